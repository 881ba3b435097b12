"""Backend registry: resolves `backend=` ("auto", "reference", "triton", "compiled") per op, device and dtype.

A backend module has `supports(op, device, dtype) -> bool` and may list in `DIFFERENTIABLE` the ops that
have a backward; when an input requires grad, "auto" skips backends without one.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

NAMES = ("auto", "reference", "triton", "compiled")
# "auto" preference order: the fastest first.
PREFERENCE = {"cuda": ("triton", "compiled", "reference"), "cpu": ("compiled", "reference")}


_MODULES: dict[str, ModuleType | None] = {}


def _module(name: str) -> ModuleType | None:
    """The backend module, or None when it cannot be imported here (e.g. triton not installed). Imported
    once: later calls are a dict lookup, which torch.compile can trace."""
    if name not in _MODULES:
        try:
            _MODULES[name] = importlib.import_module(f"mindskip_kernels.backends.{name}")
        except ImportError:
            _MODULES[name] = None
    return _MODULES[name]


def available() -> dict[str, bool]:
    """Which backends can run at all in this installation."""
    out = {}
    for name in NAMES[1:]:
        mod = _module(name)
        out[name] = mod is not None and getattr(mod, "available", lambda: True)()
    return out


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will need a backward through an op on these inputs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _differentiable(mod: ModuleType, op: str) -> bool:
    return op in getattr(mod, "DIFFERENTIABLE", ())


def resolve(backend: str, op: str, device: torch.device, dtype: torch.dtype, needs_grad: bool = False,
            empty: bool = False) -> ModuleType:
    """The backend module that runs `op` for tensors on `device` with `dtype` (with a backward when
    `needs_grad`), or a clear error. With `empty` (an input with no elements) the choice is checked as usual
    but the reference runs: there is no work for a kernel, and zero-size corners (D = 0, B = 0) need no
    special case in every kernel."""
    mod = _resolve(backend, op, device, dtype, needs_grad)
    return _module("reference") if empty else mod


def _resolve(backend: str, op: str, device: torch.device, dtype: torch.dtype, needs_grad: bool) -> ModuleType:
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {backend!r}")
    if backend == "auto":
        for name in PREFERENCE.get(device.type, ("reference",)):
            mod = _module(name)
            if mod is not None and mod.supports(op, device, dtype) and (not needs_grad or _differentiable(mod, op)):
                return mod
        raise ValueError(f"no backend supports {op} on {device} with {dtype}")  # reference supports all
    mod = _module(backend)
    if mod is None:
        raise RuntimeError(f"backend {backend!r} cannot be imported here; install its extra "
                           f"(pip install 'mindskip_kernels[{backend}]') or use backend='reference'")
    if backend == "compiled":
        mod.load()  # raises the "not built" error with instructions
    if not mod.supports(op, device, dtype):
        raise ValueError(f"backend {backend!r} does not support {op} for {str(dtype).removeprefix('torch.')} "
                         f"tensors on {device.type}; use backend='auto' or 'reference'")
    if needs_grad and not _differentiable(mod, op):
        raise ValueError(f"backend {backend!r} has no backward for {op} and an input requires grad; use "
                         f"backend='auto' or 'reference' for training")
    return mod
