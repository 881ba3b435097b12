"""The Triton backend's CUDA-only checks against the reference (fp64 truth, the tolerance rule): the fused-norm
paths, attention backward, a MindSkip layer's gradients, and a count of host syncs on the hot path. The checks
every backend shares (router, compaction, gather/scatter-add, attention forward, decode) are in
test_ops_cuda.py. Skipped without CUDA.

The kernels here must be compiled: run `python -m pytest tests/gpu -x -q` on its own (tests/conftest.py leaves
Triton's interpreter off then; in a session with the CPU tests these cases skip).
"""

from __future__ import annotations

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.attention import MindSkipAttention
from mindskip_kernels.backends import reference
from tests.cases import ATTN_GRAD_CASES, LOW
from tests.gpu.cuda_harness import (
    DEV,
    HAS_CUDA,
    INTERPRET,
    SHAPES,
    count_syncs,
    needs_cuda,
    triton_compiled_only,
)
from tests.harness import EPS, assert_within_rule, check_grads, random_keep, rmsnorm

pytestmark = [pytest.mark.gpu, needs_cuda]
if HAS_CUDA and not INTERPRET:
    from mindskip_kernels.backends import triton as tri


@triton_compiled_only
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_router_from_hidden(dtype, granularity):
    b, n, d = 2, 300, 4096
    x = (torch.randn(b, n, d, device=DEV) * 3).to(dtype)
    gamma = (1 + 0.1 * torch.randn(d, device=DEV)).to(dtype)
    w = (torch.randn(d, device=DEV) / d**0.5).to(dtype)
    mask = torch.ones(b, n, dtype=torch.bool, device=DEV)
    mask[-1, :50] = False
    scores, _ = tri.router_from_hidden(x, gamma, EPS, w, mask, 0.5, granularity)
    low, _ = reference.router(rmsnorm(x.float(), gamma.float()), w.float(), mask, 0.5, granularity)
    truth, _ = reference.router(rmsnorm(x.double(), gamma.double()), w.double(), mask, 0.5, granularity)
    assert_within_rule(scores[mask], low[mask], truth[mask], "scores")


@triton_compiled_only
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", SHAPES)
def test_gather_norm(dtype, shape):
    b, n, d = shape
    keep = random_keep(b, n, "random", device=DEV)
    idx = keep.reshape(-1).nonzero().squeeze(1)
    x = torch.randn(b * n, d, device=DEV).to(dtype)
    gamma = (1 + 0.1 * torch.randn(d, device=DEV)).to(dtype)
    normed = tri.gather_norm(x, gamma, EPS, idx)
    low = rmsnorm(x.float(), gamma.float()).to(dtype)[idx]
    truth = rmsnorm(x.double(), gamma.double())[idx]
    assert_within_rule(normed, low, truth, "gather_norm")


@triton_compiled_only
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", list(ATTN_GRAD_CASES))
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_attention_backward(dtype, case, causal):
    lq, lk, hq, hkv, dh = ATTN_GRAD_CASES[case]
    cu_q = torch.tensor([0] + lq, device=DEV).cumsum(0).int()
    cu_k = torch.tensor([0] + lk, device=DEV).cumsum(0).int()

    def fn_for(backend):
        return lambda q, k, v: mk.varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal,
                                                   backend=backend)

    inputs = [torch.randn(sum(n), h, dh, device=DEV) for n, h in ((lq, hq), (lk, hkv), (lk, hkv))]
    check_grads(fn_for, inputs, torch.randn(sum(lq), hq, dh, device=DEV), dtype, ["out", "dq", "dk", "dv"])


@triton_compiled_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_mindskip_layer_gradients(dtype, granularity):
    b, n, hidden = 2, 300, 512
    layer = MindSkipAttention(hidden, 8, 2, granularity=granularity, backend="reference").to(DEV)
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.1)
    x, residual, grad = (torch.randn(b, n, hidden, device=DEV) for _ in range(3))

    def run(backend: str, dt: torch.dtype) -> dict[str, torch.Tensor]:
        m = MindSkipAttention(hidden, 8, 2, granularity=granularity, backend=backend).to(DEV, dt)
        m.load_state_dict({k: p.to(dtype) for k, p in layer.state_dict().items()})  # the same rounded weights
        xs = x.to(dtype).to(dt).detach().clone().requires_grad_()
        out = m(xs, residual=residual.to(dtype).to(dt))
        out.backward(grad.to(dtype).to(dt))
        return {"out": out.detach(), "dx": xs.grad} | {f"d{k}": p.grad for k, p in m.named_parameters()}

    out, low, truth = run("triton", dtype), run("reference", dtype), run("reference", torch.float64)
    for name in truth:
        assert_within_rule(out[name], low[name], truth[name], name)


@triton_compiled_only
def test_no_host_sync_on_hot_path():
    """Router, gather, scatter-add, attention forward + backward (and forward with query positions) and decode
    never wait for the GPU; compaction waits exactly once (T sizes its outputs)."""
    b, n, d, hq, hkv, dh = 2, 512, 1024, 8, 2, 128
    z = torch.randn(b, n, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    w = torch.zeros(1, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(b, n, dtype=torch.bool, device=DEV)
    keep = random_keep(b, n, "random", device=DEV)
    indices, cu, positions = tri.compact(keep, torch.arange(n, device=DEV).expand(b, n))
    t = indices.shape[0]
    q = torch.randn(t, hq, dh, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(t, hkv, dh, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    cache = torch.randn(b, n, hkv, dh, device=DEV, dtype=torch.bfloat16)

    def hot_path():
        scores, _ = tri.router(z, w, mask, 0.5, "token")
        packed = tri.gather(z.reshape(-1, d), indices)
        attn = tri.varlen_attention(q, kv, kv, cu, cu, n, n, True, dh**-0.5)
        tri.varlen_attention(q.detach(), kv.detach(), kv.detach(), cu, cu, n, n, True, dh**-0.5, positions)
        out = tri.scatter_add(z.detach().reshape(-1, d), packed, indices, scores.reshape(-1)[indices])
        (out.float().sum() + attn.float().sum()).backward()
        tri.decode_attention(q[:b].detach(), cache, cache, torch.full((b,), n, device=DEV), None, dh**-0.5)

    assert count_syncs(hot_path) == 0
    assert count_syncs(lambda: tri.compact(keep, torch.arange(n, device=DEV).expand(b, n))) == 1
