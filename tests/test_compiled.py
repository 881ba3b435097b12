"""Compiled backend specifics: C++ argument checks surfacing as Python errors, backend selection, fake
implementations under torch.compile, cases test_kernels.py does not cover (fp64, strided caches, int32
indices), and the `info` command. The kernels' correctness on every op and edge case is test_kernels.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.backends import compiled, reference, resolve
from tests.harness import assert_within_rule, random_keep

pytestmark = pytest.mark.skipif(not compiled.available(), reason="mindskip_kernels._C not built")
ops = torch.ops.mindskip


def _bool(*shape: int) -> torch.Tensor:
    return torch.ones(*shape, dtype=torch.bool)


# ---- errors from C++ ---------------------------------------------------------------------------------------


def _router(z=None, w=None, gamma=None, mask=None, threshold=0.5, scores=None):
    """torch.ops.mindskip.router on valid [1, 4, 8] inputs except for the one argument given."""
    z = torch.randn(1, 4, 8) if z is None else z
    ops.router(z, torch.randn(8) if w is None else w, gamma, 1e-6, _bool(1, 4) if mask is None else mask, threshold,
               False, torch.empty(1, 4) if scores is None else scores, _bool(1, 4))


def _varlen(query_positions, causal=True):
    """torch.ops.mindskip.varlen_attention on one valid sequence of 4 tokens with the given positions."""
    q, cu = torch.randn(4, 2, 8), torch.tensor([0, 4])
    ops.varlen_attention(q, q, q, cu, cu, causal, 1.0, torch.empty_like(q), query_positions)


def _paged_varlen(query_positions, causal=True):
    """torch.ops.mindskip.paged_varlen_attention on 4 queries of one cached sequence with the given positions."""
    q, pool = torch.randn(4, 2, 8), torch.randn(2, 4, 2, 8)
    ops.paged_varlen_attention(q, pool, pool, torch.tensor([0, 4]), torch.tensor([6]),
                               torch.tensor([[1, 0]], dtype=torch.int32), causal, 1.0, torch.empty_like(q),
                               query_positions)


BAD_CALLS = {
    "router z rank": (lambda: _router(z=torch.randn(4, 8)), ValueError, "z must be 3-D"),
    "router z dtype": (lambda: _router(z=torch.ones(1, 4, 8, dtype=torch.int32)), TypeError, "z must be float16"),
    "router weight size": (lambda: _router(w=torch.randn(7)), ValueError, "weight must have shape"),
    "router mask shape": (lambda: _router(mask=_bool(1, 5)), ValueError, "mask must have shape"),
    "router threshold": (lambda: _router(threshold=1.5), ValueError, "threshold must be in"),
    "router scores dtype": (lambda: _router(scores=torch.empty(1, 4, dtype=torch.float64)), TypeError,
                            "scores must be Float"),
    "router gamma shape": (lambda: _router(gamma=torch.ones(9)), ValueError, "gamma must have shape"),
    "compact_counts keep dtype": (lambda: ops.compact_counts(torch.ones(2, 3), torch.empty(3, dtype=torch.int32)),
                                  TypeError, "keep must be Bool"),
    "compact total": (lambda: ops.compact(_bool(2, 3), torch.zeros(2, 3, dtype=torch.long),
                                          torch.tensor([0, 3, 6], dtype=torch.int32), torch.empty(5, dtype=torch.long),
                                          torch.empty(5, dtype=torch.long)), ValueError, "cu_seqlens[-1] = 6"),
    "compact position dtype": (lambda: ops.compact(_bool(1, 3), torch.zeros(1, 3), torch.tensor([0, 3],
                                                   dtype=torch.int32), torch.empty(3, dtype=torch.long),
                                                   torch.empty(3, dtype=torch.long)), TypeError, "position_ids"),
    "gather x rank": (lambda: ops.gather(torch.randn(2, 3, 4), torch.zeros(1, dtype=torch.long), torch.empty(1, 4)),
                      ValueError, "x must be 2-D"),
    "gather indices dtype": (lambda: ops.gather(torch.randn(3, 4), torch.zeros(1, dtype=torch.int32),
                                                torch.empty(1, 4)), TypeError, "indices must be Long"),
    "gather index range": (lambda: ops.gather(torch.randn(3, 4), torch.tensor([0, 3]), torch.empty(2, 4)),
                           ValueError, "indices[1] = 3 is out of range"),
    "gather out shape": (lambda: ops.gather(torch.randn(3, 4), torch.tensor([0, 2]), torch.empty(2, 5)),
                         ValueError, "out must have shape"),
    "gather out contiguous": (lambda: ops.gather(torch.randn(3, 4), torch.tensor([0, 2]), torch.empty(4, 2).t()),
                              ValueError, "must be contiguous"),
    "scatter values shape": (lambda: ops.scatter_add(torch.randn(3, 4), torch.randn(2, 5), torch.tensor([0, 2]),
                                                     None, torch.empty(3, 4)), ValueError, "values must have shape"),
    "scatter values dtype": (lambda: ops.scatter_add(torch.randn(3, 4), torch.randn(2, 4).half(),
                                                     torch.tensor([0, 2]), None, torch.empty(3, 4)),
                             TypeError, "values must be Float"),
    "scatter unsorted": (lambda: ops.scatter_add(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([2, 0]), None,
                                                 torch.empty(3, 4)), ValueError, "strictly ascending"),
    "scatter scale shape": (lambda: ops.scatter_add(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 2]),
                                                    torch.rand(3), torch.empty(3, 4)), ValueError, "scale must have"),
    "decode gqa": (lambda: ops.decode_attention(torch.randn(1, 6, 8), torch.randn(1, 5, 4, 8), torch.randn(1, 5, 4, 8),
                                                torch.tensor([3]), None, 1.0, torch.empty(1, 6, 8)),
                   ValueError, "must be a multiple of cache heads"),
    "decode head dim": (lambda: ops.decode_attention(torch.randn(1, 2, 300), torch.randn(1, 5, 1, 300),
                                                     torch.randn(1, 5, 1, 300), torch.tensor([3]), None, 1.0,
                                                     torch.empty(1, 2, 300)), ValueError, "head dim must be in"),
    "decode seqlens dtype": (lambda: ops.decode_attention(torch.randn(1, 2, 8), torch.randn(1, 5, 1, 8),
                                                          torch.randn(1, 5, 1, 8), torch.tensor([3.0]), None, 1.0,
                                                          torch.empty(1, 2, 8)), TypeError, "cache_seqlens must be"),
    "varlen cu order": (lambda: ops.varlen_attention(torch.randn(4, 2, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8),
                                                     torch.tensor([0, 3, 2, 4]), torch.tensor([0, 1, 2, 4]), True, 1.0,
                                                     torch.empty(4, 2, 8)), ValueError, "cu_seqlens_q must be"),
    "varlen k dtype": (lambda: ops.varlen_attention(torch.randn(4, 2, 8), torch.randn(4, 2, 8).double(),
                                                    torch.randn(4, 2, 8), torch.tensor([0, 4]), torch.tensor([0, 4]),
                                                    True, 1.0, torch.empty(4, 2, 8)), TypeError, "k must be Float"),
    "varlen positions dtype": (lambda: _varlen(torch.arange(4.0)), TypeError, "query_positions must be int32 or int64"),
    "varlen positions shape": (lambda: _varlen(torch.arange(3)), ValueError, "query_positions must have shape [4]"),
    "varlen positions causal": (lambda: _varlen(torch.arange(4), causal=False), ValueError, "needs causal=True"),
    "paged positions dtype": (lambda: _paged_varlen(torch.arange(4.0)), TypeError,
                              "paged_varlen_attention: query_positions must be int32"),
    "paged positions shape": (lambda: _paged_varlen(torch.arange(4).view(2, 2)), ValueError,
                              "query_positions must have shape [4]"),
    "paged positions causal": (lambda: _paged_varlen(torch.arange(4), causal=False), ValueError,
                               "paged_varlen_attention: query_positions needs causal=True"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_from_cpp(case):
    call, exc, message = BAD_CALLS[case]
    with pytest.raises(exc, match=None) as info:
        call()
    assert message in str(info.value), f"expected {message!r} in: {info.value}"


# ---- backend selection ------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", list(compiled.KERNELS))
def test_auto_picks_compiled_on_cpu(op):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert resolve("auto", op, torch.device("cpu"), dtype) is compiled


def test_supports_is_honest():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not compiled.supports("router", cpu, torch.int32)
    assert compiled.supports("gather", cpu, torch.int32)  # byte copies
    assert not compiled.supports("no_such_op", cpu, torch.float32)
    assert not compiled.supports("router", torch.device("meta"), torch.float32)
    has_cuda = bool(compiled.build_info().get("cuda"))
    for op in ("router", "compact", "gather", "scatter_add", "decode_attention"):
        assert compiled.supports(op, cuda, torch.bfloat16) == has_cuda
    assert not compiled.supports("varlen_attention", cuda, torch.float16)  # CPU kernel only


# ---- torch.compile (fake implementations) -----------------------------------------------------------------


def _small_inputs():
    keep = random_keep(2, 33, "random")
    plan = mk.RoutingPlan.from_keep(keep, backend="reference")
    x = torch.randn(2 * 33, 24)
    values = torch.randn(plan.num_kept, 24)
    return keep, plan, x, values


def test_torch_compile_fullgraph():
    keep, plan, x, values = _small_inputs()
    z = torch.randn(2, 33, 24)
    w = torch.randn(24)
    q, kc, vc, lens = torch.randn(2, 4, 16), torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16), torch.tensor([0, 7])

    def pipeline(z, w, keep, x, values, idx, scale, q, kc, vc, lens):
        scores, kept = compiled.router(z, w, keep, 0.5, "sequence")
        packed = compiled.gather(x, idx)
        out = compiled.scatter_add(x, values + packed, idx, scale)
        attn = compiled.decode_attention(q, kc, vc, lens, None, 0.25)
        return scores, kept, out, attn

    args = (z, w, keep, x, values, plan.indices, torch.rand(plan.num_kept), q, kc, vc, lens)
    eager = pipeline(*args)
    compiled_fn = torch.compile(pipeline, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled_fn(*args), eager, strict=True):
        assert torch.equal(got, want)


OPCHECK_CASES = {
    "router": lambda: (ops.router, (torch.randn(2, 5, 8), torch.randn(8), torch.rand(8), 1e-6, _bool(2, 5), 0.5,
                                    True, torch.empty(2, 5), _bool(2, 5))),
    "gather_norm": lambda: (ops.gather_norm, (torch.randn(6, 8), torch.rand(8), 1e-6, torch.tensor([1, 4]),
                                              torch.empty(2, 8))),
    "gather": lambda: (ops.gather, (torch.randn(6, 8), torch.tensor([1, 4]), torch.empty(2, 8))),
    "scatter_add": lambda: (ops.scatter_add, (torch.randn(6, 8), torch.randn(2, 8), torch.tensor([1, 4]),
                                              torch.rand(2), torch.empty(6, 8))),
    "decode_attention": lambda: (ops.decode_attention, (torch.randn(2, 4, 16), torch.randn(2, 9, 2, 16),
                                                        torch.randn(2, 9, 2, 16), torch.tensor([3, 9]), None, 0.25,
                                                        torch.empty(2, 4, 16))),
    "compact_counts": lambda: (ops.compact_counts, (random_keep(3, 7, "random"), torch.empty(4, dtype=torch.int32))),
    "varlen_attention positions": lambda: (ops.varlen_attention, (
        torch.randn(7, 4, 16), torch.randn(9, 2, 16), torch.randn(9, 2, 16), torch.tensor([0, 3, 7]),
        torch.tensor([0, 5, 9]), True, 0.25, torch.empty(7, 4, 16), torch.tensor([4, 0, -1, 3, 1, 2, 9]))),
    "varlen_attention batched": lambda: (ops.varlen_attention, (  # equal lengths, positions == index once clamped
        torch.randn(8, 4, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16), torch.tensor([0, 4, 8]),
        torch.tensor([0, 4, 8]), True, 0.25, torch.empty(8, 4, 16), torch.tensor([0, 1, 2, 3, 0, 1, 2, 9]))),
    "paged_varlen_attention positions": lambda: (ops.paged_varlen_attention, (
        torch.randn(5, 4, 16), torch.randn(4, 4, 2, 16), torch.randn(4, 4, 2, 16), torch.tensor([0, 2, 5]),
        torch.tensor([6, 3]), torch.tensor([[3, 1], [0, 2]], dtype=torch.int32), True, 0.25, torch.empty(5, 4, 16),
        torch.tensor([5, 1, 2, 0, 7], dtype=torch.int32))),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case):
    """Schema (mutation annotations), fake implementation and dispatch agree with the real kernel."""
    op, args = OPCHECK_CASES[case]()
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ---- cases beyond test_kernels.py -------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_router_fp64(granularity):
    z, w = torch.randn(3, 97, 40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    mask = random_keep(3, 97, "empty_seq")  # sequence 0 has no real token
    scores, keep = compiled.router(z, w, mask, 0.5, granularity)
    ref_scores, ref_keep = reference.router(z, w, mask, 0.5, granularity)
    torch.testing.assert_close(scores.double(), ref_scores, atol=1e-7, rtol=0)
    assert torch.equal(keep, ref_keep)


def test_compact_int32_positions():
    keep = random_keep(3, 97, "random")
    positions = torch.randint(0, 1000, (3, 97), dtype=torch.int32)
    got = compiled.compact(keep, positions)
    want = reference.compact(keep, positions)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == r.dtype and torch.equal(g, r)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_scatter_add_exact_with_scale(dtype):
    keep = random_keep(2, 97, "random")
    idx = keep.reshape(-1).nonzero().squeeze(1)
    residual, values = torch.randn(2 * 97, 40).to(dtype), torch.randn(idx.numel(), 40).to(dtype)
    scale = torch.rand(idx.numel())
    assert torch.equal(compiled.scatter_add(residual, values, idx, scale),
                       reference.scatter_add(residual, values, idx, scale))


def test_decode_attention_strided_cache():
    """A cache that is a view into a larger buffer (capacity slice, heads interleaved) is read in place."""
    big_k = torch.randn(3, 40, 2, 2, 64)
    big_v = torch.randn(3, 40, 2, 2, 64)
    k_cache, v_cache = big_k[:, :30, :, 1], big_v[:, :30, :, 0]  # [3, 30, 2, 64], non-contiguous
    q, lens = torch.randn(3, 6, 64), torch.tensor([0, 17, 45], dtype=torch.int64)  # 45 > capacity: clamped
    out = compiled.decode_attention(q, k_cache, v_cache, lens, None, 0.125)
    truth = reference.decode_attention(q.double(), k_cache.double(), v_cache.double(), lens, None, 0.125)
    assert_within_rule(out, reference.decode_attention(q, k_cache, v_cache, lens, None, 0.125), truth)


def test_varlen_attention_fp64_int64_offsets():
    q, k, v = (torch.randn(50, 4, 24, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 0, 13, 50])
    for causal in (True, False):
        got = compiled.varlen_attention(q, k, v, cu, cu, 37, 37, causal, 0.2)
        want = reference.varlen_attention(q, k, v, cu, cu, 37, 37, causal, 0.2)
        torch.testing.assert_close(got, want)


def test_query_positions_fp64():
    """fp64 (a dtype only this kernel and the reference take) with int32 positions in any order: as exact as the
    reference's."""
    q, k, v = (torch.randn(n, 4, 24, dtype=torch.float64) for n in (50, 80, 80))
    cu_q, cu_k = torch.tensor([0, 0, 13, 50]), torch.tensor([0, 3, 10, 80])
    pos = torch.randint(-2, 75, (50,), dtype=torch.int32)
    got = compiled.varlen_attention(q, k, v, cu_q, cu_k, 37, 70, True, 0.2, pos)
    want = reference.varlen_attention(q, k, v, cu_q, cu_k, 37, 70, True, 0.2, pos)
    torch.testing.assert_close(got, want)


