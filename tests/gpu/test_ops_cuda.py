"""Every backend's CUDA kernels against the reference (fp64 truth, the tolerance rule, exact for index work), on
the awkward sizes of design.md s.4, bf16 included: router, compaction, gather/scatter-add, varlen attention
forward (also with query positions) and decode attention. Skipped without CUDA; an op a backend has no CUDA
kernel for is skipped.

Run with `python -m pytest tests/gpu -x -q` (on its own: then the Triton cases run compiled, see
tests/gpu/cuda_harness.py); every comparison names what differs.
"""

from __future__ import annotations

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.backends import reference
from tests.cases import ATTN_CASES, LOW, PATTERNS, POSITION_CASES, POSITION_PATTERNS
from tests.gpu.cuda_harness import (
    DEV,
    SHAPES,
    cuda_backends,
    kernels,
    needs_cuda,
)
from tests.harness import assert_within_rule, masked_sdpa, query_positions, random_keep

pytestmark = [pytest.mark.gpu, needs_cuda]
BACKENDS = cuda_backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_router(backend, dtype, shape, granularity):
    kernels(backend, "router", dtype)
    b, n, d = shape
    z = torch.randn(b, n, d, device=DEV).to(dtype)
    w = (torch.randn(d, device=DEV) / d**0.5).to(dtype)
    mask = torch.ones(b, n, dtype=torch.long, device=DEV)
    mask[-1, : n // 3] = 0
    plan = mk.route(z, w, granularity=granularity, attention_mask=mask, backend=backend)
    low = mk.route(z, w, granularity=granularity, attention_mask=mask, backend="reference")
    truth = mk.route(z.double(), w.double(), granularity=granularity, attention_mask=mask, backend="reference")
    real = mask.bool()
    assert_within_rule(plan.scores[real], low.scores[real], truth.scores[real].double(), "scores")
    clear = (truth.scores - 0.5).abs() > 1e-3
    assert torch.equal(plan.keep[clear], truth.keep[clear]), "keep decisions differ away from the threshold"
    assert not plan.keep[~real].any(), "padding must never be kept"


# (B, N): B=600 > one scan block of sequences, N=131072 many blocks per sequence
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(b, n) for b, n, _ in SHAPES] + [(600, 7), (2, 131072)])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32])
def test_compaction_exact(backend, shape, pattern, pos_dtype):
    mod = kernels(backend, "compact", torch.bool)
    b, n = shape
    keep = random_keep(b, n, pattern, device=DEV)
    positions = torch.randint(0, 10 * n, (b, n), device=DEV, dtype=pos_dtype)
    got = mod.compact(keep, positions)
    want = reference.compact(keep, positions)
    for name, g, r in zip(("indices", "cu_seqlens", "positions"), got, want, strict=True):
        assert g.dtype == r.dtype and torch.equal(g, r), f"{name} differs"
    assert got[1].tolist() == [0] + keep.sum(1).cumsum(0).tolist(), "cu_seqlens != cumulative kept counts"
    # expanded position ids (stride 0 over the batch), as route() passes them
    expanded = torch.arange(n, device=DEV).expand(b, n)
    assert torch.equal(mod.compact(keep, expanded)[2], reference.compact(keep, expanded)[2]), "expanded positions"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_gather_scatter_exact(backend, dtype, shape, pattern):
    mod = kernels(backend, "scatter_add", dtype)
    b, n, d = shape
    keep = random_keep(b, n, pattern, device=DEV)
    idx = keep.reshape(-1).nonzero().squeeze(1)
    x = torch.randn(b * n, d, device=DEV).to(dtype)
    assert torch.equal(mod.gather(x, idx), x[idx]), "gather"
    assert torch.equal(mod.gather(x[:, 1:], idx), x[:, 1:][idx]), "gather from a strided (unaligned) view"
    residual = torch.randn(b * n, d, device=DEV).to(dtype)
    before = residual.clone()
    values = torch.randn(idx.numel(), d, device=DEV).to(dtype)
    scale = torch.rand(idx.numel(), device=DEV)
    for s in (None, scale):
        out = mod.scatter_add(residual, values, idx, s)
        assert torch.equal(out, reference.scatter_add(residual, values, idx, s)), f"scatter_add (scale={s is not None})"
    assert torch.equal(residual, before), "residual must not be modified"
    # the same through the public API, with a plan for these decisions
    plan = mk.RoutingPlan.from_keep(keep, backend="reference")
    x3d = x.reshape(b, n, d)
    assert torch.equal(mk.gather(x3d, plan, backend=backend), x[plan.indices]), "mk.gather"
    for s in (None, scale):
        out = mk.scatter_add(x3d, values, plan, s, backend=backend)
        assert torch.equal(out, mk.scatter_add(x3d, values, plan, s, backend="reference")), "mk.scatter_add"


