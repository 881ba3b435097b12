"""Triton backend: fused router, compaction, gather(+norm), scatter-add, varlen flash attention (forward and
backward), split-KV decode attention (dense or paged) and paged varlen attention (prefill with a cache).

Runs on CUDA tensors, and on CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1, for tests).
Router, gather, scatter-add, varlen and keep-masked attention are differentiable; each kernel file ends with its
custom ops (namespace `mindskip_triton`, fake implementations for torch.compile) and autograd.Function.
Compaction, decode and paged attention, `router_from_hidden`, `gather_norm` and `predicated_linear` are
inference paths.
"""

from __future__ import annotations

import torch
import triton  # noqa: F401  (ImportError here marks the backend unavailable)

from mindskip_kernels.backends import differentiable_of, ops_of
from mindskip_kernels.backends.triton import attention, cache_attention, compaction, gather_scatter, router_kernels
from mindskip_kernels.backends.triton import predicated_linear as _predicated
from mindskip_kernels.backends.triton._common import INTERPRET

NAME = "triton"
OPS = ops_of(NAME)
DIFFERENTIABLE = differentiable_of(NAME)  # ops with a backward, see backends.resolve(needs_grad=)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def available() -> bool:
    """Triton imported (it did, or this module would not) and there is a GPU or the interpreter."""
    return INTERPRET or torch.cuda.is_available()


def supports(op: str, device: torch.device, dtype: torch.dtype) -> bool:
    """CUDA tensors (CPU ones under the interpreter) of fp16/bf16/fp32; compaction takes any dtype."""
    on_device = device.type == "cuda" or (device.type == "cpu" and INTERPRET)
    return op in OPS and on_device and (op == "compact" or dtype in DTYPES)


def router(z: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, threshold: float,
           granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [B, N] float32 = sigmoid(z . w) (sequence: of the real tokens' mean) and keep flags [B, N]."""
    return router_kernels.Router.apply(z, weight, mask, threshold, granularity == "sequence")


def router_from_hidden(x: torch.Tensor, gamma: torch.Tensor, eps: float, weight: torch.Tensor, mask: torch.Tensor,
                       threshold: float, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`router` on RMSNorm(x) with weight `gamma`, without writing the normalized rows:
    score = sigmoid(rstd * sum x * gamma * w). Not differentiable (inference)."""
    return router_kernels.router_op(x, weight, gamma, eps, mask, threshold, granularity == "sequence")


def compact(keep: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """indices [T] int64, cu_seqlens [B+1] int32, positions [T] int64 (one host sync for T)."""
    return compaction.compact_op(keep, position_ids)


def gather(x2d: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows x2d[indices] -> [T, D]."""
    return gather_scatter.Gather.apply(x2d, indices)


def gather_norm(x2d: torch.Tensor, gamma: torch.Tensor, eps: float, indices: torch.Tensor) -> torch.Tensor:
    """RMSNorm(x2d[indices]) with weight gamma -> [T, D] (fp32 math, one rounding). Not differentiable."""
    return gather_scatter.gather_norm_op(x2d, gamma, eps, indices)


def scatter_add(residual2d: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                scale: torch.Tensor | None) -> torch.Tensor:
    """A copy of residual2d with values * scale added to rows `indices` (skipped rows bit-identical)."""
    return gather_scatter.ScatterAdd.apply(residual2d, values, indices, scale)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                     softmax_scale: float, query_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Flash attention over packed sequences (bottom-right causal, or up to each query's position; GQA)
    -> [Tq, Hq, Dh]."""
    return attention.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                      softmax_scale, query_positions)


def keep_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                          softmax_scale: float) -> torch.Tensor:
    """Causal attention on [B, Hq, N, Dh] where query i sees key j iff j <= i and (keep[b, j] or j == i)."""
    return attention.KeepMaskedAttention.apply(q, k, v, keep, softmax_scale)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     block_table: torch.Tensor | None, softmax_scale: float) -> torch.Tensor:
    """One query per sequence against its cache rows 0..cache_seqlens[b]-1 (dense, or paged pools read in
    place through `block_table`) -> [B, Hq, Dh]."""
    return cache_attention.decode_op(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale)


def paged_varlen_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cache_seqlens: torch.Tensor, block_table: torch.Tensor, max_seqlen_q: int, causal: bool,
                           softmax_scale: float, query_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Packed queries against paged pools read through the block table (prefill with a cache; causal bottom-right
    or up to each query's position) -> [Tq, Hq, Dh]."""
    return cache_attention.paged_varlen_op(q, k_cache, v_cache, cu_seqlens_q, cache_seqlens, block_table, max_seqlen_q,
                                           causal, softmax_scale, query_positions)


def predicated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      keep: torch.Tensor) -> torch.Tensor:
    """x [B, K] @ weight[N, K]^T + bias on rows whose device flag keep [B] is set, zeros elsewhere (a skipped
    row reads no weight: the projections of a skipped decode row at batch 1 cost a launch, no host branch)."""
    return _predicated.predicated_linear_op(x, weight, bias, keep)
