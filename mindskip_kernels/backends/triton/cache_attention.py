"""Attention over a K/V cache. Decode attention (one query per sequence against a ragged KV cache, dense or
paged) is split along the cache length so a small batch still fills the GPU: each program attends all query
heads of one KV head (GQA without expansion) over one chunk, then a combine pass merges the chunks by their
log-sum-exp.

The cache is dense [B, S, Hkv, Dh] or a paged pool [num_blocks, block_size, Hkv, Dh] read in place through
an int32 block table (vLLM / flash-attention layout); one kernel body, rows addressed by `_cache_rows`. The
split count depends on shapes only (no host read of the lengths), and a sequence of length 0 (a skipped
row of a routed decode step) loads no K/V and gets zeros. `paged_varlen_attention` (prefill with a cache,
chunked prefill) reads the same pools: packed queries, keys through the block table, causal bottom-right or, with
query positions (HAS_QPOS), each query row up to its own position. Ends with the custom ops and their fakes.
"""

import torch
import triton
import triton.language as tl

from mindskip_kernels.backends._alloc import empty
from mindskip_kernels.backends.triton._common import INTERPRET, dot_precision, fix_bf16, pow2, rounded
from mindskip_kernels.backends.triton.attention_fwd import (
    LOG2E,
    contiguous_last,
    head_dim_block,
    online_softmax_step,
    position_block_bounds,
)

BLOCK_N = 64
MIN_SPLIT = 2 * BLOCK_N


@triton.jit
def _cache_rows(table_ptr, stride_tb, seq, cols, col_ok, block_size, n_blocks, PAGED: tl.constexpr):
    """(block, row in block) of rows `cols` of sequence `seq`: through the block table (ids clamped to the
    pool, like the reference), or block `seq`, row `cols` of a dense cache."""
    if PAGED:
        block = tl.load(table_ptr + seq.to(tl.int64) * stride_tb + cols // block_size, mask=col_ok, other=0)
        block = tl.minimum(tl.maximum(block, 0), n_blocks - 1)
        return block.to(tl.int64), (cols % block_size).to(tl.int64)
    return seq.to(tl.int64) + tl.zeros_like(cols).to(tl.int64), cols.to(tl.int64)


@triton.jit
def _load_kv(k_ptr, v_ptr, table_ptr, stride_tb, seq, kv_head, cols, col_ok, offs_d, head_dim, block_size, n_blocks,
             stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, PAGED: tl.constexpr,
             FIX_BF16: tl.constexpr):
    """K and V tiles [BLOCK_N, BLOCK_D] of rows `cols` of sequence `seq`, one KV head; rows past the length
    (col_ok False) are never loaded."""
    block, row = _cache_rows(table_ptr, stride_tb, seq, cols, col_ok, block_size, n_blocks, PAGED)
    kv_ok = col_ok[:, None] & (offs_d < head_dim)[None, :]
    k = tl.load(k_ptr + (block * stride_kb + row * stride_ks + kv_head * stride_kh)[:, None] + offs_d[None, :],
                mask=kv_ok, other=0.0)
    v = tl.load(v_ptr + (block * stride_vb + row * stride_vs + kv_head * stride_vh)[:, None] + offs_d[None, :],
                mask=kv_ok, other=0.0)
    if FIX_BF16:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, lens_ptr, table_ptr, part_o_ptr, part_lse_ptr, stride_qb, stride_qh,
                         stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_tb, block_size,
                         n_blocks, cap, n_heads, head_dim, qk_scale, GROUP, split_len, n_splits, PAGED: tl.constexpr,
                         FIX_BF16: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial attention of the GROUP query heads of one KV head over cache rows split*split_len.. ."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, tl.minimum(tl.load(lens_ptr + seq).to(tl.int32), cap))
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_h
    ok = (offs_h < GROUP)[:, None] & (offs_d < head_dim)[None, :]
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=ok,
                other=0.0)
    if FIX_BF16:
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        k, v = _load_kv(k_ptr, v_ptr, table_ptr, stride_tb, seq, kv_head, cols, col_ok, offs_d, head_dim, block_size,
                        n_blocks, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, PAGED, FIX_BF16)
        qk = tl.where(col_ok[None, :], tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, DOT_PREC)
    seen = l_i > 0.0
    part = (seq.to(tl.int64) * n_heads + heads) * n_splits + split
    tl.store(part_o_ptr + part[:, None] * BLOCK_D + offs_d[None, :], acc / tl.where(seen, l_i, 1.0)[:, None],
             mask=ok)
    tl.store(part_lse_ptr + part, tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf")),
             mask=offs_h < GROUP)


