"""Backend registry: resolves `backend=` ("auto", "reference", "triton", "compiled") per op, device and dtype.

The backend contract. A backend is a module `mindskip_kernels.backends.<name>` with
`supports(op, device, dtype) -> bool`, `DIFFERENTIABLE` (the ops with a backward; when an input requires
grad, "auto" skips backends without one) and, for each op it supports, a function of the op's name taking
the reference's arguments (`paged_decode_attention` is `decode_attention` with a `block_table`). Arguments
are checked once, in the public functions (`_checks`), before any backend runs, so every backend raises the
same errors; inputs with no elements run on the reference (`resolve(empty=True)`).

Which backend has which op, on which devices, and whether it has a backward: `CONTRACT` below, the one
copy of that table (the reference's and Triton's `OPS` / `DIFFERENTIABLE` derive from it, compiled asks its
registered kernels; `support_table()` renders it, as `python -m mindskip_kernels info` prints it;
tests/test_hardening.py checks it against the modules).

dtypes: reference fp16/bf16/fp32/fp64 (fp32 math for low precision); compiled fp16/bf16/fp32/fp64 (compact
and gather any dtype); triton fp16/bf16/fp32. "any" = any device torch runs on (fp64-able: the truth for
tests). The attention kernels of compiled and triton take head dims up to `MAX_HEAD_DIM` (256; "auto" runs
larger ones on the reference). Compiled CUDA kernels need `_C` built with CUDA; triton runs CPU tensors only under
`TRITON_INTERPRET=1` (tests). "auto" prefers triton, then compiled, then the reference on CUDA, and
compiled, then the reference on the CPU.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

NAMES = ("auto", "reference", "triton", "compiled")
# "auto" preference order: the fastest first.
PREFERENCE = {"cuda": ("triton", "compiled", "reference"), "cpu": ("compiled", "reference")}


# op -> backend -> (device types with a kernel, has a backward): the table above, as data
CONTRACT: dict[str, dict[str, tuple[tuple[str, ...], bool]]] = {
    "router": {"reference": (("any",), True), "compiled": (("cpu", "cuda"), False), "triton": (("cuda",), True)},
    "router_from_hidden": {"reference": (("any",), True), "compiled": (("cpu", "cuda"), False),
                           "triton": (("cuda",), False)},
    "compact": {"reference": (("any",), True), "compiled": (("cpu", "cuda"), False), "triton": (("cuda",), False)},
    "gather": {"reference": (("any",), True), "compiled": (("cpu", "cuda"), False), "triton": (("cuda",), True)},
    "gather_norm": {"reference": (("any",), True), "compiled": (("cpu", "cuda"), False), "triton": (("cuda",), False)},
    "scatter_add": {"reference": (("any",), True), "compiled": (("cpu", "cuda"), False), "triton": (("cuda",), True)},
    "varlen_attention": {"reference": (("any",), True), "compiled": (("cpu",), False), "triton": (("cuda",), True)},
    "decode_attention": {"reference": (("any",), True), "compiled": (("cpu", "cuda"), False),
                         "triton": (("cuda",), False)},
    "paged_decode_attention": {"reference": (("any",), True), "compiled": (("cpu", "cuda"), False),
                               "triton": (("cuda",), False)},
    "paged_varlen_attention": {"reference": (("any",), True), "compiled": (("cpu",), False),
                               "triton": (("cuda",), False)},
    "keep_masked_attention": {"reference": (("any",), True), "triton": (("cuda",), True)},
    "rms_norm": {"reference": (("any",), True)},
    "predicated_linear": {"reference": (("any",), True), "triton": (("cuda",), False)},
}


def ops_of(backend: str) -> tuple[str, ...]:
    """The ops `backend` implements (from CONTRACT)."""
    return tuple(op for op, row in CONTRACT.items() if backend in row)


def differentiable_of(backend: str) -> tuple[str, ...]:
    """The ops `backend` implements with a backward (from CONTRACT)."""
    return tuple(op for op, row in CONTRACT.items() if backend in row and row[backend][1])


def support_table() -> str:
    """CONTRACT as a markdown table: per op and backend, the devices with a kernel and whether it has a backward."""
    names = NAMES[1:]
    lines = ["| op | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for op, row in CONTRACT.items():
        cells = [", ".join(d.upper() if d != "any" else d for d in row[n][0]) + (", backward" if row[n][1] else "")
                 if n in row else "-" for n in names]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

MAX_HEAD_DIM = 256  # the attention kernels' limit (csrc/mindskip.h kMaxHeadDim; triton attention_fwd.py imports it)

_MODULES: dict[str, ModuleType | None] = {}


def module(name: str) -> ModuleType | None:
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
        mod = module(name)
        out[name] = mod is not None and getattr(mod, "available", lambda: True)()
    return out


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will need a backward through an op on these inputs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _differentiable(mod: ModuleType, op: str) -> bool:
    return op in getattr(mod, "DIFFERENTIABLE", ())


def resolve(backend: str, op: str, device: torch.device, dtype: torch.dtype, needs_grad: bool = False,
            empty: bool = False, head_dim: int | None = None) -> ModuleType:
    """The backend module that runs `op` for tensors on `device` with `dtype` (with a backward when
    `needs_grad`) and, for attention, `head_dim`, or a clear error. With `empty` (an input with no elements)
    the choice is checked as usual but the reference runs: there is no work for a kernel, and zero-size
    corners (D = 0, B = 0) need no special case in every kernel."""
    mod = _resolve(backend, op, device, dtype, needs_grad, head_dim)
    return module("reference") if empty else mod


def find(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> ModuleType | None:
    """The module `resolve` would pick for `op` in inference, or None where `backend` cannot run it here (for a
    caller with a plain-torch fallback, e.g. the predicated projection). Raises nothing: torch.compile traces it."""
    names = PREFERENCE.get(device.type, ("reference",)) if backend == "auto" else (backend,)
    return _first_supporting(names, op, device, dtype, False, None)


def _first_supporting(names: tuple[str, ...], op: str, device: torch.device, dtype: torch.dtype, needs_grad: bool,
                      head_dim: int | None) -> ModuleType | None:
    """The first of `names` that can be imported and runs `op` here (with a backward if needed; heads larger
    than MAX_HEAD_DIM only on the reference)."""
    big_heads = head_dim is not None and head_dim > MAX_HEAD_DIM
    for name in names:
        mod = module(name)
        if (mod is not None and mod.supports(op, device, dtype) and (not needs_grad or _differentiable(mod, op))
                and (not big_heads or name == "reference")):
            return mod
    return None


def _resolve(backend: str, op: str, device: torch.device, dtype: torch.dtype, needs_grad: bool,
             head_dim: int | None) -> ModuleType:
    big_heads = head_dim is not None and head_dim > MAX_HEAD_DIM
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {backend!r}")
    if backend == "auto":
        mod = _first_supporting(PREFERENCE.get(device.type, ("reference",)), op, device, dtype, needs_grad, head_dim)
        if mod is None:
            raise ValueError(f"no backend supports {op} on {device} with {dtype}")  # reference supports all
        return mod
    mod = module(backend)
    if mod is None:
        raise RuntimeError(f"backend {backend!r} cannot be imported here; install its extra "
                           f"(pip install 'mindskip_kernels[{backend}]') or use backend='reference'")
    if backend == "compiled":
        mod.load()  # raises the "not built" error with instructions
    if not mod.supports(op, device, dtype):
        raise ValueError(f"backend {backend!r} does not support {op} for {str(dtype).removeprefix('torch.')} "
                         f"tensors on {device.type}; use backend='auto' or 'reference'")
    if big_heads and backend != "reference":
        raise ValueError(f"backend {backend!r} supports head dims up to {MAX_HEAD_DIM} for {op}, got {head_dim}; "
                         f"use backend='auto' or 'reference'")
    if needs_grad and not _differentiable(mod, op):
        raise ValueError(f"backend {backend!r} has no backward for {op} and an input requires grad; use "
                         f"backend='auto' or 'reference' for training")
    return mod
