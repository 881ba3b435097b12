"""Router checkpoints: `save_routers` writes the routers and their settings, `load_routers` reads them back
into a model (or a bare state-dict file of the paper's `model.layers.{i}.router.weight` keys)."""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from mindskip_kernels import _checks as check
from mindskip_kernels._checks import TARGETS
from mindskip_kernels.adapter import SkipAdapter
from mindskip_kernels.integrations.hf.model import (
    base_model,
    check_supported,
    choose_layers,
    mindskip_layers,
    model_type,
)
from mindskip_kernels.integrations.hf.patching import apply_mindskip

ROUTERS_FILE = "routers.safetensors"
ADAPTER_KEY = "skip_adapter"  # the adapter's module name on a routed layer (state-dict prefix)
META_FILE = "mindskip.json"


def save_routers(model: nn.Module, path: str | os.PathLike, info: dict | None = None) -> None:
    """Write the routers (`routers.safetensors`, keys `model.layers.{i}.router.weight`) and `mindskip.json`
    into directory `path`: layers, each layer's threshold, granularity, target and K/V rule (`thresholds`,
    `granularities`, `targets`, `kv`, by layer index), `threshold` / `granularity` when every layer has the same
    (else null), the skipped-token adapters (`adapters`: {layer: {kind, rank}}, tensors
    `model.layers.{i}.skip_adapter.*`), and under "tuning" the JSON-serialisable `info` (how they were tuned)."""
    from safetensors.torch import save_file

    layers = mindskip_layers(model)
    if not layers:
        raise ValueError("model has no MindSkip routers: call apply_mindskip(model) first")
    os.makedirs(path, exist_ok=True)
    tensors = {f"model.layers.{i}.router.weight": layer.router.weight.detach().cpu().contiguous()
               for i, layer in layers.items()}
    adapters = {i: layer.skip_adapter for i, layer in layers.items() if hasattr(layer, "skip_adapter")}
    hidden = next(iter(tensors.values())).shape[1]
    for i, adapter in adapters.items():
        tensors |= {f"model.layers.{i}.{ADAPTER_KEY}.{k}": v.detach().cpu().contiguous()
                    for k, v in adapter.state_dict().items()}
    save_file(tensors, os.path.join(path, ROUTERS_FILE))
    thresholds = {str(i): layer.mindskip.threshold for i, layer in layers.items()}
    granularities = {str(i): layer.mindskip.granularity for i, layer in layers.items()}
    targets = {str(i): layer.mindskip.target for i, layer in layers.items()}
    kv_rules = {str(i): layer.mindskip.kv for i, layer in layers.items()}

    def common(values: dict):
        return next(iter(values.values())) if len(set(values.values())) == 1 else None

    meta = {"layers": sorted(layers), "threshold": common(thresholds), "granularity": common(granularities),
            "thresholds": thresholds, "granularities": granularities, "targets": targets, "kv": kv_rules,
            "sink_tokens": max(layer.mindskip.sink_tokens for layer in layers.values()),
            "model_type": model_type(model), "hidden_size": hidden,
            "adapters": {str(i): {"kind": a.kind, "rank": a.rank} for i, a in adapters.items()}}
    if info:
        meta["tuning"] = info
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)


Adapter = tuple[str, "int | None", dict[str, torch.Tensor]]  # kind, rank, state dict


