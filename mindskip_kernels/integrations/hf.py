"""Hugging Face transformers integration: MindSkip routers on the decoder layers of Llama, Mistral, Qwen2 and
Qwen3 causal LMs.

`apply_mindskip` patches chosen decoder layer *instances* (two models in one process don't interfere): each
gets a zero-initialised `router` (`nn.Linear(hidden, 1, bias=False)`, state-dict key
`model.layers.{i}.router.weight`, the paper's naming) and a forward whose attention sub-block runs only on
kept tokens. A forward pre-hook on the base model records the 2-D padding mask, which the decoder layers
themselves never see.
"""

from __future__ import annotations

import json
import os
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from mindskip_kernels import _checks as check
from mindskip_kernels.attention import apply_rope, packed_attention, routed_update
from mindskip_kernels.backends import resolve
from mindskip_kernels.cache import MindSkipCache, RoutedKVLayer
from mindskip_kernels.routing import RoutingPlan, gather, scatter_add

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
ROUTERS_FILE = "routers.safetensors"
META_FILE = "mindskip.json"


@dataclass
class ModelState:
    """Per-model state shared by its patched layers: the current batch's 2-D padding mask."""

    padding_mask: torch.Tensor | None = None


@dataclass
class LayerState:
    """Per-layer MindSkip settings and the last forward's routing (for keep-rate losses and statistics)."""

    layer_idx: int
    threshold: float
    granularity: str
    backend: str
    model_state: ModelState
    last_plan: RoutingPlan | None = field(default=None, repr=False)
    last_mask: torch.Tensor | None = field(default=None, repr=False)  # the padding mask of that forward
    last_keep_rate: torch.Tensor | None = field(default=None, repr=False)  # training: carries the STE gradient
    last_keep: torch.Tensor | None = field(default=None, repr=False)  # [B, 1] flags of a cached decode step

    def keep_rate(self) -> float | None:
        """Fraction of real tokens whose attention ran in the last forward (None before any forward)."""
        keep = self.last_keep if self.last_plan is None else self.last_plan.keep
        if keep is None:
            return None
        real = keep.numel() if self.last_mask is None else int((self.last_mask != 0).sum())
        return int(keep.sum()) / max(real, 1)


def _base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "model", model)
    if not hasattr(base, "layers"):
        raise TypeError(f"model must be a transformers causal LM or base model with `.layers`, got "
                        f"{type(model).__name__}")
    return base


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def paper_layers(num_layers: int, n: int | None = None) -> list[int]:
    """The paper's choice: the last n layers before the final one (default n = half the layers)."""
    n = num_layers // 2 if n is None else n
    if not 0 <= n <= num_layers - 1:
        raise ValueError(f"layers must be between 0 and {num_layers - 1} (the final layer never routes), got {n}")
    return list(range(num_layers - 1 - n, num_layers - 1))


def _choose_layers(num_layers: int, layers: int | list[int] | None) -> list[int]:
    if layers is None or isinstance(layers, int):
        return paper_layers(num_layers, layers)
    chosen = sorted(set(int(i) for i in layers))
    bad = [i for i in chosen if not 0 <= i < num_layers - 1]
    if bad:
        raise ValueError(f"layers must be indices in [0, {num_layers - 2}] (the final layer never routes), "
                         f"got {bad}")
    return chosen


def mindskip_layers(model: nn.Module) -> dict[int, nn.Module]:
    """The patched decoder layers of `model`, by layer index."""
    return {i: layer for i, layer in enumerate(_base_model(model).layers) if hasattr(layer, "mindskip")}


def new_cache(model: nn.Module, block_size: int | None = None, *, num_blocks: int | None = None,
              max_bytes: int | None = None, max_length: int | None = None, static: bool = False) -> MindSkipCache:
    """An empty MindSkipCache for a patched model (what generate and use_cache=True create). num_blocks (per
    routed layer) or max_bytes (all routed layers) fix the K/V pools' size (no reallocation: CUDA graphs);
    max_length sizes the block tables ahead (generate passes its maximum length); static makes the unrouted
    layers static (capacity max_length), so a whole decode step can be captured in a CUDA graph."""
    base = _base_model(model)
    kwargs = {} if block_size is None else {"block_size": block_size}
    return MindSkipCache(base.config, sorted(mindskip_layers(base)), num_blocks=num_blocks, max_bytes=max_bytes,
                         max_length=max_length, dtype=base.layers[0].input_layernorm.weight.dtype, static=static,
                         **kwargs)


