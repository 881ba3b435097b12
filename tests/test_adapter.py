"""The skipped token's adapter (apply_mindskip(..., adapter=)): the closed-form fit recovers planted maps and the
dense model's own least-squares solution, the update lands on skipped real rows only (every target, K/V rule,
granularity, kind and backend), training == inference, cached generation == recompute, checkpoints, the static
linear replacement, and bad arguments."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.adapter import AdapterStats, SkipAdapter
from mindskip_kernels.fitting import fit_replacement, fit_routers
from mindskip_kernels.integrations import hf
from mindskip_kernels.integrations.hf import mindskip_layers, record_routing
from mindskip_kernels.layer_drop import drop_sublayers, layer_drop
from mindskip_kernels.tuning import router_tune
from tests.harness import backend_params
from tests.models import (
    NEW,
    greedy,
    left_padded_prompts,
    randomize_routers,
    reference_sequence_generation,
    tiny_model,
)

KINDS = [("linear", None), ("linear", 3), ("mean", None)]
CONFIGS = [("attention", "kept"), ("attention", "all"), ("mlp", "kept"), ("block", "kept"), ("block", "all")]


def randomize_adapters(model, std: float = 0.3) -> None:
    """Random adapter weights (a fit would give the model's own; random ones make any misplaced row visible)."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in mindskip_layers(model).values():
            for p in layer.skip_adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * std / max(p.shape[-1], 1) ** 0.5 * 4)


def _routed(target="attention", kv="kept", granularity="token", kind=("linear", None), layers=(1, 2), seed=3,
            backend="auto", **kw):
    model = tiny_model("llama")
    mk.apply_mindskip(model, layers=list(layers), granularity=granularity, target=target, kv=kv, backend=backend,
                      adapter=kind[0], adapter_rank=kind[1], **kw)
    torch.manual_seed(seed)
    randomize_routers(model, std=0.7 if granularity == "token" else 4.0)
    randomize_adapters(model)
    return model


def _samples(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen, dtype=torch.float64) @ torch.randn(dim, dim, generator=gen,
                                                                                  dtype=torch.float64) * 0.3 + 0.5


# ---- the closed-form fit ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [None, 1, 4])
def test_stats_recover_a_planted_map_streamed_in_chunks(rank):
    dim = 12
    gen = torch.Generator().manual_seed(1)
    left, right = (torch.randn(dim, rank or dim, generator=gen, dtype=torch.float64),
                   torch.randn(rank or dim, dim, generator=gen, dtype=torch.float64))
    planted, bias = left @ right, torch.randn(dim, generator=gen, dtype=torch.float64)
    z = _samples(500, dim)
    u = z @ planted.T + bias
    stats = AdapterStats(dim, "cpu")
    for chunk in range(0, 500, 77):  # streamed: ragged chunks, as batches arrive
        stats.add(z[chunk : chunk + 77], u[chunk : chunk + 77])
    adapter = SkipAdapter(dim, "linear", rank, dtype=torch.float64)
    fit = stats.solve(adapter, ridge=0.0)
    assert fit.samples == 500 and fit.r2 == pytest.approx(1.0, abs=1e-9)
    torch.testing.assert_close(adapter(z), u, atol=1e-8, rtol=1e-8)
    mean = SkipAdapter(dim, "mean", dtype=torch.float64)
    assert stats.solve(mean, 0.0).r2 == 0.0
    torch.testing.assert_close(mean(z[:3]), u.mean(0).expand(3, dim))


