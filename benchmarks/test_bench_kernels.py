"""pytest-benchmark suite of the micro-kernels, per backend, for regression tracking (not part of `pytest`'s
default run: testpaths is tests/).

    python -m pytest benchmarks/test_bench_kernels.py --benchmark-autosave            # record a baseline
    python -m pytest benchmarks/test_bench_kernels.py --benchmark-compare             # compare with it
    python -m pytest benchmarks/test_bench_kernels.py --benchmark-disable -q          # run once (CI smoke)
"""

from __future__ import annotations

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.backends import available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [name for name, ok in available().items() if ok and (name != "triton" or DEVICE == "cuda")]
B, N, D, HQ, HKV, DH = 2, 1024, 1024, 16, 4, 64


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    z = torch.randn(B, N, D, device=DEVICE)
    w = torch.randn(D, device=DEVICE) / D**0.5
    plan = mk.route(z, w, backend="reference")
    t = plan.num_kept
    q, k = torch.randn(t, HQ, DH, device=DEVICE), torch.randn(t, HKV, DH, device=DEVICE)
    return z, w, plan, torch.randn(t, D, device=DEVICE), q, k


@pytest.mark.parametrize("backend", BACKENDS)
def test_route(benchmark, data, backend):
    z, w, *_ = data
    benchmark(mk.route, z, w, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather(benchmark, data, backend):
    z, _, plan, *_ = data
    benchmark(mk.gather, z, plan, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_add(benchmark, data, backend):
    z, _, plan, values, *_ = data
    benchmark(mk.scatter_add, z, values, plan, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_attention(benchmark, data, backend):
    *_, plan, _, q, k = data
    benchmark(mk.varlen_attention, q, k, k, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen, plan.max_seqlen,
              backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_query_attention(benchmark, data, backend):
    """kv="all": the kept tokens' queries against every token's keys (query_positions)."""
    _, _, plan, _, q, _ = data
    k = torch.randn(B * N, HKV, DH, device=DEVICE)
    cu_k = (torch.arange(B + 1, device=DEVICE) * N).int()
    benchmark(mk.varlen_attention, q, k, k, plan.cu_seqlens, cu_k, plan.max_seqlen, N,
              query_positions=plan.positions, backend=backend)
