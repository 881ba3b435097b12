"""Triton-only checks (in the interpreter on CPU): the fused router and gather+norm, gradients of every
differentiable op and of the whole MindSkip layer against the reference's autograd, torch.compile of the
custom ops, and a build of every kernel for sm_90 (no GPU needed)."""

from __future__ import annotations

import copy
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.attention import MindSkipAttention
from mindskip_kernels.backends import available, reference
from tests.cases import ATTN_GRAD_CASES, LOW
from tests.harness import EPS, assert_within_rule, check_grads, random_keep, rmsnorm

pytestmark = pytest.mark.skipif(not available()["triton"], reason="triton backend not available")
if available()["triton"]:
    from mindskip_kernels.backends import triton as tri
    from tests.triton_compile import record_launches

ROOT = Path(__file__).resolve().parents[1]


def _plan(keep: torch.Tensor) -> mk.RoutingPlan:
    return mk.RoutingPlan.from_keep(keep, backend="reference")


# --- fused router and gather + norm ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("granularity", ["token", "sequence"])
@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 97, 40), (3, 130, 300)])
def test_router_from_hidden(dtype, granularity, shape):
    b, n, d = shape
    x = (torch.randn(b, n, d) * 3).to(dtype)
    gamma = (1 + 0.1 * torch.randn(d)).to(dtype)
    w = (torch.randn(d) / d**0.5).to(dtype)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[-1, : n // 3] = False
    scores, keep = tri.router_from_hidden(x, gamma, EPS, w, mask, 0.5, granularity)
    low, _ = reference.router(rmsnorm(x.float(), gamma.float()), w.float(), mask, 0.5, granularity)
    truth, truth_keep = reference.router(rmsnorm(x.double(), gamma.double()), w.double(), mask, 0.5, granularity)
    assert scores.dtype == torch.float32
    assert_within_rule(scores[mask], low[mask], truth[mask], "scores")
    clear = (truth - 0.5).abs() > 1e-3
    assert torch.equal(keep[clear], truth_keep[clear])
    assert not keep[~mask].any(), "padding must never be kept"


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 97, 40), (2, 33, 300)])
@pytest.mark.parametrize("pattern", ["random", "all", "none"])
def test_gather_norm(dtype, shape, pattern):
    b, n, d = shape
    plan = _plan(random_keep(b, n, pattern))
    x = (torch.randn(b * n, d) * 3).to(dtype)
    gamma = (1 + 0.1 * torch.randn(d)).to(dtype)
    out = tri.gather_norm(x, gamma, EPS, plan.indices)
    low = rmsnorm(x.float(), gamma.float()).to(dtype)[plan.indices]
    truth = rmsnorm(x.double(), gamma.double())[plan.indices]
    assert out.dtype == dtype
    assert_within_rule(out, low, truth, "gather_norm")


# --- gradients against the reference's autograd ------------------------------------------------------