def test_reduced_rank_is_the_best_rank_r_map():
    """Reduced-rank regression minimises the squared error among rank-r maps: no truncated SVD of the full map
    and no random rank-r map does better on the fit's data."""
    dim, rank = 10, 3
    z = _samples(400, dim, seed=2)
    gen = torch.Generator().manual_seed(3)
    u = z @ torch.randn(dim, dim, generator=gen, dtype=torch.float64).T + 0.1 * torch.randn(400, dim, generator=gen,
                                                                                            dtype=torch.float64)
    stats = AdapterStats(dim, "cpu")
    stats.add(z, u)
    full, low = (SkipAdapter(dim, "linear", r, dtype=torch.float64) for r in (None, rank))
    stats.solve(full, 0.0)
    fit = stats.solve(low, 0.0)

    def error(predicted: torch.Tensor) -> float:  # centred: the intercept is fit separately
        predicted = predicted.detach()
        centred = (u - predicted) - (u - predicted).mean(0)
        return float(centred.square().sum())

    best = error(low(z))
    assert fit.r2 == pytest.approx(1 - best / float((u - u.mean(0)).square().sum()), abs=1e-9)
    uu, s, vh = torch.linalg.svd(full.proj.weight.detach())
    truncated = (uu[:, :rank] * s[:rank]) @ vh[:rank]
    assert best < error(z @ truncated.T) - 1e-6
    up, down = low.up.weight.detach(), low.down.weight.detach()
    for seed in range(5):  # rank-r maps near the solution
        g = torch.Generator().manual_seed(seed)
        w = ((up + 0.01 * torch.randn(up.shape, generator=g, dtype=torch.float64))
             @ (down + 0.01 * torch.randn(down.shape, generator=g, dtype=torch.float64)))
        assert best <= error(z @ w.T)


