"""The routers a routed vLLM model runs, read with the HF integration's checkpoint reader and checked against
the model's config: everything the plugin cannot run is refused here, before vLLM starts an engine."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from mindskip_kernels import _checks as check
from mindskip_kernels.integrations.hf.checkpoints import META_FILE, _read_routers
from mindskip_kernels.integrations.hf.model import SUPPORTED, choose_layers

# config.model_type -> the routed architecture's name (config.json "architectures")
ARCHITECTURES = {
    "llama": "MindSkipLlamaForCausalLM",
    "mistral": "MindSkipMistralForCausalLM",
    "qwen2": "MindSkipQwen2ForCausalLM",
    "qwen3": "MindSkipQwen3ForCausalLM",
}
CONFIG_KEY = "mindskip_routers"  # config.json: the routers' directory (relative to the model folder, or absolute)
TARGETS = ("attention", "block")


@dataclass(frozen=True)
class RoutedLayerSpec:
    """One routed layer: router weight [1, D], threshold, target, sink tokens and the adapter (kind, rank,
    state dict) or None."""

    weight: torch.Tensor
    threshold: float
    target: str
    sink_tokens: int
    adapter: tuple[str, int | None, dict[str, torch.Tensor]] | None


def read_routers(path: str | os.PathLike, *, model_type: str, hidden_size: int,
                 num_layers: int) -> dict[int, RoutedLayerSpec]:
    """{layer index: RoutedLayerSpec} of the routers directory `path` (written by `mindskip tune` /
    `save_routers`), checked against the model (config.model_type, hidden_size, num_hidden_layers). Raises
    ValueError naming the problem for anything the vLLM plugin cannot run: another architecture or model, a bare
    state-dict file (no settings), sequence granularity, kv="kept", the MLP target."""
    if model_type not in SUPPORTED:
        raise ValueError(f"model: the vLLM plugin supports model_type {SUPPORTED}, got {model_type!r}")
    if not os.path.isdir(path):
        raise ValueError(f"routers must be a directory written by `mindskip tune` (routers.safetensors + "
                         f"{META_FILE}), got {os.fspath(path)!r}")
    weights, per_layer, source = _read_routers(path)
    with open(source) as f:
        meta = json.load(f)
    for key, want in (("model_type", model_type), ("hidden_size", hidden_size)):
        if meta.get(key) is not None and meta[key] != want:
            raise ValueError(f"routers {source} were tuned for a model with {key} {meta[key]!r}, the model has "
                             f"{want!r}: routers for another model")
    try:
        choose_layers(num_layers, list(weights))
    except ValueError as e:
        raise ValueError(f"routers {source} route layers {sorted(weights)}, the model has {num_layers} layers: "
                         f"routers for another model ({e})") from None
    specs = {}
    for i, weight in sorted(weights.items()):
        threshold, granularity, sink, target, kv, adapter = per_layer[i]
        if tuple(weight.shape) != (1, hidden_size):
            raise ValueError(f"routers {source}: layer {i}'s router has shape {tuple(weight.shape)}, the model "
                             f"needs [1, {hidden_size}]: routers for another model")
        if granularity != "token":
            raise ValueError(f"routers {source}: layer {i} routes with granularity {granularity!r}; the vLLM "
                             f"plugin runs token granularity only (a sequence decision would outlive a step)")
        if target not in TARGETS:
            raise ValueError(f"routers {source}: layer {i} routes target {target!r}; the vLLM plugin runs "
                             f"targets {TARGETS}")
        if kv != "all":
            raise ValueError(f'routers {source}: layer {i} uses kv={kv!r}; the vLLM plugin runs kv="all" only '
                             f"(kv=\"kept\" would need a ragged per-layer cache); re-tune with --kv all")
        specs[i] = RoutedLayerSpec(weight.float(), check.threshold(threshold), target, check.sink_tokens(sink),
                                   adapter)
    return specs
