"""Patching: `apply_mindskip` puts routers on chosen decoder layers, `record_routing` collects what they
decide, `set_thresholds` moves their keep thresholds."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

from torch import nn

from mindskip_kernels import _checks as check
from mindskip_kernels.adapter import SkipAdapter, check_adapter
from mindskip_kernels.integrations.hf.forward import routed_layer_forward
from mindskip_kernels.integrations.hf.generation import install_hooks
from mindskip_kernels.integrations.hf.model import base_model, check_supported, choose_layers, mindskip_layers
from mindskip_kernels.integrations.hf.state import LayerState, ModelState, RoutingRecord
from mindskip_kernels.integrations.hf.sublayers import SUBLAYERS


def apply_mindskip(model: nn.Module, layers: int | list[int] | None = None, threshold: float = 0.5,
                   granularity: str = "token", backend: str = "auto", *, sink_tokens: int = 0,
                   target: str = "attention", kv: str = "kept", host_compact: bool = True,
                   adapter: str | None = None, adapter_rank: int | None = None) -> nn.Module:
    """Add a zero-initialised MindSkip router to chosen decoder layers of a transformers causal LM.

    layers: None = the paper's choice (the last half of the layers before the final one), an int n = the
    last n before the final one, or a list of layer indices. sink_tokens (token granularity): the first n
    real tokens of every sequence always run attention, whatever their score, so that the kept tokens keep
    their attention sink (most heads of trained LLMs put much of their weight on the first token; skipping
    it as a key hurts every kept query). 0 = the paper's semantics. target (TARGETS): what a skipped token skips:
    "attention" (MindSkip), "mlp" (the router reads post_attention_layernorm; attention runs for every
    token), or "block" (Mixture-of-Depths: attention among the kept tokens, then the MLP on them; skipped
    tokens pass the whole block unchanged). kv (KV_RULES, design.md s.1): "kept" (the paper's rule) - a skipped
    token writes no K/V, the kept tokens attend among themselves; "all" (token granularity, attention or block
    target) - every token writes its K/V, a kept token attends to all earlier tokens, a skipped one computes no
    query, attention or o_proj (block: no MLP): better quality, no cache memory saved. host_compact: on the
    CPU, decode steps compact the kept rows on the host (free there); False runs the fixed-shape device path
    that accelerators run. adapter (design.md s.1): None, a skipped token passes the target unchanged (the
    paper's); "linear", it gets x + U V^T z + b (z the router's input; full rank when adapter_rank is None, else
    rank adapter_rank); "mean", x + b. The adapter (`layer.skip_adapter`, zero until `fitting.fit_routers` fits it
    to the dense model's update) is saved with the routers. Returns the same model, patched in place.
    """
    check_supported(model)
    threshold = check.threshold(threshold)
    granularity = check.granularity(granularity)
    check.backend(backend)
    sink_tokens = check.sink_tokens(sink_tokens)
    target = check.target(target)
    sublayer = SUBLAYERS[target, check.kv_rule(kv, granularity, target)]
    if not isinstance(host_compact, bool):
        raise TypeError(f"host_compact must be a bool, got {type(host_compact).__name__}")
    base = base_model(model)
    adapter, adapter_rank = check_adapter(adapter, adapter_rank, base.layers[0].input_layernorm.weight.shape[0])
    chosen = choose_layers(len(base.layers), layers)
    dropped = [i for i in chosen if hasattr(base.layers[i], "dropped")]
    if dropped:
        raise ValueError(f"layers {dropped} have a sub-layer dropped by drop_sublayers; route a freshly loaded model")
    if not hasattr(base, "_mindskip_state"):
        base._mindskip_state = ModelState()
        install_hooks(model, base)
    for i in chosen:
        layer = base.layers[i]
        if not hasattr(layer, "router"):
            ref = layer.input_layernorm.weight
            layer.router = nn.Linear(ref.shape[0], 1, bias=False, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(layer.router.weight)
        _set_adapter(layer, adapter, adapter_rank)
        layer.mindskip = LayerState(i, threshold, granularity, backend, base._mindskip_state, sublayer,
                                    sink_tokens=sink_tokens, host_compact=host_compact)
        layer.forward = types.MethodType(routed_layer_forward, layer)
    return model


def _set_adapter(layer: nn.Module, kind: str | None, rank: int | None) -> None:
    """Give the layer a zero skipped-token adapter of that kind and rank (an existing one of the same kind and
    rank is kept: re-patching does not lose a fit), or remove it (kind None)."""
    old = getattr(layer, "skip_adapter", None)
    if old is not None and (old.kind, old.rank) == (kind, rank):
        return
    if old is not None:
        del layer.skip_adapter
    if kind is not None:
        ref = layer.router.weight
        layer.skip_adapter = SkipAdapter(ref.shape[1], kind, rank, device=ref.device, dtype=ref.dtype)


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[RoutingRecord]:
    """Collect every routed layer's decision in the forwards run inside the context:

        with record_routing(model) as rec:
            loss = model(**batch).loss
        rec.keep_rates()                # {layer: fraction of real tokens kept}
        rec.training_keep_rates()       # train mode: differentiable, for a sparsity loss
    """
    base = base_model(model)
    if not hasattr(base, "_mindskip_state"):
        raise ValueError("model has no MindSkip routers: call apply_mindskip(model) first")
    record = RoutingRecord()
    base._mindskip_state.records.append(record)
    try:
        yield record
    finally:
        base._mindskip_state.records.remove(record)


def set_thresholds(model: nn.Module, threshold: float | dict[int, float]) -> None:
    """Set the keep threshold of every routed layer (one global value) or of each listed layer."""
    layers = mindskip_layers(model)
    values = threshold if isinstance(threshold, dict) else dict.fromkeys(layers, threshold)
    unknown = sorted(set(values) - set(layers))
    if unknown:
        raise ValueError(f"threshold names layers {unknown} that are not routed (routed: {sorted(layers)})")
    checked = {i: check.threshold(t) for i, t in values.items()}
    for i, t in checked.items():
        layers[i].mindskip.threshold = t


