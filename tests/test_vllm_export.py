"""`mindskip export-vllm` (no vLLM needed): the model folder it writes, and everything the vLLM plugin cannot run
refused before any output is written, with one line naming the problem."""

from __future__ import annotations

import json
import os

import pytest

import mindskip_kernels as mk
from mindskip_kernels.integrations.vllm.export import ROUTERS_DIR
from tests.models import randomize_routers
from tests.test_cli_errors import assert_usage_error, mindskip, no_partial, tree


@pytest.fixture
def model_dir(saved_model):
    return str(saved_model)


def _routers(model_dir, path, **settings) -> str:
    model, _ = mk.integrations.hf.load_model(model_dir)
    mk.apply_mindskip(model, layers=[1, 2], **settings)
    randomize_routers(model)
    mk.save_routers(model, path)
    return str(path)


def test_export_writes_a_routed_model_folder(model_dir, tmp_path):
    routers = _routers(model_dir, tmp_path / "r", kv="all", target="block", adapter="mean")
    out = tmp_path / "routed"
    proc = mindskip("export-vllm", "--model", model_dir, "--routers", routers, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "1 (block), 2 (block)" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MindSkipLlamaForCausalLM"]
    assert config["mindskip_routers"] == ROUTERS_DIR
    assert tree(out / ROUTERS_DIR) == tree(routers)
    assert set(os.listdir(model_dir)) <= set(os.listdir(out))
    with open(os.path.join(model_dir, "model.safetensors"), "rb") as f:
        assert (out / "model.safetensors").read_bytes() == f.read()


@pytest.mark.parametrize("settings, fragment", [
    (dict(kv="kept"), "kv=\"all\" only"),
    (dict(kv="kept", granularity="sequence"), "granularity 'sequence'"),
    (dict(kv="kept", target="mlp"), "targets ('attention', 'block')"),
])
def test_refuses_what_the_plugin_cannot_run(model_dir, tmp_path, settings, fragment):
    routers = _routers(model_dir, tmp_path / "r", **settings)
    out = tmp_path / "routed"
    proc = mindskip("export-vllm", "--model", model_dir, "--routers", routers, "--out", str(out))
    assert_usage_error(proc, "export-vllm", f"--routers {routers}", fragment)
    assert not out.exists()
    no_partial(tmp_path)


def _edit_config(model_dir, **changes) -> None:
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("changes, fragment", [
    (dict(model_type="gpt2"), "the vLLM plugin supports model_type"),
    (dict(hidden_size=64), "routers for another model"),
    (dict(num_hidden_layers=2), "routers for another model"),
])
def test_refuses_routers_for_another_model(model_dir, tmp_path, changes, fragment):
    routers = _routers(model_dir, tmp_path / "r", kv="all")
    _edit_config(model_dir, **changes)
    proc = mindskip("export-vllm", "--model", model_dir, "--routers", routers, "--out", str(tmp_path / "o"))
    assert_usage_error(proc, "export-vllm", fragment)
    assert not (tmp_path / "o").exists()


def test_refuses_a_model_that_is_not_a_folder_and_missing_routers(model_dir, tmp_path):
    routers = _routers(model_dir, tmp_path / "r", kv="all")
    afile = tmp_path / "model.gguf"
    afile.write_text("x")
    proc = mindskip("export-vllm", "--model", str(afile), "--routers", routers, "--out", str(tmp_path / "o"))
    assert_usage_error(proc, "export-vllm", "model must be a transformers model folder with config.json")
    proc = mindskip("export-vllm", "--model", model_dir, "--routers", str(tmp_path / "nope"), "--out",
                    str(tmp_path / "o"))
    assert_usage_error(proc, "export-vllm", f"--routers {tmp_path / 'nope'} does not exist")
    weights = tmp_path / "r" / "routers.safetensors"
    proc = mindskip("export-vllm", "--model", model_dir, "--routers", str(weights), "--out", str(tmp_path / "o"))
    assert_usage_error(proc, "export-vllm", "routers must be a directory written by `mindskip tune`")
    assert not (tmp_path / "o").exists()