# ---- fused RMSNorm paths (router_from_hidden, gather_norm) ----------------------------------------------


def _norm_inputs(dtype: torch.dtype, b: int, n: int, d: int):
    x = (3 * torch.randn(b, n, d)).to(dtype)
    gamma = (1 + 0.1 * torch.randn(d)).to(dtype)
    w = (torch.randn(d) / d**0.5).to(dtype)
    return x, gamma, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 97, 40), (3, 1025, 64)])
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_router_from_hidden(dtype, shape, granularity):
    b, n, d = shape
    x, gamma, w = _norm_inputs(dtype, b, n, d)
    mask = random_keep(b, n, "empty_seq") if n > 1 else _bool(b, n)
    scores, keep = compiled.router_from_hidden(x, gamma, 1e-5, w, mask, 0.5, granularity)
    low = reference.router(torch.nn.functional.rms_norm(x, (d,), gamma, 1e-5), w, mask, 0.5, granularity)[0]
    z64 = torch.nn.functional.rms_norm(x.double(), (d,), gamma.double(), 1e-5)
    truth, truth_keep = reference.router(z64, w.double(), mask, 0.5, granularity)
    assert_within_rule(scores[mask], low.float()[mask], truth[mask], "scores")
    clear = (truth - 0.5).abs() > 1e-3
    assert torch.equal(keep[clear], truth_keep[clear])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["random", "all", "none"])
