"""apply_mindskip(target="mlp" | "block") on tiny transformers models against an independent per-token
recomputation built from the dense model's own modules, in inference, training, save/load and generation."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.integrations import hf
from mindskip_kernels.integrations.hf import mindskip_layers, record_routing
from mindskip_kernels.integrations.hf.cache import RoutedKVLayer
from tests.harness import backend_params
from tests.models import (
    ARCHS,
    RECORDS,
    greedy,
    left_padded_prompts,
    randomize_routers,
    reference_sequence_generation,
    run_cache,
    tiny_model,
)

TARGETS = ["mlp", "block"]


def recompute_target(dense, routed: dict[int, torch.Tensor], ids: torch.Tensor, threshold: float, granularity: str,
                     target: str) -> torch.Tensor:
    """Independent forward of ONE unpadded sequence with the dense model's own modules. "mlp": the layer's
    attention for every token, then the router on post_attention_layernorm and the MLP on the kept tokens
    only. "block": the router on input_layernorm; the kept tokens run the layer's attention among themselves
    (its own causal SDPA, RoPE at their original positions) and then the MLP; skipped tokens pass unchanged."""
    base = dense.model
    h = base.embed_tokens(ids)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    for i, layer in enumerate(base.layers):
        if i not in routed:
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=base.rotary_emb(h, pos))
            continue
        if target == "mlp":
            attn_out, _ = layer.self_attn(layer.input_layernorm(h), position_embeddings=base.rotary_emb(h, pos),
                                          attention_mask=None)
            h = h + attn_out
            z = layer.post_attention_layernorm(h)
        else:
            z = layer.input_layernorm(h)
        score = torch.sigmoid(z[0] @ routed[i][0]) if granularity == "token" else torch.sigmoid(
            z[0].mean(0) @ routed[i][0])
        kept = torch.nonzero((score >= threshold).expand(ids.shape[1])).squeeze(1)
        h = h.clone()
        if not kept.numel():
            continue
        if target == "mlp":
            h[:, kept] = h[:, kept] + layer.mlp(z[:, kept])
        else:
            zk = z[:, kept]
            attn_out, _ = layer.self_attn(zk, position_embeddings=base.rotary_emb(zk, kept.unsqueeze(0)),
                                          attention_mask=None)
            hk = h[:, kept] + attn_out
            h[:, kept] = hk + layer.mlp(layer.post_attention_layernorm(hk))
    return dense.lm_head(base.norm(h))


def _left_padded(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), 3, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, n - len(s):], mask[b, n - len(s):] = s, 1
    return ids, mask, (mask.cumsum(1) - 1).clamp_min(0)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_target_matches_independent_recompute_with_left_padding(arch, target, granularity):
    model = tiny_model(arch)
    dense = copy.deepcopy(model)
    mk.apply_mindskip(model, layers=[0, 2], granularity=granularity, target=target)
    torch.manual_seed(1)
    randomize_routers(model, std=4.0)
    routed = {i: layer.router.weight.detach() for i, layer in mindskip_layers(model).items()}
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 97, (n,), generator=gen) for n in (13, 9, 4, 11, 6, 13)]
    ids, mask, pos = _left_padded(seqs)
    with torch.no_grad(), record_routing(model) as rec:
        result = model(ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        out, states = result.logits, result.hidden_states
        for b, s in enumerate(seqs):
            expect = recompute_target(dense, routed, s.unsqueeze(0), 0.5, granularity, target)
            torch.testing.assert_close(out[b][mask[b].bool()], expect[0], atol=3e-5, rtol=1e-5)
    kept = torch.cat([(e.keep & e.real)[e.real] for e in rec.entries])
    assert kept.any() and not kept.all(), "routing should be mixed"
    if target == "block":  # skipped rows (padding included) leave the block bit-identical
        for e in rec.entries:
            skipped = ~e.keep
            assert torch.equal(states[e.layer_idx + 1][skipped], states[e.layer_idx][skipped])


@pytest.mark.parametrize("target", TARGETS)
def test_skipped_rows_pass_the_target_unchanged(target):
    """threshold 1 skips everything: "block" layers are the identity (bit-identical), "mlp" layers are the
    dense layer's attention sub-layer alone."""
    model = tiny_model("qwen2")
    dense = copy.deepcopy(model)
    mk.apply_mindskip(model, layers=[1, 2], threshold=1.0, target=target)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
        dense_states = dense(ids, output_hidden_states=True).hidden_states
    for i in (1, 2):
        if target == "block":
            assert torch.equal(states[i + 1], states[i])
        else:
            layer = dense.model.layers[i]
            pos = torch.arange(9).unsqueeze(0)
            attn, _ = layer.self_attn(layer.input_layernorm(states[i]), attention_mask=None,
                                      position_embeddings=dense.model.rotary_emb(states[i], pos))
            torch.testing.assert_close(states[i + 1], states[i] + attn, atol=1e-6, rtol=1e-6)
    assert torch.equal(states[1], dense_states[1])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_fused_norm_equals_the_models_own_norm(target, granularity):
    model = tiny_model("mistral")
    mk.apply_mindskip(model, layers=[0, 1, 2], granularity=granularity, target=target)
    randomize_routers(model, std=4.0)
    ids, mask = left_padded_prompts([10, 7, 3], 4)
    outs = []
    for fused in (True, False):
        for layer in mindskip_layers(model).values():
            layer.mindskip.fuse_norm = fused
        with torch.no_grad():
            outs.append(model(ids, attention_mask=mask).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("target", TARGETS)
def test_threshold_zero_is_dense(target):
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        dense = model(ids).logits
        mk.apply_mindskip(model, threshold=0.0, target=target, backend="reference")
        torch.testing.assert_close(model(ids).logits, dense, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("target", ["attention", *TARGETS])
@pytest.mark.parametrize("rule", hf.RULES)
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_training_forward_equals_inference_and_routers_get_gradients(target, rule, granularity):
    model = tiny_model("llama")
    mk.apply_mindskip(model, layers=[0, 1, 2], granularity=granularity, target=target)
    torch.manual_seed(3)
    randomize_routers(model, std=0.5 if granularity == "token" else 4.0)
    for layer in mindskip_layers(model).values():
        layer.mindskip.rule = rule
    for name, p in model.named_parameters():
        p.requires_grad_(".router." in name)
    ids = torch.randint(0, 97, (4, 15), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), record_routing(model) as rec:
        expect = model(ids).logits
    model.train()
    with record_routing(model) as train_rec:
        out = model(ids, labels=ids)
    for a, b in zip(rec.entries, train_rec.entries, strict=True):
        assert torch.equal(a.keep, b.keep)
    torch.testing.assert_close(out.logits, expect, atol=3e-5, rtol=1e-5)
    (out.loss + 0.01 * train_rec.training_keep_rates().sum()).backward()
    for i, layer in mindskip_layers(model).items():
        g = layer.router.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, f"layer {i} router gradient {g}"
    assert all(p.grad is None for n, p in model.named_parameters() if ".router." not in n)


def test_save_load_records_the_target_and_refuses_a_mismatch(tmp_path):
    model = tiny_model("llama")
    mk.apply_mindskip(model, layers=[1, 2], threshold=0.4, target="block")
    mk.apply_mindskip(model, layers=[0], target="mlp")
    randomize_routers(model)
    mk.save_routers(model, tmp_path / "r")
    meta = json.loads((tmp_path / "r" / hf.META_FILE).read_text())
    assert meta["targets"] == {"0": "mlp", "1": "block", "2": "block"}
    fresh = mk.load_routers(tiny_model("llama"), tmp_path / "r")
    assert {i: layer.mindskip.target for i, layer in mindskip_layers(fresh).items()} == {0: "mlp", 1: "block",
                                                                                            2: "block"}
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
    other = mk.apply_mindskip(tiny_model("llama"), layers=[1, 2], target="attention")
    before = {i: layer.router.weight.clone() for i, layer in mindskip_layers(other).items()}
    with pytest.raises(ValueError, match="target mismatch.*'block'.*'attention'"):
        mk.load_routers(other, tmp_path / "r")
    assert all(torch.equal(before[i], layer.router.weight) and layer.mindskip.target == "attention"
               for i, layer in mindskip_layers(other).items())
    assert set(mindskip_layers(other)) == {1, 2}, "a refused load leaves the model as it was"


def test_files_without_targets_route_attention(tmp_path):
    model = tiny_model("llama")
    mk.apply_mindskip(model, layers=[1, 2])
    mk.save_routers(model, tmp_path / "old")
    meta_file = tmp_path / "old" / hf.META_FILE
    meta = json.loads(meta_file.read_text())
    del meta["targets"]  # written before targets existed
    meta_file.write_text(json.dumps(meta))
    from safetensors.torch import save_file
    save_file({"model.layers.1.router.weight": torch.zeros(1, 48)}, str(tmp_path / "paper.safetensors"))
    for path in (tmp_path / "old", tmp_path / "paper.safetensors"):
        loaded = mk.load_routers(tiny_model("llama"), path)
        assert {layer.mindskip.target for layer in mindskip_layers(loaded).values()} == {"attention"}
    with pytest.raises(ValueError, match="target mismatch"):
        mk.load_routers(mk.apply_mindskip(tiny_model("llama"), layers=[1], target="mlp"), tmp_path / "old")
    kept = mk.load_routers(mk.apply_mindskip(tiny_model("llama"), layers=[1], target="mlp"),
                           tmp_path / "paper.safetensors")  # a bare file keeps an existing patch's target
    assert mindskip_layers(kept)[1].mindskip.target == "mlp"


def test_bad_target_raises_naming_the_argument():
    model = tiny_model("llama")
    for bad in ("attn", "MLP", None, 1):
        with pytest.raises(ValueError, match="target must be one of"):
            mk.apply_mindskip(model, target=bad)
    assert not mindskip_layers(model)


def test_block_cache_holds_only_kept_tokens_and_mlp_layers_a_dense_one():
    model = mk.apply_mindskip(tiny_model("llama"), layers=[0], target="mlp")
    mk.apply_mindskip(model, layers=[1], target="block")
    mk.apply_mindskip(model, layers=[2], target="attention")
    randomize_routers(model)
    ids, mask = left_padded_prompts([12, 9, 5])
    with record_routing(model) as rec:
        cache = run_cache(model, ids, mask)
    assert [isinstance(layer, RoutedKVLayer) for layer in cache.layers] == [False, True, True, False]
    assert cache.layers[0].keys.shape[2] == ids.shape[1] + 6, "the MLP target's attention caches every position"
    kept = {i: sum(((e.keep & e.real).sum(1) for e in rec.entries if e.layer_idx == i), torch.zeros(3)).tolist()
            for i in (1, 2)}
    for i in (1, 2):
        assert cache.layers[i].lengths.tolist() == kept[i] and 0 < sum(kept[i]) < mask.sum() + 3 * 6


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("host_compact", [True, False])
def test_token_granularity_cached_generation_equals_recompute(arch, target, host_compact, monkeypatch):
    model = tiny_model(arch)
    mk.apply_mindskip(model, layers=[0, 2], target=target, host_compact=host_compact)
    torch.manual_seed(2)
    randomize_routers(model)
    ids, mask = left_padded_prompts([9, 5, 2], 1)
    cached = greedy(model, ids, mask, use_cache=True)
    with torch.no_grad(), record_routing(model) as rec:
        model(cached, attention_mask=torch.cat([mask, torch.ones_like(cached[:, ids.shape[1]:])], 1),
              use_cache=False)
    kept = torch.cat([(e.keep & e.real)[e.real] for e in rec.entries])
    assert kept.any() and not kept.all(), "routing of the generated sequences should be mixed"
    torch.testing.assert_close(cached, greedy(model, ids, mask, use_cache=False), rtol=0, atol=0)


@pytest.mark.parametrize("target", TARGETS)
def test_sequence_granularity_generation_reuses_prefill_decision(target):
    model = tiny_model("llama")
    mk.apply_mindskip(model, layers=[0, 1, 2], granularity="sequence", target=target)
    torch.manual_seed(0)
    randomize_routers(model, std=4.0)
    ids, mask = left_padded_prompts([8, 6, 3], 0)
    cached = greedy(model, ids, mask, use_cache=True)
    decisions = set()
    for b in range(ids.shape[0]):
        prompt = ids[b][mask[b].bool()]
        with torch.no_grad(), record_routing(model) as rec:
            model(prompt.unsqueeze(0), use_cache=False)
        decisions |= {bool(e.keep.any()) for e in rec.entries}
        assert torch.equal(cached[b, ids.shape[1]:], reference_sequence_generation(model, prompt)), f"sequence {b}"
    assert decisions == {True, False}, "some layers should keep and some skip"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("rule", hf.RULES)
def test_router_tune_trains_every_target(target, rule):
    from mindskip_kernels.tuning import evaluate, router_tune

    model = tiny_model("llama")
    mk.apply_mindskip(model, target=target, backend="reference")
    gen = torch.Generator().manual_seed(0)
    items = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 97, (16, 12), generator=gen)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = router_tune(model, items, keep=0.5, rule=rule, steps=6, batch_size=4, lr=1e-2, calibration_items=8,
                          progress=False)
    assert len(history) == 6 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    after = model.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == {f"model.layers.{i}.router.weight"
                                                                          for i in (1, 2)}
    assert abs(evaluate(model, items[:8]).keep_rate - 0.5) <= 0.1, "calibrated to the keep rate asked for"


def test_cli_tune_target(tmp_path, request):
    from mindskip_kernels.cli import main

    model_dir = request.getfixturevalue("saved_model")  # conftest's tiny Llama and trained tokenizer
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS))
    out = tmp_path / "run"
    main(["tune", "--model", str(model_dir), "--data", str(data), "--layers", "2", "--steps", "2", "--keep", "0.5",
          "--batch-size", "2", "--backend", "reference", "--target", "block", "--out", str(out)])
    meta = json.loads((out / hf.META_FILE).read_text())
    assert meta["targets"] == {"1": "block", "2": "block"} and meta["tuning"]["target"] == "block"
    with pytest.raises(SystemExit):
        main(["tune", "--model", str(model_dir), "--data", str(data), "--target", "ffn", "--out", str(tmp_path)])


@pytest.mark.parametrize("backend", backend_params("cpu"))
@pytest.mark.parametrize("target", TARGETS)
def test_every_backend_matches_the_reference_and_generates_like_recompute(backend, target, monkeypatch):
    """Prefill logits of each backend against the reference backend, and cached greedy decoding (the device
    path, which the interpreter's Triton takes) == recomputation, through each backend's kernels."""
    models = {}
    for name in ("reference", backend):  # the device path, which the interpreter's Triton takes
        models[name] = mk.apply_mindskip(tiny_model("qwen3"), layers=[0, 2], target=target, backend=name,
                                         host_compact=False)
        torch.manual_seed(6)
        randomize_routers(models[name])
    ids, mask = left_padded_prompts([9, 5, 2], 6)
    with torch.no_grad():
        expect, got = (models[name](ids, attention_mask=mask).logits for name in ("reference", backend))
    torch.testing.assert_close(got, expect, atol=3e-5, rtol=1e-5)
    cached = greedy(models[backend], ids, mask, use_cache=True)
    torch.testing.assert_close(cached, greedy(models[backend], ids, mask, use_cache=False), rtol=0, atol=0)
