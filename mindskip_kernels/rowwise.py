"""Row-wise public ops around a routed sub-layer: the RMSNorm its router reads (`rms_norm`) and the predicated
projection of a decode step (`predicated_linear`: a skipped row reads no weight)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mindskip_kernels import _checks as check
from mindskip_kernels.backends import needs_grad, resolve

Project = Callable[[nn.Linear, torch.Tensor], torch.Tensor]  # a decode step's linear on its rows (predicated)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, backend: str = "auto") -> torch.Tensor:
    """RMSNorm of x [..., D] over its last dim with weight [D], in transformers' Llama / Qwen numerics (variance in
    fp32, `weight * normed.to(x.dtype)`); returns x's dtype. Only the reference implements it: the kernels fuse
    the norm into the router and the gather instead (`route(norm=)`, `gather(norm=)`)."""
    check.tensor("x", x, dtypes=check.FLOAT_DTYPES)
    weight, eps = check.norm((weight, eps), x)
    check.same_device(x=x, weight=weight)
    op = resolve(backend, "rms_norm", x.device, x.dtype, needs_grad(x, weight), empty=x.numel() == 0)
    return op.rms_norm(x, weight, eps)


def predicated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor, *,
                      backend: str = "auto") -> torch.Tensor:
    """`x @ weight.T + bias` on the rows whose device flag keep [B] is set, exact zeros on the others: x [B, K],
    weight [N, K], bias [N] or None -> [B, N]. The Triton kernel reads no weight for a skipped row (a skipped
    layer's projections at batch-1 decode cost a launch each, with no host branch: CUDA-graph safe)."""
    check.tensor("x", x, ndim=2, dtypes=check.FLOAT_DTYPES)
    check.tensor("weight", weight, ndim=2, dtypes=(x.dtype,))
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must have shape [N, {x.shape[1]}] (in features of x), got {tuple(weight.shape)}")
    if bias is not None:
        check.tensor("bias", bias, ndim=1, dtypes=(x.dtype,))
        check.shape_match("bias", bias, (weight.shape[0],), "one per output feature of weight")
    check.tensor("keep", keep, ndim=1, dtypes=(torch.bool,))
    check.shape_match("keep", keep, (x.shape[0],), "one flag per row of x")
    check.same_device(x=x, weight=weight, bias=bias, keep=keep)
    op = resolve(backend, "predicated_linear", x.device, x.dtype, needs_grad(x, weight, bias),
                 empty=x.numel() == 0 or weight.numel() == 0)
    return op.predicated_linear(x, weight, bias, keep)
