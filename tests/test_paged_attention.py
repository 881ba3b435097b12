"""Paged decode and paged varlen attention of every backend against the reference: K/V pools read in place
through a block table (vLLM / flash-attention layout), ragged lengths, empty caches, block boundaries,
shuffled tables, GQA, NaN-poisoned unused pool rows and table entries, zero batch, bad inputs; paged varlen with
query positions (kept queries of a chunk against the whole cached sequence)."""

from __future__ import annotations

import re

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.backends import module, resolve
from mindskip_kernels.kv_pool import PagedKVPool, PoolFullError
from mindskip_kernels.ops import paged_varlen_attention
from tests.cases import CHUNK_CASES, DISPATCH_CASES, DISPATCH_HEADS, DISPATCH_MODES, LOW, POSITION_PATTERNS
from tests.harness import (
    DISPATCH_BACKENDS,
    GARBAGE_BLOCK,
    assert_within_rule,
    backend_params,
    bad_query_positions,
    chunk_positions,
    dispatch_positions,
    masked_sdpa,
    paged,
    query_positions,
)

BACKENDS = backend_params("cpu")

DECODE_CASES = {  # lengths, block size, (Hq, Hkv), Dh
    "ragged_bs16_gqa": ([0, 1, 15, 16, 17, 33, 100], 16, (8, 2), 64),
    "boundaries_bs16": ([31, 32, 33, 48], 16, (4, 4), 40),
    "block_size_1": ([0, 1, 2, 9], 1, (9, 3), 32),
    "block_size_5_long": ([203, 7], 5, (6, 2), 80),
    "all_empty": ([0, 0, 0], 16, (4, 2), 64),
    "batch_1": ([300], 16, (2, 1), 128),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_paged_decode_matches_reference(backend, dtype, case):
    lengths, block_size, (hq, hkv), dh = DECODE_CASES[case]
    batch, cap = len(lengths), max(lengths) + 2
    q = torch.randn(batch, hq, dh).to(dtype)
    dense_k, dense_v = (torch.randn(batch, cap, hkv, dh).to(dtype) for _ in range(2))
    for b, n in enumerate(lengths):  # rows past the length: poison in the dense form too
        dense_k[b, n:] = float("nan")
        dense_v[b, n:] = float("nan")
    k_pool, v_pool, table = paged(dense_k, dense_v, lengths, block_size)
    lens = torch.tensor(lengths, dtype=torch.int32)
    out = mk.decode_attention(q, k_pool, v_pool, lens, block_table=table, backend=backend)
    low = mk.decode_attention(q, k_pool, v_pool, lens, block_table=table, backend="reference")
    truth = mk.decode_attention(q.double(), dense_k.double(), dense_v.double(), lens, backend="reference")
    assert out.dtype == dtype and out.shape == (batch, hq, dh)
    assert_within_rule(out, low, truth, "paged decode")
    for b, n in enumerate(lengths):
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b])), "an empty cache must give zeros"


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_decode_fp64_and_int64_lengths(backend):
    if backend == "triton":
        pytest.skip("the Triton kernels are fp16/bf16/fp32")
    lengths = [5, 0, 18]
    dense_k, dense_v = (torch.randn(3, 20, 2, 16, dtype=torch.float64) for _ in range(2))
    k_pool, v_pool, table = paged(dense_k, dense_v, lengths, 4)
    q = torch.randn(3, 4, 16, dtype=torch.float64)
    lens = torch.tensor(lengths)
    out = mk.decode_attention(q, k_pool, v_pool, lens, block_table=table, softmax_scale=0.3, backend=backend)
    truth = mk.decode_attention(q, dense_k, dense_v, lens, softmax_scale=0.3, backend="reference")
    torch.testing.assert_close(out, truth)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_decode_shared_blocks_and_strided_pool(backend):
    """Two sequences may read the same block (prefix sharing); a pool may be a strided view."""
    store = torch.randn(6, 8, 4, 2, 32)  # [blocks, block_size, 4 heads, (k, v), Dh]
    k_pool, v_pool = store[:, :, :2, 0], store[:, :, :2, 1]  # strided views, last dim contiguous
    table = torch.tensor([[3, 1, 5], [3, 0, GARBAGE_BLOCK]], dtype=torch.int32)
    lens = torch.tensor([20, 9], dtype=torch.int32)
    q = torch.randn(2, 4, 32)
    out = mk.decode_attention(q, k_pool, v_pool, lens, block_table=table, backend=backend)
    blocks = [[3, 1, 5], [3, 0, 0]]  # sequence 1 has 9 rows: its third block is never read
    dense_k, dense_v = (torch.stack([pool[b].reshape(24, 2, 32) for b in blocks]) for pool in (k_pool, v_pool))
    truth = mk.decode_attention(q.double(), dense_k.double(), dense_v.double(), lens, backend="reference")
    assert_within_rule(out, mk.decode_attention(q, k_pool, v_pool, lens, block_table=table, backend="reference"),
                       truth)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_decode_zero_batch_and_empty_pool(backend):
    q = torch.randn(0, 4, 16)
    pool = torch.randn(3, 4, 2, 16)
    out = mk.decode_attention(q, pool, pool, torch.zeros(0, dtype=torch.int32),
                              block_table=torch.zeros(0, 2, dtype=torch.int32), backend=backend)
    assert out.shape == (0, 4, 16)
    empty_pool = torch.randn(0, 4, 2, 16)
    q = torch.randn(2, 4, 16)
    out = mk.decode_attention(q, empty_pool, empty_pool, torch.zeros(2, dtype=torch.int32),
                              block_table=torch.zeros(2, 0, dtype=torch.int32), backend=backend)
    assert torch.equal(out, torch.zeros_like(out))


