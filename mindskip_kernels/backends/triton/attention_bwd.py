"""Varlen flash attention backward (FlashAttention-2 split): a preprocess computes delta = rowsum(dO * O);
one kernel owns a key block and accumulates dK, dV over every query block and every query head of its GQA
group (the group reduction happens in registers: no atomics, so autotuning can rerun it); another owns a
query block and accumulates dQ over the key blocks. Probabilities are recomputed from the saved LSE; rows
that saw no key have lse = +inf, so their probabilities and gradients are zero. Layouts and keep flags as in
attention_fwd: with keep flags, a key block with no kept key gets gradient only from the diagonal queries,
and a query block skips the key blocks off its diagonal that hold no kept key."""

import torch
import triton
import triton.language as tl

from mindskip_kernels.backends._alloc import empty
from mindskip_kernels.backends.triton._common import autotune, dot_precision, fix_bf16, rounded
from mindskip_kernels.backends.triton.attention_fwd import (
    LOG2E,
    batch_offsets,
    causal_block_bounds,
    contiguous_last,
    head_dim_block,
    token_layout,
)

Tensor = torch.Tensor

PRE_BLOCK = 64


@triton.jit
def _delta_kernel(o_ptr, do_ptr, delta_ptr, total_q, head_dim, seq_len, stride_ot, stride_oh, skew_o, stride_dt,
                  stride_dh, skew_d, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1).to(tl.int64)  # head * head stride passes 2**31 in a long [B, H, N, Dh] batch
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows < total_q)[:, None] & (offs_d < head_dim)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    seq = r64 // seq_len  # row r of a batch [B, H, N, Dh] belongs to sequence r // N
    o = tl.load(o_ptr + seq * skew_o + r64 * stride_ot + head * stride_oh + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(do_ptr + seq * skew_d + r64 * stride_dt + head * stride_dh + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + head.to(tl.int64) * total_q + rows, delta, mask=rows < total_q)


@triton.jit
def _dot_rounded(a, b, acc, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr):
    """acc + a @ b for fp32 `a` and half-precision `b`: `a` is rounded to b's dtype for the tensor cores;
    SPLIT adds the product of the rounding residual, which makes `a` effectively fp32 (one more MMA)."""
    a_hi = a.to(b.dtype)
    acc = tl.dot(a_hi, b, acc, input_precision=DOT_PREC)
    if SPLIT:
        acc = tl.dot((a - a_hi.to(tl.float32)).to(b.dtype), b, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _dkdv_block_range(dk, dv, k, v, kept, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, lo, hi,
                      q_len, diag, offs_n, offs_d, head_dim, qk_scale, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
                      HAS_KEEP: tl.constexpr, FIX_BF16: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr,
                      BLOCK_M: tl.constexpr):
    """Accumulate dK, dV of one key block over the query blocks lo..hi of one head (transposed tiles); `kept`
    [BLOCK_N] holds the block's keep flags (read under HAS_KEEP)."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        ok = (rows < q_len)[:, None] & (offs_d < head_dim)[None, :]
        q = tl.load(q_base + rows.to(tl.int64)[:, None] * stride_qt + offs_d[None, :], mask=ok, other=0.0)
        do = tl.load(do_base + rows.to(tl.int64)[:, None] * stride_dot + offs_d[None, :], mask=ok, other=0.0)
        if FIX_BF16:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(lse_base + rows, mask=rows < q_len, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=rows < q_len, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale - lse[None, :])
        if MASKED:
            p_t = tl.where(offs_n[:, None] <= rows[None, :] + diag, p_t, 0.0)
        if HAS_KEEP:
            p_t = tl.where(kept[:, None] | (offs_n[:, None] == rows[None, :] + diag), p_t, 0.0)
        dv = _dot_rounded(p_t, do, dv, DOT_PREC, SPLIT)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot_rounded(ds_t, q, dk, DOT_PREC, SPLIT)
    return dk, dv


DKDV_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=3),
                triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=4, num_stages=3),
                triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3)]


@autotune(DKDV_CONFIGS, key=["BLOCK_D", "IS_CAUSAL", "HAS_KEEP"])
@triton.jit
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_q_ptr, cu_k_ptr, keep_ptr,
                 stride_qt, stride_qh, skew_q, stride_kt, stride_kh, skew_k, stride_vt, stride_vh, skew_v, stride_dot,
                 stride_doh, skew_do, stride_dkt, stride_dkh, skew_dk, stride_dvt, stride_dvh, skew_dv, total_q,
                 head_dim, softmax_scale, qk_scale, GROUP, IS_CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr,
                 FIX_BF16: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    kv_head = tl.program_id(1).to(tl.int64)  # kv_head * head stride passes 2**31 in a long batch
    seq = tl.program_id(2)
    k_start = tl.load(cu_k_ptr + seq)
    k_len = tl.load(cu_k_ptr + seq + 1) - k_start
    if start_n >= k_len:
        return
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    diag = k_len - q_len
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    keys = (k_start + offs_n).to(tl.int64)
    seq64 = seq.to(tl.int64)
    ok = (offs_n < k_len)[:, None] & (offs_d < head_dim)[None, :]
    k = tl.load(k_ptr + seq64 * skew_k + keys[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=ok,
                other=0.0)
    v = tl.load(v_ptr + seq64 * skew_v + keys[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=ok,
                other=0.0)
    if FIX_BF16:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    # query blocks before `lo` see none of these keys; from `full` on they see all of them (causal)
    if IS_CAUSAL:
        lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
        full = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - diag, lo), q_len)
        full = tl.cdiv(full, BLOCK_M) * BLOCK_M
    else:
        lo = 0
        full = 0
    hi = q_len
    kept = offs_n < k_len  # replaced by the keep flags under HAS_KEEP (read only there)
    if HAS_KEEP:
        kept = tl.load(keep_ptr + keys, mask=offs_n < k_len, other=0) != 0
        hi = tl.where(tl.max(kept.to(tl.int32), axis=0) == 0, full, q_len)  # no kept key: only j == i queries
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, GROUP):
        head = kv_head * GROUP + g
        q_base = q_ptr + seq64 * skew_q + q_start.to(tl.int64) * stride_qt + head * stride_qh
        do_base = do_ptr + seq64 * skew_do + q_start.to(tl.int64) * stride_dot + head * stride_doh
        lse_base = lse_ptr + head.to(tl.int64) * total_q + q_start
        delta_base = delta_ptr + head.to(tl.int64) * total_q + q_start
        dk, dv = _dkdv_block_range(dk, dv, k, v, kept, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                   lo, full, q_len, diag, offs_n, offs_d, head_dim, qk_scale, True, IS_CAUSAL,
                                   HAS_KEEP, FIX_BF16, DOT_PREC, SPLIT, BLOCK_M)
        dk, dv = _dkdv_block_range(dk, dv, k, v, kept, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                   full, hi, q_len, diag, offs_n, offs_d, head_dim, qk_scale, False, IS_CAUSAL,
                                   HAS_KEEP, FIX_BF16, DOT_PREC, SPLIT, BLOCK_M)
    tl.store(dk_ptr + seq64 * skew_dk + keys[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
             rounded(dk * softmax_scale, dk_ptr.dtype.element_ty, FIX_BF16), mask=ok)
    tl.store(dv_ptr + seq64 * skew_dv + keys[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
             rounded(dv, dv_ptr.dtype.element_ty, FIX_BF16), mask=ok)


@triton.jit
def _dq_block(dq, q, do, lse, delta, k_base, v_base, keep_base, stride_kt, stride_vt, start_n, k_len, diag, offs_m,
              offs_d, head_dim, qk_scale, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr,
              FIX_BF16: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dQ of one query block over the keys start_n..start_n+BLOCK_N."""
    cols = start_n + tl.arange(0, BLOCK_N)
    ok = (cols < k_len)[:, None] & (offs_d < head_dim)[None, :]
    k = tl.load(k_base + cols.to(tl.int64)[:, None] * stride_kt + offs_d[None, :], mask=ok, other=0.0)
    v = tl.load(v_base + cols.to(tl.int64)[:, None] * stride_vt + offs_d[None, :], mask=ok, other=0.0)
    if FIX_BF16:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale - lse[:, None])
    if MASKED:
        allowed = (cols < k_len)[None, :]
        if IS_CAUSAL:
            allowed = allowed & (cols[None, :] <= offs_m[:, None] + diag)
        p = tl.where(allowed, p, 0.0)
    if HAS_KEEP:
        kept = tl.load(keep_base + cols, mask=cols < k_len, other=0) != 0
        p = tl.where(kept[None, :] | (cols[None, :] == offs_m[:, None] + diag), p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    return _dot_rounded(ds, k, dq, DOT_PREC, SPLIT)


@triton.jit
def _dq_block_range(dq, q, do, lse, delta, k_base, v_base, keep_base, stride_kt, stride_vt, lo, hi, k_len, diag,
                    offs_m, offs_d, head_dim, qk_scale, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    HAS_KEEP: tl.constexpr, FIX_BF16: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """`_dq_block` over the key blocks lo..hi, skipping blocks off the diagonal with no kept key."""
    for start_n in range(lo, hi, BLOCK_N):
        if HAS_KEEP and not MASKED:
            cols = start_n + tl.arange(0, BLOCK_N)
            if tl.max(tl.load(keep_base + cols, mask=cols < k_len, other=0), axis=0) != 0:
                dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, keep_base, stride_kt, stride_vt, start_n, k_len,
                               diag, offs_m, offs_d, head_dim, qk_scale, MASKED, IS_CAUSAL, HAS_KEEP, FIX_BF16,
                               DOT_PREC, SPLIT, BLOCK_N)
        else:
            dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, keep_base, stride_kt, stride_vt, start_n, k_len,
                           diag, offs_m, offs_d, head_dim, qk_scale, MASKED, IS_CAUSAL, HAS_KEEP, FIX_BF16, DOT_PREC,
                           SPLIT, BLOCK_N)
    return dq


DQ_CONFIGS = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
              triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
              triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3)]