@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_router_backward(dtype, granularity):
    b, n, d = 3, 37, 40
    mask = torch.ones(b, n, dtype=torch.long)
    mask[-1, :10] = 0

    def fn_for(backend):
        return lambda z, w: mk.route(z, w, granularity=granularity, attention_mask=mask, backend=backend).scores

    check_grads(fn_for, [torch.randn(b, n, d), torch.randn(1, d) / d**0.5], torch.randn(b, n), dtype,
                 ["scores", "dz", "dweight"])


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("pattern", ["random", "empty_seq", "none"])
def test_gather_scatter_backward(dtype, with_scale, pattern):
    b, n, d = 2, 97, 40
    plan = _plan(random_keep(b, n, pattern))
    t = plan.num_kept

    def fn_for(backend):
        def fn(x, residual, values, *scale):
            packed = mk.gather(x, plan, backend=backend)  # d x = scatter of the packed gradient
            return mk.scatter_add(residual, values + packed, plan, *scale, backend=backend)
        return fn

    inputs = [torch.randn(b, n, d), torch.randn(b, n, d), torch.randn(t, d)] + ([torch.rand(t)] if with_scale else [])
    names = ["out", "dx", "dresidual", "dvalues"] + (["dscale"] if with_scale else [])
    check_grads(fn_for, inputs, torch.randn(b, n, d), dtype, names)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", list(ATTN_GRAD_CASES))
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_attention_backward(dtype, case, causal):
    lq, lk, hq, hkv, dh = ATTN_GRAD_CASES[case]
    cu_q = torch.tensor([0] + lq).cumsum(0).int()
    cu_k = torch.tensor([0] + lk).cumsum(0).int()

    def fn_for(backend):
        return lambda q, k, v: mk.varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal,
                                                   backend=backend)

    inputs = [torch.randn(sum(lq), hq, dh), torch.randn(sum(lk), hkv, dh), torch.randn(sum(lk), hkv, dh)]
    check_grads(fn_for, inputs, torch.randn(sum(lq), hq, dh), dtype, ["out", "dq", "dk", "dv"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_mindskip_layer_gradients(dtype, granularity):
    """The whole layer in training mode: outputs and the gradients of the input, every projection and the
    router (through the straight-through gate) match the reference backend."""
    b, n, hidden = 3, 23, 64
    layer = MindSkipAttention(hidden, 4, 2, granularity=granularity, backend="reference")
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.3)  # some tokens (sequences) skipped, some kept
    layer.train()
    x, residual, grad = torch.randn(b, n, hidden), torch.randn(b, n, hidden), torch.randn(b, n, hidden)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, :7] = 0

    def run(backend: str, dt: torch.dtype) -> dict[str, torch.Tensor]:
        m = copy.deepcopy(layer).to(dtype).to(dt)  # the truth uses the same rounded weights
        m.backend = backend
        xs = x.to(dtype).to(dt).detach().clone().requires_grad_()
        out = m(xs, residual=residual.to(dtype).to(dt), attention_mask=mask)
        out.backward(grad.to(dtype).to(dt))
        return {"out": out.detach(), "dx": xs.grad} | {f"d{k}": p.grad for k, p in m.named_parameters()}

    out, low, truth = run("triton", dtype), run("reference", dtype), run("reference", torch.float64)
    plan = mk.route(x.double(), layer.router.weight.double(), granularity=granularity, attention_mask=mask,
                    backend="reference")
    assert 0 < int(plan.keep.sum()) < int(mask.sum()), "the case must keep some tokens and skip others"
    assert truth["drouter.weight"].abs().max() > 0
    for name in truth:
        assert_within_rule(out[name], low[name], truth[name], name)


# --- torch.compile ----------------------------------------------------------------------------------

def test_custom_op_compiles_fullgraph():
    """The backend's attention (autograd.Function over custom ops with fake impls) traces into one graph.
    (The public `mk.varlen_attention` does not yet: `backends.resolve` calls importlib, which dynamo skips.)"""
    lengths = [5, 17]
    cu = torch.tensor([0] + lengths).cumsum(0).int()
    q, k, v = torch.randn(22, 4, 64), torch.randn(22, 2, 64), torch.randn(22, 2, 64)

    def fn(q, k, v):
        return tri.varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), True, 0.125) * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    expect = 2 * mk.varlen_attention(q, k, v, cu, cu, 17, 17, softmax_scale=0.125, backend="reference")
    torch.testing.assert_close(compiled(q, k, v), expect)


def test_query_positions_compile_fullgraph():
    """Varlen and paged varlen attention with query positions (the custom ops' optional tensor and its fakes) trace
    into one graph."""
    cu = torch.tensor([0, 5, 22], dtype=torch.int32)
    q, k = torch.randn(22, 4, 32), torch.randn(30, 2, 32)
    cu_k = torch.tensor([0, 9, 30], dtype=torch.int32)
    pos = torch.randint(-1, 21, (22,))
    pool, table = k.view(15, 2, 2, 32), torch.arange(16, dtype=torch.int32).view(2, 8).clamp(max=14)

    def fn(q, k, pos):
        varlen = tri.varlen_attention(q, k, k, cu, cu_k, 17, 21, True, 0.125, pos)
        return varlen, tri.paged_varlen_attention(q, pool, pool, cu, torch.tensor([9, 16]), table, 17, True, 0.125, pos)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(q, k, pos), fn(q, k, pos), strict=True):
        torch.testing.assert_close(got, want)


def test_query_positions_backward_raises():
    """Query positions are forward only (the public op refuses grad); a direct backend call that tries a backward
    through them fails loudly instead of returning causal gradients."""
    cu = torch.tensor([0, 6], dtype=torch.int32)
    q = torch.randn(6, 2, 16, requires_grad=True)
    out = tri.varlen_attention(q, q, q, cu, cu, 6, 6, True, 0.25, torch.arange(6))
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()


# --- every kernel builds for sm_90 --------------------------------------------------------------------

