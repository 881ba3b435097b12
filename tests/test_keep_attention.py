"""keep_masked_attention (Router-Tuning's every-token training attention): the reference against a naive
per-query fp64 loop, the Triton kernels (interpreter on CPU) against the reference, forward and gradients, on
fresh random data with awkward lengths, GQA, non-power-of-two head dims, every keep pattern and strided inputs
whose unused memory holds NaN; the same errors for bad inputs from every backend; zero sizes."""

from __future__ import annotations

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.backends import available
from tests.cases import LOW
from tests.harness import backend_params, check_forward_backward, make_keep, random_keep

needs_triton = pytest.mark.skipif(not available()["triton"], reason="triton backend not available")


def naive_keep_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """fp64, one query at a time: softmax over the keys j <= i with keep[b, j] or j == i."""
    batch, hq, n, dh = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(batch, hq, n, dh, dtype=torch.float64)
    for b in range(batch):
        for h in range(hq):
            for i in range(n):
                js = torch.tensor([j for j in range(i + 1) if keep[b, j] or j == i])
                kj, vj = k[b, h // group, js].double(), v[b, h // group, js].double()
                weights = torch.softmax(kj @ q[b, h, i].double() * scale, dim=0)
                out[b, h, i] = weights @ vj
    return out


@pytest.mark.parametrize("shape", [(1, 2, 2, 1, 8), (2, 4, 2, 17, 16), (3, 6, 2, 33, 12)])
@pytest.mark.parametrize("pattern", ["random", "all", "none", "empty_seq"])
def test_reference_matches_naive_loop(shape, pattern):
    b, hq, hkv, n, dh = shape
    q, k, v = torch.randn(b, hq, n, dh), torch.randn(b, hkv, n, dh), torch.randn(b, hkv, n, dh)
    keep = random_keep(b, n, pattern)
    for scale in (None, 0.3):
        out = mk.keep_masked_attention(q.double(), k.double(), v.double(), keep, softmax_scale=scale,
                                       backend="reference")
        expect = naive_keep_attention(q, k, v, keep, dh**-0.5 if scale is None else scale)
        torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-10)


# (B, Hq, Hkv, N, Dh, layout): N = 1, 17, 97, 130 (130 > one 128-key block), GQA 4/2 and MHA, Dh 40 and 80
CASES = {
    "n1_gqa": (2, 4, 2, 1, 64, "contiguous"),
    "n17_mha_dh40": (2, 2, 2, 17, 40, "padded"),
    "n97_gqa_dh80": (1, 4, 2, 97, 80, "bnhd"),
    "n130_gqa": (2, 4, 2, 130, 64, "padded"),
}


@needs_triton
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("pattern", ["random", "all", "none", "empty_seq", "prefix"])
def test_triton_forward_backward(dtype, case, pattern):
    """Triton's out, dq, dk, dv within the tolerance rule of the reference at `dtype`, both against fp64."""
    b, hq, hkv, n, dh, layout = CASES[case]
    keep = make_keep(b, n, pattern)
    inputs = [torch.randn(b, hq, n, dh).to(dtype), torch.randn(b, hkv, n, dh).to(dtype),
              torch.randn(b, hkv, n, dh).to(dtype)]
    check_forward_backward(inputs, keep, torch.randn(b, hq, n, dh).to(dtype), layout)


@needs_triton
def test_triton_is_not_plain_causal():
    """The keep flags change the result (a kernel that ignored them would pass only the 'all' pattern)."""
    q, k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    keep = random_keep(1, 40, "random")
    masked = mk.keep_masked_attention(q, k, v, keep, backend="triton")
    causal = mk.keep_masked_attention(q, k, v, torch.ones_like(keep), backend="triton")
    assert (masked - causal).abs().max() > 1e-2
    torch.testing.assert_close(masked, mk.keep_masked_attention(q, k, v, keep, backend="reference"))


@needs_triton
def test_triton_head_dim_limit():
    """Head dims above the kernels' 256 are a clear error, not a wrong result."""
    q = torch.randn(1, 1, 3, 264)
    with pytest.raises(ValueError, match="head dims up to 256"):
        mk.keep_masked_attention(q, q, q, torch.ones(1, 3, dtype=torch.bool), backend="triton")