@autotune(DQ_CONFIGS, key=["BLOCK_D", "IS_CAUSAL", "HAS_KEEP"])
@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_q_ptr, cu_k_ptr, keep_ptr, stride_qt,
               stride_qh, skew_q, stride_kt, stride_kh, skew_k, stride_vt, stride_vh, skew_v, stride_dot, stride_doh,
               skew_do, stride_dqt, stride_dqh, skew_dq, total_q, head_dim, softmax_scale, qk_scale, GROUP,
               IS_CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, FIX_BF16: tl.constexpr, DOT_PREC: tl.constexpr,
               SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1).to(tl.int64)  # head * head stride passes 2**31 in a long [B, H, N, Dh] batch
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
    seq64 = seq.to(tl.int64)
    row_ok = offs_m < q_len
    ok = row_ok[:, None] & (offs_d < head_dim)[None, :]
    q = tl.load(q_ptr + seq64 * skew_q + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=ok,
                other=0.0)
    do = tl.load(do_ptr + seq64 * skew_do + rows[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=ok,
                 other=0.0)
    if FIX_BF16:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(lse_ptr + head.to(tl.int64) * total_q + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + head.to(tl.int64) * total_q + rows, mask=row_ok, other=0.0)
    k_base = k_ptr + seq64 * skew_k + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = v_ptr + seq64 * skew_v + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    keep_base = keep_ptr + k_start.to(tl.int64)
    diag = k_len - q_len
    full, hi = causal_block_bounds(start_m, k_len, diag, IS_CAUSAL, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_block_range(dq, q, do, lse, delta, k_base, v_base, keep_base, stride_kt, stride_vt, 0, full, k_len, diag,
                         offs_m, offs_d, head_dim, qk_scale, False, IS_CAUSAL, HAS_KEEP, FIX_BF16, DOT_PREC, SPLIT,
                         BLOCK_N)
    dq = _dq_block_range(dq, q, do, lse, delta, k_base, v_base, keep_base, stride_kt, stride_vt, full, hi, k_len, diag,
                         offs_m, offs_d, head_dim, qk_scale, True, IS_CAUSAL, HAS_KEEP, FIX_BF16, DOT_PREC, SPLIT,
                         BLOCK_N)
    tl.store(dq_ptr + seq64 * skew_dq + rows[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
             rounded(dq * softmax_scale, dq_ptr.dtype.element_ty, FIX_BF16), mask=ok)


def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                       softmax_scale: float, keep: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of `attention_forward` (GQA: dk/dv summed over each KV head's query heads), packed rows or a
    [B, H, N, Dh] batch with keep flags."""
    grad_out, q, k, v, out = contiguous_last(grad_out, q, k, v, out)
    heads, head_dim, kv_heads = q.shape[1], q.shape[-1], k.shape[1]
    batched = q.dim() == 4
    total_q = q.shape[0] * q.shape[2] if batched else q.shape[0]
    total_k = k.shape[0] * k.shape[2] if batched else k.shape[0]
    dq = empty(q.shape, q.dtype, q.device)
    dk = empty(k.shape, k.dtype, k.device)
    dv = empty(v.shape, v.dtype, v.device)
    batch = cu_seqlens_q.numel() - 1
    if batch == 0 or heads == 0 or (total_q == 0 and total_k == 0):
        return dq, dk.zero_(), dv.zero_()  # no query reads the keys: their gradient is zero
    block_d = head_dim_block(head_dim)
    delta = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    if total_q:
        seq_len = q.shape[2] if batched else total_q
        _delta_kernel[(triton.cdiv(total_q, PRE_BLOCK), heads)](
            out, grad_out, delta, total_q, head_dim, seq_len, *token_layout(out), *token_layout(grad_out),
            BLOCK_M=PRE_BLOCK, BLOCK_D=block_d)
    split = q.dtype != torch.float32 and not fix_bf16(q.dtype)  # fp32 (and interpreted bf16) dots are exact
    common = dict(IS_CAUSAL=causal, HAS_KEEP=keep is not None, FIX_BF16=fix_bf16(q.dtype),
                  DOT_PREC=dot_precision(q.dtype), SPLIT=split, BLOCK_D=block_d)
    qk_scale = softmax_scale * LOG2E
    keep_flags = cu_seqlens_q if keep is None else keep.view(torch.uint8)  # never read without HAS_KEEP
    layouts = (*token_layout(q), *token_layout(k), *token_layout(v), *token_layout(grad_out))
    if total_k:
        _dkdv_kernel[lambda meta: (triton.cdiv(max(max_seqlen_k, 1), meta["BLOCK_N"]), kv_heads, batch)](
            q, k, v, grad_out, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, keep_flags, *layouts,
            *token_layout(dk), *token_layout(dv), total_q, head_dim, softmax_scale, qk_scale, heads // kv_heads,
            **common)
    if total_q:
        _dq_kernel[lambda meta: (triton.cdiv(max(max_seqlen_q, 1), meta["BLOCK_M"]), heads, batch)](
            q, k, v, grad_out, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, keep_flags, *layouts, *token_layout(dq),
            total_q, head_dim, softmax_scale, qk_scale, heads // kv_heads, **common)
    return dq, dk, dv


# --- custom ops (namespace mindskip_triton, fake implementations for torch.compile); autograd in attention.py ---

@torch.library.custom_op("mindskip_triton::varlen_attention_backward", mutates_args=())
def varlen_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                       causal: bool, softmax_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return attention_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              causal, softmax_scale, None)


@varlen_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("mindskip_triton::keep_masked_attention_backward", mutates_args=())
def keep_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, keep: Tensor,
                     softmax_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    keep = keep.contiguous()
    cu = batch_offsets(keep)
    n = q.shape[2]
    return attention_backward(grad_out, q, k, v, out, lse, cu, cu, n, n, True, softmax_scale, keep)


@keep_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, keep, softmax_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