@pytest.mark.parametrize("target", ["attention", "mlp", "block"])
def test_fit_routers_solves_the_dense_models_least_squares(target):
    """In one label pass with the routers: the adapter equals the least-squares map (intercept, no ridge) of the
    target's dense update on its RMSNorm output over the real tokens after the sinks, with padding in batches."""
    model = mk.apply_mindskip(tiny_model("llama"), layers=[2], target=target, adapter="linear", sink_tokens=1)
    model.double()
    gen = torch.Generator().manual_seed(4)
    items = [{"input_ids": (ids := torch.randint(1, 97, (n,), generator=gen)), "labels": ids}
             for n in (30, 17, 25, 9, 30, 22, 28, 14, 30, 26)]
    zs, us = [], []
    layer = model.model.layers[2]
    norm = layer.post_attention_layernorm if target == "mlp" else layer.input_layernorm
    with torch.no_grad(), hf.dense_forward(model):
        def collect(i: int, x: torch.Tensor, y: torch.Tensor) -> None:  # one unpadded item: all but the sink
            zs.append(norm(x)[0, 1:])
            us.append((y - x)[0, 1:])

        with hf.observe_sublayers(model, {2: target}, collect):
            for it in items:
                model(it["input_ids"].unsqueeze(0), use_cache=False)
    z, u = torch.cat(zs), torch.cat(us)
    design = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)
    solution = torch.linalg.lstsq(design, u).solution
    fit = fit_routers(model, items, batch_size=3, ridge=0.0, progress=False)
    adapter = layer.skip_adapter
    torch.testing.assert_close(adapter.proj.weight, solution[:-1].T, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(adapter.proj.bias, solution[-1], atol=1e-7, rtol=1e-6)
    assert fit.layers[2].adapter.samples == len(z) and 0.0 < fit.layers[2].adapter.r2 <= 1.0
    only = mk.apply_mindskip(tiny_model("llama").double(), layers=[2], target=target, adapter="linear", sink_tokens=1)
    fit_routers(only, items, batch_size=3, ridge=0.0, routers=False, progress=False)
    assert torch.equal(only.model.layers[2].router.weight, torch.zeros_like(layer.router.weight))
    torch.testing.assert_close(only.model.layers[2].skip_adapter.proj.weight, adapter.proj.weight)


# ---- where the update lands ---------------------------------------------------------------------------------------

def _finish(layer, target: str, h: torch.Tensor) -> torch.Tensor:
    return h + layer.mlp(layer.post_attention_layernorm(h)) if target == "attention" else h


@pytest.mark.parametrize("backend", backend_params("cpu"))
@pytest.mark.parametrize("kind", KINDS, ids=["full", "rank3", "mean"])
@pytest.mark.parametrize("granularity", ["token", "sequence"])
@pytest.mark.parametrize(("target", "kv"), CONFIGS)
def test_adapter_updates_the_skipped_real_rows_only(target, kv, granularity, kind, backend):
    """One routed layer, left-padded batch: kept rows and padding are exactly what the model without the adapter
    computes; a skipped real row is the target's input y plus adapter(norm(y)) (then the attention target's MLP)."""
    if kv == "all" and granularity == "sequence":
        pytest.skip('kv="all" is token routing')
    if backend == "triton" and kind != ("linear", 3):
        pytest.skip("Triton's interpreter is slow: one adapter kind")
    model = _routed(target, kv, granularity, kind, layers=(2,), backend=backend)
    plain = copy.deepcopy(model)
    del plain.model.layers[2].skip_adapter
    ids, mask = left_padded_prompts([11, 7, 4], seed=2)
    with torch.no_grad(), record_routing(model) as rec:
        states = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        plain_states = plain(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    x, out, none = states[2], states[3], plain_states[3]
    assert torch.equal(x, plain_states[2])
    keep, real = rec.entries[0].keep, mask.bool()
    skipped = ~keep & real
    assert skipped.any() and (keep & real).any(), "routing should be mixed"
    torch.testing.assert_close(out[keep | ~real], none[keep | ~real], rtol=0, atol=1e-6)
    layer = model.model.layers[2]
    y = none if target == "mlp" else x  # the stream entering the target (the MLP target: after dense attention)
    norm = layer.post_attention_layernorm if target == "mlp" else layer.input_layernorm
    with torch.no_grad():
        expect = _finish(layer, target, y + layer.skip_adapter(norm(y)))
    torch.testing.assert_close(out[skipped], expect[skipped], rtol=1e-5, atol=2e-6)
    assert (out[skipped] - none[skipped]).abs().max() > 1e-3, "the adapter should change skipped rows"


@pytest.mark.parametrize("backend", backend_params("cpu", reference=False))
@pytest.mark.parametrize(("target", "kv"), CONFIGS)
def test_every_backend_equals_the_reference(target, kv, backend):
    ids, mask = left_padded_prompts([13, 6, 9], seed=4)
    with torch.no_grad():
        ref = _routed(target, kv, kind=("linear", 3), backend="reference")(ids, attention_mask=mask).logits
        out = _routed(target, kv, kind=("linear", 3), backend=backend)(ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)


# ---- training, generation, checkpoints ----------------------------------------------------------------------------

@pytest.mark.parametrize("rule", hf.RULES)
@pytest.mark.parametrize("granularity", ["token", "sequence"])
@pytest.mark.parametrize(("target", "kv"), CONFIGS)
def test_training_forward_equals_inference_and_gradients_flow(target, kv, granularity, rule):
    if kv == "all" and (granularity == "sequence" or rule == "paper"):
        pytest.skip('kv="all": token routing, every-token forward')
    model = _routed(target, kv, granularity, ("linear", 3), layers=(0, 1, 2))
    for layer in mindskip_layers(model).values():
        layer.mindskip.rule = rule
    for name, p in model.named_parameters():
        p.requires_grad_(".router." in name or ".skip_adapter." in name)
    ids, mask = left_padded_prompts([15, 9, 12, 15], seed=5)
    with torch.no_grad():
        expect = model(ids, attention_mask=mask).logits
    model.train()
    with record_routing(model) as rec:
        out = model(ids, attention_mask=mask, labels=ids)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], expect[real], atol=3e-5, rtol=1e-5)
    out.loss.backward()
    skipping = [e.layer_idx for e in rec.entries if (~e.keep & e.real).any()]
    assert skipping, "some layer should skip tokens"
    for i in skipping:
        layer = model.model.layers[i]
        assert layer.router.weight.grad.abs().sum() > 0, f"layer {i}: no router gradient"
        grads = [p.grad for p in layer.skip_adapter.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("backend", backend_params("cpu", skip={"triton": "the interpreter is slow: see "
                                                                           "test_every_backend_equals_the_reference"}))
@pytest.mark.parametrize("host_compact", [True, False], ids=["cpu-path", "device-path"])
@pytest.mark.parametrize(("target", "kv"), CONFIGS)
def test_cached_generation_equals_recompute(target, kv, host_compact, backend):
    model = _routed(target, kv, kind=("linear", 3), layers=(0, 1, 2), backend=backend, host_compact=host_compact)
    ids, mask = left_padded_prompts([9, 5, 2], seed=5)
    torch.testing.assert_close(greedy(model, ids, mask, use_cache=True), greedy(model, ids, mask, use_cache=False),
                               rtol=0, atol=0)


@pytest.mark.parametrize("host_compact", [True, False], ids=["cpu-path", "device-path"])
@pytest.mark.parametrize("target", ["attention", "block"])
def test_sequence_granularity_generation_reuses_the_decision(target, host_compact):
    model = _routed(target, "kept", "sequence", ("mean", None), layers=(0, 1, 2), host_compact=host_compact)
    ids, mask = left_padded_prompts([8, 6, 3], seed=1)
    cached = greedy(model, ids, mask, use_cache=True)
    for b in range(ids.shape[0]):
        assert torch.equal(cached[b, ids.shape[1]:], reference_sequence_generation(model, ids[b][mask[b].bool()]))


def test_batch_one_decode_reads_the_adapter_weights_only_when_skipped(monkeypatch):
    """The device path at batch 1: the adapter's projections go through the predicated GEMV with the skip flag."""
    from mindskip_kernels.integrations.hf import forward

    model = _routed("block", "all", kind=("linear", 3), layers=(1, 2), host_compact=False, backend="compiled")
    flags = []
    real = forward.decode_projection

    def spy(backend, keep, like):
        flags.append(keep.clone())
        return real(backend, keep, like)

    monkeypatch.setattr(forward, "decode_projection", spy)
    ids, mask = left_padded_prompts([6], seed=2)
    greedy(model, ids, mask, use_cache=True)
    # per routed layer and step: the layer's projections predicated on keep, then the adapter's on not keep
    assert len(flags) == 2 * 2 * (NEW - 1)
    assert all(torch.equal(a, ~b) for a, b in zip(flags[0::2], flags[1::2], strict=True))
    assert any(bool(f.all()) for f in flags[1::2]) and any(not bool(f.any()) for f in flags[1::2])


def test_save_load_round_trip_and_refusals(tmp_path):
    model = _routed("block", "all", kind=("linear", 3), layers=(1, 2))
    mk.apply_mindskip(model, layers=[0], target="block", kv="all")  # layer 0 without an adapter
    mk.save_routers(model, tmp_path / "r")
    meta = json.loads((tmp_path / "r" / hf.META_FILE).read_text())
    assert meta["adapters"] == {"1": {"kind": "linear", "rank": 3}, "2": {"kind": "linear", "rank": 3}}
    fresh = mk.load_routers(tiny_model("llama"), tmp_path / "r")
    assert not hasattr(fresh.model.layers[0], "skip_adapter")
    ids, mask = left_padded_prompts([9, 4], seed=3)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                                   rtol=0, atol=0)
    # a directory's routers carry their adapters: one saved without removes a layer's adapter
    bare = mk.apply_mindskip(tiny_model("llama"), layers=[0, 1, 2], target="block", kv="all")
    mk.save_routers(bare, tmp_path / "plain")
    mk.load_routers(fresh, tmp_path / "plain")
    assert not any(hasattr(layer, "skip_adapter") for layer in mindskip_layers(fresh).values())
    # tampered: the metadata says rank 5, the tensors are rank 3 -> refused, the model untouched
    meta["adapters"]["2"]["rank"] = 5
    (tmp_path / "r" / hf.META_FILE).write_text(json.dumps(meta))
    target = _routed("block", "all", kind=("mean", None), layers=(1, 2))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="adapter of layer 2 does not match its metadata"):
        mk.load_routers(target, tmp_path / "r")
    after = target.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(adapter="quadratic"), "adapter must be None or one of"),
    (dict(adapter="linear", adapter_rank=0), "adapter_rank must be None"),
    (dict(adapter="linear", adapter_rank=49), r"adapter_rank must be None \(full rank\) or an int in \[1, 48\]"),
    (dict(adapter="linear", adapter_rank=True), "adapter_rank must be None"),
    (dict(adapter="mean", adapter_rank=4), 'adapter_rank needs adapter="linear"'),
    (dict(adapter_rank=4), 'adapter_rank needs adapter="linear"'),
])
def test_bad_adapter_arguments_are_refused_before_patching(kwargs, match):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        mk.apply_mindskip(model, **kwargs)
    assert not mindskip_layers(model)


