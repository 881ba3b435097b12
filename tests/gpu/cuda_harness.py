"""What the CUDA tests share: the device, the backends as params, and host-sync counting.

Run `pytest tests/gpu` on its own: tests/conftest.py then leaves Triton's interpreter off, so the Triton
kernels run compiled and every test here is a plain test (set MINDSKIP_TRITON_AUTOTUNE=0 for a quick check
with the first config of each kernel; the sm_90 build of every config is checked in tests/test_triton.py). In
a session that also runs the CPU tests the interpreter is on, and the Triton cases here skip.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import pytest
import torch

from mindskip_kernels.backends import compiled
from tests.harness import backend_params

DEV = "cuda"
HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SHAPES = [(1, 1, 8), (2, 97, 40), (3, 1025, 64), (2, 300, 4096), (2, 33, 41)]  # (B, N, D); D=41: unvectorised
INTERPRETER_ON = ("Triton's interpreter is on (this session runs CPU tests too): run `pytest tests/gpu` on its own "
                  "for the compiled Triton kernels")

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
triton_compiled_only = pytest.mark.skipif(INTERPRET, reason=INTERPRETER_ON)


def cuda_backends() -> list:
    """"compiled" and "triton" as pytest params, each skipped where it cannot run here (see the module doc)."""
    compiled_skip = None if compiled.build_info().get("cuda") else "_C built without CUDA kernels"
    return backend_params(DEV, reference=False, skip={"compiled": compiled_skip,
                                                      "triton": INTERPRETER_ON if INTERPRET else None})


def kernels(backend: str, op: str, dtype: torch.dtype) -> ModuleType:
    """The backend module; skips the test when the backend has no CUDA kernel for `op` at `dtype`."""
    mod = importlib.import_module(f"mindskip_kernels.backends.{backend}")
    if not mod.supports(op, torch.device(DEV), dtype):
        pytest.skip(f"{backend} has no {DEV} kernel for {op} at {dtype}")
    return mod


def count_syncs(fn) -> int:
    """Host syncs made by fn(), counted with CUDA sync debug mode ('warn' records each one), after a warm-up
    call (autotuning, allocator, module loading)."""
    fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)
