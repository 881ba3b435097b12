"""Hugging Face transformers integration: MindSkip routers on the decoder layers of Llama, Mistral, Qwen2 and
Qwen3 causal LMs.

`apply_mindskip` patches chosen decoder layer *instances* (two models in one process don't interfere): each
gets a zero-initialised `router` (`nn.Linear(hidden, 1, bias=False)`, state-dict key
`model.layers.{i}.router.weight`, the paper's naming) and a forward whose routed target (the attention
sub-block by default, or the MLP, or the whole block) runs only on kept tokens. A forward pre-hook on the
base model records the 2-D padding mask, which the decoder layers themselves never see.
"""

from __future__ import annotations

import contextlib
import json
import os
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from mindskip_kernels import _checks as check
from mindskip_kernels._checks import TARGETS
from mindskip_kernels.attention import apply_rope, packed_attention, routed_update, straight_through_gate
from mindskip_kernels.backends import module as backend_module
from mindskip_kernels.backends import resolve
from mindskip_kernels.cache import MindSkipCache, RoutedKVLayer
from mindskip_kernels.ops import keep_masked_attention
from mindskip_kernels.routing import RoutingPlan, gather, route, scatter_add

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
# Router-Tuning's training forward (design.md s.1): "every_token" computes attention for every token, each query
# seeing the kept earlier tokens and itself, and gates every row with the straight-through decision; "paper" (the
# authors' code) computes attention for the kept tokens only, so only they carry the LM gradient to the router.
RULES = ("every_token", "paper")
ROUTERS_FILE = "routers.safetensors"
META_FILE = "mindskip.json"
Project = Callable[[nn.Linear, torch.Tensor], torch.Tensor]  # a decode step's linear on its rows (`_predicated`)


@dataclass
class RoutingEntry:
    """One routed layer's decision in one forward: scores [B, N] fp32 (None where a stored sequence decision
    was reused), keep [B, N] bool, real [B, N] bool (not padding), and in training the keep rate over real
    tokens as a tensor carrying the straight-through gradient."""

    layer_idx: int
    scores: torch.Tensor | None
    keep: torch.Tensor
    real: torch.Tensor
    keep_rate: torch.Tensor | None


@dataclass
class RoutingRecord:
    """What `record_routing` collected: an entry per routed layer per forward, in call order."""

    entries: list[RoutingEntry] = field(default_factory=list)

    def keep_rates(self) -> dict[int, float]:
        """Fraction of real tokens kept per routed layer, over all recorded forwards."""
        kept: dict[int, torch.Tensor] = {}
        real: dict[int, torch.Tensor] = {}
        for e in self.entries:
            kept[e.layer_idx] = kept.get(e.layer_idx, 0) + (e.keep & e.real).sum()
            real[e.layer_idx] = real.get(e.layer_idx, 0) + e.real.sum()
        return {i: float(kept[i]) / max(float(real[i]), 1.0) for i in sorted(kept)}

    def real_scores(self) -> torch.Tensor:
        """Router scores of every (routed layer, real token) pair recorded, flattened, fp32."""
        if not any(e.scores is not None for e in self.entries):
            return torch.zeros(0)
        return torch.cat([e.scores.detach()[e.real].float().cpu() for e in self.entries if e.scores is not None])

    def training_keep_rates(self) -> torch.Tensor:
        """Stacked differentiable keep rates of the recorded training forwards (for sparsity losses)."""
        rates = [e.keep_rate for e in self.entries if e.keep_rate is not None]
        if not rates:
            raise ValueError("no training forward was recorded (keep rates carry gradients only in train mode)")
        return torch.stack([r.float() for r in rates])


@dataclass
class ModelState:
    """Per-model state shared by its patched layers: the current batch's 2-D padding mask, and the open
    `record_routing` contexts."""

    padding_mask: torch.Tensor | None = None
    records: list[RoutingRecord] = field(default_factory=list)