def test_repatching_keeps_a_fit_of_the_same_kind_and_replaces_another():
    model = _routed("attention", "kept", kind=("linear", 3), layers=(1,))
    fitted = model.model.layers[1].skip_adapter
    mk.apply_mindskip(model, layers=[1], adapter="linear", adapter_rank=3, threshold=0.3)
    assert model.model.layers[1].skip_adapter is fitted
    mk.apply_mindskip(model, layers=[1], adapter="mean")
    assert model.model.layers[1].skip_adapter.kind == "mean"
    assert not model.model.layers[1].skip_adapter.bias.any()
    mk.apply_mindskip(model, layers=[1])
    assert not hasattr(model.model.layers[1], "skip_adapter")


def test_router_tune_freezes_the_adapters_unless_asked(tokenizer):
    from tests.models import RECORDS, tiny_llama

    def run(**kw):
        model = mk.apply_mindskip(tiny_llama(len(tokenizer)), layers=[1, 2], target="block", kv="all",
                                  adapter="linear", adapter_rank=2)
        randomize_adapters(model)
        before = {i: [p.clone() for p in layer.skip_adapter.parameters()]
                  for i, layer in mindskip_layers(model).items()}
        router_tune(model, RECORDS, tokenizer, keep=0.5, steps=3, batch_size=2, lr=1e-2, progress=False, **kw)
        return [torch.equal(a, b) for i, layer in mindskip_layers(model).items()
                for a, b in zip(before[i], layer.skip_adapter.parameters(), strict=True)]

    assert all(run())
    assert not any(run(tune_adapters=True))
    with pytest.raises(ValueError, match="tune_adapters=True, but no routed layer has a skipped-token adapter"):
        router_tune(mk.apply_mindskip(tiny_llama(len(tokenizer)), layers=[1]), RECORDS, tokenizer, steps=1,
                    tune_adapters=True, progress=False)


