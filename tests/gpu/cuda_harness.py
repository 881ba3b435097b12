"""What the CUDA tests share: the device, the backends as params, the rerun without Triton's interpreter, and
host-sync counting.

tests/conftest.py switches Triton's interpreter on for the CPU suite, but on CUDA the Triton kernels must run
compiled. So a module with Triton cases skips them while the interpreter is on and has a test that reruns it
in a fresh process with TRITON_INTERPRET=0 (MINDSKIP_TRITON_AUTOTUNE=0: the first config of each kernel, a
quick check; the sm_90 build of every config is checked in tests/test_triton.py). That process has
MINDSKIP_TRITON_RERUN=1 and skips the non-Triton cases, which the first process ran: nothing runs twice.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch

from mindskip_kernels.backends import compiled
from tests.harness import backend_params

DEV = "cuda"
HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
RERUN = os.environ.get("MINDSKIP_TRITON_RERUN", "0") == "1"  # this process is the rerun: Triton cases only
ROOT = Path(__file__).resolve().parents[2]
SHAPES = [(1, 1, 8), (2, 97, 40), (3, 1025, 64), (2, 300, 4096), (2, 33, 41)]  # (B, N, D); D=41: unvectorised

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
triton_compiled_only = pytest.mark.skipif(INTERPRET and HAS_CUDA, reason="Triton interpreter on: covered by the "
                                                                         "rerun test")
rerun_only_with_interpreter = pytest.mark.skipif(not INTERPRET, reason="the compiled kernels run in this process")


def cuda_backends() -> list:
    """"compiled" and "triton" as pytest params, each skipped where it cannot run here (see the module doc)."""
    compiled_skip = None
    if RERUN:
        compiled_skip = "this process reruns the Triton cases only"
    elif not compiled.build_info().get("cuda"):
        compiled_skip = "_C built without CUDA kernels"
    triton_skip = "Triton interpreter on: covered by the rerun test" if INTERPRET else None
    return backend_params(DEV, reference=False, skip={"compiled": compiled_skip, "triton": triton_skip})


def kernels(backend: str, op: str, dtype: torch.dtype) -> ModuleType:
    """The backend module; skips the test when the backend has no CUDA kernel for `op` at `dtype`."""
    mod = importlib.import_module(f"mindskip_kernels.backends.{backend}")
    if not mod.supports(op, torch.device(DEV), dtype):
        pytest.skip(f"{backend} has no {DEV} kernel for {op} at {dtype}")
    return mod


def rerun_without_interpreter(test_file: str) -> None:
    """Run `test_file` in a fresh pytest process with the Triton kernels compiled; fail with its output."""
    env = os.environ | {"TRITON_INTERPRET": "0", "MINDSKIP_TRITON_AUTOTUNE": "0", "MINDSKIP_TRITON_RERUN": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-12000:] + proc.stderr[-4000:]


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