def _base_forward_pre_hook(state: ModelState):
    """Record the 2-D padding mask; in inference with use_cache, start a MindSkipCache instead of the
    DynamicCache transformers would create."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        state.padding_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        use_cache = kwargs.get("use_cache")
        use_cache = module.config.use_cache if use_cache is None else use_cache
        if use_cache and not module.training and kwargs.get("cache", kwargs.get("past_key_values")) is None:
            kwargs.pop("past_key_values", None)
            kwargs["cache"] = new_cache(module)
        return args, kwargs

    return hook


def _prepare_cache_for_generation(model: nn.Module, original):
    """generate(): refuse beam search, and use a MindSkipCache where transformers would use a DynamicCache."""

    def prepare(generation_config, model_kwargs: dict, *args, **kwargs):
        if generation_config.num_beams > 1:
            raise NotImplementedError("beam search is not supported on MindSkip models (its cache holds ragged "
                                      "per-sequence K/V): use greedy decoding or sampling")
        if (generation_config.use_cache is not False and model_kwargs.get("cache") is None
                and generation_config.cache_implementation in (None, "dynamic")):
            model_kwargs["cache"] = new_cache(model, max_length=generation_config.max_length)
            return None
        return original(generation_config, model_kwargs, *args, **kwargs)

    return prepare


def _rope_rows(position_embeddings: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor | None, head_dim: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's cos/sin [1 or B, N, Dh] as rows [T, Dh] at flat token indices `idx` (None: every row, N = 1),
    without materialising a [B, N, Dh] copy."""
    rows = (c.reshape(-1, head_dim) for c in position_embeddings)
    return tuple((r if idx is None else r.index_select(0, idx)).to(dtype) for r in rows)


