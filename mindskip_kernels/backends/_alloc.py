"""Output allocation shared by the kernel backends.

With MINDSKIP_POISON_OUTPUTS=1 (set by the test suite) outputs start as NaN (floats), a large negative
sentinel (integers) or True (bool), so an element a kernel forgets to write fails the comparison with the
reference instead of passing by luck.
"""

from __future__ import annotations

import os

import torch

POISON = os.environ.get("MINDSKIP_POISON_OUTPUTS", "0") == "1"


def empty(shape: tuple[int, ...] | list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        if dtype.is_floating_point:
            out.fill_(float("nan"))
        elif dtype == torch.bool:
            out.fill_(True)
        else:
            out.fill_(-(2**30) - 7)
    return out
