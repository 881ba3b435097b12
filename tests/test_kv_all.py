"""kv="all" (skip the query, keep the keys), end to end on real tiny models: against an oracle that shares no code
with the routed path (the plain transformers model with each skipped token's attention update, or whole block,
zeroed by forward hooks), train mode against eval mode, cached generation against recomputation, what the cache
holds, and the settings' checks and persistence."""

from __future__ import annotations

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.integrations.hf import load_routers, mindskip_layers, record_routing, save_routers
from mindskip_kernels.tuning import router_tune
from tests.harness import backend_params
from tests.models import (
    ARCHS,
    RECORDS,
    greedy,
    left_padded_prompts,
    randomize_routers,
    run_cache,
    tiny_llama,
    tiny_model,
)

ROUTED = [1, 2]


def _patched(arch: str = "llama", target: str = "attention", backend: str = "auto", sink_tokens: int = 1,
             seed: int = 3, **kwargs):
    model = tiny_model(arch)
    mk.apply_mindskip(model, layers=ROUTED, backend=backend, target=target, kv="all", sink_tokens=sink_tokens,
                      **kwargs)
    torch.manual_seed(seed)
    randomize_routers(model, std=3.0)
    return model


def _oracle_logits(arch: str, routed, target: str, ids, mask, sink_tokens: int) -> torch.Tensor:
    """The dense model (same weights) whose routed layers keep a token's attention update (attention target) or
    whole block update (block target) iff sigmoid(router(LN1 x)) >= threshold or it is a sink; nothing else
    changes, so every token's K/V are the dense model's of its (routed) stream."""
    dense = tiny_model(arch)
    layers = dense.model.layers
    first = (mask.cumsum(1) - 1 < sink_tokens) & (mask != 0)
    handles, stream = [], {}

    def decision(i: int, z: torch.Tensor) -> torch.Tensor:
        state = routed[i].mindskip
        return (torch.sigmoid(routed[i].router(z).float())[..., 0] >= state.threshold) | first

    for i in routed:
        if target == "attention":
            def attn_hook(module, args, kwargs, out, i=i):
                keep = decision(i, kwargs["hidden_states"])
                return (out[0] * keep.unsqueeze(-1).to(out[0].dtype), *out[1:])
            handles.append(layers[i].self_attn.register_forward_hook(attn_hook, with_kwargs=True))
        else:
            def pre(module, args, kwargs, i=i):
                stream[i] = kwargs.get("hidden_states", args[0] if args else None)

            def block_hook(module, args, kwargs, out, i=i):
                x = stream.pop(i)
                y = out[0] if isinstance(out, tuple) else out
                keep = decision(i, module.input_layernorm(x)).unsqueeze(-1)
                y = torch.where(keep, y, x)
                return (y, *out[1:]) if isinstance(out, tuple) else y
            handles.append(layers[i].register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layers[i].register_forward_hook(block_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            return dense(ids, attention_mask=mask).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("target", ["attention", "block"])
@pytest.mark.parametrize("sink_tokens", [0, 1])
def test_matches_the_zeroed_update_oracle(arch, target, sink_tokens):
    """Left-padded batch, mixed routing: the routed model's logits are the dense model's with the skipped tokens'
    updates zeroed (their K/V still written) - exactly what kv="all" means."""
    model = _patched(arch, target, sink_tokens=sink_tokens)
    ids, mask = left_padded_prompts([11, 6, 14], seed=1)
    with torch.no_grad(), record_routing(model) as rec:
        out = model(ids, attention_mask=mask).logits
    rates = rec.keep_rates()
    assert all(0.1 < r < 0.9 for r in rates.values()), f"routing should be mixed, got {rates}"
    expect = _oracle_logits(arch, mindskip_layers(model), target, ids, mask, sink_tokens)
    real = mask.bool()
    torch.testing.assert_close(out[real], expect[real], rtol=1e-5, atol=1e-5)


def test_the_oracle_tells_the_rules_apart():
    """The oracle is not blind: kv="kept" (skipped tokens are no one's key) gives other logits."""
    model = _patched()
    ids, mask = left_padded_prompts([11, 6, 14], seed=1)
    expect = _oracle_logits("llama", mindskip_layers(model), "attention", ids, mask, 1)
    mk.apply_mindskip(model, layers=ROUTED, kv="kept", sink_tokens=1)
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
    assert (out - expect)[mask.bool()].abs().max() > 1e-3


@pytest.mark.parametrize("backend", backend_params("cpu"))
@pytest.mark.parametrize("target", ["attention", "block"])
def test_every_backend_agrees_with_the_reference(backend, target):
    model = _patched(target=target, backend=backend)
    ids, mask = left_padded_prompts([13, 1, 7], seed=2)
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
    for layer in mindskip_layers(model).values():
        layer.mindskip.backend = "reference"
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["attention", "block"])
def test_train_forward_is_the_inference_forward_and_routers_learn(target):
    """Train mode (dense attention for every token, hard gate straight-through) gives eval mode's logits, and
    every router gets a gradient."""
    model = _patched(target=target)
    ids, mask = left_padded_prompts([10, 4, 12], seed=3)
    with torch.no_grad():
        eval_logits = model(ids, attention_mask=mask).logits
    model.train()
    for layer in mindskip_layers(model).values():
        layer.router.weight.requires_grad_(True)
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    real = mask.bool()
    torch.testing.assert_close(out.logits[real].detach(), eval_logits[real], rtol=1e-5, atol=1e-5)
    out.loss.backward()
    for i, layer in mindskip_layers(model).items():
        grad = layer.router.weight.grad
        assert grad is not None and grad.abs().sum() > 0, f"router {i} got no gradient"


def test_router_tune_trains_and_refuses_the_paper_rule(tokenizer):
    model = tiny_llama(len(tokenizer))
    mk.apply_mindskip(model, layers=ROUTED, kv="all", sink_tokens=1)
    with pytest.raises(ValueError, match=r"rule 'paper' is not a training forward of kv=\"all\""):
        router_tune(model, RECORDS, tokenizer, keep=0.5, rule="paper", steps=2)
    before = {i: layer.router.weight.clone() for i, layer in mindskip_layers(model).items()}
    router_tune(model, RECORDS, tokenizer, keep=0.5, steps=3, batch_size=2, lr=1e-2, calibration_items=4,
                progress=False)
    assert all(not torch.equal(before[i], layer.router.weight) for i, layer in mindskip_layers(model).items())
    assert all(layer.mindskip.kv == "all" for layer in mindskip_layers(model).values())


@pytest.mark.parametrize("backend", backend_params("cpu"))
@pytest.mark.parametrize("target", ["attention", "block"])
@pytest.mark.parametrize("host_compact", [True, False], ids=["cpu-path", "device-path"])
def test_cached_generation_equals_recompute(backend, target, host_compact):
    """Batch 3 with left padding, greedy: the cache (every real token's K/V, kept queries over all of it; a
    skipped decode row still appends) gives the tokens a full recomputation gives, on both decode paths."""
    if backend == "triton" and host_compact:
        pytest.skip("Triton runs on CUDA, where the device path runs (the interpreter is slow: test that one)")
    model = _patched(target=target, backend=backend, host_compact=host_compact, seed=5)
    ids, mask = left_padded_prompts([9, 5, 2], 5)
    with record_routing(model) as rec:
        cached = greedy(model, ids, mask, use_cache=True)
    decode = [e.keep for e in rec.entries if e.keep.shape[1] == 1]
    assert decode and any(k.any() for k in decode) and not all(k.all() for k in decode), "decode must keep and skip"
    torch.testing.assert_close(cached, greedy(model, ids, mask, use_cache=False), rtol=0, atol=0)


def test_batch_one_device_path_skips_the_q_and_o_weights(monkeypatch):
    """Batch 1 on the device path with Triton: q_proj and o_proj go through the predicated GEMV (a skipped row
    reads neither), k_proj and v_proj run for every row; generation equals recomputation."""
    from mindskip_kernels.backends import available
    if not available()["triton"]:
        pytest.skip("backend 'triton' not available in this install")
    from mindskip_kernels.backends import triton as tri

    calls = []
    real = tri.predicated_linear
    monkeypatch.setattr(tri, "predicated_linear", lambda *a: calls.append(a[1].shape) or real(*a))
    model = _patched(backend="triton", host_compact=False, seed=3)
    ids = torch.randint(1, 97, (1, 7))
    mask = torch.ones_like(ids)
    cached = greedy(model, ids, mask, use_cache=True)
    attn = model.model.layers[1].self_attn
    assert calls and set(calls) == {attn.q_proj.weight.shape, attn.o_proj.weight.shape}
    torch.testing.assert_close(cached, greedy(model, ids, mask, use_cache=False), rtol=0, atol=0)


def test_cache_holds_every_real_token():
    """Under kv="all" each routed layer stores every real token's K/V (padding excluded), skipped or not."""
    model = _patched(seed=6)
    ids, mask = left_padded_prompts([9, 5, 2], 6)
    steps = 4
    cache = run_cache(model, ids, mask, steps=steps)
    real = mask.sum(1).to(torch.int32) + steps
    for i in ROUTED:
        assert torch.equal(cache.kv_layer(i).lengths, real), f"layer {i}"


def test_settings_checked_saved_and_loaded(tmp_path):
    model = tiny_model()
    for kwargs, match in (({"kv": "every"}, "kv must be one of"), ({"kv": "all", "granularity": "sequence"},
                          'kv="all".*granularity="token"'), ({"kv": "all", "target": "mlp"}, 'kv="all".*"block"')):
        with pytest.raises(ValueError, match=match):
            mk.apply_mindskip(model, layers=ROUTED, **kwargs)
    assert not mindskip_layers(model), "a refused patch must leave the model untouched"
    model = _patched(seed=7)
    save_routers(model, tmp_path / "r")
    fresh = load_routers(tiny_model(), tmp_path / "r")
    assert {i: layer.mindskip.kv for i, layer in mindskip_layers(fresh).items()} == dict.fromkeys(ROUTED, "all")
    ids, mask = left_padded_prompts([8, 3], seed=7)
    with torch.no_grad():
        assert torch.equal(fresh(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    kept = load_routers(tiny_model(), tmp_path / "r", kv="kept")
    assert all(layer.mindskip.kv == "kept" for layer in mindskip_layers(kept).values())
    untouched = tiny_model()
    with pytest.raises(ValueError, match=r"layer 1: kv=\"all\""):
        load_routers(untouched, tmp_path / "r", granularity="sequence")
    assert not mindskip_layers(untouched)