# ---- the static linear replacement ----------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["attention", "mlp", "block"])
def test_static_linear_replacement_runs_the_fitted_map_on_every_token(target):
    dense = tiny_model("llama")
    gen = torch.Generator().manual_seed(6)
    items = [{"input_ids": (ids := torch.randint(1, 97, (24,), generator=gen)), "labels": ids} for _ in range(12)]
    maps = fit_replacement(dense, items, [1, 2], target=target, progress=False)
    replaced = drop_sublayers(copy.deepcopy(dense), [1, 2], target, maps)
    dropped = drop_sublayers(copy.deepcopy(dense), [1, 2], target)
    ids = items[0]["input_ids"].unsqueeze(0)
    with torch.no_grad():
        states = replaced(ids, output_hidden_states=True).hidden_states
        true = dense(ids, output_hidden_states=True).hidden_states
        plain = dropped(ids, output_hidden_states=True).hidden_states
    layer = replaced.model.layers[1]
    with torch.no_grad():
        y = states[1] if target != "mlp" else plain_attention(dense.model.layers[1], states[1], dense)
        norm = layer.post_attention_layernorm if target == "mlp" else layer.input_layernorm
        expect = _finish(layer, target, y + maps[1](norm(y)))
    torch.testing.assert_close(states[2], expect, rtol=1e-5, atol=1e-6)
    # on the data it was fit on, the map is closer to the dense layer than dropping it
    assert (states[3] - true[3]).norm() < (plain[3] - true[3]).norm()
    with pytest.raises(ValueError, match="replacement must map exactly the dropped layers"):
        drop_sublayers(copy.deepcopy(dense), [1, 2], target, {1: maps[1]})
    model = copy.deepcopy(dense)
    chosen = layer_drop(model, items, target=target, n=1, adapter="linear", adapter_rank=4)
    assert model.model.layers[chosen[0]].skip_adapter.rank == 4


