"""Router kernels: one pass over the hidden states computes each token's logit `z . w` (or, fused with the
RMSNorm, `rstd * x . (gamma * w)`), the sigmoid score and the keep flag; sequence granularity adds a second,
tiny pass over the logits (the mean of the rows' logits is the logit of the rows' mean)."""

import torch
import triton
import triton.language as tl

from mindskip_kernels.backends._alloc import empty

BLOCK_ROWS = 16
Tensor = torch.Tensor


@triton.jit
def _token_kernel(x_ptr, w_ptr, gamma_ptr, mask_ptr, score_ptr, keep_ptr, n_rows, dim, stride_x, eps,
                  threshold, NORM: tl.constexpr, SEQUENCE: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Per row: logit (SEQUENCE: stored raw for the sequence pass) or score and keep flag."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    base = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    dot = tl.zeros([BLOCK_R], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < dim
        x = tl.load(base + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if NORM:
            w = w * tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            sumsq += tl.sum(x * x, axis=1)
        dot += tl.sum(x * w[None, :], axis=1)
    if NORM:
        dot = dot * tl.rsqrt(sumsq / dim + eps)
    if SEQUENCE:
        tl.store(score_ptr + rows, dot, mask=row_ok)
    else:
        score = tl.sigmoid(dot)
        real = tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0
        tl.store(score_ptr + rows, score, mask=row_ok)
        tl.store(keep_ptr + rows, (score >= threshold) & real, mask=row_ok)


@triton.jit
def _sequence_kernel(score_ptr, mask_ptr, keep_ptr, seq_len, threshold, BLOCK: tl.constexpr):
    """Per sequence: masked mean of the token logits -> one score, broadcast with the keep flags."""
    base = tl.program_id(0).to(tl.int64) * seq_len
    total = tl.zeros([BLOCK], dtype=tl.float32)
    count = tl.zeros([BLOCK], dtype=tl.float32)
    for n0 in range(0, seq_len, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        real = tl.load(mask_ptr + base + offs, mask=offs < seq_len, other=0) != 0
        total += tl.where(real, tl.load(score_ptr + base + offs, mask=real, other=0.0), 0.0)
        count += real.to(tl.float32)
    score = tl.sigmoid(tl.sum(total, axis=0) / tl.maximum(tl.sum(count, axis=0), 1.0))
    scores = tl.zeros([BLOCK], dtype=tl.float32) + score
    for n0 in range(0, seq_len, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        ok = offs < seq_len
        real = tl.load(mask_ptr + base + offs, mask=ok, other=0) != 0
        tl.store(score_ptr + base + offs, scores, mask=ok)
        tl.store(keep_ptr + base + offs, real & (scores >= threshold), mask=ok)


def launch(x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor | None, eps: float, mask: torch.Tensor,
           threshold: float, sequence: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [B, N] float32 and keep [B, N] bool for x [B, N, D] (normalized by `gamma` when given)."""
    batch, seq_len, dim = x.shape
    scores = empty((batch, seq_len), torch.float32, x.device)
    keep = empty((batch, seq_len), torch.bool, x.device)
    if scores.numel() == 0:
        return scores, keep
    x2d = x.reshape(batch * seq_len, dim)
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    mask = mask.contiguous()
    w = weight.reshape(-1).contiguous()
    grid = (triton.cdiv(batch * seq_len, BLOCK_ROWS),)
    _token_kernel[grid](x2d, w, w if gamma is None else gamma.contiguous(), mask, scores, keep, batch * seq_len,
                        dim, x2d.stride(0), eps, threshold, NORM=gamma is not None, SEQUENCE=sequence,
                        BLOCK_R=BLOCK_ROWS, BLOCK_D=min(triton.next_power_of_2(dim), 256), num_warps=4)
    if sequence:
        _sequence_kernel[(batch,)](scores, mask, keep, seq_len, threshold,
                                   BLOCK=min(triton.next_power_of_2(seq_len), 4096), num_warps=4)
    return scores, keep


# --- custom ops (namespace mindskip_triton, fake implementations for torch.compile) and autograd ------------

@torch.library.custom_op("mindskip_triton::router", mutates_args=())
def router_op(z: Tensor, weight: Tensor, gamma: Tensor | None, eps: float, mask: Tensor, threshold: float,
              sequence: bool) -> tuple[Tensor, Tensor]:
    return launch(z, weight, gamma, eps, mask, threshold, sequence)


@router_op.register_fake
def _(z, weight, gamma, eps, mask, threshold, sequence):
    return z.new_empty(z.shape[:2], dtype=torch.float32), torch.empty_like(mask)


class Router(torch.autograd.Function):
    """Scores and keep flags; the backward (small, memory-bound) is plain PyTorch: d logit = d score * s(1-s),
    spread to the tokens' hidden states (sequence: to the real tokens, / count) and to the weight."""

    @staticmethod
    def forward(ctx, z: Tensor, weight: Tensor, mask: Tensor, threshold: float, sequence: bool):
        scores, keep = router_op(z, weight, None, 0.0, mask, threshold, sequence)
        ctx.save_for_backward(z, weight, mask, scores)
        ctx.sequence = sequence
        ctx.mark_non_differentiable(keep)
        return scores, keep

    @staticmethod
    def backward(ctx, grad_scores: Tensor, _grad_keep: Tensor | None):
        z, weight, mask, scores = ctx.saved_tensors
        grad_logit = grad_scores.float() * scores * (1.0 - scores)
        if ctx.sequence:
            real = mask.float()
            grad_logit = (grad_logit.sum(1) / real.sum(1).clamp_min(1.0)).unsqueeze(1) * real
        w = weight.reshape(-1).float()
        grad_z = (grad_logit.unsqueeze(-1) * w).to(z.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.einsum("bn,bnd->d", grad_logit, z.float()).to(weight.dtype).reshape(weight.shape)
        return grad_z, grad_w, None, None, None
