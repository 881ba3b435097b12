"""Backend over the compiled extension `mindskip_kernels._C` (ops registered as torch.ops.mindskip.*)."""

from __future__ import annotations

import functools
from types import ModuleType

import torch

NAME = "compiled"

NOT_BUILT = (
    "mindskip_kernels._C is not built (import failed: {err}). Reinstall from the source tree with the build "
    "enabled: `pip install -e . --no-build-isolation` after installing torch (unset MINDSKIP_SKIP_BUILD). "
    "The 'reference' and 'triton' backends work without it."
)


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    try:
        from mindskip_kernels import _C
    except ImportError as err:  # not built, or built against another torch
        return None, str(err)
    return _C, ""


def load() -> ModuleType:
    """The extension module, or a RuntimeError that says how to build it."""
    ext, err = _load()
    if ext is None:
        raise RuntimeError(NOT_BUILT.format(err=err))
    return ext


def available() -> bool:
    return _load()[0] is not None


def build_info() -> dict:
    """How _C was built ({'cuda': bool, 'cuda_archs': str, ...}), or {'built': False, 'error': ...}."""
    ext, err = _load()
    if ext is None:
        return {"built": False, "error": err}
    return {"built": True, **ext.build_info()}


def supports(op: str, device: torch.device, dtype: torch.dtype) -> bool:
    """True when the op is registered for this device type (CPU always when built, CUDA when built with it)."""
    if not available() or not hasattr(torch.ops.mindskip, op):
        return False
    key = "CPU" if device.type == "cpu" else "CUDA" if device.type == "cuda" else None
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"mindskip::{op}", key)
