"""Static whole-layer drop: no routing at run time, a fixed set of sub-layers removed (attention, MLP or block).

Two ways to choose the layers, both over the routable layers of a transformers causal LM:
- `layer_drop`: the training-free drops of He et al. 2024 ("What Matters in Transformers? Not All Attention Is
  Needed"): Attention Drop, MLP Drop and Block Drop remove the target sub-layers whose output changes the
  residual stream least, i.e. with the highest cosine similarity between the sub-layer's input x and its
  output x + f(x) (for the block: its input and output) on calibration data.
- `layers_to_drop_by_keep_rate`: from tuned MindSkip routers, drop the layers whose learned keep rate is lowest
  (or, without a count, those whose keep rate rounds to 0).
`drop_sublayers` applies a choice. The dropped forward of a layer, by target:
attention -> x + MLP(LN2(x)); mlp -> x + Attn(LN1(x)); block -> x.
"""

from __future__ import annotations

import types
from collections.abc import Sequence

import torch
from torch import nn

from mindskip_kernels import _checks as check
from mindskip_kernels.data import Data, as_items, collate


def _layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported model (the dropped forwards and hooks assume its block layout)."""
    from mindskip_kernels.integrations.hf import base_model, check_supported  # imports transformers: when used

    check_supported(model)
    return base_model(model).layers


def _check_unchanged(all_layers: nn.ModuleList, chosen: Sequence[int], what: str) -> None:
    """Refuse layers that apply_mindskip routes or drop_sublayers already changed."""
    routed = [i for i in chosen if hasattr(all_layers[i], "mindskip")]
    if routed:
        raise ValueError(f"layers {routed} are routed by apply_mindskip; {what} of an unrouted model")
    again = [i for i in chosen if hasattr(all_layers[i], "dropped")]
    if again:
        raise ValueError(f"layers {again} are already dropped; {what} of a freshly loaded model")


def _candidates(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    from mindskip_kernels.integrations.hf import choose_layers

    return choose_layers(len(_layers(model)), None if layers is None else list(layers))


def _n_drop(n: int | None, keep: float | None, candidates: int) -> int:
    if (n is None) == (keep is None):
        raise ValueError("give exactly one of n (layers to drop) and keep (fraction of candidate layers to keep)")
    if keep is not None:
        if not isinstance(keep, (int, float)) or not 0.0 <= keep <= 1.0:
            raise ValueError(f"keep must be in [0, 1], got {keep!r}")
        n = round((1.0 - keep) * candidates)
    if not isinstance(n, int) or not 0 <= n <= candidates:
        raise ValueError(f"n must be an int in [0, {candidates}] (the candidate layers), got {n!r}")
    return n


def _lowest(scores: dict[int, float], count: int) -> list[int]:
    """The `count` layers with the lowest score, ascending (ties: the lower index first)."""
    return sorted(sorted(scores, key=lambda i: (scores[i], i))[:count])


def _attention_free_forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Decoder layer forward without its attention sub-layer: the MLP sub-layer only."""
    return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def _block_free_forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Decoder layer forward without the layer: the residual stream passes unchanged."""
    return hidden_states


def _replaced_forward(self: nn.Module, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """Decoder layer forward with its target sub-layer replaced by the fitted map on every token:
    x + skip_adapter(z), z the target's RMSNorm output (what runs before and after the target, as routed)."""
    from mindskip_kernels.integrations.hf.sublayers import SUBLAYERS

    sublayer = SUBLAYERS[self.dropped, "kept"]
    x = sublayer.prepare(self, hidden_states, **kwargs)
    return sublayer.finish(self, x + self.skip_adapter(sublayer.router_norm(self)(x)).to(x.dtype))


def drop_sublayers(model: nn.Module, layers: Sequence[int], target: str = "attention",
                   replacement: dict[int, nn.Module] | None = None) -> nn.Module:
    """Remove the `target` sub-layer ("attention", "mlp" or the whole "block") of the given decoder layers (in
    place; the model is returned). `replacement` ({layer: adapter.SkipAdapter}, e.g. `fitting.fit_replacement`):
    the static linear replacement (ReplaceMe-style), each dropped target's update replaced by its map of the
    target's RMSNorm output for every token (attached as the layer's `skip_adapter`).

    Layers patched by `apply_mindskip` or already dropped cannot be dropped (reload the model). A layer whose
    attention is dropped ("attention", "block") stores no K/V; generation with a cache needs layer 0 to keep its
    attention (transformers reads the cache length from it)."""
    from mindskip_kernels.integrations.hf import dense_attention

    check.target(target)
    all_layers = _layers(model)
    chosen = sorted({int(i) for i in layers})
    bad = [i for i in chosen if not 0 <= i < len(all_layers)]
    if bad:
        raise ValueError(f"layers must be decoder layer indices in [0, {len(all_layers) - 1}], got {bad}")
    _check_unchanged(all_layers, chosen, "drop sub-layers")
    if replacement is not None and sorted(replacement) != chosen:
        raise ValueError(f"replacement must map exactly the dropped layers {chosen}, got {sorted(replacement)}")
    forward = {"attention": _attention_free_forward, "mlp": dense_attention, "block": _block_free_forward}[target]
    for i in chosen:
        if replacement is not None:
            all_layers[i].skip_adapter = replacement[i]
        all_layers[i].forward = types.MethodType(forward if replacement is None else _replaced_forward,
                                                 all_layers[i])
        all_layers[i].dropped = target
    return model


