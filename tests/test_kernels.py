"""Every op of every backend against the fp64 reference: fresh random data, awkward sizes, edge cases.

Backends are parametrized (tests/harness.py); the reference backend runs too, so the comparison machinery
itself is exercised. Outputs of kernel backends are poisoned (conftest), so unwritten elements fail.
"""

from __future__ import annotations

import re

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.backends import module
from tests.cases import (
    ATTN_CASES,
    CHUNK_CASES,
    DISPATCH_CASES,
    DISPATCH_HEADS,
    DISPATCH_MODES,
    LOW,
    PATTERNS,
    POSITION_CASES,
    POSITION_PATTERNS,
)
from tests.harness import (
    DISPATCH_BACKENDS,
    assert_within_rule,
    backend_params,
    bad_query_positions,
    chunk_positions,
    dispatch_positions,
    masked_sdpa,
    query_positions,
    random_keep,
)

BACKENDS = backend_params("cpu")
SHAPES = [(1, 1, 8), (2, 97, 40), (3, 1025, 64)]  # (B, N, D): N = 1, 97, 1025; D not a power of two


def _plan(keep: torch.Tensor) -> mk.RoutingPlan:
    """A plan for given keep flags, built by the reference so kernels are compared on identical routing."""
    return mk.RoutingPlan.from_keep(keep, backend="reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_router_scores(backend, dtype, shape, granularity):
    b, n, d = shape
    z = torch.randn(b, n, d).to(dtype)
    w = torch.randn(d).to(dtype) / d**0.5
    mask = torch.ones(b, n, dtype=torch.long)
    mask[-1, : n // 3] = 0  # left padding in the last sequence
    plan = mk.route(z, w, granularity=granularity, attention_mask=mask, backend=backend)
    low = mk.route(z, w, granularity=granularity, attention_mask=mask, backend="reference")
    truth = mk.route(z.double(), w.double(), granularity=granularity, attention_mask=mask, backend="reference")
    real = mask.bool()
    assert plan.scores.dtype == torch.float32
    assert_within_rule(plan.scores[real], low.scores[real], truth.scores[real].double(), "scores")
    clear = (truth.scores - 0.5).abs() > 1e-3  # decisions at the threshold may flip by rounding
    assert torch.equal(plan.keep[clear], truth.keep[clear])
    assert not plan.keep[~real].any(), "padding must never be kept"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_compaction_exact(backend, shape, pattern):
    b, n, _ = shape
    keep = random_keep(b, n, pattern)
    positions = torch.randint(0, 10 * n, (b, n))
    z = torch.randn(b, n, 4)
    w = torch.full((4,), 0.0)
    # threshold 0 keeps every real token, so the mask alone decides: an exact test of compaction
    plan = mk.route(z, w, threshold=0.0, attention_mask=keep.long(), position_ids=positions, backend=backend)
    flat = keep.reshape(-1)
    expect_idx = torch.arange(b * n)[flat]
    assert torch.equal(plan.keep, keep)
    assert torch.equal(plan.indices, expect_idx)
    assert plan.indices.dtype == torch.int64
    assert plan.cu_seqlens.dtype == torch.int32
    assert plan.cu_seqlens.tolist() == [0] + keep.sum(1).cumsum(0).tolist()
    assert torch.equal(plan.positions, positions.reshape(-1)[flat])
    assert plan.max_seqlen >= int(keep.sum(1).max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_gather_scatter_exact(backend, dtype, shape, pattern):
    b, n, d = shape
    plan = _plan(random_keep(b, n, pattern))
    x = torch.randn(b, n, d).to(dtype)
    packed = mk.gather(x, plan, backend=backend)
    assert torch.equal(packed, x.reshape(-1, d)[plan.indices])

    residual = torch.randn(b, n, d).to(dtype)
    before = residual.clone()
    values = torch.randn(plan.num_kept, d).to(dtype)
    out = mk.scatter_add(residual, values, plan, backend=backend)
    expect = before.clone().reshape(-1, d)
    expect[plan.indices] += values
    assert torch.equal(out, expect.view(b, n, d))
    assert torch.equal(residual, before), "residual must not be modified"

    scale = torch.rand(plan.num_kept)
    out = mk.scatter_add(residual, values, plan, scale, backend=backend)
    expect = before.clone().reshape(-1, d)
    expect[plan.indices] += values * scale.to(dtype)[:, None]
    assert torch.equal(out[~plan.keep], before[~plan.keep]), "skipped rows must be bit-identical"
    torch.testing.assert_close(out, expect.view(b, n, d))


def _varlen_inputs(lengths_q, lengths_k, hq, hkv, dh, dtype):
    cu_q = torch.tensor([0] + lengths_q).cumsum(0).int()
    cu_k = torch.tensor([0] + lengths_k).cumsum(0).int()
    q = torch.randn(int(cu_q[-1]), hq, dh)
    k = torch.randn(int(cu_k[-1]), hkv, dh)
    v = torch.randn(int(cu_k[-1]), hkv, dh)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", list(ATTN_CASES))
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_attention(backend, dtype, case, causal):
    lq, lk, hq, hkv, dh = ATTN_CASES[case]
    q, k, v, cu_q, cu_k = _varlen_inputs(lq, lk, hq, hkv, dh, dtype)
    args = (cu_q, cu_k, max(lq), max(lk))
    low = [t.to(dtype) for t in (q, k, v)]
    out = mk.varlen_attention(*low, *args, causal=causal, backend=backend)
    ref = mk.varlen_attention(*low, *args, causal=causal, backend="reference")
    truth = mk.varlen_attention(*(t.to(dtype).double() for t in (q, k, v)), *args, causal=causal,
                                backend="reference")
    assert out.dtype == dtype and out.shape == (q.shape[0], hq, dh)
    assert_within_rule(out, ref, truth, "attention")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", list(POSITION_CASES))
@pytest.mark.parametrize("pattern", POSITION_PATTERNS)
def test_varlen_attention_query_positions(backend, dtype, case, pattern):
    """Kept queries against every key of their sequence (kv="all"): query t sees keys 0..positions[t], within
    the tolerance rule of the reference against an fp64 dense SDPA with the mask built in the test; key rows
    past cu_seqlens_k[-1] are NaN (unused: never read)."""
    lq, lk, hq, hkv, dh = POSITION_CASES[case]
    q, k, v, cu_q, cu_k = _varlen_inputs(lq, lk, hq, hkv, dh, dtype)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    pos = query_positions(lq, lk, pattern)
    args = (cu_q, cu_k, max(lq), max(lk))
    k_nan, v_nan = (torch.cat([t, torch.full((3, hkv, dh), float("nan"), dtype=dtype)]) for t in (k, v))
    out = mk.varlen_attention(q, k_nan, v_nan, *args, query_positions=pos, backend=backend)
    low = mk.varlen_attention(q, k, v, *args, query_positions=pos, backend="reference")
    truth = masked_sdpa(q, k, v, cu_q, cu_k, pos)
    assert out.dtype == dtype and out.shape == q.shape
    assert_within_rule(out, low, truth, "attention with query positions")
    fp64 = mk.varlen_attention(q.double(), k.double(), v.double(), *args, query_positions=pos, backend="reference")
    torch.testing.assert_close(fp64, truth, msg="the fp64 reference differs from the dense SDPA oracle")
    if pattern == "bottom_right":  # the last Lq positions are the causal rule itself
        assert torch.equal(out, mk.varlen_attention(q, k, v, *args, backend=backend)), "positions != causal"


def _check_varlen_paths(backend, dtype, lq, lk, causal, pos, seen):
    """varlen_attention at `dtype` (key rows past cu_seqlens_k[-1] NaN: never read) within the tolerance rule of
    the reference against the fp64 dense-SDPA oracle masked by `seen`; a query that sees no key gets exactly
    zeros; the fp64 reference agrees with the oracle (the case means what the oracle masks)."""
    q, k, v, cu_q, cu_k = _varlen_inputs(lq, lk, *DISPATCH_HEADS, dtype)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    args = (cu_q, cu_k, max(lq), max(lk))
    k_nan, v_nan = (torch.cat([t, torch.full((3, *t.shape[1:]), float("nan"), dtype=dtype)]) for t in (k, v))
    out = mk.varlen_attention(q, k_nan, v_nan, *args, causal=causal, query_positions=pos, backend=backend)
    low = mk.varlen_attention(q, k, v, *args, causal=causal, query_positions=pos, backend="reference")
    truth = masked_sdpa(q, k, v, cu_q, cu_k, seen)
    assert out.dtype == dtype and out.shape == q.shape
    assert_within_rule(out, low, truth, "attention")
    blind = (seen < 0) | (torch.tensor(lk).repeat_interleave(torch.tensor(lq)) == 0)
    assert torch.equal(out[blind], torch.zeros_like(out[blind])), "a query that sees no key gets zeros"
    fp64 = mk.varlen_attention(q.double(), k.double(), v.double(), *args, causal=causal, query_positions=pos,
                               backend="reference")
    torch.testing.assert_close(fp64, truth, msg="the fp64 reference differs from the dense SDPA oracle")


@pytest.mark.parametrize("backend", DISPATCH_BACKENDS)
@pytest.mark.parametrize("dtype", [*LOW, torch.float64])
@pytest.mark.parametrize("case", list(DISPATCH_CASES))
@pytest.mark.parametrize("mode", DISPATCH_MODES)
def test_varlen_attention_dispatch(backend, dtype, case, mode):
    """Back-to-back sequences of one length with keys == queries, causal or not, or with positions == each
    query's index (also clamped past the end): the compiled kernel's one batched call; the same with one position
    off by one, keys longer or shorter than the queries, or an empty sequence in the middle: refused, per
    sequence (one causal call, one unmasked call, zeros) or in chunks of 64 queries (tests/cases.py)."""
    lq, lk = DISPATCH_CASES[case]
    _check_varlen_paths(backend, dtype, lq, lk, *dispatch_positions(lq, lk, mode))


@pytest.mark.parametrize("backend", DISPATCH_BACKENDS)
@pytest.mark.parametrize("dtype", [*LOW, torch.float64])
@pytest.mark.parametrize("case", list(CHUNK_CASES))
def test_varlen_attention_query_chunks(backend, dtype, case):
    """Kept queries in chunks of 64 (the compiled kernel's): chunks whose queries see different numbers of keys
    (masked), the same number (unmasked), none (zeros), whole sequences that see nothing, the same keys (one
    unmasked call) or keys 0..t (one causal call), positions shuffled across the chunks' boundaries."""
    lq, lk, pos = chunk_positions(CHUNK_CASES[case])
    _check_varlen_paths(backend, dtype, lq, lk, True, pos, pos)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_query_positions_extreme_values(backend, pos_dtype):
    """The dtype's extremes: the most negative sees no key, the largest every key (no overflow in the +1)."""
    info = torch.iinfo(pos_dtype)
    q, k, v, cu_q, cu_k = _varlen_inputs([6, 2], [200, 3], 4, 2, 16, torch.float32)
    pos = torch.tensor([info.max, info.min, 150, -1, 0, info.max - 1, info.min + 1, info.max], dtype=pos_dtype)
    out = mk.varlen_attention(q, k, v, cu_q, cu_k, 6, 200, query_positions=pos, backend=backend)
    truth = masked_sdpa(q, k, v, cu_q, cu_k, pos.clamp(-1, 300))
    low = mk.varlen_attention(q, k, v, cu_q, cu_k, 6, 200, query_positions=pos, backend="reference")
    assert_within_rule(out, low, truth, "extreme positions")
    assert torch.equal(out[[1, 3, 6]], torch.zeros_like(out[[1, 3, 6]])), "a negative position sees no key"


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_positions_kernels_without_keys_or_queries(backend):
    """Zero-size inputs in the kernels themselves (called directly: the public op hands them to the reference):
    queries of a sequence with no keys get zeros, no queries give an empty output."""
    mod = module(backend)
    q, k, v = torch.randn(3, 2, 16), torch.randn(0, 1, 16), torch.randn(0, 1, 16)
    cu_q, cu_k = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0, 0], dtype=torch.int32)
    out = mod.varlen_attention(q, k, v, cu_q, cu_k, 3, 0, True, 0.25, torch.tensor([0, 1, 2]))
    assert torch.equal(out, torch.zeros_like(q))
    k, v = torch.randn(5, 1, 16), torch.randn(5, 1, 16)
    out = mod.varlen_attention(q[:0], k, v, cu_q * 0, cu_k + torch.tensor([0, 5], dtype=torch.int32), 0, 5, True,
                               0.25, torch.zeros(0, dtype=torch.int32))
    assert out.shape == (0, 2, 16)


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("case", list(bad_query_positions(6)))
def test_varlen_bad_query_positions_same_error_for_every_backend(backend, case):
    kwargs, grad, exc, message = bad_query_positions(6)[case]
    q, k, v = (torch.randn(6, 2, 8, requires_grad=grad) for _ in range(3))
    cu = torch.tensor([0, 2, 6])
    with pytest.raises(exc, match=re.escape(message)):
        mk.varlen_attention(q, k, v, cu, cu, 4, 4, **kwargs, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("lengths", [[0, 1, 57, 300], [1], [0, 0]])
@pytest.mark.parametrize("heads", [(8, 2), (9, 3)])
def test_decode_attention(backend, dtype, lengths, heads):
    hq, hkv = heads
    dh, s = 64, max(lengths) + 3  # cache rows past each length hold garbage that must be ignored
    q = torch.randn(len(lengths), hq, dh)
    kc = torch.randn(len(lengths), s, hkv, dh)
    vc = torch.randn(len(lengths), s, hkv, dh)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    low = [t.to(dtype) for t in (q, kc, vc)]
    out = mk.decode_attention(*low, seqlens, backend=backend)
    ref = mk.decode_attention(*low, seqlens, backend="reference")
    truth = mk.decode_attention(*(t.double() for t in low), seqlens, backend="reference")
    assert_within_rule(out, ref, truth, "decode")
    # the same query through varlen attention (bottom-right causal) must agree
    cu_k = torch.tensor([0] + lengths).cumsum(0).int()
    k_packed = torch.cat([kc[b, :n] for b, n in enumerate(lengths)]).double()
    v_packed = torch.cat([vc[b, :n] for b, n in enumerate(lengths)]).double()
    varlen = mk.varlen_attention(q.to(dtype).double(), k_packed.to(dtype).double(), v_packed.to(dtype).double(),
                                 torch.arange(len(lengths) + 1).int(), cu_k, 1, max(lengths), backend="reference")
    torch.testing.assert_close(varlen, truth)


def test_public_ops_compile_fullgraph():
    """The public entry points (validation + dispatch) trace under torch.compile(fullgraph=True)."""
    q, k, v, cu_q, cu_k = _varlen_inputs([5, 0, 9], [5, 0, 9], 4, 2, 16, torch.float32)
    fn = torch.compile(lambda q, k, v: mk.varlen_attention(q, k, v, cu_q, cu_k, 9, 9, backend="reference"),
                       fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(q, k, v), mk.varlen_attention(q, k, v, cu_q, cu_k, 9, 9, backend="reference"))
