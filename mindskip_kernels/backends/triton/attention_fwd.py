"""Flash attention forward: one program per (query block, query head, sequence), online softmax over the key
blocks in fp32, causal aligned bottom-right, GQA by indexing the shared key/value head (never expanded), head
dims padded to a power of two with masks. Saves the log-sum-exp for the backward. With query positions
(HAS_QPOS, forward only) query row t sees keys 0..qpos[t] instead: the block runs up to its largest position,
and only the key blocks past its smallest one are masked (per row).

Two layouts share the kernel: packed varlen rows [T, H, Dh] (sequence b owns rows cu[b]:cu[b+1]) and the
batched SDPA layout [B, H, N, Dh] of keep-masked attention (cu = b*N; each tensor's "skew" adds the batch
stride beyond N token strides). With keep flags (HAS_KEEP) key j is visible to query i only if it is kept or
j == i, read per key block; key blocks off the diagonal with no kept key are skipped."""

import torch
import triton
import triton.language as tl

from mindskip_kernels.backends import MAX_HEAD_DIM
from mindskip_kernels.backends._alloc import empty
from mindskip_kernels.backends.triton._common import autotune, dot_precision, fix_bf16, pow2, rounded

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)
Tensor = torch.Tensor


@triton.jit
def online_softmax_step(acc, l_i, m_i, qk, v, DOT_PREC: tl.constexpr):
    """Fold one block of scores qk [M, N] (log2 domain, -inf = masked) and values v [N, D] into the running
    (acc, l_i, m_i) of the online softmax; rows with no key yet stay at zero."""
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _attend_block(acc, l_i, m_i, q, k_base, v_base, keep_base, stride_k, stride_v, start_n, k_len, last, offs_d,
                  head_dim, qk_scale, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr,
                  FIX_BF16: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) with the keys start_n..start_n+BLOCK_N (log2 domain). MASKED
    blocks apply key bounds (< k_len) and the causal mask (key <= last [BLOCK_M], each query row's last key);
    HAS_KEEP the keep flags (the diagonal key, last, always visible)."""
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
            allowed = allowed & (cols[None, :] <= last[:, None])
        qk = tl.where(allowed, qk, float("-inf"))
    if HAS_KEEP:
        kept = tl.load(keep_base + cols, mask=cols < k_len, other=0) != 0
        qk = tl.where(kept[None, :] | (cols[None, :] == last[:, None]), qk, float("-inf"))
    return online_softmax_step(acc, l_i, m_i, qk, v, DOT_PREC)


@triton.jit
def _attend_range(acc, l_i, m_i, q, k_base, v_base, keep_base, stride_k, stride_v, lo, hi, k_len, last, offs_d,
                  head_dim, qk_scale, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr,
                  FIX_BF16: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """`_attend_block` over the key blocks lo..hi. With keep flags, a block off the diagonal (not MASKED)
    that holds no kept key contributes nothing and is skipped."""
    for start_n in range(lo, hi, BLOCK_N):
        if HAS_KEEP and not MASKED:
            cols = start_n + tl.arange(0, BLOCK_N)
            if tl.max(tl.load(keep_base + cols, mask=cols < k_len, other=0), axis=0) != 0:
                acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_base, v_base, keep_base, stride_k, stride_v,
                                              start_n, k_len, last, offs_d, head_dim, qk_scale, MASKED, IS_CAUSAL,
                                              HAS_KEEP, FIX_BF16, DOT_PREC, BLOCK_N)
        else:
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_base, v_base, keep_base, stride_k, stride_v, start_n,
                                          k_len, last, offs_d, head_dim, qk_scale, MASKED, IS_CAUSAL, HAS_KEEP,
                                          FIX_BF16, DOT_PREC, BLOCK_N)
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


@triton.jit
def position_block_bounds(qpos_ptr, rows, row_ok, k_len, BLOCK_N: tl.constexpr):
    """(last, full, hi) of a block of queries with key positions: last [BLOCK_M] = each row's position clamped
    to -1..k_len-1 (padding rows -1), keys 0..full are visible to every row in whole BLOCK_N blocks, keys
    full..hi need the per-row mask, keys >= hi (past the largest position) are invisible to the block."""
    qpos = tl.load(qpos_ptr + rows, mask=row_ok, other=-1)
    last = tl.minimum(tl.maximum(qpos, -1), k_len - 1).to(tl.int32)  # clamped before +1: no overflow
    hi = tl.max(last, axis=0) + 1
    full = (tl.min(tl.where(row_ok, last, k_len - 1), axis=0) + 1) // BLOCK_N * BLOCK_N
    return last, full, hi


CONFIGS = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
           triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
           triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=4),
           triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=4),
           triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3)]


@autotune(CONFIGS, key=["BLOCK_D", "IS_CAUSAL", "HAS_KEEP", "HAS_QPOS"])
@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_q_ptr, cu_k_ptr, keep_ptr, qpos_ptr, stride_qt,
                     stride_qh, skew_q, stride_kt, stride_kh, skew_k, stride_vt, stride_vh, skew_v, stride_ot,
                     stride_oh, skew_o, total_q, head_dim, qk_scale, GROUP, IS_CAUSAL: tl.constexpr,
                     HAS_KEEP: tl.constexpr, HAS_QPOS: tl.constexpr, FIX_BF16: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
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
    q_ok = (offs_m < q_len)[:, None] & (offs_d < head_dim)[None, :]
    q = tl.load(q_ptr + seq64 * skew_q + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=q_ok,
                other=0.0)
    if FIX_BF16:
        q = q.to(tl.float32)
    k_base = k_ptr + seq64 * skew_k + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = v_ptr + seq64 * skew_v + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    keep_base = keep_ptr + k_start.to(tl.int64)
    if HAS_QPOS:
        last, full, hi = position_block_bounds(qpos_ptr, rows, offs_m < q_len, k_len, BLOCK_N)
    else:
        diag = k_len - q_len
        last = offs_m + diag
        full, hi = causal_block_bounds(start_m, k_len, diag, IS_CAUSAL, BLOCK_M, BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, k_base, v_base, keep_base, stride_kt, stride_vt, 0, full, k_len,
                                  last, offs_d, head_dim, qk_scale, False, IS_CAUSAL, HAS_KEEP, FIX_BF16, DOT_PREC,
                                  BLOCK_N)
    acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, k_base, v_base, keep_base, stride_kt, stride_vt, full, hi, k_len,
                                  last, offs_d, head_dim, qk_scale, True, IS_CAUSAL, HAS_KEEP, FIX_BF16, DOT_PREC,
                                  BLOCK_N)
    seen = l_i > 0.0  # queries that see no key output zeros and get lse = +inf (zero gradient)
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(o_ptr + seq64 * skew_o + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             rounded(out, o_ptr.dtype.element_ty, FIX_BF16), mask=q_ok)
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("inf"))
    tl.store(lse_ptr + head.to(tl.int64) * total_q + rows, lse, mask=offs_m < q_len)


def head_dim_block(head_dim: int) -> int:
    """The power-of-two block that holds a head (80 and 96 run in 128 with masked columns)."""
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"triton attention supports head dims up to {MAX_HEAD_DIM}, got {head_dim}")
    return pow2(head_dim)


def contiguous_last(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kernels index the head dim with stride 1."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def token_layout(t: torch.Tensor) -> tuple[int, int, int]:
    """(token stride, head stride, skew) of packed rows [T, H, Dh] (skew 0) or of a batch [B, H, N, Dh] read as
    rows b*N + n: row r of sequence b is at b * skew + r * token stride."""
    if t.dim() == 3:
        return t.stride(0), t.stride(1), 0
    return t.stride(2), t.stride(1), t.stride(0) - t.shape[2] * t.stride(2)


def batch_offsets(keep: torch.Tensor) -> torch.Tensor:
    """cu_seqlens [B+1] int32 = b*N of a [B, N] batch: every sequence has all N tokens."""
    return torch.arange(keep.shape[0] + 1, dtype=torch.int32, device=keep.device) * keep.shape[1]


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, max_seqlen_q: int, causal: bool, softmax_scale: float,
                      keep: torch.Tensor | None, query_positions: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out like q, lse [Hq, rows of q] float32 natural-log log-sum-exp of the scaled logits) for packed rows,
    or for a [B, H, N, Dh] batch with keep flags [B, N] (cu_seqlens = b*N). query_positions [rows of q] (packed
    rows, causal): each query's last key instead of the bottom-right rule."""
    q, k, v = contiguous_last(q, k, v)
    heads, head_dim = q.shape[1], q.shape[-1]
    total_q = q.shape[0] if q.dim() == 3 else q.shape[0] * q.shape[2]
    out = empty(q.shape, q.dtype, q.device)
    lse = empty((heads, total_q), torch.float32, q.device)
    batch = cu_seqlens_q.numel() - 1
    if total_q == 0 or batch == 0 or max_seqlen_q == 0 or heads == 0:
        return out, lse

    def grid(meta: dict) -> tuple[int, int, int]:
        return triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), heads, batch

    keep_flags = cu_seqlens_q if keep is None else keep.view(torch.uint8)  # never read without HAS_KEEP
    qpos = cu_seqlens_q if query_positions is None else query_positions.contiguous()  # read only with HAS_QPOS
    _attn_fwd_kernel[grid](q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, keep_flags, qpos, *token_layout(q),
                           *token_layout(k), *token_layout(v), *token_layout(out), total_q, head_dim,
                           softmax_scale * LOG2E, heads // k.shape[1], IS_CAUSAL=causal, HAS_KEEP=keep is not None,
                           HAS_QPOS=query_positions is not None, FIX_BF16=fix_bf16(q.dtype),
                           DOT_PREC=dot_precision(q.dtype), BLOCK_D=head_dim_block(head_dim))
    return out, lse


# --- custom ops (namespace mindskip_triton, fake implementations for torch.compile); autograd in attention.py ---

@torch.library.custom_op("mindskip_triton::varlen_attention_forward", mutates_args=())
def varlen_forward_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                      max_seqlen_q: int, causal: bool, softmax_scale: float,
                      query_positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal, softmax_scale, None,
                             query_positions)


@varlen_forward_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal, softmax_scale, query_positions=None):
    return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("mindskip_triton::keep_masked_attention_forward", mutates_args=())
def keep_forward_op(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, softmax_scale: float) -> tuple[Tensor, Tensor]:
    keep = keep.contiguous()
    cu = batch_offsets(keep)
    return attention_forward(q, k, v, cu, cu, q.shape[2], True, softmax_scale, keep)


@keep_forward_op.register_fake
def _(q, k, v, keep, softmax_scale):
    return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0] * q.shape[2], dtype=torch.float32)
