"""The compiled backend's CUDA-only checks: the fused-norm paths, a strided cache for decode, CPU vs CUDA
kernels, device errors and host-sync counting. The checks every backend shares (router, compaction,
gather/scatter-add, attention, decode) are in test_ops_cuda.py. Skipped without CUDA.

Written to run first time on a GPU: every comparison names what differs; run with
`python -m pytest tests/gpu/test_compiled_cuda.py -x -q`.
"""

from __future__ import annotations

import pytest
import torch

from mindskip_kernels.backends import compiled, reference
from tests.cases import LOW
from tests.gpu.cuda_harness import DEV, SHAPES, count_syncs, needs_cuda
from tests.harness import assert_within_rule, random_keep

pytestmark = [
    pytest.mark.gpu,
    needs_cuda,
    pytest.mark.skipif(not compiled.build_info().get("cuda"), reason="_C built without CUDA kernels"),
]


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_fused_norm_paths(dtype, shape, granularity):
    """router_from_hidden and gather_norm: RMSNorm folded in, against rms_norm + reference in fp64."""
    b, n, d = shape
    x = (3 * torch.randn(b, n, d, device=DEV)).to(dtype)
    gamma = (1 + 0.1 * torch.randn(d, device=DEV)).to(dtype)
    w = (torch.randn(d, device=DEV) / d**0.5).to(dtype)
    mask = random_keep(b, n, "random", device=DEV)
    scores, _ = compiled.router_from_hidden(x, gamma, 1e-5, w, mask, 0.5, granularity)
    rms = torch.nn.functional.rms_norm
    low = reference.router(rms(x, (d,), gamma, 1e-5), w, mask, 0.5, granularity)[0].float()
    truth = reference.router(rms(x.double(), (d,), gamma.double(), 1e-5), w.double(), mask, 0.5, granularity)[0]
    assert_within_rule(scores[mask], low[mask], truth[mask], "router_from_hidden scores")
    idx = mask.reshape(-1).nonzero().squeeze(1)
    x2d = x.reshape(-1, d)
    out = compiled.gather_norm(x2d, gamma, 1e-5, idx)
    assert_within_rule(out, rms(x2d, (d,), gamma, 1e-5)[idx], rms(x2d.double(), (d,), gamma.double(), 1e-5)[idx],
                       "gather_norm")


def test_decode_attention_strided_cache():
    big = torch.randn(2, 600, 4, 2, 128, device=DEV, dtype=torch.bfloat16)
    kc, vc = big[:, :512, :, 0], big[:, :512, :, 1]  # capacity slice of a larger buffer, K/V interleaved
    q = torch.randn(2, 16, 128, device=DEV, dtype=torch.bfloat16)
    lens = torch.tensor([511, 700], device=DEV)  # 700 > capacity: clamped like the reference
    out = compiled.decode_attention(q, kc, vc, lens, None, 128**-0.5)
    truth = reference.decode_attention(q.double(), kc.double(), vc.double(), lens, None, 128**-0.5)
    assert_within_rule(out, reference.decode_attention(q, kc, vc, lens, None, 128**-0.5), truth)


def test_cuda_matches_cpu_kernels():
    """Same inputs through the CPU and CUDA kernels: index work identical, scores within a few ulps."""
    keep = random_keep(4, 257, "random")
    z, w = torch.randn(4, 257, 96), torch.randn(96) / 10
    for gran in ("token", "sequence"):
        s_cpu, k_cpu = compiled.router(z, w, keep, 0.5, gran)
        s_gpu, k_gpu = compiled.router(z.to(DEV), w.to(DEV), keep.to(DEV), 0.5, gran)
        torch.testing.assert_close(s_gpu.cpu(), s_cpu, atol=1e-6, rtol=0)
    pos = torch.arange(257).expand(4, 257)
    for g, c in zip(compiled.compact(keep.to(DEV), pos.to(DEV)), compiled.compact(keep, pos), strict=True):
        assert torch.equal(g.cpu(), c)


def test_device_mismatch_raises():
    x = torch.randn(6, 8, device=DEV)
    with pytest.raises(ValueError, match="indices is on cpu"):
        torch.ops.mindskip.gather(x, torch.tensor([1, 2]), torch.empty(2, 8, device=DEV))
    with pytest.raises(ValueError, match="is on"):
        compiled.router(torch.randn(1, 4, 8, device=DEV), torch.randn(8), torch.ones(1, 4, dtype=torch.bool,
                                                                                      device=DEV), 0.5, "token")


def test_host_syncs():
    """Router, gather, scatter-add and decode attention never sync; compaction syncs once (T = its shape)."""
    b, n, d = 4, 512, 256
    z = torch.randn(b, n, d, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(d, device=DEV, dtype=torch.bfloat16)
    mask = torch.ones(b, n, dtype=torch.bool, device=DEV)
    pos = torch.arange(n, device=DEV).expand(b, n)
    scores, keep = compiled.router(z, w, mask, 0.5, "sequence")  # warm-up: allocator, module loading
    idx, _, _ = compiled.compact(keep, pos)
    x2d = z.reshape(-1, d)
    values = torch.randn(idx.numel(), d, device=DEV, dtype=torch.bfloat16)
    scale = torch.rand(idx.numel(), device=DEV)
    q, kc = torch.randn(b, 8, 64, device=DEV), torch.randn(b, 300, 2, 64, device=DEV)
    lens = torch.tensor([0, 1, 150, 300], device=DEV)
    calls = {
        "router": lambda: compiled.router(z, w, mask, 0.5, "token"),
        "router_sequence": lambda: compiled.router(z, w, mask, 0.5, "sequence"),
        "gather": lambda: compiled.gather(x2d, idx),
        "gather_norm": lambda: compiled.gather_norm(x2d, w, 1e-6, idx),
        "router_from_hidden": lambda: compiled.router_from_hidden(z, w, 1e-6, w, mask, 0.5, "sequence"),
        "scatter_add": lambda: compiled.scatter_add(x2d, values, idx, scale),
        "decode_attention": lambda: compiled.decode_attention(q, kc, kc, lens, None, 0.125),
    }
    for name, fn in calls.items():
        assert count_syncs(fn) == 0, f"{name} synchronised with the host"
    assert count_syncs(lambda: compiled.compact(keep, pos)) == 1, "compaction must sync exactly once (for T)"
