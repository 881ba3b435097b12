"""Varlen flash attention forward: one program per (query block, query head, sequence), online softmax over
the key blocks in fp32, causal aligned bottom-right, GQA by indexing the shared key/value head (never
expanded), head dims padded to a power of two with masks. Saves the log-sum-exp for the backward."""

import torch
import triton
import triton.language as tl

from mindskip_kernels.backends._alloc import empty
from mindskip_kernels.backends.triton._common import autotune, dot_precision, fix_bf16, pow2, rounded

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)
MAX_HEAD_DIM = 256


@triton.jit
def attend_block_range(acc, l_i, m_i, q, k_base, v_base, stride_k, stride_v, lo, hi, k_len, diag, offs_m,
                       offs_d, head_dim, qk_scale, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
                       FIX_BF16: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) with keys lo..hi (log2 domain, qk_scale includes log2 e).
    MASKED blocks apply key bounds (< k_len) and the causal mask (key <= query + diag)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (cols < k_len)[:, None] & (offs_d < head_dim)[None, :]
        k = tl.load(k_base + cols.to(tl.int64)[:, None] * stride_k + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + cols.to(tl.int64)[:, None] * stride_v + offs_d[None, :], mask=kv_ok, other=0.0)
        if FIX_BF16:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if MASKED:
            allowed = (cols < k_len)[None, :]
            if IS_CAUSAL:
                allowed = allowed & (cols[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet stay at zero
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def causal_block_bounds(start_m, k_len, diag, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """(full, hi): keys 0..full are visible to every query of the block in whole BLOCK_N blocks (no mask
    needed), keys full..hi need the mask, keys >= hi are invisible to the whole block."""
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(k_len, start_m + BLOCK_M + diag), 0)
        full = tl.maximum(tl.minimum(k_len, start_m + diag + 1), 0) // BLOCK_N * BLOCK_N
    else:
        hi = k_len
        full = k_len // BLOCK_N * BLOCK_N
    return full, hi


CONFIGS = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
           triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
           triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=4),
           triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=4),
           triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3)]


@autotune(CONFIGS, key=["BLOCK_D", "IS_CAUSAL"])
@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_q_ptr, cu_k_ptr, stride_qt, stride_qh, stride_kt,
                     stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, total_q, head_dim, qk_scale, GROUP,
                     IS_CAUSAL: tl.constexpr, FIX_BF16: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    if start_m >= q_len:
        return
    k_start = tl.load(cu_k_ptr + seq)
    k_len = tl.load(cu_k_ptr + seq + 1) - k_start
    kv_head = head // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = (q_start + offs_m).to(tl.int64)
    q_ok = (offs_m < q_len)[:, None] & (offs_d < head_dim)[None, :]
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=q_ok, other=0.0)
    if FIX_BF16:
        q = q.to(tl.float32)
    k_base = k_ptr + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = v_ptr + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    diag = k_len - q_len
    full, hi = causal_block_bounds(start_m, k_len, diag, IS_CAUSAL, BLOCK_M, BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = attend_block_range(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, 0, full, k_len,
                                       diag, offs_m, offs_d, head_dim, qk_scale, False, IS_CAUSAL, FIX_BF16,
                                       DOT_PREC, BLOCK_N)
    acc, l_i, m_i = attend_block_range(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, full, hi, k_len,
                                       diag, offs_m, offs_d, head_dim, qk_scale, True, IS_CAUSAL, FIX_BF16,
                                       DOT_PREC, BLOCK_N)
    seen = l_i > 0.0  # queries that see no key output zeros and get lse = +inf (zero gradient)
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(o_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             rounded(out, o_ptr.dtype.element_ty, FIX_BF16), mask=q_ok)
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("inf"))
    tl.store(lse_ptr + head.to(tl.int64) * total_q + rows, lse, mask=offs_m < q_len)


def head_dim_block(head_dim: int) -> int:
    """The power-of-two block that holds a head (80 and 96 run in 128 with masked columns)."""
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"triton varlen attention supports head dims up to {MAX_HEAD_DIM}, got {head_dim}")
    return pow2(head_dim)


def contiguous_last(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kernels index the head dim with stride 1."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                   cu_seqlens_k: torch.Tensor, max_seqlen_q: int, causal: bool, softmax_scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [Tq, Hq, Dh], lse [Hq, Tq] float32 natural-log log-sum-exp of the scaled logits)."""
    q, k, v = contiguous_last(q, k, v)
    total_q, heads, head_dim = q.shape
    out = empty(q.shape, q.dtype, q.device)
    lse = empty((heads, total_q), torch.float32, q.device)
    batch = cu_seqlens_q.numel() - 1
    if total_q == 0 or batch == 0 or max_seqlen_q == 0:
        return out, lse

    def grid(meta: dict) -> tuple[int, int, int]:
        return triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), heads, batch

    _attn_fwd_kernel[grid](q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, q.stride(0), q.stride(1), k.stride(0),
                           k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1), total_q, head_dim,
                           softmax_scale * LOG2E, heads // k.shape[1], IS_CAUSAL=causal,
                           FIX_BF16=fix_bf16(q.dtype), DOT_PREC=dot_precision(q.dtype),
                           BLOCK_D=head_dim_block(head_dim))
    return out, lse