ATTN = ATTN_CASES | {"bf16_hd128_4k": ([1024, 3072], [1024, 3072], 16, 4, 128)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", list(ATTN))
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_attention(backend, dtype, case, causal):
    kernels(backend, "varlen_attention", dtype)
    lq, lk, hq, hkv, dh = ATTN[case]
    cu_q = torch.tensor([0] + lq, device=DEV).cumsum(0).int()
    cu_k = torch.tensor([0] + lk, device=DEV).cumsum(0).int()
    q = torch.randn(sum(lq), hq, dh, device=DEV).to(dtype)
    k = torch.randn(sum(lk), hkv, dh, device=DEV).to(dtype)
    v = torch.randn(sum(lk), hkv, dh, device=DEV).to(dtype)
    args = (cu_q, cu_k, max(lq), max(lk))
    out = mk.varlen_attention(q, k, v, *args, causal=causal, backend=backend)
    low = mk.varlen_attention(q, k, v, *args, causal=causal, backend="reference")
    truth = mk.varlen_attention(q.double(), k.double(), v.double(), *args, causal=causal, backend="reference")
    assert_within_rule(out, low, truth, "attention")


POSITIONS = POSITION_CASES | {"bf16_hd128_4k_half_kept": ([2048, 1500], [4096, 3000], 16, 4, 128)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", list(POSITIONS))
@pytest.mark.parametrize("pattern", POSITION_PATTERNS)
def test_varlen_attention_query_positions(backend, dtype, case, pattern):
    """Kept queries against every key of their sequence (query t sees keys 0..positions[t]) against an fp64 dense
    SDPA with the mask built in the test; key rows past cu_seqlens_k[-1] are NaN."""
    kernels(backend, "varlen_attention", dtype)
    lq, lk, hq, hkv, dh = POSITIONS[case]
    cu_q = torch.tensor([0] + lq, device=DEV).cumsum(0).int()
    cu_k = torch.tensor([0] + lk, device=DEV).cumsum(0).int()
    pos = query_positions(lq, lk, pattern).to(DEV)
    q = torch.randn(sum(lq), hq, dh, device=DEV).to(dtype)
    k, v = (torch.randn(sum(lk), hkv, dh, device=DEV).to(dtype) for _ in range(2))
    k_nan, v_nan = (torch.cat([t, torch.full((3, hkv, dh), float("nan"), device=DEV, dtype=dtype)]) for t in (k, v))
    args = (cu_q, cu_k, max(lq), max(lk))
    out = mk.varlen_attention(q, k_nan, v_nan, *args, query_positions=pos, backend=backend)
    low = mk.varlen_attention(q, k, v, *args, query_positions=pos, backend="reference")
    assert_within_rule(out, low, masked_sdpa(q, k, v, cu_q, cu_k, pos), "attention with query positions")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("lengths", [[0, 1, 57, 300], [1], [0, 0], [4096, 3000], [4096, 17]])
@pytest.mark.parametrize("heads", [(8, 2), (9, 3), (32, 8), (6, 6), (40, 4)])  # group 10 > 4 heads per block
@pytest.mark.parametrize("dh", [64, 128, 80, 256])
def test_decode_attention(backend, dtype, lengths, heads, dh):
    kernels(backend, "decode_attention", dtype)
    hq, hkv = heads
    s = max(lengths) + 3
    q = torch.randn(len(lengths), hq, dh, device=DEV).to(dtype)
    kc = torch.randn(len(lengths), s, hkv, dh, device=DEV).to(dtype)
    vc = torch.randn(len(lengths), s, hkv, dh, device=DEV).to(dtype)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    out = mk.decode_attention(q, kc, vc, lens, backend=backend)
    low = mk.decode_attention(q, kc, vc, lens, backend="reference")
    truth = mk.decode_attention(q.double(), kc.double(), vc.double(), lens, backend="reference")
    assert_within_rule(out, low, truth, "decode")
