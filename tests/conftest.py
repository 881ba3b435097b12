"""Test setup: poisoned kernel outputs everywhere; Triton's interpreter only where the CPU tests need it.

The interpreter must be on before any @triton.jit is applied, i.e. before the package is imported, so it is
decided in `pytest_configure`, before any test module is collected: on for a session that runs the CPU tests
(tests/*.py, where Triton runs CPU tensors in the interpreter), off when every path given is under tests/gpu,
where the Triton kernels run compiled on the GPU and a GPU test is a plain test. A mixed session keeps it on,
and the Triton cases of tests/gpu then skip, saying to run `pytest tests/gpu` on its own. An explicit
TRITON_INTERPRET in the environment wins.
"""

import os
from pathlib import Path

import pytest
import torch

GPU_TESTS = Path(__file__).resolve().parent / "gpu"

os.environ["MINDSKIP_POISON_OUTPUTS"] = "1"


def _gpu_only(config: pytest.Config) -> bool:
    """Whether every path this session was given lies under tests/gpu."""
    base = Path(config.invocation_params.dir)
    paths = [(base / arg.split("::")[0]).resolve() for arg in config.args]
    return bool(paths) and all(p == GPU_TESTS or GPU_TESTS in p.parents for p in paths)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "0" if _gpu_only(config) else "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Shared model fixtures. tests.models imports the package, which must wait for pytest_configure (above): import
# it inside the fixtures, never at the top of this file.


@pytest.fixture(scope="module")
def tokenizer():
    """A real byte-level BPE tokenizer, trained on the tests' corpus (no download)."""
    from tests.models import train_tokenizer

    return train_tokenizer()


@pytest.fixture
def saved_model(tmp_path, tokenizer):
    """A directory holding tiny_llama of the tokenizer's vocabulary and the tokenizer (save_pretrained)."""
    from tests.models import tiny_llama

    path = tmp_path / "tiny"
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