def _kernel_names() -> set[str]:
    """Every Triton kernel defined by the backend (names `_*_kernel`)."""
    modules = [importlib.import_module(f"mindskip_kernels.backends.triton.{name}") for name in
               ("attention_bwd", "attention_fwd", "cache_attention", "compaction", "gather_scatter",
                "predicated_linear", "router_kernels")]
    return {f"{m.__name__}.{name}" for m in modules for name in vars(m) if name.endswith("_kernel")}


def _run_every_kernel() -> None:
    """Small bf16 calls that launch every kernel (and each constexpr variant) once."""
    dt = torch.bfloat16
    b, n, d = 2, 40, 64
    x = torch.randn(b, n, d).to(dt)
    w, gamma = torch.randn(d).to(dt), torch.randn(d).to(dt)
    mask = torch.ones(b, n, dtype=torch.bool)
    for granularity in ("token", "sequence"):
        tri.router(x, w, mask, 0.5, granularity)
        tri.router_from_hidden(x, gamma, EPS, w, mask, 0.5, granularity)
    indices, cu, _ = tri.compact(random_keep(b, n, "random"), torch.arange(n).expand(b, n))
    x2d = x.reshape(-1, d).requires_grad_()
    tri.gather_norm(x2d, gamma, EPS, indices)
    values = tri.gather(x2d, indices)
    scale = torch.rand(indices.shape[0], requires_grad=True)
    out = tri.scatter_add(x2d, values, indices, scale) + tri.scatter_add(x2d, values, indices, None)
    out.sum().backward()
    q = torch.randn(indices.shape[0], 4, 128).to(dt).requires_grad_()
    kv = torch.randn(indices.shape[0], 2, 128).to(dt).requires_grad_()
    tri.varlen_attention(q, kv, kv, cu, cu, n, n, True, 0.1).sum().backward()
    qb = torch.randn(b, 4, n, 128).to(dt).requires_grad_()
    kvb = torch.randn(b, 2, n, 128).to(dt).requires_grad_()
    tri.keep_masked_attention(qb, kvb, kvb, random_keep(b, n, "random"), 0.1).sum().backward()
    cache = torch.randn(2, 5, 2, 128).to(dt)
    tri.decode_attention(q[:2].detach(), cache, cache, torch.tensor([3, 5]), None, 0.1)
    table = torch.tensor([[1, 0], [0, 1]], dtype=torch.int32)  # the paged variants
    tri.decode_attention(q[:2].detach(), cache, cache, torch.tensor([3, 5]), table, 0.1)
    tri.paged_varlen_attention(q[:4].detach(), cache, cache, torch.tensor([0, 3, 4]), torch.tensor([3, 5]), table, 3,
                               True, 0.1)
    positions = torch.arange(indices.shape[0]) % 7  # the query-position variants (forward only), int64 and int32
    tri.varlen_attention(q.detach(), kv.detach(), kv.detach(), cu, cu, n, n, True, 0.1, positions)
    tri.paged_varlen_attention(q[:4].detach(), cache, cache, torch.tensor([0, 3, 4]), torch.tensor([3, 5]), table, 3,
                               True, 0.1, positions[:4].int())
    for bias in (None, torch.randn(96).to(dt)):
        tri.predicated_linear(x[:, 0], torch.randn(96, d).to(dt), bias, torch.tensor([True, False]))


def test_kernels_build_for_sm90(tmp_path):
    """Record the launches in the interpreter, then compile each kernel (every autotune config) for sm_90 in
    a process without the interpreter; attention kernels must use tensor-core instructions."""
    with record_launches() as launches:
        _run_every_kernel()
    assert {launch["kernel"] for launch in launches} == _kernel_names(), "a kernel is not exercised"
    with_positions = {launch["kernel"].rsplit(".", 1)[1] for launch in launches if launch["constexprs"].get("HAS_QPOS")}
    assert with_positions == {"_attn_fwd_kernel", "_paged_varlen_kernel"}, "a query-position variant is not built"
    spec = tmp_path / "launches.json"
    spec.write_text(json.dumps(launches))
    env = os.environ | {"TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", "tests.triton_compile", str(spec), "90"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = [r for r in results if not r["ok"]]
    assert not failed, failed
    for r in results:
        assert r["shared"] <= 227 * 1024, f"{r['kernel']} needs {r['shared']} B of shared memory (> 227 KiB)"
        if any(name in r["kernel"] for name in ("_attn_fwd_kernel", "_dkdv_kernel", "_dq_kernel", "_decode_split")):
            assert r["mma"], f"{r['kernel']}: no mma/wgmma in the PTX"
