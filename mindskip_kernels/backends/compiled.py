"""Backend over the compiled extension `mindskip_kernels._C` (ops registered as torch.ops.mindskip.*).

The C++/CUDA ops write into outputs passed in (`Tensor(a!) out` schemas): the wrappers here allocate them
with `_alloc.empty`, so tests can poison them, and fake implementations registered on load let the ops
run under torch.compile. Every op checks its arguments in C++ too (ValueError/TypeError naming the
argument), so calling torch.ops.mindskip.* directly is safe.
"""

from __future__ import annotations

from types import ModuleType

import torch

from mindskip_kernels.backends._alloc import empty

NAME = "compiled"

NOT_BUILT = (
    "mindskip_kernels._C is not built (import failed: {err}). Reinstall from the source tree with the build "
    "enabled: `pip install -e . --no-build-isolation` after installing torch (unset MINDSKIP_SKIP_BUILD). "
    "The 'reference' and 'triton' backends work without it."
)

# backend op -> the registered op whose kernel decides support (compact also runs compact_counts)
KERNELS = {
    "router": "router",
    "compact": "compact",
    "gather": "gather",
    "router_from_hidden": "router",
    "gather_norm": "gather_norm",
    "scatter_add": "scatter_add",
    "decode_attention": "decode_attention",
    "paged_decode_attention": "decode_attention",
    "varlen_attention": "varlen_attention",
    "paged_varlen_attention": "paged_varlen_attention",
}
ALL_OPS = ("router", "compact_counts", "compact", "gather", "gather_norm", "scatter_add", "decode_attention",
           "varlen_attention", "paged_varlen_attention")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DTYPE_FREE = ("compact", "gather")  # index work and byte copies: any dtype


def _no_output(*args: object) -> None:
    """Fake (meta) implementation: every op only writes its out arguments, whose shapes the caller chose."""


def _import() -> tuple[ModuleType | None, str]:
    """Import _C once (at module import, bottom of this file) and register the fakes of its ops."""
    try:
        from mindskip_kernels import _C
    except ImportError as err:  # not built, or built against another torch
        return None, str(err)
    for op in ALL_OPS:
        torch.library.register_fake(f"mindskip::{op}", _no_output)
    return _C, ""


def load() -> ModuleType:
    """The extension module, or a RuntimeError that says how to build it."""
    if _EXT is None:
        raise RuntimeError(NOT_BUILT.format(err=_ERR))
    return _EXT


def available() -> bool:
    return _EXT is not None


def build_info() -> dict:
    """How _C was built ({'cuda': bool, 'cuda_archs': str, ...}), or {'built': False, 'error': ...}."""
    if _EXT is None:
        return {"built": False, "error": _ERR}
    return {"built": True, **_EXT.build_info()}


def supports(op: str, device: torch.device, dtype: torch.dtype) -> bool:
    """True when `op` has a kernel registered for this device type (CPU always when built, CUDA when built
    with it) and the kernel handles `dtype` (fp16/bf16/fp32/fp64; compaction and gather take any)."""
    if op not in KERNELS or not available():
        return False
    if op not in DTYPE_FREE and dtype not in FLOAT_DTYPES:
        return False
    return _registered(KERNELS[op], device.type)


_REGISTERED: dict[tuple[str, str], bool] = {}


def _registered(kernel: str, device_type: str) -> bool:
    """Whether torch.ops.mindskip.<kernel> has an implementation for the device type. Asked once, then a dict
    lookup (hot path), which torch.compile traces without a graph break (a functools cache it cannot)."""
    if (kernel, device_type) not in _REGISTERED:
        key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
        _REGISTERED[kernel, device_type] = key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"mindskip::{kernel}", key)
    return _REGISTERED[kernel, device_type]


