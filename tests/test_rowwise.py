"""The row-wise public ops: `predicated_linear` (every backend against the reference, fp64 truth) and `rms_norm`."""

from __future__ import annotations

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.backends.reference import rms_norm as reference_rms_norm
from tests.harness import assert_within_rule, backend_params

BACKENDS = backend_params("cpu", skip={"compiled": "the compiled extension has no predicated projection"})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("batch", "n_in", "n_out", "bias"), [(1, 8, 4, True), (3, 97, 65, False),
                                                              (2, 130, 129, True), (1, 1, 1, False)])
@pytest.mark.parametrize("pattern", ["mixed", "all", "none"])
def test_predicated_linear_matches_the_reference(backend, dtype, batch, n_in, n_out, bias, pattern):
    x = torch.randn(batch, n_in, dtype=dtype)
    weight = torch.randn(n_out, n_in, dtype=dtype) / n_in ** 0.5
    b = torch.randn(n_out, dtype=dtype) if bias else None
    keep = {"all": torch.ones(batch, dtype=torch.bool), "none": torch.zeros(batch, dtype=torch.bool),
            "mixed": torch.arange(batch) % 2 == 0}[pattern]
    out = mk.predicated_linear(x, weight, b, keep, backend=backend)
    low = mk.predicated_linear(x, weight, b, keep, backend="reference")
    truth = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    truth = torch.where(keep.unsqueeze(1), truth, 0)
    assert out.dtype == dtype
    assert_within_rule(out, low, truth)
    assert torch.equal(out[~keep], torch.zeros_like(out[~keep])), "a skipped row must be exactly zero"


@pytest.mark.parametrize("backend", BACKENDS)
def test_predicated_linear_zero_sizes(backend):
    for batch, n_in, n_out in ((0, 8, 4), (2, 8, 0), (2, 0, 3)):
        out = mk.predicated_linear(torch.randn(batch, n_in), torch.randn(n_out, n_in), None,
                                   torch.ones(batch, dtype=torch.bool), backend=backend)
        assert out.shape == (batch, n_out)
        assert torch.equal(out, torch.zeros(batch, n_out))  # K = 0: the empty sum


BAD = {
    "x rank": (dict(x=torch.randn(2, 3, 8)), ValueError, "x must have 2 dimensions"),
    "weight width": (dict(weight=torch.randn(4, 7)), ValueError, "weight must have shape [N, 8]"),
    "weight dtype": (dict(weight=torch.randn(4, 8, dtype=torch.float64)), TypeError, "weight must have dtype"),
    "bias size": (dict(bias=torch.randn(5)), ValueError, "bias must have shape"),
    "keep dtype": (dict(keep=torch.ones(2, dtype=torch.int32)), TypeError, "keep must have dtype"),
    "keep size": (dict(keep=torch.ones(3, dtype=torch.bool)), ValueError, "keep must have shape"),
}


@pytest.mark.parametrize("backend", backend_params("cpu"))  # checked before a backend is chosen: compiled too
@pytest.mark.parametrize("case", list(BAD))
def test_predicated_linear_bad_input_same_error_every_backend(backend, case):
    args = dict(x=torch.randn(2, 8), weight=torch.randn(4, 8), bias=torch.randn(4),
                keep=torch.ones(2, dtype=torch.bool))
    change, error, message = BAD[case]
    args.update(change)
    with pytest.raises(error, match=message.replace("[", r"\[")):
        mk.predicated_linear(args["x"], args["weight"], args["bias"], args["keep"], backend=backend)


def test_predicated_linear_has_a_backward_on_the_reference():
    x, weight = torch.randn(3, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    keep = torch.tensor([True, False, True])
    mk.predicated_linear(x, weight, None, keep).sum().backward()
    assert torch.equal(x.grad[1], torch.zeros(8)) and x.grad[0].abs().sum() > 0


def test_rms_norm_is_the_transformers_norm():
    import transformers

    norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(48))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 5, 48, dtype=dtype)
        want = norm.to(dtype)(x)
        assert torch.equal(mk.rms_norm(x, norm.weight, norm.variance_epsilon), want)
        assert torch.equal(reference_rms_norm(x, norm.weight, norm.variance_epsilon), want)
    with pytest.raises(ValueError, match="norm"):
        mk.rms_norm(torch.randn(2, 48), torch.ones(47), 1e-5)