@needs_triton
def test_triton_custom_op_compiles_fullgraph():
    """The autograd.Function over the custom ops (with fake implementations) traces into one graph."""
    from mindskip_kernels.backends import triton as tri

    q, k, v = torch.randn(2, 4, 19, 32), torch.randn(2, 2, 19, 32), torch.randn(2, 2, 19, 32)
    keep = random_keep(2, 19, "random")
    compiled = torch.compile(lambda q, k, v: tri.keep_masked_attention(q, k, v, keep, 0.2) * 2, fullgraph=True,
                             backend="aot_eager")
    expect = 2 * mk.keep_masked_attention(q, k, v, keep, softmax_scale=0.2, backend="reference")
    torch.testing.assert_close(compiled(q, k, v), expect)


BACKENDS = backend_params("cpu")
GOOD = {"q": (2, 4, 5, 8), "k": (2, 2, 5, 8), "keep": (2, 5)}
BAD_INPUTS = {
    "q_rank": (dict(q=torch.randn(4, 5, 8)), ValueError, "q must have 4 dimensions"),
    "k_rank": (dict(k=torch.randn(2, 5, 8), v=torch.randn(2, 5, 8)), ValueError, "k must have 4 dimensions"),
    "keep_rank": (dict(keep=torch.ones(10, dtype=torch.bool)), ValueError, "keep must have 2 dimensions"),
    "keep_shape": (dict(keep=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"keep must have shape \(2, 5\)"),
    "k_length": (dict(k=torch.randn(2, 2, 4, 8), v=torch.randn(2, 2, 4, 8)), ValueError, "k must have shape"),
    "kv_shapes": (dict(v=torch.randn(2, 2, 5, 7)), ValueError, "k and v must have the same shape"),
    "gqa": (dict(k=torch.randn(2, 3, 5, 8), v=torch.randn(2, 3, 5, 8)), ValueError, "multiple of key/value heads"),
    "no_kv_heads": (dict(k=torch.randn(2, 0, 5, 8), v=torch.randn(2, 0, 5, 8)), ValueError, "multiple of"),
    "q_dtype": (dict(q=torch.ones(2, 4, 5, 8, dtype=torch.int32)), TypeError, "q must have dtype"),
    "kv_dtype": (dict(k=torch.randn(2, 2, 5, 8).half(), v=torch.randn(2, 2, 5, 8).half()), TypeError,
                 "k must have dtype"),
    "keep_dtype": (dict(keep=torch.ones(2, 5, dtype=torch.long)), TypeError, "keep must have dtype"),
    "q_type": (dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    "keep_device": (dict(keep=torch.ones(2, 5, dtype=torch.bool, device="meta")), ValueError,
                    "keep is on meta but q is on cpu"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_same_error_every_backend(backend, case):
    override, error, message = BAD_INPUTS[case]
    args = {"q": torch.randn(*GOOD["q"]), "k": torch.randn(*GOOD["k"]), "v": torch.randn(*GOOD["k"]),
            "keep": torch.ones(*GOOD["keep"], dtype=torch.bool)} | override
    with pytest.raises(error, match=message):
        mk.keep_masked_attention(args["q"], args["k"], args["v"], args["keep"], backend=backend)


@pytest.mark.parametrize("backend", [pytest.param("reference"),
                                     pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("shape", [(0, 4, 2, 7, 16), (2, 4, 2, 0, 16), (2, 0, 2, 7, 16)])
def test_zero_size(backend, shape):
    """Empty batch, empty sequences and zero query heads give empty outputs and gradients."""
    b, hq, hkv, n, dh = shape
    q, k, v = (torch.randn(b, h, n, dh, requires_grad=True) for h in (hq, hkv, hkv))
    out = mk.keep_masked_attention(q, k, v, torch.ones(b, n, dtype=torch.bool), backend=backend)
    assert out.shape == (b, hq, n, dh)
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and (t.grad == 0).all()