def test_gather_norm(dtype, pattern):
    x, gamma, _ = _norm_inputs(dtype, 2, 97, 40)
    x2d = x.reshape(-1, 40)
    idx = random_keep(2, 97, pattern).reshape(-1).nonzero().squeeze(1)
    out = compiled.gather_norm(x2d, gamma, 1e-6, idx)
    low = torch.nn.functional.rms_norm(x2d, (40,), gamma, 1e-6)[idx]
    truth = torch.nn.functional.rms_norm(x2d.double(), (40,), gamma.double(), 1e-6)[idx]
    assert out.dtype == dtype
    assert_within_rule(out, low, truth, "gather_norm")


def test_norm_bad_input():
    with pytest.raises(ValueError, match="gamma must have shape"):
        compiled.gather_norm(torch.randn(4, 8), torch.ones(7), 1e-6, torch.tensor([1]))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        compiled.router_from_hidden(torch.randn(1, 4, 8), torch.ones(8), -1.0, torch.randn(8), _bool(1, 4), 0.5,
                                    "token")


# ---- info -------------------------------------------------------------------------------------------------


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "mindskip_kernels", "info"], capture_output=True, text=True,
                         check=True).stdout
    assert "torch" in out and "compiled" in out and "reference" in out
    info = compiled.build_info()
    assert ("CUDA kernels: yes" in out) == bool(info["cuda"])
    if info["cuda"]:
        assert info["cuda_archs"] in out
