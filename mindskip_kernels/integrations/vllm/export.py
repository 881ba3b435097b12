"""`mindskip export-vllm`: a transformers model folder + a routers directory -> a model folder vLLM serves."""

from __future__ import annotations

import json
import os
import shutil

from mindskip_kernels.integrations.hf.checkpoints import META_FILE, ROUTERS_FILE
from mindskip_kernels.integrations.vllm.routers import ARCHITECTURES, CONFIG_KEY, read_routers

ROUTERS_DIR = "mindskip"  # the routers' subfolder of an exported model folder


def model_config(model: str | os.PathLike) -> dict:
    """config.json of a transformers model folder (ValueError naming `model` when it is not one)."""
    path = os.path.join(model, "config.json")
    if not os.path.isdir(model) or not os.path.isfile(path):
        raise ValueError(f"model must be a transformers model folder with config.json (save_pretrained), got "
                         f"{os.fspath(model)!r}")
    with open(path) as f:
        config = json.load(f)
    for key in ("model_type", "hidden_size", "num_hidden_layers"):
        if key not in config:
            raise ValueError(f"model {os.fspath(model)}: config.json has no {key!r}")
    return config


def export_vllm(model: str | os.PathLike, routers: str | os.PathLike, out: str | os.PathLike) -> dict[int, str]:
    """Write into directory `out` (created; existing files of the same names are replaced) the files of
    transformers model folder `model`, its config.json naming the routed architecture and `mindskip_routers`,
    and the routers directory `routers` (as `mindskip tune` wrote it) under out/mindskip/. Everything is checked
    first (ValueError): an unsupported architecture, routers for another model, settings vLLM cannot run.
    Returns {layer: target} of the routed layers."""
    config = model_config(model)
    specs = read_routers(routers, model_type=config["model_type"], hidden_size=config["hidden_size"],
                         num_layers=config["num_hidden_layers"])
    os.makedirs(os.path.join(out, ROUTERS_DIR), exist_ok=True)
    for name in os.listdir(model):
        src = os.path.join(model, name)
        if os.path.isfile(src) and name != "config.json":
            shutil.copy2(src, os.path.join(out, name))
    for name in (ROUTERS_FILE, META_FILE):
        shutil.copy2(os.path.join(routers, name), os.path.join(out, ROUTERS_DIR, name))
    config["architectures"] = [ARCHITECTURES[config["model_type"]]]
    config[CONFIG_KEY] = ROUTERS_DIR
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return {i: spec.target for i, spec in specs.items()}