@dataclass
class LayerState:
    """Per-layer MindSkip settings (what a forward decided is collected by `record_routing`)."""

    layer_idx: int
    threshold: float
    granularity: str
    backend: str
    model_state: ModelState
    rule: str = "every_token"  # the training forward (RULES); inference is the same for every rule
    sink_tokens: int = 0  # token granularity: the first n real tokens of a sequence are always kept
    fuse_norm: bool = True  # inference: the router's RMSNorm fused into the router and the gather
    target: str = "attention"  # TARGETS: the sub-layer the router skips


def _base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "model", model)
    if not hasattr(base, "layers"):
        raise TypeError(f"model must be a transformers causal LM or base model with `.layers`, got "
                        f"{type(model).__name__}")
    return base


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def _check_supported(model: nn.Module) -> None:
    model_type = _model_type(model)
    if model_type not in SUPPORTED:
        raise ValueError(f"model must be one of {SUPPORTED} (config.model_type), got {model_type!r}")


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
    routed = sorted(i for i, layer in mindskip_layers(base).items() if layer.mindskip.target != "mlp")
    return MindSkipCache(base.config, routed, num_blocks=num_blocks, max_bytes=max_bytes,
                         max_length=max_length, dtype=base.layers[0].input_layernorm.weight.dtype, static=static,
                         **kwargs)


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


