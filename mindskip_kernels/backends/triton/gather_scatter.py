"""Row movement between the [B*N, D] layout and the packed [T, D] layout of kept tokens: gather (optionally
RMS-normalizing on the fly), the scatter-add into the residual in one pass over it, and the scatter-add's
backward (the gathered gradient times the gate, and the gate's gradient)."""

import torch
import triton
import triton.language as tl

from mindskip_kernels.backends._alloc import empty
from mindskip_kernels.backends.triton._common import fix_bf16, rounded

BLOCK_ROWS = 16
Tensor = torch.Tensor


def _block_d(dim: int) -> int:
    return min(triton.next_power_of_2(dim), 256)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@triton.jit
def _gather_kernel(x_ptr, idx_ptr, out_ptr, n_out, dim, stride_x, stride_o, BLOCK_R: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_out
    ok = row_ok[:, None] & (cols < dim)[None, :]
    src = tl.load(idx_ptr + rows, mask=row_ok, other=0)
    x = tl.load(x_ptr + src[:, None] * stride_x + cols[None, :], mask=ok)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_o + cols[None, :], x, mask=ok)


@triton.jit
def _gather_norm_kernel(x_ptr, idx_ptr, gamma_ptr, out_ptr, n_out, dim, stride_x, stride_o, eps,
                        FIX_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = x[idx[t]] * rstd * gamma, computed in fp32 and rounded once."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_out
    src = x_ptr + tl.load(idx_ptr + rows, mask=row_ok, other=0)[:, None] * stride_x
    dst = out_ptr + rows.to(tl.int64)[:, None] * stride_o
    sumsq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(src + cols[None, :], mask=row_ok[:, None] & (cols < dim)[None, :], other=0.0).to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
    rstd = tl.rsqrt(sumsq / dim + eps)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols < dim)[None, :]
        x = tl.load(src + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        g = tl.load(gamma_ptr + cols, mask=cols < dim, other=0.0).to(tl.float32)
        y = x * rstd[:, None] * g[None, :]
        tl.store(dst + cols[None, :], rounded(y, out_ptr.dtype.element_ty, FIX_BF16), mask=ok)


@triton.jit
def _scatter_add_kernel(res_ptr, val_ptr, inv_ptr, scale_ptr, out_ptr, n_rows, dim, stride_r, stride_v,
                        stride_o, HAS_RESIDUAL: tl.constexpr, HAS_SCALE: tl.constexpr, FIX_BF16: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """One pass over every row: out = residual (or 0), kept rows (inv >= 0) get + values[inv] * scale[inv],
    each product and sum rounded to the tensor dtype like PyTorch's eager ops. Skipped rows are copied."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    ok = row_ok[:, None] & (cols < dim)[None, :]
    src = tl.load(inv_ptr + rows, mask=row_ok, other=-1)
    kept = src >= 0
    dtype = out_ptr.dtype.element_ty
    v = tl.load(val_ptr + src.to(tl.int64)[:, None] * stride_v + cols[None, :], mask=ok & kept[:, None],
                other=0.0).to(tl.float32)
    if HAS_SCALE:
        s = rounded(tl.load(scale_ptr + src, mask=row_ok & kept, other=0.0).to(tl.float32), dtype, FIX_BF16)
        v = rounded(v * s.to(tl.float32)[:, None], dtype, FIX_BF16).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows.to(tl.int64)[:, None] * stride_r + cols[None, :], mask=ok)
        out = tl.where(kept[:, None], rounded(r.to(tl.float32) + v, dtype, FIX_BF16), r)
    else:
        out = rounded(v, dtype, FIX_BF16)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_o + cols[None, :], out, mask=ok)


@triton.jit
def _scatter_add_bwd_kernel(grad_ptr, val_ptr, idx_ptr, scale_ptr, dval_ptr, dscale_ptr, n_kept, dim, stride_g,
                            stride_v, stride_dv, FIX_BF16: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_D: tl.constexpr):
    """dvalues[t] = grad[idx[t]] * scale[t] (rounded like the forward), dscale[t] = grad[idx[t]] . values[t]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_kept
    src = grad_ptr + tl.load(idx_ptr + rows, mask=row_ok, other=0)[:, None] * stride_g
    dtype = dval_ptr.dtype.element_ty
    s = rounded(tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32), dtype, FIX_BF16)
    s = s.to(tl.float32)[:, None]
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols < dim)[None, :]
        g = tl.load(src + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        v = tl.load(val_ptr + rows.to(tl.int64)[:, None] * stride_v + cols[None, :], mask=ok, other=0.0)
        tl.store(dval_ptr + rows.to(tl.int64)[:, None] * stride_dv + cols[None, :],
                 rounded(g * s, dtype, FIX_BF16), mask=ok)
        acc += tl.sum(g * v.to(tl.float32), axis=1)
    tl.store(dscale_ptr + rows, acc.to(dscale_ptr.dtype.element_ty), mask=row_ok)


def gather(x2d: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows x2d[indices] -> [T, D]."""
    x2d = _rows(x2d)
    n_out, dim = indices.shape[0], x2d.shape[1]
    out = empty((n_out, dim), x2d.dtype, x2d.device)
    if out.numel():
        grid = (triton.cdiv(n_out, BLOCK_ROWS), triton.cdiv(dim, _block_d(dim)))
        _gather_kernel[grid](x2d, indices, out, n_out, dim, x2d.stride(0), out.stride(0), BLOCK_R=BLOCK_ROWS,
                             BLOCK_D=_block_d(dim), num_warps=4)
    return out


def gather_norm(x2d: torch.Tensor, gamma: torch.Tensor, eps: float, indices: torch.Tensor) -> torch.Tensor:
    """RMSNorm of the rows x2d[indices] (weight `gamma`) -> [T, D] in x2d's dtype."""
    x2d = _rows(x2d)
    n_out, dim = indices.shape[0], x2d.shape[1]
    out = empty((n_out, dim), x2d.dtype, x2d.device)
    if out.numel():
        _gather_norm_kernel[(triton.cdiv(n_out, BLOCK_ROWS),)](
            x2d, indices, gamma.contiguous(), out, n_out, dim, x2d.stride(0), out.stride(0), eps,
            FIX_BF16=fix_bf16(x2d.dtype), BLOCK_R=BLOCK_ROWS, BLOCK_D=_block_d(dim), num_warps=4)
    return out


def scatter_add(residual2d: torch.Tensor | None, values: torch.Tensor, indices: torch.Tensor,
                scale: torch.Tensor | None, n_rows: int) -> torch.Tensor:
    """New [n_rows, D]: residual (zeros when None) with values * scale added to rows `indices`."""
    values = _rows(values)
    dim = values.shape[1]
    out = empty((n_rows, dim), values.dtype, values.device)
    if out.numel() == 0:
        return out
    # row -> packed index (-1 when skipped), so one pass over all rows writes the whole output
    inverse = torch.full((n_rows,), -1, dtype=torch.int32, device=values.device)
    inverse.index_copy_(0, indices, torch.arange(indices.shape[0], dtype=torch.int32, device=values.device))
    res = out if residual2d is None else _rows(residual2d)
    grid = (triton.cdiv(n_rows, BLOCK_ROWS), triton.cdiv(dim, _block_d(dim)))
    _scatter_add_kernel[grid](res, values, inverse, values if scale is None else scale, out, n_rows, dim,
                              res.stride(0), values.stride(0), out.stride(0), HAS_RESIDUAL=residual2d is not None,
                              HAS_SCALE=scale is not None, FIX_BF16=fix_bf16(values.dtype),
                              BLOCK_R=BLOCK_ROWS, BLOCK_D=_block_d(dim), num_warps=4)
    return out


def scatter_add_backward(grad2d: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                         scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of values [T, D] and scale [T] of `scatter_add` given the output gradient [B*N, D]."""
    grad2d, values = _rows(grad2d), _rows(values)
    n_kept, dim = values.shape
    dvalues = empty((n_kept, dim), values.dtype, values.device)
    dscale = empty((n_kept,), scale.dtype, scale.device)
    if n_kept:
        _scatter_add_bwd_kernel[(triton.cdiv(n_kept, BLOCK_ROWS),)](
            grad2d, values, indices, scale, dvalues, dscale, n_kept, dim, grad2d.stride(0), values.stride(0),
            dvalues.stride(0), FIX_BF16=fix_bf16(values.dtype), BLOCK_R=BLOCK_ROWS, BLOCK_D=_block_d(dim),
            num_warps=4)
    return dvalues, dscale


# --- custom ops (namespace mindskip_triton, fake implementations for torch.compile) and autograd ------------

@torch.library.custom_op("mindskip_triton::gather", mutates_args=())
def gather_op(x2d: Tensor, indices: Tensor) -> Tensor:
    return gather(x2d, indices)


@gather_op.register_fake
def _(x2d, indices):
    return x2d.new_empty(indices.shape[0], x2d.shape[1])


@torch.library.custom_op("mindskip_triton::gather_norm", mutates_args=())
def gather_norm_op(x2d: Tensor, gamma: Tensor, eps: float, indices: Tensor) -> Tensor:
    return gather_norm(x2d, gamma, eps, indices)


@gather_norm_op.register_fake
def _(x2d, gamma, eps, indices):
    return x2d.new_empty(indices.shape[0], x2d.shape[1])


@torch.library.custom_op("mindskip_triton::scatter_add", mutates_args=())
def scatter_add_op(residual2d: Tensor | None, values: Tensor, indices: Tensor, scale: Tensor | None,
                   n_rows: int) -> Tensor:
    return scatter_add(residual2d, values, indices, scale, n_rows)


@scatter_add_op.register_fake
def _(residual2d, values, indices, scale, n_rows):
    return values.new_empty(n_rows, values.shape[1])


@torch.library.custom_op("mindskip_triton::scatter_add_backward", mutates_args=())
def scatter_add_backward_op(grad2d: Tensor, values: Tensor, indices: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    return scatter_add_backward(grad2d, values, indices, scale)


@scatter_add_backward_op.register_fake
def _(grad2d, values, indices, scale):
    return torch.empty_like(values), torch.empty_like(scale)


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
