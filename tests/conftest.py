"""Test setup: Triton's interpreter and poisoned kernel outputs must be switched on before import."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit is applied
os.environ["MINDSKIP_POISON_OUTPUTS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
