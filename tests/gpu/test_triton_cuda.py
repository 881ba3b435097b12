"""The Triton backend's compiled kernels on CUDA tensors against the reference (fp64 truth, the tolerance
rule, exact for index work), bf16 included, plus a count of host syncs on the hot path. Skipped without CUDA.

tests/conftest.py switches Triton's interpreter on for the CPU suite; the kernels here must be compiled, so
when the interpreter is on this module reruns itself in a fresh process with TRITON_INTERPRET=0 (and
MINDSKIP_TRITON_AUTOTUNE=0: the first config of each kernel, so the run is a quick check; the sm_90 build
of every config is checked in tests/test_triton.py). Run directly with
`TRITON_INTERPRET=0 python -m pytest tests/gpu/test_triton_cuda.py -x -q`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.attention import MindSkipAttention
from mindskip_kernels.backends import reference
from tests.harness import assert_within_rule, random_keep
from tests.test_kernels import ATTN_CASES, LOW, PATTERNS
from tests.test_triton import ATTN_GRAD_CASES, EPS, _check_grads, _rmsnorm

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEV = "cuda"
SHAPES = [(1, 1, 8), (2, 97, 40), (3, 1025, 64), (2, 300, 4096)]
compiled_only = pytest.mark.skipif(INTERPRET and torch.cuda.is_available(),
                                   reason="Triton interpreter on: covered by the rerun test")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
if torch.cuda.is_available() and not INTERPRET:
    from mindskip_kernels.backends import triton as tri


@pytest.mark.skipif(not INTERPRET, reason="the compiled kernels run in this process")
def test_rerun_without_interpreter():
    env = os.environ | {"TRITON_INTERPRET": "0", "MINDSKIP_TRITON_AUTOTUNE": "0"}
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"], env=env,
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-12000:] + proc.stderr[-4000:]


@compiled_only
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_router(dtype, shape, granularity):
    b, n, d = shape
    z = torch.randn(b, n, d, device=DEV).to(dtype)
    w = (torch.randn(d, device=DEV) / d**0.5).to(dtype)
    mask = torch.ones(b, n, dtype=torch.long, device=DEV)
    mask[-1, : n // 3] = 0
    plan = mk.route(z, w, granularity=granularity, attention_mask=mask, backend="triton")
    low = mk.route(z, w, granularity=granularity, attention_mask=mask, backend="reference")
    truth = mk.route(z.double(), w.double(), granularity=granularity, attention_mask=mask, backend="reference")
    real = mask.bool()
    assert_within_rule(plan.scores[real], low.scores[real], truth.scores[real].double(), "scores")
    clear = (truth.scores - 0.5).abs() > 1e-3
    assert torch.equal(plan.keep[clear], truth.keep[clear])
    assert not plan.keep[~real].any()


@compiled_only
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_router_from_hidden(dtype, granularity):
    b, n, d = 2, 300, 4096
    x = (torch.randn(b, n, d, device=DEV) * 3).to(dtype)
    gamma = (1 + 0.1 * torch.randn(d, device=DEV)).to(dtype)
    w = (torch.randn(d, device=DEV) / d**0.5).to(dtype)
    mask = torch.ones(b, n, dtype=torch.bool, device=DEV)
    mask[-1, :50] = False
    scores, _ = tri.router_from_hidden(x, gamma, EPS, w, mask, 0.5, granularity)
    low, _ = reference.router(_rmsnorm(x.float(), gamma.float()), w.float(), mask, 0.5, granularity)
    truth, _ = reference.router(_rmsnorm(x.double(), gamma.double()), w.double(), mask, 0.5, granularity)
    assert_within_rule(scores[mask], low[mask], truth[mask], "scores")


@compiled_only
@pytest.mark.parametrize("shape", [(1, 1), (2, 97), (3, 1025), (2, 131072)])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_compaction_exact(shape, pattern):
    b, n = shape
    keep = random_keep(b, n, pattern, device=DEV)
    positions = torch.randint(0, 10 * n, (b, n), device=DEV)
    indices, cu, kept_pos = tri.compact(keep, positions)
    flat = keep.reshape(-1)
    assert torch.equal(indices, torch.arange(b * n, device=DEV)[flat])
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0] + keep.sum(1).cumsum(0).tolist()
    assert torch.equal(kept_pos, positions.reshape(-1)[flat])
    _, _, broadcast = tri.compact(keep, torch.arange(n, device=DEV).expand(b, n))  # stride-0 position ids
    assert torch.equal(broadcast, torch.arange(n, device=DEV).repeat(b)[flat])


@compiled_only
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_gather_scatter_exact(dtype, shape, pattern):
    b, n, d = shape
    keep = random_keep(b, n, pattern, device=DEV)
    plan = mk.route(torch.randn(b, n, 4, device=DEV), torch.zeros(4, device=DEV), threshold=0.0,
                    attention_mask=keep.long(), backend="reference")
    x = torch.randn(b, n, d, device=DEV).to(dtype)
    assert torch.equal(mk.gather(x, plan, backend="triton"), x.reshape(-1, d)[plan.indices])
    values = torch.randn(plan.num_kept, d, device=DEV).to(dtype)
    scale = torch.rand(plan.num_kept, device=DEV)
    for s in (None, scale):
        out = mk.scatter_add(x, values, plan, s, backend="triton")
        assert torch.equal(out, mk.scatter_add(x, values, plan, s, backend="reference"))
    gamma = (1 + 0.1 * torch.randn(d, device=DEV)).to(dtype)
    normed = tri.gather_norm(x.reshape(-1, d), gamma, EPS, plan.indices)
    low = _rmsnorm(x.float(), gamma.float()).to(dtype).reshape(-1, d)[plan.indices]
    truth = _rmsnorm(x.double(), gamma.double()).reshape(-1, d)[plan.indices]
    assert_within_rule(normed, low, truth, "gather_norm")


ATTN = ATTN_CASES | {"bf16_hd128_4k": ([1024, 3072], [1024, 3072], 16, 4, 128)}


@compiled_only
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", list(ATTN))
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_attention(dtype, case, causal):
    lq, lk, hq, hkv, dh = ATTN[case]
    cu_q = torch.tensor([0] + lq, device=DEV).cumsum(0).int()
    cu_k = torch.tensor([0] + lk, device=DEV).cumsum(0).int()
    q = torch.randn(sum(lq), hq, dh, device=DEV).to(dtype)
    k = torch.randn(sum(lk), hkv, dh, device=DEV).to(dtype)
    v = torch.randn(sum(lk), hkv, dh, device=DEV).to(dtype)
    args = (cu_q, cu_k, max(lq), max(lk))
    out = mk.varlen_attention(q, k, v, *args, causal=causal, backend="triton")
    low = mk.varlen_attention(q, k, v, *args, causal=causal, backend="reference")
    truth = mk.varlen_attention(q.double(), k.double(), v.double(), *args, causal=causal, backend="reference")
    assert_within_rule(out, low, truth, "attention")


@compiled_only
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", list(ATTN_GRAD_CASES))
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_attention_backward(dtype, case, causal):
    lq, lk, hq, hkv, dh = ATTN_GRAD_CASES[case]
    cu_q = torch.tensor([0] + lq, device=DEV).cumsum(0).int()
    cu_k = torch.tensor([0] + lk, device=DEV).cumsum(0).int()

    def fn_for(backend):
        return lambda q, k, v: mk.varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal,
                                                   backend=backend)

    inputs = [torch.randn(sum(n), h, dh, device=DEV) for n, h in ((lq, hq), (lk, hkv), (lk, hkv))]
    _check_grads(fn_for, inputs, torch.randn(sum(lq), hq, dh, device=DEV), dtype, ["out", "dq", "dk", "dv"])


@compiled_only
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("lengths", [[0, 1, 57, 300], [1], [0, 0], [4096, 17]])
@pytest.mark.parametrize("heads", [(8, 2), (9, 3), (32, 8)])
def test_decode_attention(dtype, lengths, heads):
    hq, hkv = heads
    dh, s = 128, max(lengths) + 3
    q = torch.randn(len(lengths), hq, dh, device=DEV).to(dtype)
    kc = torch.randn(len(lengths), s, hkv, dh, device=DEV).to(dtype)
    vc = torch.randn(len(lengths), s, hkv, dh, device=DEV).to(dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    out = mk.decode_attention(q, kc, vc, seqlens, backend="triton")
    low = mk.decode_attention(q, kc, vc, seqlens, backend="reference")
    truth = mk.decode_attention(q.double(), kc.double(), vc.double(), seqlens, backend="reference")
    assert_within_rule(out, low, truth, "decode")


@compiled_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_mindskip_layer_gradients(dtype, granularity):
    b, n, hidden = 2, 300, 512
    layer = MindSkipAttention(hidden, 8, 2, granularity=granularity, backend="reference").to(DEV)
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.1)
    x, residual, grad = (torch.randn(b, n, hidden, device=DEV) for _ in range(3))

    def run(backend: str, dt: torch.dtype) -> dict[str, torch.Tensor]:
        m = MindSkipAttention(hidden, 8, 2, granularity=granularity, backend=backend).to(DEV, dt)
        m.load_state_dict({k: p.to(dtype) for k, p in layer.state_dict().items()})  # the same rounded weights
        xs = x.to(dtype).to(dt).detach().clone().requires_grad_()
        out = m(xs, residual=residual.to(dtype).to(dt))
        out.backward(grad.to(dtype).to(dt))
        return {"out": out.detach(), "dx": xs.grad} | {f"d{k}": p.grad for k, p in m.named_parameters()}

    out, low, truth = run("triton", dtype), run("reference", dtype), run("reference", torch.float64)
    for name in truth:
        assert_within_rule(out[name], low[name], truth[name], name)


def _count_syncs(fn) -> int:
    """Host syncs made by fn(), counted with CUDA sync debug mode (after a warm-up call that autotunes)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@compiled_only
