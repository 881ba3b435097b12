"""The Triton attention ops' entry points: autograd Functions over the forward kernels (attention_fwd.py) and the
backward kernels (attention_bwd.py), for packed variable-length and keep-masked causal attention; varlen attention
with query positions is the forward alone."""

from __future__ import annotations

import torch
from torch import Tensor

from mindskip_kernels.backends.triton.attention_bwd import keep_backward_op, varlen_backward_op
from mindskip_kernels.backends.triton.attention_fwd import keep_forward_op, varlen_forward_op


class VarlenAttention(torch.autograd.Function):
    """Flash attention over packed sequences; the backward recomputes probabilities from the saved LSE."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                max_seqlen_q: int, max_seqlen_k: int, causal: bool, softmax_scale: float):
        out, lse = varlen_forward_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.args = (max_seqlen_q, max_seqlen_k, causal, softmax_scale)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = varlen_backward_op(grad_out, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, causal: bool, softmax_scale: float,
                     query_positions: Tensor | None) -> Tensor:
    """`VarlenAttention`, or with query positions the forward custom op alone: that rule is forward only (the
    public op refuses inputs that need grad), and a backward through it raises (no autograd formula)."""
    if query_positions is not None:
        return varlen_forward_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal, softmax_scale,
                                 query_positions)[0]
    return VarlenAttention.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                 softmax_scale)


class KeepMaskedAttention(torch.autograd.Function):
    """Causal attention over a [B, H, N, Dh] batch whose keys are masked by keep flags [B, N] (key j visible to
    query i iff j <= i and (keep[j] or j == i)); the backward recomputes probabilities from the saved LSE."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, keep: Tensor, softmax_scale: float):
        out, lse = keep_forward_op(q, k, v, keep, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse, keep)
        ctx.softmax_scale = softmax_scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse, keep = ctx.saved_tensors
        dq, dk, dv = keep_backward_op(grad_out, q, k, v, out, lse, keep, ctx.softmax_scale)
        return dq, dk, dv, None, None
