"""keep_masked_attention on CUDA at a realistic size (B2, H8/2, N1024, Dh128): the compiled Triton kernels,
forward and gradients, and compiled FlexAttention (a mask_mod reading the keep flags, the benchmark's
baseline) against the reference (fp64 truth, the tolerance rule); no host sync in the Triton path. Skipped
without CUDA.

The kernels must be compiled: run `pytest tests/gpu` on its own (tests/conftest.py then leaves Triton's
interpreter off; see tests/gpu/cuda_harness.py).
"""

from __future__ import annotations

import pytest
import torch

import mindskip_kernels as mk
from benchmarks.bench_kernels import flex_keep_attention
from mindskip_kernels.backends import available
from tests.cases import LOW
from tests.gpu.cuda_harness import (
    DEV,
    HAS_CUDA,
    INTERPRET,
    count_syncs,
    needs_cuda,
    triton_compiled_only,
)
from tests.harness import assert_within_rule, check_forward_backward, make_keep

pytestmark = [pytest.mark.gpu, needs_cuda, pytest.mark.skipif(not available()["triton"], reason="needs triton")]
if HAS_CUDA and not INTERPRET:
    from mindskip_kernels.backends import triton as tri

B, HQ, HKV, N, DH = 2, 8, 2, 1024, 128


def _inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.randn(B, h, N, DH, device=DEV).to(dtype) for h in (HQ, HKV, HKV)]


@triton_compiled_only
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("pattern", ["random", "all", "none", "empty_seq", "prefix"])
def test_triton_forward_backward(dtype, pattern):
    check_forward_backward(_inputs(dtype), make_keep(B, N, pattern, DEV),
                           torch.randn(B, HQ, N, DH, device=DEV).to(dtype), "bnhd")


@triton_compiled_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flex_attention_matches_reference(dtype):
    """The FlexAttention baseline computes the same op (so the benchmark compares like with like)."""
    q, k, v = _inputs(dtype)
    keep = make_keep(B, N, "random", DEV)
    out = flex_keep_attention()(q, k, v, keep, DH**-0.5)
    low = mk.keep_masked_attention(q, k, v, keep, backend="reference")
    truth = mk.keep_masked_attention(q.double(), k.double(), v.double(), keep, backend="reference")
    assert_within_rule(out, low, truth, "flex")


@triton_compiled_only
def test_no_host_sync():
    """Forward and backward never wait for the GPU (keep flags are read on the device)."""
    q, k, v = (t.requires_grad_() for t in _inputs(torch.bfloat16))
    keep = make_keep(B, N, "random", DEV)
    grad = torch.randn(B, HQ, N, DH, device=DEV, dtype=torch.bfloat16)

    def step():
        torch.autograd.grad(tri.keep_masked_attention(q, k, v, keep, DH**-0.5), (q, k, v), grad)

    assert count_syncs(step) == 0
