"""Compaction of the keep flags [B, N] into the packed layout: per-block counts, one scan over the block
counts (which also yields cu_seqlens), then each block writes its kept tokens at its offset. Works for any
N (the scan loops over blocks); the only host sync is reading the total T to size the outputs."""

import torch
import triton
import triton.language as tl

from mindskip_kernels.backends._alloc import empty

BLOCK = 1024
Tensor = torch.Tensor
SCAN_BLOCK = 1024


@triton.jit
def _count_kernel(keep_ptr, counts_ptr, seq_len, stride_b, n_blocks, BLOCK: tl.constexpr):
    j = tl.program_id(0)
    b = tl.program_id(1)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    kept = tl.load(keep_ptr + b.to(tl.int64) * stride_b + offs, mask=offs < seq_len, other=0) != 0
    tl.store(counts_ptr + b * n_blocks + j, tl.sum(kept.to(tl.int32), axis=0))


@triton.jit
def _scan_kernel(counts_ptr, offsets_ptr, cu_ptr, n_total, n_blocks, BLOCK: tl.constexpr):
    """One program: exclusive prefix sum of the block counts; a sequence's first block gives cu_seqlens."""
    carry = tl.zeros([], dtype=tl.int64)
    for start in range(0, n_total, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < n_total
        counts = tl.load(counts_ptr + offs, mask=ok, other=0).to(tl.int64)
        exclusive = tl.cumsum(counts, axis=0) - counts + carry
        tl.store(offsets_ptr + offs, exclusive, mask=ok)
        tl.store(cu_ptr + offs // n_blocks, exclusive.to(tl.int32), mask=ok & (offs % n_blocks == 0))
        carry += tl.sum(counts, axis=0)
    tl.store(cu_ptr + n_total // n_blocks, carry.to(tl.int32))


@triton.jit
def _write_kernel(keep_ptr, pos_ptr, offsets_ptr, idx_ptr, out_pos_ptr, seq_len, stride_kb, stride_pb,
                  stride_pn, n_blocks, BLOCK: tl.constexpr):
    j = tl.program_id(0)
    b = tl.program_id(1)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    kept = tl.load(keep_ptr + b.to(tl.int64) * stride_kb + offs, mask=offs < seq_len, other=0) != 0
    flags = kept.to(tl.int32)
    dst = tl.load(offsets_ptr + b * n_blocks + j) + (tl.cumsum(flags, axis=0) - flags)
    tl.store(idx_ptr + dst, b.to(tl.int64) * seq_len + offs, mask=kept)
    pos = tl.load(pos_ptr + b.to(tl.int64) * stride_pb + offs.to(tl.int64) * stride_pn, mask=kept)
    tl.store(out_pos_ptr + dst, pos.to(tl.int64), mask=kept)


def compact(keep: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """indices [T] int64 (flat b*N+n, ascending), cu_seqlens [B+1] int32, positions [T] int64.

    position_ids [B, N] may be a broadcast view (stride 0). One device-to-host sync: T = cu_seqlens[-1]
    sizes the outputs (the contract gives them shape [T]); everything else stays on the device.
    """
    batch, seq_len = keep.shape
    device = keep.device
    n_blocks = max(triton.cdiv(seq_len, BLOCK), 1)
    counts = torch.empty(batch * n_blocks, dtype=torch.int32, device=device)
    offsets = torch.empty(batch * n_blocks, dtype=torch.int64, device=device)
    cu_seqlens = empty((batch + 1,), torch.int32, device)
    if keep.stride(1) != 1:
        keep = keep.contiguous()
    if batch:
        _count_kernel[(n_blocks, batch)](keep, counts, seq_len, keep.stride(0), n_blocks, BLOCK=BLOCK)
    _scan_kernel[(1,)](counts, offsets, cu_seqlens, batch * n_blocks, n_blocks, BLOCK=SCAN_BLOCK)
    total = int(cu_seqlens[-1])  # the one sync: T sizes the outputs
    indices = empty((total,), torch.int64, device)
    positions = empty((total,), torch.int64, device)
    if total:
        _write_kernel[(n_blocks, batch)](keep, position_ids, offsets, indices, positions, seq_len, keep.stride(0),
                                         position_ids.stride(0), position_ids.stride(1), n_blocks, BLOCK=BLOCK)
    return indices, cu_seqlens, positions


# --- custom op (namespace mindskip_triton, fake implementation for torch.compile) -------------------------------

@torch.library.custom_op("mindskip_triton::compact", mutates_args=())
def compact_op(keep: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return compact(keep, position_ids)


@compact_op.register_fake
def _(keep, position_ids):
    total = torch.library.get_ctx().new_dynamic_size()
    return (keep.new_empty(total, dtype=torch.int64), keep.new_empty(keep.shape[0] + 1, dtype=torch.int32),
            keep.new_empty(total, dtype=torch.int64))