def _read_routers(path: str | os.PathLike
                  ) -> tuple[dict[int, torch.Tensor], dict[int, tuple[float, str, int, str, str, Adapter | None]]
                             | None, str]:
    """({layer: router weight}, {layer: (threshold, granularity, sink_tokens, target, kv, adapter or None)} or
    None for a bare state-dict file, the file named in errors). Files written before targets (K/V rules,
    adapters) existed route attention (under kv="kept", without an adapter)."""
    from safetensors.torch import load_file

    if os.path.isfile(path):
        weights_file = os.fspath(path)
        state = (load_file(weights_file) if weights_file.endswith(".safetensors")
                 else torch.load(weights_file, map_location="cpu", weights_only=True))
        state = {k: v for k, v in state.items() if k.startswith("model.layers.") and k.endswith(".router.weight")}
        if not state:
            raise ValueError(f"path {weights_file} holds no `model.layers.{{i}}.router.weight` tensors")
        return {int(k.split(".")[2]): v for k, v in state.items()}, None, weights_file
    weights_file, meta_file = os.path.join(path, ROUTERS_FILE), os.path.join(path, META_FILE)
    for f in (weights_file, meta_file):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"path must be a directory written by save_routers or a state-dict file; "
                                    f"missing {f}")
    with open(meta_file) as f:
        meta = json.load(f)
    tensors = load_file(weights_file)
    weights = {int(k.split(".")[2]): v for k, v in tensors.items() if k.endswith(".router.weight")}
    adapters: dict[int, Adapter] = {}
    for i, spec in meta.get("adapters", {}).items():
        prefix = f"model.layers.{i}.{ADAPTER_KEY}."
        adapters[int(i)] = (spec["kind"], spec["rank"],
                            {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
    if sorted(weights) != sorted(meta["layers"]):
        raise ValueError(f"{weights_file} holds routers of layers {sorted(weights)} but {meta_file} lists "
                         f"{meta['layers']}")
    per_layer = {i: (meta.get("thresholds", {}).get(str(i), meta.get("threshold")),
                     meta.get("granularities", {}).get(str(i), meta.get("granularity")),
                     meta.get("sink_tokens", 0), meta.get("targets", {}).get(str(i), "attention"),
                     meta.get("kv", {}).get(str(i), "kept"), adapters.get(i)) for i in weights}
    return weights, per_layer, meta_file


def load_routers(model: nn.Module, path: str | os.PathLike, backend: str | None = None, *,
                 granularity: str | None = None, kv: str | None = None) -> nn.Module:
    """Load routers saved by `save_routers` (a directory: each layer's threshold and granularity come from its
    metadata), or a state-dict file (`.safetensors`, or torch `.bin`/`.pt`) with keys
    `model.layers.{i}.router.weight` (the paper's naming; other keys are ignored). A bare file has no settings:
    a layer the model already routes keeps its threshold and granularity, others get threshold 0.5 and
    granularity "sequence" (the paper's released routers are sequence-level). `granularity` overrides both.
    `backend` None keeps an existing patch's backend ("auto" for new layers). The target comes from the
    metadata ("attention" for files written before targets existed; a bare file keeps an existing patch's,
    else "attention"); a layer the model already routes for another target is refused (ValueError naming
    both). The K/V rule likewise comes from the metadata ("kept" before rules existed; a bare file keeps an
    existing patch's, else "kept"); `kv` overrides it (a router tuned under one rule can run under the other).
    The skipped-token adapters come with a directory's routers (a layer saved without one gets none); a bare file
    leaves a layer's existing adapter as it is.

    Everything is checked before the model is touched: on an error the model is exactly as it was."""
    if granularity is not None:
        check.granularity(granularity)
    if backend is not None:
        check.backend(backend)
    check_supported(model)
    weights, per_layer, source = _read_routers(path)
    base = base_model(model)
    choose_layers(len(base.layers), list(weights))
    patched = mindskip_layers(model)
    extra = sorted(set(patched) - set(weights))
    if extra:
        raise ValueError(f"model already routes layers {extra}, which {source} does not list")
    settings = {}
    for i, weight in sorted(weights.items()):
        hidden = base.layers[i].input_layernorm.weight.shape[0]
        if tuple(weight.shape) != (1, hidden) or not weight.is_floating_point():
            raise ValueError(f"{source}: router of layer {i} has shape {tuple(weight.shape)} and dtype {weight.dtype}"
                             f", the model needs a float [1, {hidden}] (hidden size {hidden})")
        old = patched[i].mindskip if i in patched else None
        if per_layer is not None:
            threshold, gran, sink, target, rule, adapter = per_layer[i]
        else:  # a bare file: the routers only (an existing adapter stays as it is)
            threshold, gran, sink, target, rule = ((old.threshold, old.granularity, old.sink_tokens, old.target,
                                                    old.kv) if old is not None else (0.5, "sequence", 0, "attention",
                                                                                      "kept"))
            current = getattr(patched[i], ADAPTER_KEY, None) if i in patched else None
            adapter = None if current is None else (current.kind, current.rank, None)
        if adapter is not None and adapter[2] is not None:  # the adapter's tensors fit its kind, rank and size
            try:
                SkipAdapter(hidden, adapter[0], adapter[1]).load_state_dict(adapter[2])
            except (RuntimeError, ValueError, TypeError) as e:
                raise ValueError(f"{source}: the skipped-token adapter of layer {i} does not match its metadata "
                                 f"(kind {adapter[0]!r}, rank {adapter[1]}, hidden size {hidden}): {e}") from None
        if target not in TARGETS:
            raise ValueError(f"{source}: layer {i} has target {target!r}, expected one of {TARGETS}")
        if old is not None and old.target != target:
            raise ValueError(f"target mismatch: {source} holds a router of layer {i} for target {target!r}, but "
                             f"the model already routes that layer with target {old.target!r}; load into a "
                             f"model patched with target={target!r} or an unpatched one")
        layer_backend = backend if backend is not None else old.backend if old is not None else "auto"
        gran = check.granularity(granularity or gran)
        try:
            rule = check.kv_rule(kv or rule, gran, target)
        except ValueError as e:
            raise ValueError(f"{source}: layer {i}: {e}") from None
        settings[i] = dict(threshold=check.threshold(threshold), granularity=gran, backend=layer_backend,
                           sink_tokens=check.sink_tokens(sink), target=target, kv=rule,
                           host_compact=old.host_compact if old is not None else True,
                           adapter=None if adapter is None else adapter[0],
                           adapter_rank=None if adapter is None else adapter[1])
    for i, layer_settings in settings.items():
        apply_mindskip(model, layers=[i], **layer_settings)
        with torch.no_grad():
            base.layers[i].router.weight.copy_(weights[i])
            if per_layer is not None and per_layer[i][5] is not None:
                base.layers[i].skip_adapter.load_state_dict(per_layer[i][5][2])
    return model