@triton.jit
def _decode_combine_kernel(part_o_ptr, part_lse_ptr, o_ptr, n_splits, head_dim, FIX_BF16: tl.constexpr,
                           BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, h] = the chunks' outputs weighted by their softmax mass (zeros when no chunk saw a key)."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_splits
    lse = tl.load(part_lse_ptr + row * n_splits + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    weight = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    parts = tl.load(part_o_ptr + (row * n_splits + offs_s)[:, None] * BLOCK_D + offs_d[None, :],
                    mask=s_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    total = tl.sum(weight, axis=0)
    out = tl.sum(parts * weight[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(o_ptr + row * head_dim + offs_d, rounded(out, o_ptr.dtype.element_ty, FIX_BF16),
             mask=offs_d < head_dim)


@triton.jit
def _paged_varlen_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu_q_ptr, lens_ptr, table_ptr, qpos_ptr, stride_qt, stride_qh,
                         stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_ot, stride_oh,
                         stride_tb, block_size, n_blocks, cap, head_dim, qk_scale, GROUP, IS_CAUSAL: tl.constexpr,
                         HAS_QPOS: tl.constexpr, FIX_BF16: tl.constexpr, DOT_PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """BLOCK_M packed queries of one head of one sequence against its keys 0..len-1 in the paged pool (online
    softmax in fp32, causal aligned bottom-right, or with HAS_QPOS query row t sees keys 0..qpos[t], the key
    blocks every row sees whole unmasked; a query that sees no key gets zeros)."""
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    if start_m >= q_len:
        return
    k_len = tl.maximum(tl.minimum(tl.load(lens_ptr + seq).to(tl.int32), cap), 0)
    kv_head = head // GROUP
    diag = k_len - q_len
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = (q_start + offs_m).to(tl.int64)
    q_ok = (offs_m < q_len)[:, None] & (offs_d < head_dim)[None, :]
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=q_ok, other=0.0)
    if FIX_BF16:
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if HAS_QPOS:
        last, full, hi = position_block_bounds(qpos_ptr, rows, offs_m < q_len, k_len, BLOCK_N)
        for start_n in range(0, full, BLOCK_N):  # keys every row of the block sees: no mask
            cols = start_n + tl.arange(0, BLOCK_N)
            k, v = _load_kv(k_ptr, v_ptr, table_ptr, stride_tb, seq, kv_head, cols, cols < full, offs_d, head_dim,
                            block_size, n_blocks, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                            True, FIX_BF16)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, DOT_PREC)
    else:
        last = offs_m + diag
        full = 0
        hi = k_len
        if IS_CAUSAL:
            hi = tl.maximum(tl.minimum(k_len, start_m + BLOCK_M + diag), 0)
    for start_n in range(full, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        k, v = _load_kv(k_ptr, v_ptr, table_ptr, stride_tb, seq, kv_head, cols, col_ok, offs_d, head_dim, block_size,
                        n_blocks, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, True, FIX_BF16)
        allowed = col_ok[None, :]
        if IS_CAUSAL:
            allowed = allowed & (cols[None, :] <= last[:, None])
        qk = tl.where(allowed, tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, DOT_PREC)
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(o_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             rounded(out, o_ptr.dtype.element_ty, FIX_BF16), mask=q_ok)


def _num_splits(batch: int, kv_heads: int, cache_len: int, device: torch.device) -> int:
    """Chunks per (sequence, KV head): enough programs to fill the GPU, from shapes only (no sync)."""
    target = 64 if INTERPRET else 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(target, max(batch * kv_heads, 1)), triton.cdiv(cache_len, MIN_SPLIT)))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     block_table: torch.Tensor | None, softmax_scale: float) -> torch.Tensor:
    """q [B, Hq, Dh] against caches [B, S, Hkv, Dh] (or pools [num_blocks, block_size, Hkv, Dh] through
    `block_table` [B, max_blocks]), rows 0..cache_seqlens[b]-1 -> [B, Hq, Dh]."""
    q, k_cache, v_cache = contiguous_last(q, k_cache, v_cache)
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    paged = block_table is not None
    if paged:
        block_table = block_table.contiguous()
        cache_len = block_table.shape[1] * k_cache.shape[1] if k_cache.shape[0] else 0
    else:
        cache_len = k_cache.shape[1]
    out = empty((batch, heads, head_dim), q.dtype, q.device)
    if out.numel() == 0:
        return out
    splits = _num_splits(batch, kv_heads, cache_len, q.device)
    split_len = triton.cdiv(triton.cdiv(max(cache_len, 1), splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(max(cache_len, 1), split_len)
    block_d = head_dim_block(head_dim)
    part_o = torch.empty((batch, heads, splits, block_d), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((batch, heads, splits), dtype=torch.float32, device=q.device)
    group = heads // kv_heads
    table = block_table if paged else cache_seqlens  # never read when dense
    _decode_split_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, cache_seqlens, table, part_o, part_lse, q.stride(0), q.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        table.stride(0), k_cache.shape[1], k_cache.shape[0], cache_len, heads, head_dim, softmax_scale * LOG2E,
        group, split_len, splits, PAGED=paged, FIX_BF16=fix_bf16(q.dtype), DOT_PREC=dot_precision(q.dtype),
        BLOCK_H=pow2(group), BLOCK_N=BLOCK_N, BLOCK_D=block_d, num_warps=4)
    _decode_combine_kernel[(batch * heads,)](part_o, part_lse, out, splits, head_dim, FIX_BF16=fix_bf16(q.dtype),
                                             BLOCK_S=pow2(splits, 1), BLOCK_D=block_d, num_warps=4)
    return out


def paged_varlen_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cache_seqlens: torch.Tensor, block_table: torch.Tensor, max_seqlen_q: int, causal: bool,
                           softmax_scale: float, query_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Packed queries q [Tq, Hq, Dh] (cu_seqlens_q) against sequence b's rows 0..cache_seqlens[b]-1 of the
    pools, read through block_table -> [Tq, Hq, Dh]; with query_positions [Tq] query t sees rows
    0..query_positions[t] (causal)."""
    q, k_cache, v_cache = contiguous_last(q, k_cache, v_cache)
    block_table = block_table.contiguous()
    total_q, heads, head_dim = q.shape
    out = empty(q.shape, q.dtype, q.device)
    batch = cu_seqlens_q.numel() - 1
    if total_q == 0 or batch == 0 or max_seqlen_q == 0:
        return out
    cap = block_table.shape[1] * k_cache.shape[1] if k_cache.shape[0] else 0
    block_m = 64
    qpos = cu_seqlens_q if query_positions is None else query_positions.contiguous()  # read only with HAS_QPOS
    _paged_varlen_kernel[(triton.cdiv(max_seqlen_q, block_m), heads, batch)](
        q, k_cache, v_cache, out, cu_seqlens_q, cache_seqlens, block_table, qpos, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), out.stride(0), out.stride(1), block_table.stride(0), k_cache.shape[1], k_cache.shape[0],
        cap, head_dim, softmax_scale * LOG2E, heads // k_cache.shape[2], IS_CAUSAL=causal,
        HAS_QPOS=query_positions is not None, FIX_BF16=fix_bf16(q.dtype), DOT_PREC=dot_precision(q.dtype),
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_D=head_dim_block(head_dim), num_warps=4)
    return out


@torch.library.custom_op("mindskip_triton::paged_varlen_attention", mutates_args=())
def paged_varlen_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cache_seqlens: torch.Tensor, block_table: torch.Tensor, max_seqlen_q: int, causal: bool,
                    softmax_scale: float, query_positions: torch.Tensor | None = None) -> torch.Tensor:
    return paged_varlen_attention(q, k_cache, v_cache, cu_seqlens_q, cache_seqlens, block_table, max_seqlen_q,
                                  causal, softmax_scale, query_positions)


@paged_varlen_op.register_fake
def _(q, k_cache, v_cache, cu_seqlens_q, cache_seqlens, block_table, max_seqlen_q, causal, softmax_scale,
      query_positions=None):
    return torch.empty_like(q)


@torch.library.custom_op("mindskip_triton::decode_attention", mutates_args=())
def decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
              block_table: torch.Tensor | None, softmax_scale: float) -> torch.Tensor:
    return decode_attention(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale)


@decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale):
    return torch.empty_like(q)