def _rope_rows(position_embeddings: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor | None, head_dim: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's cos/sin [1 or B, N, Dh] as rows [T, Dh] at flat token indices `idx` (None: every row, N = 1),
    without materialising a [B, N, Dh] copy."""
    rows = (c.reshape(-1, head_dim) for c in position_embeddings)
    return tuple((r if idx is None else r.index_select(0, idx)).to(dtype) for r in rows)


def _qkv(attn: nn.Module, z: torch.Tensor, project: Project | None = None
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q/k/v [T, H, Dh] of rows z [T, D] through a transformers attention module (Qwen3's q/k norms too);
    `project(linear, rows)` replaces `linear(rows)` when given."""
    project = project or (lambda linear, rows: linear(rows))
    q, k, v = (project(proj, z).unflatten(-1, (-1, attn.head_dim))
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
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


def _sink_flags(st: LayerState, batch: int, seq_len: int, past: int, device: torch.device) -> torch.Tensor | None:
    """[B, N] True on the first `st.sink_tokens` real tokens of each sequence (token granularity), counted
    over the whole sequence so far: the model's 2-D padding mask covers cached tokens too; without one, the
    `past` cached positions are all real."""
    if not st.sink_tokens or st.granularity != "token":
        return None
    full = st.model_state.padding_mask
    if full is not None:
        rank = (full != 0).long().cumsum(1)[:, -seq_len:] - 1
    else:
        rank = (past + torch.arange(seq_len, device=device)).expand(batch, seq_len)
    return rank < st.sink_tokens


def _router_norm(layer: nn.Module) -> nn.Module:
    """The RMSNorm whose output the router reads: post_attention_layernorm for the MLP target, else
    input_layernorm."""
    return layer.post_attention_layernorm if layer.mindskip.target == "mlp" else layer.input_layernorm


def _mlp_rows(mlp: nn.Module, x: torch.Tensor, project: Project | None = None) -> torch.Tensor:
    """The MLP on rows x; with `project` (a decode step's predicated GEMV) its gate/up/down projections (the
    Llama / Mistral / Qwen form) read no weight for a skipped row."""
    if project is None:
        return mlp(x)
    return project(mlp.down_proj, mlp.act_fn(project(mlp.gate_proj, x)) * project(mlp.up_proj, x))


def _block_out(layer: nn.Module, x: torch.Tensor, attn_out: torch.Tensor, project: Project | None = None
               ) -> torch.Tensor:
    """The decoder block's contribution on rows x given its attention output: attn + mlp(ln2(x + attn)), so that
    x + g * out is the block at g = 1 and x at g = 0."""
    return attn_out + _mlp_rows(layer.mlp, layer.post_attention_layernorm(x + attn_out), project)


def _sublayer_fn(layer: nn.Module, x: torch.Tensor, attend):
    """fn(packed z, plan) -> the routed sub-layer's contribution on the kept rows, for the layer's target:
    `attend` (attention), the MLP (z is then the post_attention_layernorm output), or the block: attention,
    then the MLP on the same packed rows (the block input x [B, N, D] is gathered un-normalized for its
    residual; nothing is scattered in between)."""
    target = layer.mindskip.target
    if target == "attention":
        return attend
    if target == "mlp":
        return lambda zp, plan: layer.mlp(zp)

    def block(zp: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        return _block_out(layer, gather(x, plan, backend=layer.mindskip.backend), attend(zp, plan).to(x.dtype))

    return block


def _routed(layer: nn.Module, x: torch.Tensor, fn, pad: torch.Tensor | None, position_ids: torch.Tensor | None,
            sinks: torch.Tensor | None, training: bool) -> tuple[torch.Tensor, RoutingPlan, torch.Tensor | None]:
    """`routed_update` of the layer's target on its input x: the router reads the target's RMSNorm (fused into
    the router and the gather unless st.fuse_norm is off), fn computes the kept rows' contribution."""
    st: LayerState = layer.mindskip
    ln = _router_norm(layer)
    return routed_update(x if st.fuse_norm else ln(x), layer.router.weight, fn, residual=x,
                         norm=(ln.weight, ln.variance_epsilon) if st.fuse_norm else None, threshold=st.threshold,
                         granularity=st.granularity, attention_mask=pad, position_ids=position_ids,
                         force_keep=sinks, training=training, backend=st.backend)


def _reuse_decision(layer: nn.Module, x: torch.Tensor, decision: torch.Tensor, real: torch.Tensor | None,
                    position_ids: torch.Tensor | None, fn) -> tuple[torch.Tensor, RoutingPlan]:
    """A later chunk of a sequence-granularity sequence: the stored per-sequence decision [B] instead of the
    router, then the target's contribution on the kept rows as in `_routed`."""
    st: LayerState = layer.mindskip
    ln = _router_norm(layer)
    keep = decision.unsqueeze(1).expand(-1, x.shape[1])
    plan = RoutingPlan.from_keep(keep if real is None else keep & real, position_ids, backend=st.backend)
    norm = (ln.weight, ln.variance_epsilon) if st.fuse_norm else None
    values = fn(gather(x if st.fuse_norm else ln(x), plan, norm=norm, backend=st.backend), plan)
    return scatter_add(x, values.to(x.dtype), plan, backend=st.backend), plan


def _every_token_update(layer: nn.Module, x: torch.Tensor, position_embeddings, pad: torch.Tensor | None,
                        st: LayerState, sinks: torch.Tensor | None) -> tuple[torch.Tensor, RoutingPlan, torch.Tensor]:
    """The "every_token" training forward: the target's sub-layer for every token (attention with each query
    seeing the kept earlier tokens and itself, so a kept token sees exactly what inference shows it; for the
    block, that attention and then the MLP), and h = x + g * out on every row with the hard gate g (0 or 1 in
    value) passing its gradient straight through to the score. Returns (h, plan, keep rate over real tokens
    with the straight-through gradient)."""
    z = _router_norm(layer)(x)
    plan = route(z, layer.router.weight, threshold=st.threshold, granularity=st.granularity, attention_mask=pad,
                 force_keep=sinks, backend=st.backend)
    if st.target == "mlp":
        out = layer.mlp(z)
    else:
        attn = layer.self_attn
        q, k, v = _qkv(attn, z)
        cos, sin = (c.to(q.dtype) for c in position_embeddings)  # [1 or B, N, Dh]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, Dh]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = keep_masked_attention(q, k, v, plan.keep, softmax_scale=attn.scaling, backend=st.backend)
        out = attn.o_proj(out.transpose(1, 2).flatten(2))
        if st.target == "block":
            out = _block_out(layer, x, out)
    gate, keep_rate = straight_through_gate(plan, pad)
    return x + gate.unsqueeze(-1).to(out.dtype) * out, plan, keep_rate


def _predicated(backend: str, keep: torch.Tensor, like: torch.Tensor) -> Project | None:
    """`project(linear, rows)` for a batch-1 decode step on the device path: the Triton predicated GEMV,
    which reads the device keep flag and, for a skipped row, writes zeros without reading the weight (a
    skipped layer's projections, q/k/v/o and the MLP's, cost a launch each, no host branch). None (cuBLAS /
    torch) where Triton cannot run or another backend was asked for, and at batch > 1, where one GEMM over
    all rows reads each weight once and the predicated add discards the skipped rows."""
    if keep.shape[0] != 1 or backend not in ("auto", "triton"):
        return None
    tri = backend_module("triton")
    if tri is None or not tri.supports("predicated_linear", like.device, like.dtype):
        return None
    if backend == "auto" and like.device.type != "cuda":
        return None  # "auto" on the CPU: the interpreter is for tests, not for running models
    # a wrapped linear (LoRA, quantized) runs its own forward: the GEMV reads plain weights only
    return lambda linear, rows: (tri.predicated_linear(rows, linear.weight, linear.bias, keep)
                                 if type(linear) is nn.Linear else linear(rows))


# On the CPU a host read of the keep flags is free (no device queue to drain), so a decode step projects and
# attends only its kept rows there (a skipped row costs no q/k/v/o projection). Accelerators take the
# fixed-shape device path, which CUDA graphs can capture; tests set this False to run that path on the CPU.
HOST_COMPACT_ON_CPU = True


def _decode_keep(self: nn.Module, z: torch.Tensor, real: torch.Tensor | None, sinks: torch.Tensor | None,
                 decision: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """A decode step's device keep flag, no host read: the stored sequence decision [B] where there is one, else
    the router's on z [B, 1, D] (sinks forced). Returns (router scores [B, 1] or None, keep [B] over real rows,
    the decision to store: the flag for sequence granularity, else None)."""
    st: LayerState = self.mindskip
    scores = None
    if decision is not None:
        keep = decision
    else:
        mask = torch.ones(z.shape[0], 1, dtype=torch.bool, device=z.device) if real is None else real
        router = resolve(st.backend, "router", z.device, z.dtype)
        scores, keep = router.router(z, self.router.weight, mask, st.threshold, st.granularity)
        keep = keep[:, 0] if sinks is None else keep[:, 0] | sinks[:, 0]
        if st.granularity == "sequence":
            decision = keep
    return scores, keep if real is None else keep & real[:, 0], decision


def _decode_rows(keep: torch.Tensor, like: torch.Tensor, backend: str
                 ) -> tuple[torch.Tensor | None, Project | None]:
    """(rows, project) for a decode step: on the CPU the kept row indices (host compaction: a skipped row costs
    no projection), else None with the batch-1 predicated GEMV where it applies (`_predicated`)."""
    if HOST_COMPACT_ON_CPU and keep.device.type == "cpu":
        return keep.nonzero()[:, 0], None
    return None, _predicated(backend, keep, like)


def _decode_add(hidden_states: torch.Tensor, keep: torch.Tensor, rows: torch.Tensor | None,
                out: torch.Tensor) -> torch.Tensor:
    """h + out on a decode step's kept rows, h (bit-identical) on the others: an index_add of the compacted
    rows, or the device path's add predicated on the flag (the same rounding)."""
    batch = hidden_states.shape[0]
    out = out.to(hidden_states.dtype)
    if rows is not None:
        return hidden_states.view(batch, -1).index_add(0, rows, out).view_as(hidden_states)
    return torch.where(keep.view(batch, 1, 1), hidden_states + out.unsqueeze(1), hidden_states)


def _cached_decode_step(self: nn.Module, hidden_states: torch.Tensor, z: torch.Tensor, real: torch.Tensor | None,
                        sinks: torch.Tensor | None, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                        layer_cache: RoutedKVLayer) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One new token per sequence through the routed attention (or block). The device path has fixed shapes
    and no host read: every row goes through with a device keep flag [B], kept rows append K/V and attend
    over their paged cache, skipped rows take no slot, read no cache, and stay bit-identical (the add is
    predicated on the flag). Returns (out, router scores [B, 1] or None for a stored decision, keep [B])."""
    st: LayerState = self.mindskip
    scores, keep, layer_cache.decision = _decode_keep(self, z, real, sinks, layer_cache.decision)
    rows, project = _decode_rows(keep, z, st.backend)
    if rows is not None and rows.numel() == 0:
        return hidden_states, scores, keep  # nothing kept: no projection, no cache access
    attn = self.self_attn
    q, k, v = _qkv(attn, z[:, 0] if rows is None else z[:, 0].index_select(0, rows), project)
    cos, sin = _rope_rows(position_embeddings, None, attn.head_dim, q.dtype)
    if rows is not None and cos.shape[0] > 1:
        cos, sin = cos.index_select(0, rows), sin.index_select(0, rows)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    attended = layer_cache.attend_decode(q, k, v, keep, attn.scaling, st.backend, rows).flatten(1)
    out = (attn.o_proj(attended) if project is None else project(attn.o_proj, attended)).to(hidden_states.dtype)
    if st.target == "block":  # the MLP on the same rows (predicated like the projections on the device path)
        out = _block_out(self, hidden_states[:, 0] if rows is None else hidden_states[:, 0].index_select(0, rows),
                         out, project)
    return _decode_add(hidden_states, keep, rows, out), scores, keep


def _mlp_decode_step(self: nn.Module, hidden_states: torch.Tensor, real: torch.Tensor | None,
                     sinks: torch.Tensor | None, decision: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """One new token per sequence through the routed MLP (after attention ran for every token), with the same
    fixed-shape, host-read-free device path as `_cached_decode_step`. Returns (out, router scores [B, 1] or
    None, keep [B], the decision to store)."""
    z = self.post_attention_layernorm(hidden_states)
    scores, keep, decision = _decode_keep(self, z, real, sinks, decision)
    rows, project = _decode_rows(keep, z, self.mindskip.backend)
    if rows is not None and rows.numel() == 0:
        return hidden_states, scores, keep, decision
    out = _mlp_rows(self.mlp, z[:, 0] if rows is None else z[:, 0].index_select(0, rows), project)
    return _decode_add(hidden_states, keep, rows, out), scores, keep, decision


def _cached_update(self: nn.Module, x: torch.Tensor, pad: torch.Tensor | None, position_ids: torch.Tensor | None,
                   sinks: torch.Tensor | None, fn, decision: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Inference with a cache, for any target: the stored per-sequence decision [B] where there is one (a
    later chunk or token of a sequence-granularity sequence), else the router. Returns (out, scores [B, N] or
    None where a stored decision was reused, keep [B, N], the decision to store: [B] for sequence granularity,
    else None)."""
    real = None if pad is None else pad != 0
    if decision is not None:
        out, plan = _reuse_decision(self, x, decision, real, position_ids, fn)
        return out, None, plan.keep, decision
    out, plan, _ = _routed(self, x, fn, pad, position_ids, sinks, training=False)
    return out, plan.scores, plan.keep, plan.keep.any(1) if self.mindskip.granularity == "sequence" else None


def _cached_attention(self: nn.Module, hidden_states: torch.Tensor, pad: torch.Tensor | None,
                      position_ids: torch.Tensor | None, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                      layer_cache: RoutedKVLayer, sinks: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The routed attention sub-block (or, for the block target, attention and then the MLP on the kept rows)
    with a MindSkipCache (inference): decode steps take the fixed-shape device path; prefill routes (one host
    read of T) and attends through the paged cache. Sequence granularity stores the prefill decision and
    reuses it for every later token. Returns (out, scores [B, N] or None where a stored decision was reused,
    keep [B, N])."""
    seq_len = hidden_states.shape[1]
    if seq_len == 1:
        real = None if pad is None else pad != 0
        out, scores, keep = _cached_decode_step(self, hidden_states, self.input_layernorm(hidden_states), real,
                                                sinks, position_embeddings, layer_cache)
        keep = keep.unsqueeze(1)
    else:
        fn = _sublayer_fn(self, hidden_states, _attend_fn(self.self_attn, position_embeddings, self.mindskip.backend,
                                                          layer_cache))
        out, scores, keep, layer_cache.decision = _cached_update(self, hidden_states, pad, position_ids, sinks, fn,
                                                                 layer_cache.decision)
    layer_cache.seen += seq_len
    return out, scores, keep


def _dense_attention(self: nn.Module, hidden_states: torch.Tensor, attention_mask=None, position_ids=None,
                     cache=None, use_cache=False, position_embeddings=None, **kwargs) -> torch.Tensor:
    """The MLP target's attention sub-layer: transformers' own, for every token (its cache layer is an ordinary
    dense one)."""
    out, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                            position_ids=position_ids, cache=cache, use_cache=use_cache,
                            position_embeddings=position_embeddings, **kwargs)
    return hidden_states + out


def _mindskip_layer_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask=None,
                            position_ids=None, cache=None, use_cache=False, position_embeddings=None,
                            **kwargs) -> torch.Tensor:
    """Decoder layer forward with the target sub-layer routed: attention (the MLP runs for every token), the
    MLP (attention runs for every token, through transformers' own module and a dense cache layer), or the
    whole block (skipped tokens pass it unchanged).

    With a MindSkipCache (inference) the attention and block targets go through `_cached_attention`. In
    training the cache is not used (gradients flow through freshly computed K/V)."""
    st: LayerState = self.mindskip
    layer_cache = None
    if cache is not None and not self.training:
        if not isinstance(cache, MindSkipCache):
            raise TypeError(f"cache must be a MindSkipCache for models patched by apply_mindskip (generate and "
                            f"use_cache=True create one), got {type(cache).__name__}")
        if st.target != "mlp":
            layer_cache = cache.routed_layer(st.layer_idx)
    batch, seq_len, _ = hidden_states.shape
    window = getattr(self.self_attn, "sliding_window", None)
    if window is not None and seq_len > window:
        raise NotImplementedError(f"sliding-window attention (window {window}) is not supported by MindSkip "
                                  f"layers for sequences longer than the window ({seq_len})")
    pad = st.model_state.padding_mask
    if pad is not None and tuple(pad.shape) != (batch, seq_len):
        if pad.shape[0] != batch or pad.shape[1] < seq_len:
            raise ValueError(f"attention_mask must have shape [{batch}, >= {seq_len}] (batch and length of the "
                             f"hidden states), got {tuple(pad.shape)}")
        pad = pad[:, -seq_len:]
    dense_cache = cache if st.target == "mlp" and not self.training else None
    past = (layer_cache.seen if layer_cache is not None
            else dense_cache.get_seq_length(st.layer_idx) if dense_cache is not None else 0)
    sinks = _sink_flags(st, batch, seq_len, past, hidden_states.device)
    if st.target == "mlp":
        hidden_states = _dense_attention(self, hidden_states, attention_mask, position_ids, dense_cache, use_cache,
                                         position_embeddings, **kwargs)
    keep_rate = None
    if layer_cache is not None:
        hidden_states, scores, keep = _cached_attention(self, hidden_states, pad, position_ids, position_embeddings,
                                                        layer_cache, sinks)
    elif dense_cache is not None:
        stored = dense_cache.decisions.get(st.layer_idx)
        if seq_len == 1:
            hidden_states, scores, keep, decision = _mlp_decode_step(self, hidden_states, None if pad is None
                                                                     else pad != 0, sinks, stored)
            keep = keep.unsqueeze(1)
        else:
            hidden_states, scores, keep, decision = _cached_update(self, hidden_states, pad, position_ids, sinks,
                                                                   _sublayer_fn(self, hidden_states, None), stored)
        if decision is not None:
            dense_cache.decisions[st.layer_idx] = decision
    elif self.training and st.rule == "every_token":
        hidden_states, plan, keep_rate = _every_token_update(self, hidden_states, position_embeddings, pad, st, sinks)
        scores, keep = plan.scores, plan.keep
    else:
        fn = _sublayer_fn(self, hidden_states, _attend_fn(self.self_attn, position_embeddings, st.backend, None))
        hidden_states, plan, keep_rate = _routed(self, hidden_states, fn, pad, position_ids, sinks, self.training)
        scores, keep = plan.scores, plan.keep
    if st.model_state.records:
        real = torch.ones_like(keep) if pad is None else pad != 0
        entry = RoutingEntry(st.layer_idx, scores, keep, real, keep_rate)
        for record in st.model_state.records:
            record.entries.append(entry)
    if st.target != "attention":
        return hidden_states
    residual = hidden_states
    hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
    return residual + hidden_states


def apply_mindskip(model: nn.Module, layers: int | list[int] | None = None, threshold: float = 0.5,
                   granularity: str = "token", backend: str = "auto", *, sink_tokens: int = 0,
                   target: str = "attention") -> nn.Module:
    """Add a zero-initialised MindSkip router to chosen decoder layers of a transformers causal LM.

    layers: None = the paper's choice (the last half of the layers before the final one), an int n = the
    last n before the final one, or a list of layer indices. sink_tokens (token granularity): the first n
    real tokens of every sequence always run attention, whatever their score, so that the kept tokens keep
    their attention sink (most heads of trained LLMs put much of their weight on the first token; skipping
    it as a key hurts every kept query). 0 = the paper's semantics. target (TARGETS): what a skipped token skips:
    "attention" (MindSkip), "mlp" (the router reads post_attention_layernorm; attention runs for every
    token), or "block" (Mixture-of-Depths: attention among the kept tokens, then the MLP on them; skipped
    tokens pass the whole block unchanged). Returns the same model, patched in place.
    """
    _check_supported(model)
    threshold = check.threshold(threshold)
    granularity = check.granularity(granularity)
    check.backend(backend)
    sink_tokens = check.sink_tokens(sink_tokens)
    check.target(target)
    base = _base_model(model)
    chosen = _choose_layers(len(base.layers), layers)
    dropped = [i for i in chosen if hasattr(base.layers[i], "dropped")]
    if dropped:
        raise ValueError(f"layers {dropped} have a sub-layer dropped by drop_sublayers; route a freshly loaded model")
    if not hasattr(base, "_mindskip_state"):
        base._mindskip_state = ModelState()
        base.register_forward_pre_hook(_base_forward_pre_hook, with_kwargs=True)
        if hasattr(model, "_prepare_cache_for_generation"):
            model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)
    for i in chosen:
        layer = base.layers[i]
        if not hasattr(layer, "router"):
            ref = layer.input_layernorm.weight
            layer.router = nn.Linear(ref.shape[0], 1, bias=False, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(layer.router.weight)
        layer.mindskip = LayerState(i, threshold, granularity, backend, base._mindskip_state,
                                    sink_tokens=sink_tokens, target=target)
        layer.forward = types.MethodType(_mindskip_layer_forward, layer)
    return model


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[RoutingRecord]:
    """Collect every routed layer's decision in the forwards run inside the context:

        with record_routing(model) as rec:
            loss = model(**batch).loss
        rec.keep_rates()                # {layer: fraction of real tokens kept}
        rec.training_keep_rates()       # train mode: differentiable, for a sparsity loss
    """
    base = _base_model(model)
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


def save_routers(model: nn.Module, path: str | os.PathLike, info: dict | None = None) -> None:
    """Write the routers (`routers.safetensors`, keys `model.layers.{i}.router.weight`) and `mindskip.json`
    into directory `path`: layers, each layer's threshold, granularity and target (`thresholds`,
    `granularities`, `targets`, by layer index), `threshold` / `granularity` when every layer has the same
    (else null), and under "tuning" the JSON-serialisable `info` (how they were tuned)."""
    from safetensors.torch import save_file

    layers = mindskip_layers(model)
    if not layers:
        raise ValueError("model has no MindSkip routers: call apply_mindskip(model) first")
    os.makedirs(path, exist_ok=True)
    tensors = {f"model.layers.{i}.router.weight": layer.router.weight.detach().cpu().contiguous()
               for i, layer in layers.items()}
    save_file(tensors, os.path.join(path, ROUTERS_FILE))
    thresholds = {str(i): layer.mindskip.threshold for i, layer in layers.items()}
    granularities = {str(i): layer.mindskip.granularity for i, layer in layers.items()}
    targets = {str(i): layer.mindskip.target for i, layer in layers.items()}

    def common(values: dict):
        return next(iter(values.values())) if len(set(values.values())) == 1 else None

    meta = {"layers": sorted(layers), "threshold": common(thresholds), "granularity": common(granularities),
            "thresholds": thresholds, "granularities": granularities, "targets": targets,
            "sink_tokens": max(layer.mindskip.sink_tokens for layer in layers.values()),
            "model_type": _model_type(model),
            "hidden_size": next(iter(tensors.values())).shape[1]}
    if info:
        meta["tuning"] = info
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def _read_routers(path: str | os.PathLike
                  ) -> tuple[dict[int, torch.Tensor], dict[int, tuple[float, str, int, str]] | None, str]:
    """({layer: router weight}, {layer: (threshold, granularity, sink_tokens, target)} or None for a bare
    state-dict file, the file named in errors). Files written before targets existed route attention."""
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
    weights = {int(k.split(".")[2]): v for k, v in load_file(weights_file).items()}
    if sorted(weights) != sorted(meta["layers"]):
        raise ValueError(f"{weights_file} holds routers of layers {sorted(weights)} but {meta_file} lists "
                         f"{meta['layers']}")
    per_layer = {i: (meta.get("thresholds", {}).get(str(i), meta.get("threshold")),
                     meta.get("granularities", {}).get(str(i), meta.get("granularity")),
                     meta.get("sink_tokens", 0), meta.get("targets", {}).get(str(i), "attention")) for i in weights}
    return weights, per_layer, meta_file


def load_routers(model: nn.Module, path: str | os.PathLike, backend: str | None = None, *,
                 granularity: str | None = None) -> nn.Module:
    """Load routers saved by `save_routers` (a directory: each layer's threshold and granularity come from its
    metadata), or a state-dict file (`.safetensors`, or torch `.bin`/`.pt`) with keys
    `model.layers.{i}.router.weight` (the paper's naming; other keys are ignored). A bare file has no settings:
    a layer the model already routes keeps its threshold and granularity, others get threshold 0.5 and
    granularity "sequence" (the paper's released routers are sequence-level). `granularity` overrides both.
    `backend` None keeps an existing patch's backend ("auto" for new layers). The target comes from the
    metadata ("attention" for files written before targets existed; a bare file keeps an existing patch's,
    else "attention"); a layer the model already routes for another target is refused (ValueError naming
    both).

    Everything is checked before the model is touched: on an error the model is exactly as it was."""
    if granularity is not None:
        check.granularity(granularity)
    if backend is not None:
        check.backend(backend)
    _check_supported(model)
    weights, per_layer, source = _read_routers(path)
    base = _base_model(model)
    _choose_layers(len(base.layers), list(weights))
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
            threshold, gran, sink, target = per_layer[i]
        else:
            threshold, gran, sink, target = ((old.threshold, old.granularity, old.sink_tokens, old.target)
                                             if old is not None else (0.5, "sequence", 0, "attention"))
        if target not in TARGETS:
            raise ValueError(f"{source}: layer {i} has target {target!r}, expected one of {TARGETS}")
        if old is not None and old.target != target:
            raise ValueError(f"target mismatch: {source} holds a router of layer {i} for target {target!r}, but "
                             f"the model already routes that layer with target {old.target!r}; load into a "
                             f"model patched with target={target!r} or an unpatched one")
        layer_backend = backend if backend is not None else old.backend if old is not None else "auto"
        settings[i] = (check.threshold(threshold), check.granularity(granularity or gran), layer_backend,
                       check.sink_tokens(sink), target)
    for i, (threshold, gran, layer_backend, sink, target) in settings.items():
        apply_mindskip(model, layers=[i], threshold=threshold, granularity=gran, backend=layer_backend,
                       sink_tokens=sink, target=target)
        with torch.no_grad():
            base.layers[i].router.weight.copy_(weights[i])
    return model