def plain_attention(layer, x: torch.Tensor, model) -> torch.Tensor:
    """x + Attn(LN1 x) of one unpadded sequence (the MLP target's stream before the MLP)."""
    pos = torch.arange(x.shape[1]).unsqueeze(0)
    attn, _ = layer.self_attn(layer.input_layernorm(x), attention_mask=None,
                              position_embeddings=model.model.rotary_emb(x, pos))
    return x + attn


@pytest.mark.parametrize("target", ["attention", "mlp", "block"])
def test_nothing_skipped_is_dense_and_everything_skipped_is_the_static_replacement(target):
    """Threshold 0: the adapter never runs (the dense model exactly); threshold 1: every token takes the adapter,
    which is the static linear replacement of drop_sublayers with the same maps."""
    model = _routed(target, "kept", kind=("linear", 3), layers=(1, 2))
    dense = tiny_model("llama")
    ids, mask = left_padded_prompts([10, 6], seed=7)
    maps = {i: copy.deepcopy(model.model.layers[i].skip_adapter) for i in (1, 2)}
    replaced = drop_sublayers(tiny_model("llama"), [1, 2], target, maps)
    with torch.no_grad():
        real = mask.bool()  # padding rows pass a routed block / MLP unchanged: not compared
        hf.set_thresholds(model, 0.0)
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real],
                                   dense(ids, attention_mask=mask).logits[real], rtol=1e-5, atol=2e-5)
        hf.set_thresholds(model, 1.0)
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real],
                                   replaced(ids, attention_mask=mask).logits[real], rtol=1e-5, atol=2e-5)


def test_cli_tune_fits_saves_and_loads_the_adapters(tmp_path, saved_model):
    from mindskip_kernels.cli import main
    from mindskip_kernels.integrations.hf import load_model
    from tests.models import RECORDS

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS))
    out = tmp_path / "fit"
    main(["tune", "--method", "fit", "--model", str(saved_model), "--data", str(data), "--layers", "2", "--keep",
          "0.5", "--target", "block", "--adapter", "linear", "--adapter-rank", "4", "--batch-size", "2", "--out",
          str(out)])
    meta = json.loads((out / hf.META_FILE).read_text())
    assert meta["adapters"] == {"1": {"kind": "linear", "rank": 4}, "2": {"kind": "linear", "rank": 4}}
    assert meta["tuning"]["adapter"] == "linear" and set(meta["tuning"]["fit"]["adapter_r2"]) == {"1", "2"}
    model, _ = load_model(saved_model)
    mk.load_routers(model, out)
    assert all(layer.skip_adapter.rank == 4 and layer.skip_adapter.up.weight.abs().sum() > 0
               for layer in mindskip_layers(model).values())
    with pytest.raises(SystemExit, match="2"):
        main(["tune", "--model", str(saved_model), "--data", str(data), "--adapter", "mean", "--adapter-rank", "4",
              "--out", str(tmp_path / "x")])
