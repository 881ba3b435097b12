"""Router fitting: the least-squares solve, the streaming and multi-process accumulation, the label hooks against
an independent recomputation, and the CLI pipeline."""

from __future__ import annotations

import json
import os

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.fitting import LeastSquares, fit_routers, fit_then_tune
from mindskip_kernels.integrations.hf import TARGETS, dense_forward, mindskip_layers, observe_sublayers
from mindskip_kernels.tuning import evaluate
from tests.models import RECORDS, TEXT, run_script, tiny_model


def test_least_squares_recovers_a_planted_router_and_streams_like_one_shot():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(500, 12, generator=gen, dtype=torch.float64)
    w_true = torch.randn(12, generator=gen, dtype=torch.float64)
    y = z @ w_true  # log u exactly linear in z
    one = LeastSquares(12, torch.device("cpu"))
    one.add(z, y)
    streamed = LeastSquares(12, torch.device("cpu"))
    for chunk in range(0, 500, 37):
        streamed.add(z[chunk : chunk + 37].float(), y[chunk : chunk + 37].float())  # fp32 in, fp64 inside
    w, fit = one.solve(ridge=0.0)
    torch.testing.assert_close(w, w_true, rtol=1e-10, atol=1e-10)
    assert fit.samples == 500 and fit.r2 == pytest.approx(1.0, abs=1e-9)
    w_streamed, _ = streamed.solve(ridge=0.0)
    oracle = torch.linalg.lstsq(z.float().double(), y.float().double().unsqueeze(1)).solution[:, 0]
    torch.testing.assert_close(w_streamed, oracle, rtol=1e-9, atol=1e-9)
    empty = LeastSquares(3, torch.device("cpu"))
    with pytest.raises(ValueError, match="no real tokens"):
        empty.solve(ridge=0.0)


