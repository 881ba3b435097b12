"""Shared test harness: the backends under test, random inputs, and the tolerance rule of design.md s.4."""

from __future__ import annotations

import pytest
import torch

from mindskip_kernels.backends import available

_AVAILABLE = available()


def backend_params(device: str = "cpu", *, reference: bool = True, skip: dict[str, str | None] | None = None) -> list:
    """Every non-reference backend as a pytest param (after "reference" unless reference=False), skipped where
    it cannot run on `device` or where `skip` gives it a reason (None: no extra reason)."""
    params = []
    for name in ("compiled", "triton"):
        reason = None
        if not _AVAILABLE[name]:
            reason = f"backend {name!r} not available in this install"
        elif device == "cuda" and not torch.cuda.is_available():
            reason = "needs CUDA"
        elif skip and skip.get(name):
            reason = skip[name]
        params.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=reason or "")))
    return ([pytest.param("reference")] if reference else []) + params


def random_keep(batch: int, seq_len: int, pattern: str, device: str = "cpu") -> torch.Tensor:
    """Keep flags [B, N]: 'random' (~half), 'all', 'none', or 'empty_seq' (random, sequence 0 keeps none)."""
    if pattern == "all":
        return torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    if pattern == "none":
        return torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
    keep = torch.rand(batch, seq_len, device=device) < 0.5
    if pattern == "empty_seq":
        keep[0] = False
    return keep


def assert_within_rule(out: torch.Tensor, low_ref: torch.Tensor, truth: torch.Tensor, name: str = "out") -> None:
    """flash-attention rule: max |out - truth| <= 2 * max |low_ref - truth| (+ a few ulps of fp32).

    `truth` is the reference in fp64, `low_ref` the reference run in the same precision as `out`.
    """
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten output?)"
    err = (out.double() - truth).abs().max().item() if out.numel() else 0.0
    ref_err = (low_ref.double() - truth).abs().max().item() if out.numel() else 0.0
    floor = 4 * torch.finfo(torch.float32).eps * max(truth.abs().max().item() if truth.numel() else 0.0, 1.0)
    assert err <= 2 * ref_err + floor, f"{name}: max error {err:.3g} > 2 x reference error {ref_err:.3g}"