def _qkv(attn: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q/k/v [T, H, Dh] of rows z [T, D] through a transformers attention module (Qwen3's q/k norms too)."""
    q, k, v = (proj(z).unflatten(-1, (-1, attn.head_dim)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    if hasattr(attn, "q_norm"):  # Qwen3
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q, k, v


def _attend_fn(attn: nn.Module, position_embeddings: tuple[torch.Tensor, torch.Tensor], backend: str,
               cache: RoutedKVLayer | None):
    """attend(packed_z, plan) for a transformers attention module, with RoPE from the model's own cos/sin at
    the kept tokens' original positions: varlen attention among the kept tokens, or with a `cache`, appended
    to it and attended over each sequence's cached kept tokens (paged, read in place)."""
    cos = position_embeddings[0]

    def attend(zp: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        q, k, v = _qkv(attn, zp)
        idx = plan.indices % plan.seq_len if cos.shape[0] == 1 else plan.indices
        cos_rows, sin_rows = _rope_rows(position_embeddings, idx, attn.head_dim, q.dtype)
        if cache is None:
            return attn.o_proj(packed_attention(q, k, v, cos_rows, sin_rows, plan, attn.scaling, backend))
        q, k = apply_rope(q, cos_rows, sin_rows), apply_rope(k, cos_rows, sin_rows)
        return attn.o_proj(cache.attend_prefill(q, k, v, plan, attn.scaling, backend).flatten(1))

    return attend


# On the CPU a host read of the keep flags is free (no device queue to drain), so a decode step projects and
# attends only its kept rows there (a skipped row costs no q/k/v/o projection). Accelerators take the
# fixed-shape device path, which CUDA graphs can capture; tests set this False to run that path on the CPU.
HOST_COMPACT_ON_CPU = True


def _cached_decode_step(self: nn.Module, hidden_states: torch.Tensor, z: torch.Tensor, real: torch.Tensor | None,
                        position_embeddings: tuple[torch.Tensor, torch.Tensor],
                        layer_cache: RoutedKVLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """One new token per sequence. The device path has fixed shapes and no host read: every row goes through
    with a device keep flag [B] (the router's, or the stored sequence decision), kept rows append K/V and
    attend over their paged cache, skipped rows take no slot, read no cache, and stay bit-identical (the add
    is predicated on the flag). Returns (out, keep)."""
    st: LayerState = self.mindskip
    batch = hidden_states.shape[0]
    if layer_cache.decision is not None:  # sequence granularity: the prefill decision, on the device
        keep = layer_cache.decision
    else:
        mask = torch.ones(batch, 1, dtype=torch.bool, device=z.device) if real is None else real
        router = resolve(st.backend, "router", z.device, z.dtype)
        keep = router.router(z, self.router.weight, mask, st.threshold, st.granularity)[1][:, 0]
        if st.granularity == "sequence":
            layer_cache.decision = keep
    if real is not None:
        keep = keep & real[:, 0]
    rows = keep.nonzero()[:, 0] if HOST_COMPACT_ON_CPU and keep.device.type == "cpu" else None
    if rows is not None and rows.numel() == 0:
        return hidden_states, keep  # nothing kept: no projection, no cache access
    attn = self.self_attn
    q, k, v = _qkv(attn, z[:, 0] if rows is None else z[:, 0].index_select(0, rows))
    cos, sin = _rope_rows(position_embeddings, None, attn.head_dim, q.dtype)
    if rows is not None and cos.shape[0] > 1:
        cos, sin = cos.index_select(0, rows), sin.index_select(0, rows)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = attn.o_proj(layer_cache.attend_decode(q, k, v, keep, attn.scaling, st.backend, rows).flatten(1))
    out = out.to(hidden_states.dtype)
    if rows is not None:  # residual + attention on the kept rows (the rounding of the device path's add)
        return hidden_states.view(batch, -1).index_add(0, rows, out).view_as(hidden_states), keep
    return torch.where(keep.view(batch, 1, 1), hidden_states + out.unsqueeze(1), hidden_states), keep


def _cached_attention(self: nn.Module, hidden_states: torch.Tensor, pad: torch.Tensor | None,
                      position_ids: torch.Tensor | None, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                      layer_cache: RoutedKVLayer) -> torch.Tensor:
    """The routed attention sub-block with a MindSkipCache (inference): decode steps take the fixed-shape
    device path; prefill routes (one host read of T) and attends through the paged cache. Sequence
    granularity stores the prefill decision and reuses it for every later token."""
    st: LayerState = self.mindskip
    seq_len = hidden_states.shape[1]
    z = self.input_layernorm(hidden_states)
    real = None if pad is None else pad != 0
    attend = _attend_fn(self.self_attn, position_embeddings, st.backend, layer_cache)
    if seq_len == 1:
        out, keep = _cached_decode_step(self, hidden_states, z, real, position_embeddings, layer_cache)
        st.last_plan, st.last_keep = None, keep.unsqueeze(1)
    elif layer_cache.decision is not None:  # a later chunk of a sequence-granularity prefill: reuse the decision
        keep = layer_cache.decision.unsqueeze(1).expand(-1, seq_len)
        plan = RoutingPlan.from_keep(keep if real is None else keep & real, position_ids, backend=st.backend)
        values = attend(gather(z, plan, backend=st.backend), plan)
        out = scatter_add(hidden_states, values.to(hidden_states.dtype), plan, backend=st.backend)
        st.last_plan = plan
    else:
        out, plan, _ = routed_update(z, self.router.weight, attend, residual=hidden_states, threshold=st.threshold,
                                     granularity=st.granularity, attention_mask=pad, position_ids=position_ids,
                                     training=False, backend=st.backend)
        if st.granularity == "sequence":
            layer_cache.decision = plan.keep.any(1)
        st.last_plan = plan
    st.last_mask, st.last_keep_rate = pad, None
    layer_cache.seen += seq_len
    return out


def _mindskip_layer_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask=None,
                            position_ids=None, cache=None, use_cache=False, position_embeddings=None,
                            **kwargs) -> torch.Tensor:
    """Decoder layer forward with the attention sub-block routed; the MLP runs for every token.

    With a MindSkipCache (inference) the attention sub-block goes through `_cached_attention`. In training
    the cache is not used (gradients flow through freshly computed K/V)."""
    st: LayerState = self.mindskip
    layer_cache = None
    if cache is not None and not self.training:
        if not isinstance(cache, MindSkipCache):
            raise TypeError(f"cache must be a MindSkipCache for models patched by apply_mindskip (generate and "
                            f"use_cache=True create one), got {type(cache).__name__}")
        layer_cache = cache.routed_layer(st.layer_idx)
    batch, seq_len, _ = hidden_states.shape
    window = getattr(self.self_attn, "sliding_window", None)
    if window is not None and seq_len > window:
        raise NotImplementedError(f"sliding-window attention (window {window}) is not supported by MindSkip "
                                  f"layers for sequences longer than the window ({seq_len})")
    pad = st.model_state.padding_mask
    if pad is not None and tuple(pad.shape) != (batch, seq_len):
        pad = None if pad.shape[0] != batch or pad.shape[1] < seq_len else pad[:, -seq_len:]
    if layer_cache is not None:
        hidden_states = _cached_attention(self, hidden_states, pad, position_ids, position_embeddings, layer_cache)
    else:
        attend = _attend_fn(self.self_attn, position_embeddings, st.backend, None)
        hidden_states, plan, keep_rate = routed_update(
            self.input_layernorm(hidden_states), self.router.weight, attend, residual=hidden_states,
            threshold=st.threshold, granularity=st.granularity, attention_mask=pad, position_ids=position_ids,
            training=self.training, backend=st.backend)
        st.last_plan, st.last_mask, st.last_keep_rate = plan, pad, keep_rate
    residual = hidden_states
    hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
    return residual + hidden_states


def apply_mindskip(model: nn.Module, layers: int | list[int] | None = None, threshold: float = 0.5,
                   granularity: str = "token", backend: str = "auto") -> nn.Module:
    """Add a zero-initialised MindSkip router to chosen decoder layers of a transformers causal LM.

    layers: None = the paper's choice (the last half of the layers before the final one), an int n = the
    last n before the final one, or a list of layer indices. Returns the same model, patched in place.
    """
    model_type = _model_type(model)
    if model_type not in SUPPORTED:
        raise ValueError(f"model must be one of {SUPPORTED} (config.model_type), got {model_type!r}")
    threshold = check.threshold(threshold)
    granularity = check.granularity(granularity)
    base = _base_model(model)
    chosen = _choose_layers(len(base.layers), layers)
    if not hasattr(base, "_mindskip_state"):
        base._mindskip_state = ModelState()
        base.register_forward_pre_hook(_base_forward_pre_hook(base._mindskip_state), with_kwargs=True)
        if hasattr(model, "_prepare_cache_for_generation"):
            model._prepare_cache_for_generation = _prepare_cache_for_generation(model,
                                                                                model._prepare_cache_for_generation)
    for i in chosen:
        layer = base.layers[i]
        if not hasattr(layer, "router"):
            ref = layer.input_layernorm.weight
            layer.router = nn.Linear(ref.shape[0], 1, bias=False, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(layer.router.weight)
        layer.mindskip = LayerState(i, threshold, granularity, backend, base._mindskip_state)
        layer.forward = types.MethodType(_mindskip_layer_forward, layer)
    return model


def keep_rates(model: nn.Module) -> dict[int, float]:
    """Fraction of real tokens whose attention ran in each routed layer, in the last forward."""
    rates = {i: layer.mindskip.keep_rate() for i, layer in mindskip_layers(model).items()}
    return {i: rate for i, rate in rates.items() if rate is not None}


def save_routers(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the routers (`routers.safetensors`, keys `model.layers.{i}.router.weight`) and `mindskip.json`
    (layers, threshold, granularity) into directory `path`."""
    from safetensors.torch import save_file

    layers = mindskip_layers(model)
    if not layers:
        raise ValueError("model has no MindSkip routers: call apply_mindskip(model) first")
    os.makedirs(path, exist_ok=True)
    tensors = {f"model.layers.{i}.router.weight": layer.router.weight.detach().cpu().contiguous()
               for i, layer in layers.items()}
    save_file(tensors, os.path.join(path, ROUTERS_FILE))
    first = next(iter(layers.values())).mindskip
    meta = {"layers": sorted(layers), "threshold": first.threshold, "granularity": first.granularity,
            "model_type": _model_type(model), "hidden_size": next(iter(tensors.values())).shape[1]}
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def load_routers(model: nn.Module, path: str | os.PathLike, backend: str = "auto") -> nn.Module:
    """Load routers saved by `save_routers` (a directory), or a state-dict file (`.safetensors`, or torch
    `.bin`/`.pt`) with keys `model.layers.{i}.router.weight` (the paper's naming; other keys are ignored;
    threshold 0.5, token granularity), patching the model first if needed."""
    from safetensors.torch import load_file

    if os.path.isfile(path):
        weights_file = meta_file = os.fspath(path)
        state = (load_file(weights_file) if weights_file.endswith(".safetensors")
                 else torch.load(weights_file, map_location="cpu", weights_only=True))
        state = {k: v for k, v in state.items() if k.startswith("model.layers.") and k.endswith(".router.weight")}
        if not state:
            raise ValueError(f"path {weights_file} holds no `model.layers.{{i}}.router.weight` tensors")
        meta = {"layers": sorted(int(k.split(".")[2]) for k in state), "threshold": 0.5, "granularity": "token"}
    else:
        weights_file, meta_file = os.path.join(path, ROUTERS_FILE), os.path.join(path, META_FILE)
        for f in (weights_file, meta_file):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"path must be a directory written by save_routers or a state-dict file; "
                                        f"missing {f}")
        with open(meta_file) as f:
            meta = json.load(f)
        state = load_file(weights_file)
    extra = sorted(set(mindskip_layers(model)) - set(meta["layers"]))
    if extra:
        raise ValueError(f"model already routes layers {extra}, which {meta_file} does not list")
    apply_mindskip(model, layers=meta["layers"], threshold=meta["threshold"], granularity=meta["granularity"],
                   backend=backend)
    layers = mindskip_layers(model)
    for key, weight in state.items():
        idx = int(key.split(".")[2])
        if idx not in layers or layers[idx].router.weight.shape != weight.shape:
            raise ValueError(f"{weights_file}: {key} with shape {tuple(weight.shape)} does not match the model")
        with torch.no_grad():
            layers[idx].router.weight.copy_(weight)
    return model