def _bad_decode_calls() -> dict:
    q, pool, lens = torch.randn(2, 4, 16), torch.randn(5, 4, 2, 16), torch.tensor([3, 1])
    table = torch.zeros(2, 3, dtype=torch.int32)
    return {
        "table dtype": (dict(block_table=table.long()), (q, pool, pool, lens), TypeError, "block_table must have"),
        "table rows": (dict(block_table=table[:1]), (q, pool, pool, lens), ValueError, "block_table must have shape"),
        "table rank": (dict(block_table=table[0]), (q, pool, pool, lens), ValueError, "block_table must have 2"),
        "block size 0": (dict(block_table=table), (q, pool[:, :0], pool[:, :0], lens), ValueError, "paged pool"),
        "pool head dim": (dict(block_table=table), (q, pool[..., :8], pool[..., :8], lens), ValueError, "paged pool"),
        "gqa": (dict(block_table=table), (torch.randn(2, 3, 16), pool, pool, lens), ValueError, "multiple of cache"),
        "v shape": (dict(block_table=table), (q, pool, pool[:4], lens), ValueError, "same shape"),
        "lens shape": (dict(block_table=table), (q, pool, pool, lens[:1]), ValueError, "cache_seqlens must have"),
        "pool dtype": (dict(block_table=table), (q, pool.half(), pool.half(), lens), TypeError, "k_cache must have"),
    }


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("case", list(_bad_decode_calls()))
def test_paged_decode_bad_inputs_same_error_for_every_backend(backend, case):
    kwargs, args, exc, message = _bad_decode_calls()[case]
    with pytest.raises(exc, match=message):
        mk.decode_attention(*args, **kwargs, backend=backend)


# ---- paged varlen (prefill with a cache, chunked prefill) ---------------------------------------------------

VARLEN_CASES = {  # new queries per sequence, cache lengths (new tokens included), block size, (Hq, Hkv), Dh
    "chunked_prefill": ([5, 1, 17], [37, 1, 17], 16, (8, 2), 64),
    "empty_and_bs1": ([0, 3, 2], [0, 9, 2], 1, (4, 4), 32),
    "long_chunk": ([70, 4], [130, 64], 16, (6, 3), 48),
}


def _paged_case(case: str, dtype: torch.dtype):
    """(q, k_pool, v_pool, table, cu_q, lens, the same keys and values packed, cu_k) of a VARLEN_CASES case;
    pool rows past each length are NaN and unused table entries out of range (harness.paged)."""
    lq, lk, block_size, (hq, hkv), dh = VARLEN_CASES[case]
    return _paged_inputs(lq, lk, block_size, hq, hkv, dh, dtype)


