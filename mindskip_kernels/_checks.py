"""Argument checks shared by every public function: each failure names the argument and what was expected."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
GRANULARITIES = ("token", "sequence")


def tensor(name: str, t: object, ndim: int | tuple[int, ...] | None = None,
           dtypes: tuple[torch.dtype, ...] | None = None) -> torch.Tensor:
    """Check that `t` is a tensor of the given rank(s) and dtype(s)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        ranks = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in ranks:
            want = " or ".join(str(r) for r in ranks)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).removeprefix('torch.')}")
    return t


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Check that all given tensors (None ignored) live on one device; return it."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}: move them to one device")
    return first.device


def threshold(value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1] (a sigmoid score), got {value!r}")
    return float(value)


def granularity(value: str) -> str:
    if value not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {value!r}")
    return value


def shape_match(name: str, t: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {tuple(t.shape)}")
