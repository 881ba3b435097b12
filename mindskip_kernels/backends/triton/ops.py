"""The Triton kernels as torch.library custom ops (namespace `mindskip_triton`, each with a fake
implementation for torch.compile) and their autograd: one autograd.Function per differentiable op."""

import torch

from mindskip_kernels.backends.triton import (
    attention_bwd,
    attention_fwd,
    compaction,
    gather_scatter,
    router_kernels,
)

Tensor = torch.Tensor


@torch.library.custom_op("mindskip_triton::router", mutates_args=())
def router_op(z: Tensor, weight: Tensor, gamma: Tensor | None, eps: float, mask: Tensor, threshold: float,
              sequence: bool) -> tuple[Tensor, Tensor]:
    return router_kernels.launch(z, weight, gamma, eps, mask, threshold, sequence)


@router_op.register_fake
def _(z, weight, gamma, eps, mask, threshold, sequence):
    return z.new_empty(z.shape[:2], dtype=torch.float32), torch.empty_like(mask)


@torch.library.custom_op("mindskip_triton::compact", mutates_args=())
def compact_op(keep: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return compaction.compact(keep, position_ids)


@compact_op.register_fake
def _(keep, position_ids):
    total = torch.library.get_ctx().new_dynamic_size()
    return (keep.new_empty(total, dtype=torch.int64), keep.new_empty(keep.shape[0] + 1, dtype=torch.int32),
            keep.new_empty(total, dtype=torch.int64))


@torch.library.custom_op("mindskip_triton::gather", mutates_args=())
def gather_op(x2d: Tensor, indices: Tensor) -> Tensor:
    return gather_scatter.gather(x2d, indices)


@gather_op.register_fake
def _(x2d, indices):
    return x2d.new_empty(indices.shape[0], x2d.shape[1])


@torch.library.custom_op("mindskip_triton::gather_norm", mutates_args=())
def gather_norm_op(x2d: Tensor, gamma: Tensor, eps: float, indices: Tensor) -> Tensor:
    return gather_scatter.gather_norm(x2d, gamma, eps, indices)


@gather_norm_op.register_fake
def _(x2d, gamma, eps, indices):
    return x2d.new_empty(indices.shape[0], x2d.shape[1])


@torch.library.custom_op("mindskip_triton::scatter_add", mutates_args=())
def scatter_add_op(residual2d: Tensor | None, values: Tensor, indices: Tensor, scale: Tensor | None,
                   n_rows: int) -> Tensor:
    return gather_scatter.scatter_add(residual2d, values, indices, scale, n_rows)


@scatter_add_op.register_fake
def _(residual2d, values, indices, scale, n_rows):
    return values.new_empty(n_rows, values.shape[1])


@torch.library.custom_op("mindskip_triton::scatter_add_backward", mutates_args=())
def scatter_add_backward_op(grad2d: Tensor, values: Tensor, indices: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    return gather_scatter.scatter_add_backward(grad2d, values, indices, scale)


@scatter_add_backward_op.register_fake
def _(grad2d, values, indices, scale):
    return torch.empty_like(values), torch.empty_like(scale)


@torch.library.custom_op("mindskip_triton::varlen_attention_forward", mutates_args=())
def varlen_forward_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                      max_seqlen_q: int, causal: bool, softmax_scale: float) -> tuple[Tensor, Tensor]:
    return attention_fwd.varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal, softmax_scale)


@varlen_forward_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal, softmax_scale):
    return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("mindskip_triton::varlen_attention_backward", mutates_args=())
def varlen_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                       causal: bool, softmax_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return attention_bwd.varlen_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                         max_seqlen_k, causal, softmax_scale)


@varlen_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


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


class Gather(torch.autograd.Function):
    """Packed rows; the gradient scatters back into zeros."""

    @staticmethod
    def forward(ctx, x2d: Tensor, indices: Tensor):
        ctx.save_for_backward(indices)
        ctx.n_rows = x2d.shape[0]
        return gather_op(x2d, indices)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (indices,) = ctx.saved_tensors
        return scatter_add_op(None, grad, indices, None, ctx.n_rows), None


class ScatterAdd(torch.autograd.Function):
    """residual + scale * values on the kept rows; backward: the residual's gradient passes through, the
    values get the gathered gradient (times scale), the scale gets the rows' dot products."""

    @staticmethod
    def forward(ctx, residual2d: Tensor, values: Tensor, indices: Tensor, scale: Tensor | None):
        ctx.save_for_backward(values, indices, scale)
        return scatter_add_op(residual2d, values, indices, scale, residual2d.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, indices, scale = ctx.saved_tensors
        if scale is None:
            return grad, gather_op(grad, indices), None, None
        grad_values, grad_scale = scatter_add_backward_op(grad, values, indices, scale)
        return grad, grad_values, None, grad_scale


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