def _paged_inputs(lq: list[int], lk: list[int], block_size: int, hq: int, hkv: int, dh: int, dtype: torch.dtype):
    """`_paged_case` of given query lengths, cache lengths, block size and heads."""
    cu_q = torch.tensor([0] + lq).cumsum(0).int()
    q = torch.randn(int(cu_q[-1]), hq, dh).to(dtype)
    dense_k, dense_v = (torch.randn(len(lk), max(lk) + 1, hkv, dh).to(dtype) for _ in range(2))
    k_pool, v_pool, table = paged(dense_k, dense_v, lk, block_size)
    k_packed, v_packed = (torch.cat([d[b, :n] for b, n in enumerate(lk)]) for d in (dense_k, dense_v))
    cu_k = torch.tensor([0] + lk).cumsum(0).int()
    return q, k_pool, v_pool, table, cu_q, torch.tensor(lk, dtype=torch.int32), k_packed, v_packed, cu_k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", list(VARLEN_CASES))
@pytest.mark.parametrize("causal", [True, False])
def test_paged_varlen_matches_reference(backend, dtype, case, causal):
    lq, lk = VARLEN_CASES[case][:2]
    q, k_pool, v_pool, table, cu_q, lens, k_packed, v_packed, cu_k = _paged_case(case, dtype)
    out = paged_varlen_attention(q, k_pool, v_pool, cu_q, lens, table, max(lq), causal=causal, backend=backend)
    low = paged_varlen_attention(q, k_pool, v_pool, cu_q, lens, table, max(lq), causal=causal, backend="reference")
    # the same keys packed: plain varlen attention is the truth
    truth = mk.varlen_attention(q.double(), k_packed.double(), v_packed.double(), cu_q, cu_k, max(lq), max(lk),
                                causal=causal, backend="reference")
    assert_within_rule(out, low, truth, "paged varlen")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", list(VARLEN_CASES))
@pytest.mark.parametrize("pattern", POSITION_PATTERNS)
def test_paged_varlen_query_positions(backend, dtype, case, pattern):
    """Query t sees its sequence's cached rows 0..positions[t]: within the tolerance rule of the reference
    against an fp64 dense SDPA with the mask built in the test, on the packed copy of the cached keys."""
    lq, lk = VARLEN_CASES[case][:2]
    q, k_pool, v_pool, table, cu_q, lens, k_packed, v_packed, cu_k = _paged_case(case, dtype)
    pos = query_positions(lq, lk, pattern)
    args = (cu_q, lens, table, max(lq))
    out = paged_varlen_attention(q, k_pool, v_pool, *args, query_positions=pos, backend=backend)
    low = paged_varlen_attention(q, k_pool, v_pool, *args, query_positions=pos, backend="reference")
    truth = masked_sdpa(q, k_packed, v_packed, cu_q, cu_k, pos)
    assert out.dtype == dtype
    assert_within_rule(out, low, truth, "paged varlen with query positions")
    if pattern == "bottom_right":  # the last Lq positions are the causal rule itself
        causal = paged_varlen_attention(q, k_pool, v_pool, *args, backend=backend)
        assert torch.equal(out, causal), "positions != causal"


def _check_paged_paths(backend, dtype, lq, lk, causal, pos, seen):
    """paged_varlen_attention at `dtype` (block size 16, pool rows past each length NaN) within the tolerance rule
    of the reference against the fp64 dense-SDPA oracle (masked by `seen`) on the packed copy of the cached keys;
    a query that sees no key gets exactly zeros."""
    q, k_pool, v_pool, table, cu_q, lens, k_packed, v_packed, cu_k = _paged_inputs(lq, lk, 16, *DISPATCH_HEADS,
                                                                                   dtype)
    args = (cu_q, lens, table, max(lq))
    out = paged_varlen_attention(q, k_pool, v_pool, *args, causal=causal, query_positions=pos, backend=backend)
    low = paged_varlen_attention(q, k_pool, v_pool, *args, causal=causal, query_positions=pos, backend="reference")
    truth = masked_sdpa(q, k_packed, v_packed, cu_q, cu_k, seen)
    assert out.dtype == dtype and out.shape == q.shape
    assert_within_rule(out, low, truth, "paged varlen")
    blind = (seen < 0) | (lens.long().repeat_interleave(torch.tensor(lq)) == 0)
    assert torch.equal(out[blind], torch.zeros_like(out[blind])), "a query that sees no key gets zeros"