def _dense_updates(model, ids: torch.Tensor, layer: int, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent recomputation of (router input z, u) at `layer` through the model's own modules."""
    base = model.model
    with dense_forward(model), torch.no_grad():
        hidden = model(ids, output_hidden_states=True, use_cache=False).hidden_states[layer]
        block = base.layers[layer]
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        rope = base.rotary_emb(hidden, pos)
        attn = block.self_attn(block.input_layernorm(hidden), position_embeddings=rope, attention_mask=None)[0]
        if target == "attention":
            return block.input_layernorm(hidden), attn.norm(dim=-1) / hidden.norm(dim=-1)
        h = hidden + attn
        mlp = block.mlp(block.post_attention_layernorm(h))
        if target == "mlp":
            return block.post_attention_layernorm(h), mlp.norm(dim=-1) / h.norm(dim=-1)
        return block.input_layernorm(hidden), (attn + mlp).norm(dim=-1) / hidden.norm(dim=-1)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_label_hooks_see_what_the_dense_model_does(arch, target):
    model = tiny_model(arch)
    mk.apply_mindskip(model, layers=[1, 2], target=target, backend="reference")
    ids = torch.randint(1, 97, (1, 11))
    seen = {}
    with dense_forward(model), observe_sublayers(model, {1: target, 2: target},
                                                 lambda i, x, y: seen.setdefault(i, (x, y))), torch.no_grad():
        model(ids, use_cache=False)
    for i in (1, 2):
        x, y = seen[i]
        z_ref, u_ref = _dense_updates(model, ids, i, target)
        layer = mindskip_layers(model)[i]
        torch.testing.assert_close(layer.mindskip.sublayer.router_norm(layer)(x), z_ref)
        torch.testing.assert_close((y - x).norm(dim=-1) / x.norm(dim=-1), u_ref, rtol=1e-4, atol=1e-6)
    assert "forward" in mindskip_layers(model)[1].__dict__, "dense_forward restores the patch"


@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_fit_routers_solves_the_label_regression_and_is_batch_independent(granularity):
    # fp64: padded and unpadded batches take different SDPA paths in the dense forward, whose fp32 rounding the
    # least-squares solve amplifies past this tolerance; in fp64 only a padding leak could move the fit
    model = tiny_model("llama").double()
    mk.apply_mindskip(model, layers=[1, 2], granularity=granularity, backend="reference")
    items = [{"input_ids": torch.randint(1, 97, (n,)), "labels": torch.randint(1, 97, (n,))} for n in (9, 5, 12, 7)]
    one = fit_routers(model, items, batch_size=4, progress=False)
    routers = {i: layer.router.weight.clone() for i, layer in mindskip_layers(model).items()}
    fit_routers(model, items, batch_size=1, progress=False)  # other padding, same samples
    for i, layer in mindskip_layers(model).items():
        torch.testing.assert_close(layer.router.weight, routers[i], rtol=1e-5, atol=1e-7)
        assert layer.router.weight.abs().sum() > 0
    expected = 33 if granularity == "token" else 4
    assert all(f.samples == expected for f in one.layers.values()) and one.seconds > 0
    assert all(0.0 < f.r2 <= 1.0 for f in one.layers.values()), one.layers
    if granularity == "token":  # attention sinks are always kept: the fit leaves them out
        mk.apply_mindskip(model, layers=[1, 2], backend="reference", sink_tokens=2)
        sunk = fit_routers(model, items, batch_size=4, progress=False)
        assert all(f.samples == 33 - 2 * 4 for f in sunk.layers.values())


def test_fit_then_tune_hits_the_keep_rate_and_refuses_bad_arguments(tokenizer):
    from tests.models import tiny_llama

    model = tiny_llama(len(tokenizer))
    mk.apply_mindskip(model, layers=2, backend="reference", sink_tokens=1)
    fit, history = fit_then_tune(model, [TEXT], tokenizer, method="fit", keep=0.5, max_length=32, progress=False)
    assert fit is not None and history == []
    assert evaluate(model, [TEXT], tokenizer, max_length=32).keep_rate == pytest.approx(0.5, abs=0.03)
    fit, history = fit_then_tune(model, [TEXT], tokenizer, method="fit+tune", keep=0.5, steps=2, max_length=32,
                                 batch_size=2, progress=False)
    assert len(history) == 2
    with pytest.raises(ValueError, match="method must be one of"):
        fit_then_tune(model, [TEXT], tokenizer, method="magic")
    with pytest.raises(ValueError, match="needs a keep rate"):
        fit_then_tune(model, [TEXT], tokenizer, method="fit", keep=None)
    with pytest.raises(ValueError, match="model has no MindSkip routers"):
        fit_routers(tiny_model("llama"), [TEXT], tokenizer)


def test_cli_fit_writes_routers_that_load_with_the_calibrated_threshold(tmp_path, saved_model, capsys):
    from mindskip_kernels.cli import main
    from mindskip_kernels.integrations.hf import load_model

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS))
    out = tmp_path / "fit"
    main(["tune", "--method", "fit", "--model", str(saved_model), "--data", str(data), "--layers", "2",
          "--keep", "0.5", "--batch-size", "2", "--backend", "reference", "--out", str(out)])
    meta = json.loads((out / "mindskip.json").read_text())
    assert meta["tuning"]["method"] == "fit" and set(meta["tuning"]["fit"]["r2"]) == {"1", "2"}
    assert "train_log.csv" not in os.listdir(out)
    model, tok = load_model(saved_model)
    mk.load_routers(model, out, backend="reference")
    assert {layer.mindskip.threshold for layer in mindskip_layers(model).values()} == {meta["threshold"]}
    assert 0.0 < meta["threshold"] < 0.5, "fitted scores are sigmoid(log u): the threshold sits below 0.5"
    with pytest.raises(SystemExit, match="2"):  # a usage error: one line on stderr (tests/test_cli_errors.py)
        main(["tune", "--method", "fit", "--model", str(saved_model), "--data", str(data), "--keep", "none",
              "--out", str(tmp_path / "x")])
    assert "mindskip tune: error: --method fit needs a --keep" in capsys.readouterr().err


def test_torchrun_fit_equals_one_process(tmp_path, saved_model):
    """Two gloo processes each read half the data; the all-reduced statistics give the one-process fit (routers
    and skipped-token adapters)."""
    data = tmp_path / "train.txt"
    data.write_text(TEXT)
    source = f"""
        import os, torch
        import mindskip_kernels as mk
        from mindskip_kernels.fitting import fit_routers
        from mindskip_kernels.integrations.hf import load_model
        model, tok = load_model({str(saved_model)!r})
        mk.apply_mindskip(model, backend="reference", adapter="linear", adapter_rank=4)
        fit_routers(model, {str(data)!r}, tok, batch_size=1, max_length=24, progress=False)
        routers = {{n: p for n, p in model.state_dict().items() if ".router." in n or ".skip_adapter." in n}}
        torch.save(routers, os.path.join({str(tmp_path)!r}, f"rank{{os.environ.get('RANK', 'single')}}.pt"))
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    """
    run_script(tmp_path / "fit.py", source, nproc=2)
    run_script(tmp_path / "fit.py", source)
    r0, r1, single = (torch.load(tmp_path / f"rank{r}.pt") for r in ("0", "1", "single"))
    assert any(".skip_adapter.down." in name for name in single)
    for name in single:
        assert torch.equal(r0[name], r1[name]), name
        torch.testing.assert_close(r0[name], single[name], rtol=1e-5, atol=1e-7)
