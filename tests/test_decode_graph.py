"""Graph-ready decode, proved on the CPU with the code path CUDA runs (no device-type branch in it): the routed
decoder layer's decode step compiles with torch.compile(fullgraph=True), and one decode step of a patched
tiny Llama reads no more tensor data on the host than the dense model's (zero added), at token and
sequence granularity, for every routed target and K/V rule."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mindskip_kernels as mk
from mindskip_kernels.integrations.hf import TARGETS, mindskip_layers, new_cache, record_routing
from tests.models import left_padded_prompts, randomize_routers, tiny_model

ROUTED = [0, 1, 2]
# aten ops whose output depends on tensor data in a way the host must see (shape or a Python value)
DATA_DEPENDENT = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique", "_unique",
                  "_unique2", "unique_consecutive", "unique_dim", "equal", "is_nonzero", "repeat_interleave",
                  "_assert_async", "bincount", "histc"}


class HostReads(TorchDispatchMode):
    """Records data-dependent aten ops, plus Tensor.tolist/item/__bool__ calls (patched while active)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self._saved: dict[str, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in DATA_DEPENDENT:
            self.reads.append(f"aten.{name}")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for attr in ("tolist", "item", "__bool__"):
            original = getattr(torch.Tensor, attr)
            self._saved[attr] = original

            def wrapped(t, *a, _attr=attr, _original=original, **kw):
                self.reads.append(f"Tensor.{_attr}")
                return _original(t, *a, **kw)

            setattr(torch.Tensor, attr, wrapped)
        return super().__enter__()

    def __exit__(self, *exc):
        for attr, original in self._saved.items():
            setattr(torch.Tensor, attr, original)
        return super().__exit__(*exc)


def _decode_setup(model, cache, steps: int = 2):
    """Prefill a left-padded batch of 3 and run `steps` greedy decode steps; returns the next step's inputs."""
    ids, mask = left_padded_prompts([9, 6, 3], seed=1)
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        for _ in range(steps + 1):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            pos = pos[:, -1:] + 1
            if _ == steps:
                break
            out = model(nxt, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
    return {"input_ids": nxt, "attention_mask": mask, "position_ids": pos, "cache": cache, "use_cache": True}


# (granularity, target, K/V rule) of the routed decode steps under test: every valid combination
ROUTINGS = [pytest.param(g, t, "kept", id=f"{g}-{t}") for g in ("token", "sequence") for t in TARGETS] + [
    pytest.param("token", t, "all", id=f"token-{t}-kv_all") for t in ("attention", "block")]


def _patched(granularity: str, backend: str = "auto", target: str = "attention", kv: str = "kept",
             adapter: str | None = None):
    model = tiny_model("llama")
    mk.apply_mindskip(model, layers=ROUTED, granularity=granularity, backend=backend, target=target, kv=kv,
                      host_compact=False, adapter=adapter, adapter_rank=3 if adapter == "linear" else None)
    torch.manual_seed(2 if kv == "kept" else 4)  # seeds whose last decode step both keeps and skips rows
    randomize_routers(model, std=4.0)
    with torch.no_grad():  # skipped rows' adapter (random: a wrong row would show)
        for p in (p for layer in mindskip_layers(model).values() for p in (
                layer.skip_adapter.parameters() if adapter else ())):
            p.normal_(0.0, 0.2)
    return model


def _fixed_cache(model):
    """A pool sized up front (what a captured decode loop uses): its capacity bound never needs a read."""
    return new_cache(model, block_size=4, num_blocks=64, max_length=64)


def count_host_reads(model, inputs) -> list[str]:
    with torch.no_grad(), HostReads() as reads:
        model(**inputs)
    return reads.reads


@pytest.mark.parametrize("adapter", [None, "linear"])
@pytest.mark.parametrize(("granularity", "target", "kv"), ROUTINGS)
def test_decode_step_adds_no_host_reads(granularity, target, kv, adapter):
    model = _patched(granularity, target=target, kv=kv, adapter=adapter)
    with record_routing(model) as rec:
        inputs = _decode_setup(model, _fixed_cache(model))
    keep = torch.cat([e.keep for e in rec.entries[-len(ROUTED):]])  # the last decode step's decisions
    assert keep.any() and not keep.all(), "the routed layers should both keep and skip rows in decode"
    routed = count_host_reads(model, inputs)

    dense = tiny_model("llama")
    dense_inputs = _decode_setup(dense, None)
    dense_inputs["cache"] = None
    with torch.no_grad():  # the dense model with its own cache, the same number of steps in
        ids, mask = left_padded_prompts([9, 6, 3], seed=1)
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        out = dense(ids, attention_mask=mask, position_ids=pos, use_cache=True)
        dense_inputs["cache"] = out.past_key_values if hasattr(out, "past_key_values") else out.cache
        for _ in range(2):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            pos = pos[:, -1:] + 1
            out = dense(nxt, attention_mask=mask, position_ids=pos, cache=dense_inputs["cache"], use_cache=True)
        dense_inputs.update(input_ids=out.logits[:, -1].argmax(-1, keepdim=True),
                            attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1),
                            position_ids=pos + 1)
    assert sorted(routed) == sorted(count_host_reads(dense, dense_inputs)), "MindSkip added host reads"


def test_host_read_counter_sees_reads():
    """The counter is not blind: a step through the growable default cache reads the lengths back when its
    capacity bound stops fitting, and plain item()/nonzero() calls are recorded."""
    with HostReads() as reads:
        torch.tensor([1, 0, 2]).nonzero()
        torch.tensor(3.0).item()
        bool(torch.tensor(True))
        torch.arange(3).tolist()
    assert {"aten.nonzero", "aten._local_scalar_dense", "Tensor.item", "Tensor.__bool__", "Tensor.tolist"} <= set(
        reads.reads)
    model = _patched("token")
    inputs = _decode_setup(model, new_cache(model, block_size=4), steps=3)  # sized for the 9-token prompt
    assert "Tensor.tolist" in count_host_reads(model, inputs), "a full bound must read the lengths to grow"


@pytest.mark.parametrize(("granularity", "target", "kv"), ROUTINGS)
@pytest.mark.parametrize(("backend", "adapter"), [("compiled", None), ("reference", None), ("compiled", "linear")])
def test_routed_decode_layer_compiles_fullgraph(granularity, backend, target, kv, adapter):
    """The routed decoder layer's decode step (router flag, paged append, paged decode attention, predicated
    add, MLP, the skipped rows' adapter; for the MLP target attention with its dense cache layer, then the routed
    MLP) traces into one graph, and gives what eager gives, cache state included."""
    model = _patched(granularity, backend, target, kv, adapter)
    cache_eager = _fixed_cache(model)
    inputs = _decode_setup(model, cache_eager)
    cache_compiled = copy.deepcopy(cache_eager)
    layer = model.model.layers[1]
    hidden = torch.randn(3, 1, 48)
    pos = inputs["position_ids"]
    pe = model.model.rotary_emb(hidden, pos)
    model.model._mindskip_state.padding_mask = inputs["attention_mask"]

    def step(h, cos, sin, cache):
        return layer(h, position_ids=pos, cache=cache, use_cache=True, position_embeddings=(cos, sin))

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        expect = step(hidden, *pe, cache_eager)
        got = compiled(hidden, *pe, cache_compiled)
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
    a, b = cache_eager.layers[1], cache_compiled.layers[1]
    if target == "mlp":  # attention's ordinary cache layer
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    else:
        assert torch.equal(a.lengths, b.lengths) and torch.equal(a.block_table, b.block_table)
        assert torch.equal(a.pool.next_block, b.pool.next_block)


# ---- predicated projections (Triton, interpreter here) ------------------------------------------------------


@pytest.mark.skipif(not mk.available_backends()["triton"], reason="Triton not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 48, 48), (3, 200, 67), (8, 130, 257), (0, 16, 16)])  # (B, K, N)
@pytest.mark.parametrize("bias", [True, False])
def test_predicated_linear_matches_linear(dtype, shape, bias):
    from mindskip_kernels.backends import triton as tri

    b, k, n = shape
    x, w = torch.randn(b, k).to(dtype), (torch.randn(n, k) / k**0.5).to(dtype)
    bv = torch.randn(n).to(dtype) if bias else None
    keep = torch.rand(b) < 0.5
    if b:
        keep[0] = True
    out = tri.predicated_linear(x, w, bv, keep)
    truth = torch.nn.functional.linear(x.double(), w.double(), None if bv is None else bv.double())
    low = torch.nn.functional.linear(x, w, bv)
    assert out.shape == (b, n) and out.dtype == dtype
    assert torch.equal(out[~keep], torch.zeros_like(out[~keep])), "a skipped row must give zeros"
    kept = keep.nonzero()[:, 0]
    tol = torch.finfo(dtype).eps * 2 * k**0.5
    err, ref_err = ((o.double() - truth[kept]).abs().max().item() if kept.numel() else 0.0 for o in (out[kept],
                                                                                                       low[kept]))
    assert err <= 2 * ref_err + tol, f"max error {err:.3g} > 2 x F.linear's {ref_err:.3g}"
