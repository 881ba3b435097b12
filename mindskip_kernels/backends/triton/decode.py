"""Decode attention (one query per sequence against a ragged KV cache), split along the cache length so a
small batch still fills the GPU: each program attends all query heads of one KV head (GQA without
expansion) over one chunk, then a combine pass merges the chunks by their log-sum-exp."""

import torch
import triton
import triton.language as tl

from mindskip_kernels.backends._alloc import empty
from mindskip_kernels.backends.triton._common import INTERPRET, dot_precision, fix_bf16, pow2, rounded
from mindskip_kernels.backends.triton.attention_fwd import LOG2E, attend_block_range, contiguous_last, head_dim_block

BLOCK_N = 64
MIN_SPLIT = 2 * BLOCK_N


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, lens_ptr, part_o_ptr, part_lse_ptr, stride_qb, stride_qh,
                         stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, n_heads, head_dim,
                         qk_scale, GROUP, split_len, n_splits, FIX_BF16: tl.constexpr, DOT_PREC: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial attention of the GROUP query heads of one KV head over cache rows split*split_len.. ."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, tl.load(lens_ptr + seq).to(tl.int32))
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_h
    ok = (offs_h < GROUP)[:, None] & (offs_d < head_dim)[None, :]
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=ok,
                other=0.0)
    if FIX_BF16:
        q = q.to(tl.float32)
    k_base = k_ptr + seq.to(tl.int64) * stride_kb + kv_head * stride_kh
    v_base = v_ptr + seq.to(tl.int64) * stride_vb + kv_head * stride_vh
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = attend_block_range(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, lo, hi, hi, 0,
                                       offs_h, offs_d, head_dim, qk_scale, True, False, FIX_BF16, DOT_PREC,
                                       BLOCK_N)
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


def _num_splits(batch: int, kv_heads: int, cache_len: int, device: torch.device) -> int:
    """Chunks per (sequence, KV head): enough programs to fill the GPU, from shapes only (no sync)."""
    target = 64 if INTERPRET else 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(target, max(batch * kv_heads, 1)), triton.cdiv(cache_len, MIN_SPLIT)))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     softmax_scale: float) -> torch.Tensor:
    """q [B, Hq, Dh] against caches [B, S, Hkv, Dh] rows 0..cache_seqlens[b]-1 -> [B, Hq, Dh]."""
    q, k_cache, v_cache = contiguous_last(q, k_cache, v_cache)
    batch, heads, head_dim = q.shape
    cache_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
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
    _decode_split_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, cache_seqlens, part_o, part_lse, q.stride(0), q.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), heads,
        head_dim, softmax_scale * LOG2E, group, split_len, splits, FIX_BF16=fix_bf16(q.dtype),
        DOT_PREC=dot_precision(q.dtype), BLOCK_H=pow2(group), BLOCK_N=BLOCK_N, BLOCK_D=block_d, num_warps=4)
    _decode_combine_kernel[(batch * heads,)](part_o, part_lse, out, splits, head_dim, FIX_BF16=fix_bf16(q.dtype),
                                             BLOCK_S=pow2(splits, 1), BLOCK_D=block_d, num_warps=4)
    return out
