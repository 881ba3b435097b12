"""Paged decode attention on CUDA (compiled split-K kernel and Triton split-KV kernel) against the reference:
pools read in place through shuffled block tables, ragged and long caches, block boundaries, GQA, NaN in
every unused pool row; no host sync. Paged varlen attention, also with query positions.
Skipped without CUDA; the Triton cases run when `pytest tests/gpu` runs on its own (see cuda_harness)."""

from __future__ import annotations

import pytest
import torch

import mindskip_kernels as mk
from tests.cases import LOW, POSITION_PATTERNS
from tests.gpu.cuda_harness import (
    DEV,
    count_syncs,
    cuda_backends,
    kernels,
    needs_cuda,
)
from tests.harness import assert_within_rule, masked_sdpa, paged, query_positions

pytestmark = [pytest.mark.gpu, needs_cuda]
BACKENDS = cuda_backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("lengths", [[0, 1, 15, 16, 17, 300], [4096, 17], [0, 0], [2049]])
@pytest.mark.parametrize("heads", [(8, 2), (32, 8), (40, 4)])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("dh", [64, 128])
def test_paged_decode(backend, dtype, lengths, heads, block_size, dh):
    kernels(backend, "paged_decode_attention", dtype)
    hq, hkv = heads
    batch, cap = len(lengths), max(lengths) + 2
    dense_k, dense_v = (torch.randn(batch, cap, hkv, dh).to(dtype) for _ in range(2))
    for b, n in enumerate(lengths):
        dense_k[b, n:] = float("nan")
        dense_v[b, n:] = float("nan")
    k_pool, v_pool, table = (t.to(DEV) for t in paged(dense_k, dense_v, lengths, block_size))
    q = torch.randn(batch, hq, dh, device=DEV).to(dtype)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    out = mk.decode_attention(q, k_pool, v_pool, lens, block_table=table, backend=backend)
    low = mk.decode_attention(q, k_pool, v_pool, lens, block_table=table, backend="reference")
    truth = mk.decode_attention(q.double(), dense_k.to(DEV).double(), dense_v.to(DEV).double(), lens,
                                backend="reference")
    assert_within_rule(out, low, truth, "paged decode")


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_decode_never_syncs(backend):
    kernels(backend, "paged_decode_attention", torch.bfloat16)
    pool = torch.randn(64, 16, 8, 128, device=DEV, dtype=torch.bfloat16)
    table = torch.randperm(64, device=DEV).view(4, 16).int()
    q = torch.randn(4, 32, 128, device=DEV, dtype=torch.bfloat16)
    lens = torch.tensor([0, 255, 256, 100], device=DEV, dtype=torch.int32)
    assert count_syncs(lambda: mk.decode_attention(q, pool, pool, lens, block_table=table, backend=backend)) == 0


def _paged_inputs(lengths: tuple[list[int], list[int]], dtype: torch.dtype) -> tuple:
    """(q packed by cu_q, cu_q, the dense K/V [B, S, Hkv, Dh], their paged pools on the GPU and block table) for
    (query lengths, cache lengths) per sequence."""
    lq, lk = lengths
    hq, hkv, dh = 8, 2, 128
    cu_q = torch.tensor([0] + lq).cumsum(0).int()
    q = torch.randn(int(cu_q[-1]), hq, dh).to(dtype)
    dense_k, dense_v = (torch.randn(len(lk), max(lk) + 1, hkv, dh).to(dtype) for _ in range(2))
    k_pool, v_pool, table = (t.to(DEV) for t in paged(dense_k, dense_v, lk, 16))
    return q, cu_q, dense_k, dense_v, k_pool, v_pool, table


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("lengths", [([5, 1, 17], [37, 1, 17]), ([300, 0], [1000, 0]), ([64], [64])])
@pytest.mark.parametrize("causal", [True, False])
def test_paged_varlen(backend, dtype, lengths, causal):
    kernels(backend, "paged_varlen_attention", dtype)
    q, cu_q, dense_k, dense_v, k_pool, v_pool, table = _paged_inputs(lengths, dtype)
    lq, lk = lengths
    args = (cu_q.to(DEV), torch.tensor(lk, dtype=torch.int32, device=DEV), table, max(lq))
    out = mk.paged_varlen_attention(q.to(DEV), k_pool, v_pool, *args, causal=causal, backend=backend)
    low = mk.paged_varlen_attention(q.to(DEV), k_pool, v_pool, *args, causal=causal, backend="reference")
    truth = mk.paged_varlen_attention(q.to(DEV).double(), k_pool.double(), v_pool.double(), *args, causal=causal,
                                      backend="reference")
    assert_within_rule(out, low, truth, "paged varlen")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("lengths", [([5, 1, 17], [37, 1, 17]), ([300, 0], [1000, 0]), ([1024, 64], [4096, 130])])
@pytest.mark.parametrize("pattern", POSITION_PATTERNS)
def test_paged_varlen_query_positions(backend, dtype, lengths, pattern):
    """Query t sees its cached rows 0..positions[t]; the truth is an fp64 dense SDPA with the mask built in the
    test, on the same keys packed."""
    kernels(backend, "paged_varlen_attention", dtype)
    q, cu_q, dense_k, dense_v, k_pool, v_pool, table = _paged_inputs(lengths, dtype)
    lq, lk = lengths
    pos = query_positions(lq, lk, pattern).to(DEV)
    args = (cu_q.to(DEV), torch.tensor(lk, dtype=torch.int32, device=DEV), table, max(lq))
    out = mk.paged_varlen_attention(q.to(DEV), k_pool, v_pool, *args, query_positions=pos, backend=backend)
    low = mk.paged_varlen_attention(q.to(DEV), k_pool, v_pool, *args, query_positions=pos, backend="reference")
    k_packed, v_packed = (torch.cat([d[b, :n] for b, n in enumerate(lk)]).to(DEV) for d in (dense_k, dense_v))
    cu_k = torch.tensor([0] + lk, device=DEV).cumsum(0).int()
    truth = masked_sdpa(q.to(DEV), k_packed, v_packed, cu_q.to(DEV), cu_k, pos)
    assert_within_rule(out, low, truth, "paged varlen with query positions")