@pytest.mark.parametrize("backend", DISPATCH_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # every dtype: test_kernels.py's dispatch cases
@pytest.mark.parametrize("case", list(DISPATCH_CASES))
@pytest.mark.parametrize("mode", DISPATCH_MODES)
def test_paged_varlen_dispatch(backend, dtype, case, mode):
    """The compiled kernel's per-sequence paths through a block table: one causal call (as many queries as cached
    keys, query t sees 0..t), one unmasked call, zeros (an empty cache, no visible key), chunks of 64 queries (a
    position off by one, more keys than queries): the varlen dispatch cases of tests/cases.py."""
    lq, lk = DISPATCH_CASES[case]
    _check_paged_paths(backend, dtype, lq, lk, *dispatch_positions(lq, lk, mode))


@pytest.mark.parametrize("backend", DISPATCH_BACKENDS)
@pytest.mark.parametrize("dtype", [*LOW, torch.float64])
@pytest.mark.parametrize("case", list(CHUNK_CASES))
def test_paged_varlen_query_chunks(backend, dtype, case):
    """Kept queries of a chunk in chunks of 64 against the cached sequence: masked, unmasked and zero chunks,
    sequences that see nothing, every cached key, or keys 0..t, positions shuffled across the chunks' boundaries."""
    lq, lk, pos = chunk_positions(CHUNK_CASES[case])
    _check_paged_paths(backend, dtype, lq, lk, True, pos, pos)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_varlen_query_positions_zero_size(backend):
    """The kernels themselves (called directly) on no queries, and on a sequence with an empty cache (zeros)."""
    mod = module(backend)
    k_pool, v_pool = torch.randn(3, 4, 2, 16), torch.randn(3, 4, 2, 16)
    table = torch.tensor([[2, GARBAGE_BLOCK], [0, 1]], dtype=torch.int32)  # sequence 1: rows 0..5 in blocks 0, 1
    q = torch.randn(3, 4, 16)
    pos = torch.tensor([5, 4, 1], dtype=torch.int32)
    out = mod.paged_varlen_attention(q, k_pool, v_pool, torch.tensor([0, 1, 3]), torch.tensor([0, 6]), table, 2,
                                     True, 0.25, pos)
    assert torch.equal(out[0], torch.zeros_like(out[0])), "an empty cache gives zeros"
    k, v = (pool[:2].reshape(8, 2, 16)[:6] for pool in (k_pool, v_pool))
    truth = masked_sdpa(q[1:], k, v, torch.tensor([0, 2]), torch.tensor([0, 6]), pos[1:], 0.25)
    torch.testing.assert_close(out[1:].double(), truth, atol=1e-5, rtol=1e-5)
    out = mod.paged_varlen_attention(q[:0], k_pool, v_pool, torch.tensor([0, 0, 0]), torch.tensor([0, 6]), table, 0,
                                     True, 0.25, pos[:0])
    assert out.shape == (0, 4, 16)


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("case", list(bad_query_positions(4)))
def test_paged_varlen_bad_query_positions_same_error_for_every_backend(backend, case):
    kwargs, grad, exc, message = bad_query_positions(4)[case]
    q, pool = torch.randn(4, 2, 16, requires_grad=grad), torch.randn(3, 4, 2, 16)
    cu, lens, table = torch.tensor([0, 4]), torch.tensor([4]), torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(exc, match=re.escape(message)):
        paged_varlen_attention(q, pool, pool, cu, lens, table, 4, **kwargs, backend=backend)


def test_paged_varlen_one_query_equals_paged_decode():
    lengths = [9, 0, 40]
    dense_k, dense_v = (torch.randn(3, 41, 2, 32) for _ in range(2))
    k_pool, v_pool, table = paged(dense_k, dense_v, lengths, 8)
    q = torch.randn(3, 4, 32)
    lens = torch.tensor(lengths, dtype=torch.int32)
    varlen = paged_varlen_attention(q, k_pool, v_pool, torch.arange(4, dtype=torch.int32), lens, table, 1)
    torch.testing.assert_close(varlen, mk.decode_attention(q, k_pool, v_pool, lens, block_table=table))


def test_paged_varlen_bad_inputs():
    q, pool = torch.randn(4, 2, 16), torch.randn(3, 4, 2, 16)
    cu, lens, table = torch.tensor([0, 4]), torch.tensor([4]), torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_q must have"):
        paged_varlen_attention(q, pool, pool, cu[:0], lens, table, 4)
    with pytest.raises(ValueError, match="block_table must have shape"):
        paged_varlen_attention(q, pool, pool, cu, lens, torch.zeros(2, 2, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        paged_varlen_attention(q, pool, pool, cu, lens, table, -1)
    with pytest.raises(ValueError, match="does not support paged_varlen_attention"):
        resolve("compiled", "paged_varlen_attention", torch.device("cuda"), q.dtype)  # its kernel is CPU only


# ---- plans from known decisions ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_from_keep_matches_route(backend):
    """RoutingPlan.from_keep compacts given decisions exactly like route() compacts the router's."""
    z, w = torch.randn(3, 11, 8), torch.randn(8)
    pos = torch.randint(0, 50, (3, 11))
    routed = mk.route(z, w, position_ids=pos, backend="reference")
    plan = mk.RoutingPlan.from_keep(routed.keep, pos, scores=routed.scores, backend=backend)
    for name in ("scores", "keep", "indices", "cu_seqlens", "positions"):
        assert torch.equal(getattr(plan, name), getattr(routed, name)), name
    assert plan.max_seqlen == routed.max_seqlen
    empty = mk.RoutingPlan.from_keep(torch.zeros(2, 0, dtype=torch.bool), backend=backend)
    assert empty.num_kept == 0 and empty.cu_seqlens.tolist() == [0, 0, 0]
    with pytest.raises(TypeError, match="keep must have dtype"):
        mk.RoutingPlan.from_keep(torch.ones(2, 3), backend=backend)
    with pytest.raises(ValueError, match="scores must have shape"):
        mk.RoutingPlan.from_keep(routed.keep, scores=torch.rand(3, 10), backend=backend)


# ---- the block pool ---------------------------------------------------------------------------------------------


def test_pool_appends_kept_rows_only_and_grows_keeping_them():
    """Random keep patterns over many decode-like appends: each sequence stores exactly its kept rows in order
    (skipped rows take no slot), blocks are handed out exactly as needed, growth keeps the stored rows, and a
    fresh pool is NaN (never silently zero) under the test suite's poisoning."""
    pool = PagedKVPool(3, 2, 8, num_blocks=1, block_size=4)
    assert torch.isnan(pool.k).all(), "tests allocate pools NaN-filled"
    stored = [[] for _ in range(3)]
    for step in range(30):
        k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
        keep = torch.rand(3) < (0.0 if step % 7 == 0 else 0.6)
        rows = torch.arange(3)
        pool.append(k, v, rows, torch.zeros_like(rows), keep.int(), valid=keep, max_per_seq=1)
        for b in range(3):
            if keep[b]:
                stored[b].append((k[b], v[b]))
    assert pool.syncs > 0 and pool.num_blocks > 1, "the pool had to grow"
    assert pool.lengths.tolist() == [len(s) for s in stored]
    assert int(pool.next_block[0]) == sum(-(-len(s) // 4) for s in stored)
    for b in range(3):
        k_rows, v_rows = pool.gather(b)
        assert torch.equal(k_rows, torch.stack([k for k, _ in stored[b]]).reshape(-1, 2, 8))
        assert torch.equal(v_rows, torch.stack([v for _, v in stored[b]]).reshape(-1, 2, 8))


def test_pool_packed_append_and_byte_budget():
    """Prefill-style append of packed kept rows; a byte budget sizes the pool; a fixed pool refuses to overflow."""
    per_block = PagedKVPool.block_bytes(16, 2, 8, torch.float16)
    pool = PagedKVPool(2, 2, 8, max_bytes=5 * per_block + 7, dtype=torch.float16, growable=False,
                       max_blocks_per_seq=4)
    assert pool.num_blocks == 5
    keep = torch.tensor([[True] * 20 + [False] * 5, [False] * 24 + [True]])
    plan = mk.RoutingPlan.from_keep(keep)
    k = torch.randn(plan.num_kept, 2, 8).half()
    seq = plan.indices // 25
    rank = torch.arange(plan.num_kept) - plan.cu_seqlens.long()[seq]
    pool.append(k, k, seq, rank, plan.cu_seqlens[1:] - plan.cu_seqlens[:-1], max_per_seq=25)
    assert pool.lengths.tolist() == [20, 1] and int(pool.next_block[0]) == 3
    assert torch.equal(pool.gather(0)[0], k[:20]) and torch.equal(pool.gather(1)[0], k[20:])
    with pytest.raises(PoolFullError, match="num_blocks"):
        pool.append(torch.randn(50, 2, 8).half(), torch.randn(50, 2, 8).half(), torch.zeros(50, dtype=torch.long),
                    torch.arange(50), torch.tensor([50, 0]))
    with pytest.raises(ValueError, match="exactly one of num_blocks and max_bytes"):
        PagedKVPool(2, 2, 8)