def router(z: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, threshold: float,
           granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused score + decision: scores [B,N] float32, keep [B,N] bool (one pass over z)."""
    scores = empty(mask.shape, torch.float32, z.device)
    keep = empty(mask.shape, torch.bool, z.device)
    torch.ops.mindskip.router(z, weight, None, 0.0, mask, threshold, granularity == "sequence", scores, keep)
    return scores, keep


def router_from_hidden(x: torch.Tensor, gamma: torch.Tensor, eps: float, weight: torch.Tensor, mask: torch.Tensor,
                       threshold: float, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`router` on RMSNorm(x) * gamma without writing the normalized rows: score = sigmoid(rstd * x . (gamma * w)),
    one pass over the hidden states x [B,N,D] (inference; like the Triton backend's)."""
    scores = empty(mask.shape, torch.float32, x.device)
    keep = empty(mask.shape, torch.bool, x.device)
    torch.ops.mindskip.router(x, weight, gamma, eps, mask, threshold, granularity == "sequence", scores, keep)
    return scores, keep


def compact(keep: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """indices [T], cu_seqlens [B+1] int32, positions [T] int64 without nonzero().

    T is the output shape, so it is read from cu_seqlens[-1]: free on the CPU, one device-to-host sync on
    CUDA (the only one of the routing pipeline; everything else stays on the device).
    """
    cu_seqlens = empty((keep.shape[0] + 1,), torch.int32, keep.device)
    torch.ops.mindskip.compact_counts(keep, cu_seqlens)
    total = int(cu_seqlens[-1])
    indices = empty((total,), torch.int64, keep.device)
    positions = empty((total,), torch.int64, keep.device)
    torch.ops.mindskip.compact(keep, position_ids, cu_seqlens, indices, positions)
    return indices, cu_seqlens, positions


def gather(x2d: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    out = empty((indices.shape[0], x2d.shape[1]), x2d.dtype, x2d.device)
    torch.ops.mindskip.gather(x2d, indices, out)
    return out


def gather_norm(x2d: torch.Tensor, gamma: torch.Tensor, eps: float, indices: torch.Tensor) -> torch.Tensor:
    """RMSNorm(x2d[indices]) * gamma -> [T, D], fp32 math and one rounding: only kept rows are normalized."""
    out = empty((indices.shape[0], x2d.shape[1]), x2d.dtype, x2d.device)
    torch.ops.mindskip.gather_norm(x2d, gamma, eps, indices, out)
    return out


def scatter_add(residual2d: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                scale: torch.Tensor | None) -> torch.Tensor:
    """A new tensor: residual rows copied, kept rows + scale * values (rounded like the reference)."""
    out = empty(residual2d.shape, residual2d.dtype, residual2d.device)
    torch.ops.mindskip.scatter_add(residual2d, values, indices, scale, out)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_seqlens: torch.Tensor, block_table: torch.Tensor | None,
                     softmax_scale: float) -> torch.Tensor:
    """Dense caches, or paged pools read through `block_table` in place (no copy of cached K/V)."""
    out = empty(q.shape, q.dtype, q.device)
    torch.ops.mindskip.decode_attention(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, out)
    return out


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                     softmax_scale: float, query_positions: torch.Tensor | None = None) -> torch.Tensor:
    """CPU only. The kernel reads the sequence lengths from cu_seqlens; the max_seqlen bounds are unused."""
    out = empty(q.shape, q.dtype, q.device)
    torch.ops.mindskip.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, out,
                                        query_positions)
    return out


def paged_varlen_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cache_seqlens: torch.Tensor, block_table: torch.Tensor, max_seqlen_q: int, causal: bool,
                           softmax_scale: float, query_positions: torch.Tensor | None = None) -> torch.Tensor:
    """CPU only. Keys read from the pools through the block table; max_seqlen_q is unused."""
    out = empty(q.shape, q.dtype, q.device)
    torch.ops.mindskip.paged_varlen_attention(q, k_cache, v_cache, cu_seqlens_q, cache_seqlens, block_table, causal,
                                              softmax_scale, out, query_positions)
    return out


# registers torch.ops.mindskip.* (when built) so the wrappers above work on import; load()/available() read
# these globals, so torch.compile traces them
_EXT, _ERR = _import()
