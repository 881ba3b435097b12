"""Predicated skinny GEMV for the projections of a routed decode step: y[b] = x[b] @ W^T + bias where the
device flag keep[b] is set, zeros elsewhere. A program whose row is skipped reads the flag, writes zeros and
returns without reading the weight, so a skipped layer's q/k/v/o projections at batch 1 cost about a launch,
with no host branch (CUDA-graph safe). One program per (row, block of outputs): meant for the few rows of a
decode step (the weight is read once per kept row). Ends with the custom op and its fake."""

import torch
import triton
import triton.language as tl

from mindskip_kernels.backends._alloc import empty
from mindskip_kernels.backends.triton._common import fix_bf16, rounded

BLOCK_N = 64
BLOCK_K = 128


@triton.jit
def _predicated_linear_kernel(x_ptr, w_ptr, b_ptr, keep_ptr, y_ptr, n_out, n_in, stride_xb, stride_wn, stride_yb,
                              HAS_BIAS: tl.constexpr, FIX_BF16: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_out
    y_row = y_ptr + row * stride_yb + offs_n
    if tl.load(keep_ptr + row) == 0:  # skipped row: no weight read
        tl.store(y_row, tl.zeros([BLOCK_N], dtype=tl.float32).to(y_ptr.dtype.element_ty), mask=n_ok)
        return
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < n_in
        x = tl.load(x_ptr + row * stride_xb + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :],
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_row, rounded(acc, y_ptr.dtype.element_ty, FIX_BF16), mask=n_ok)


def predicated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      keep: torch.Tensor) -> torch.Tensor:
    """x [B, K], weight [N, K], bias [N] or None, keep [B] bool -> [B, N]: the linear map on kept rows, zeros
    on skipped ones (fp32 accumulation, one rounding)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    batch, n_out = x.shape[0], weight.shape[0]
    out = empty((batch, n_out), x.dtype, x.device)
    if out.numel() == 0:
        return out
    _predicated_linear_kernel[(batch, triton.cdiv(n_out, BLOCK_N))](
        x, weight, bias if bias is not None else weight, keep, out, n_out, x.shape[1], x.stride(0), weight.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, FIX_BF16=fix_bf16(x.dtype), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        num_warps=4)
    return out


@torch.library.custom_op("mindskip_triton::predicated_linear", mutates_args=())
def predicated_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         keep: torch.Tensor) -> torch.Tensor:
    return predicated_linear(x, weight, bias, keep)


@predicated_linear_op.register_fake
def _(x, weight, bias, keep):
    return x.new_empty(x.shape[0], weight.shape[0])
