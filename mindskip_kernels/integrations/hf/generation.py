"""Generation: the MindSkipCache a patched model uses (`new_cache`), and the hooks that make `generate` and
`use_cache=True` forwards create one and that record each batch's padding mask."""

from __future__ import annotations

import types

import torch
from torch import nn

from mindskip_kernels.integrations.hf.cache import MindSkipCache
from mindskip_kernels.integrations.hf.model import base_model, mindskip_layers


def new_cache(model: nn.Module, block_size: int | None = None, *, num_blocks: int | None = None,
              max_bytes: int | None = None, max_length: int | None = None, static: bool = False) -> MindSkipCache:
    """An empty MindSkipCache for a patched model (what generate and use_cache=True create). num_blocks (per
    routed layer) or max_bytes (all routed layers) fix the K/V pools' size (no reallocation: CUDA graphs);
    max_length sizes the block tables ahead (generate passes its maximum length); static makes the unrouted
    layers static (capacity max_length), so a whole decode step can be captured in a CUDA graph."""
    base = base_model(model)
    kwargs = {} if block_size is None else {"block_size": block_size}
    routed = mindskip_layers(base)
    paged = sorted(i for i, layer in routed.items() if layer.mindskip.sublayer.paged_kv)
    return MindSkipCache(base.config, paged, num_blocks=num_blocks, max_bytes=max_bytes, max_length=max_length,
                         dtype=base.layers[0].input_layernorm.weight.dtype, static=static,
                         dense_routed_layers=tuple(sorted(set(routed) - set(paged))), **kwargs)


def _base_forward_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Record the 2-D padding mask in the model's own ModelState (`module._mindskip_state`, so a deep copy
    records into its copy); in inference with use_cache, start a MindSkipCache instead of the DynamicCache
    transformers would create."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    module._mindskip_state.padding_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    use_cache = kwargs.get("use_cache")
    use_cache = module.config.use_cache if use_cache is None else use_cache
    if use_cache and not module.training and kwargs.get("cache", kwargs.get("past_key_values")) is None:
        kwargs.pop("past_key_values", None)
        kwargs["cache"] = new_cache(module)
    return args, kwargs


def _prepare_cache_for_generation(self: nn.Module, generation_config, model_kwargs: dict, *args, **kwargs):
    """generate(): refuse beam search, and use a MindSkipCache where transformers would use a DynamicCache.
    Bound to the model instance (a deep copy rebinds it to the copy); the class's method does the rest."""
    if generation_config.num_beams > 1:
        raise NotImplementedError("beam search is not supported on MindSkip models (its cache holds ragged "
                                  "per-sequence K/V): use greedy decoding or sampling")
    if (generation_config.use_cache is not False and model_kwargs.get("cache") is None
            and generation_config.cache_implementation in (None, "dynamic")):
        model_kwargs["cache"] = new_cache(self, max_length=generation_config.max_length)
        return None
    return type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)


def install_hooks(model: nn.Module, base: nn.Module) -> None:
    """Once per model: the base model's pre-hook (padding mask, cache creation) and generate's cache choice."""
    base.register_forward_pre_hook(_base_forward_pre_hook, with_kwargs=True)
    if hasattr(model, "_prepare_cache_for_generation"):
        model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)