def dropped_layers(model: nn.Module) -> dict[int, str]:
    """{decoder layer index: dropped target} for the layers `drop_sublayers` changed."""
    return {i: layer.dropped for i, layer in enumerate(_layers(model)) if hasattr(layer, "dropped")}


@torch.no_grad()
def sublayer_similarity(model: nn.Module, data: Data, tokenizer=None, *, target: str = "attention",
                        layers: Sequence[int] | None = None, batch_size: int = 4,
                        max_length: int = 512) -> dict[int, float]:
    """Mean cosine similarity, over real tokens, between each candidate `target` sub-layer's input x and its
    output (x + Attn(LN1(x)), x + MLP(LN2(x)) or the block's output; 1 = it barely changes the residual
    stream)."""
    check.target(target)
    candidates = _candidates(model, layers)
    all_layers = _layers(model)
    _check_unchanged(all_layers, candidates, "measure the sub-layers")
    from mindskip_kernels.integrations.hf import observe_sublayers

    items = as_items(data, tokenizer, max_length)
    device = next(model.parameters()).device
    sums = dict.fromkeys(candidates, 0.0)
    total = 0
    mask: list[torch.Tensor] = []

    def add(i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        sums[i] += float(nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)[mask[0]].sum())

    was_training = model.training
    model.eval()
    try:
        with observe_sublayers(model, dict.fromkeys(candidates, target), add):
            for start in range(0, len(items), batch_size):
                batch = collate(items[start : start + batch_size])
                mask[:] = [batch["attention_mask"].to(device).bool()]
                total += int(mask[0].sum())
                model(input_ids=batch["input_ids"].to(device), attention_mask=mask[0].long(), use_cache=False,
                      logits_to_keep=1)
    finally:
        model.train(was_training)
    return {i: s / max(total, 1) for i, s in sums.items()}


def layers_to_drop_by_similarity(similarity: dict[int, float], *, n: int | None = None,
                                 keep: float | None = None) -> list[int]:
    """The `n` layers (or all but the fraction `keep`) with the highest similarity, ascending (ties: lower
    index first): the training-free drop's choice."""
    return _lowest({i: -s for i, s in similarity.items()}, _n_drop(n, keep, len(similarity)))


def layer_drop(model: nn.Module, data: Data, tokenizer=None, *, target: str = "attention", n: int | None = None,
               keep: float | None = None, layers: Sequence[int] | None = None, batch_size: int = 4,
               max_length: int = 512, adapter: str | None = None, adapter_rank: int | None = None) -> list[int]:
    """Training-free Attention / MLP / Block Drop: remove the `n` `target` sub-layers (or all but the fraction
    `keep`) with the highest input/output cosine similarity on `data`, among `layers` (default: the paper's
    routed layers). adapter "linear" / "mean" (rank adapter_rank): the static linear replacement instead, each
    dropped sub-layer replaced by its map fit on `data` (`fitting.fit_replacement`). Returns the dropped layer
    indices, ascending."""
    from mindskip_kernels.adapter import check_adapter
    from mindskip_kernels.fitting import fit_replacement

    check_adapter(adapter, adapter_rank, _layers(model)[0].input_layernorm.weight.shape[0])
    similarity = sublayer_similarity(model, data, tokenizer, target=target, layers=layers, batch_size=batch_size,
                                     max_length=max_length)
    chosen = layers_to_drop_by_similarity(similarity, n=n, keep=keep)
    replacement = None
    if adapter is not None and chosen:
        replacement = fit_replacement(model, data, chosen, tokenizer, target=target, adapter=adapter,
                                      adapter_rank=adapter_rank, batch_size=batch_size, max_length=max_length,
                                      progress=False)
    drop_sublayers(model, chosen, target, replacement)
    return chosen


def layers_to_drop_by_keep_rate(keep_rates: dict[int, float], *, n: int | None = None,
                                keep: float | None = None) -> list[int]:
    """The layers to drop from tuned routers' learned per-layer keep rates (e.g. `evaluate(...).keep_rates` or
    `record_routing(...).keep_rates()`): the `n` lowest (or all but the fraction `keep`), or, with neither,
    every layer whose keep rate rounds to 0. Returns indices, ascending."""
    if not keep_rates:
        raise ValueError("keep_rates is empty: measure the tuned routers' keep rates on some data first")
    if n is None and keep is None:
        return sorted(i for i, rate in keep_rates.items() if rate < 0.5)
    return _lowest(keep_rates, _n_drop(n, keep, len(keep_rates)))