def test_no_host_sync_on_hot_path():
    """Router, gather, scatter-add, attention forward + backward and decode never wait for the GPU;
    compaction waits exactly once (T sizes its outputs)."""
    b, n, d, hq, hkv, dh = 2, 512, 1024, 8, 2, 128
    z = torch.randn(b, n, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    w = torch.zeros(1, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(b, n, dtype=torch.bool, device=DEV)
    keep = random_keep(b, n, "random", device=DEV)
    indices, cu, positions = tri.compact(keep, torch.arange(n, device=DEV).expand(b, n))
    t = indices.shape[0]
    q = torch.randn(t, hq, dh, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(t, hkv, dh, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    cache = torch.randn(b, n, hkv, dh, device=DEV, dtype=torch.bfloat16)

    def hot_path():
        scores, _ = tri.router(z, w, mask, 0.5, "token")
        packed = tri.gather(z.reshape(-1, d), indices)
        attn = tri.varlen_attention(q, kv, kv, cu, cu, n, n, True, dh**-0.5)
        out = tri.scatter_add(z.detach().reshape(-1, d), packed, indices, scores.reshape(-1)[indices])
        (out.float().sum() + attn.float().sum()).backward()
        tri.decode_attention(q[:b].detach(), cache, cache, torch.full((b,), n, device=DEV), dh**-0.5)

    assert _count_syncs(hot_path) == 0
    assert _count_syncs(lambda: tri.compact(keep, torch.arange(n, device=DEV).expand(b, n))) == 1
