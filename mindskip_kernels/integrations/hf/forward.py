"""The routed decoder-layer forward: one path for every target (the layer's `RoutedSublayer`) and phase.

`routed_layer_forward` normalises the call once (`LayerCall`), lets the target run what it runs for every token
before routing, then takes one of four flows, chosen by what the call is (not by the target):
- inference without a cache, and the "paper" training rule: route, gather, the kept rows' contribution,
  scatter (`prefill`);
- the "every_token" training rule: the contribution of every token, gated straight-through (`every_token`);
- inference with a MindSkipCache, a prompt or chunk: as `prefill`, through the layer's cache, with a stored
  sequence decision reused (`cached_prefill`);
- inference with a MindSkipCache, one new token per sequence: fixed shapes, no host read (`decode_step`).
Each returns a `Routed`; the cache's `RoutingState` records the step, `record_routing` the decision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mindskip_kernels.adapter import SkipAdapter
from mindskip_kernels.attention import Attend, routed_update, straight_through_gate
from mindskip_kernels.backends import find
from mindskip_kernels.integrations.hf.cache import MindSkipCache, RoutingState
from mindskip_kernels.integrations.hf.layer_call import LayerCall, Project
from mindskip_kernels.integrations.hf.state import LayerState
from mindskip_kernels.routing import RoutingPlan, route, score
from mindskip_kernels.rowwise import predicated_linear


@dataclass(frozen=True)
class Routed:
    """What a flow returns: the new hidden states [B, N, D], the router's scores [B, N] (None where a stored
    decision was reused), keep [B, N], the differentiable keep rate (training) and the per-sequence decision
    [B] to store (sequence granularity with a cache)."""

    hidden: torch.Tensor
    scores: torch.Tensor | None
    keep: torch.Tensor
    keep_rate: torch.Tensor | None = None
    decision: torch.Tensor | None = None


def skip_adapter(layer: nn.Module) -> SkipAdapter | None:
    """The layer's skipped-token adapter (`apply_mindskip(..., adapter=)`), or None: skipped tokens pass."""
    return getattr(layer, "skip_adapter", None)


def _update(layer: nn.Module, call: LayerCall, fn: Attend, training: bool = False,
            plan: RoutingPlan | None = None) -> tuple[torch.Tensor, RoutingPlan, torch.Tensor | None]:
    """`routed_update` of the layer's target on call.x: the router reads the target's RMSNorm (fused into the
    router and the gather unless st.fuse_norm is off) unless a `plan` is given; fn computes the kept rows."""
    st: LayerState = layer.mindskip
    ln = st.sublayer.router_norm(layer)
    x = call.x
    return routed_update(x if st.fuse_norm else ln(x), layer.router.weight, fn, residual=x,
                         norm=(ln.weight, ln.variance_epsilon) if st.fuse_norm else None, threshold=st.threshold,
                         granularity=st.granularity, attention_mask=call.real, position_ids=call.position_ids,
                         force_keep=call.sinks, plan=plan, training=training, adapter=skip_adapter(layer),
                         backend=st.backend)


def prefill(layer: nn.Module, call: LayerCall, training: bool = False) -> Routed:
    """Route, then the target's contribution on the kept rows only (also the "paper" training rule)."""
    out, plan, keep_rate = _update(layer, call, layer.mindskip.sublayer.kept_rows(layer, call), training)
    return Routed(out, plan.scores, plan.keep, keep_rate)


def every_token(layer: nn.Module, call: LayerCall) -> Routed:
    """The "every_token" training rule: the target's sub-layer for every token (attention with each query seeing
    the kept earlier tokens and itself, so a kept token sees exactly what inference shows it), and
    h = x + g * out on every row with the hard gate g (0 or 1 in value) passing its gradient straight through."""
    st: LayerState = layer.mindskip
    z = st.sublayer.router_norm(layer)(call.x)
    plan = route(z, layer.router.weight, threshold=st.threshold, granularity=st.granularity, attention_mask=call.real,
                 force_keep=call.sinks, backend=st.backend)
    out = st.sublayer.every_token(layer, call, z, plan)
    gate, keep_rate = straight_through_gate(plan, call.real)
    hidden = call.x + gate.unsqueeze(-1).to(out.dtype) * out
    adapter = skip_adapter(layer)
    if adapter is not None:  # the skipped real rows' update: 1 - gate is exactly 1 there, 0 on kept rows
        rest = 1 - gate if call.real is None else (1 - gate) * call.real
        hidden = hidden + rest.unsqueeze(-1).to(out.dtype) * adapter(z).to(out.dtype)
    return Routed(hidden, plan.scores, plan.keep, keep_rate)


# the training forward of each rule (design.md s.1); inference is the same for every rule
TRAINING_FORWARDS = {"every_token": every_token, "paper": lambda layer, call: prefill(layer, call, training=True)}
RULES = tuple(TRAINING_FORWARDS)


def cached_prefill(layer: nn.Module, call: LayerCall, state: RoutingState) -> Routed:
    """A prompt or chunk with a cache: the stored per-sequence decision where there is one (a later chunk of a
    sequence-granularity sequence), else the router (whose decision sequence granularity then stores)."""
    st: LayerState = layer.mindskip
    fn = st.sublayer.kept_rows(layer, call)
    if state.decision is not None:
        keep = state.decision.unsqueeze(1).expand(-1, call.x.shape[1])
        plan = RoutingPlan.from_keep(keep if call.real is None else keep & call.real, call.position_ids,
                                     backend=st.backend)
        out, plan, _ = _update(layer, call, fn, plan=plan)
        return Routed(out, None, plan.keep)
    out, plan, _ = _update(layer, call, fn)
    return Routed(out, plan.scores, plan.keep, decision=plan.keep.any(1) if st.granularity == "sequence" else None)


def _decode_keep(layer: nn.Module, call: LayerCall, z: torch.Tensor, decision: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """A decode step's device keep flag, no host read: the stored sequence decision [B] where there is one, else
    the router's on z [B, 1, D] (sinks forced). Returns (router scores [B, 1] or None, keep [B] over real rows,
    the decision to store: the flag for sequence granularity, else None)."""
    st: LayerState = layer.mindskip
    scores = None
    if decision is not None:
        keep = decision
    else:
        scores, keep = score(z, layer.router.weight, threshold=st.threshold, granularity=st.granularity,
                             attention_mask=call.real, force_keep=call.sinks, backend=st.backend)
        keep = keep[:, 0]
        if st.granularity == "sequence":
            decision = keep
    return scores, keep if call.real is None else keep & call.real[:, 0], decision


def decode_projection(backend: str, keep: torch.Tensor, like: torch.Tensor) -> Project | None:
    """`project(linear, rows)` for a batch-1 decode step on the device path where a kernel pays for it: the
    predicated projection, which for a skipped row reads no weight (a skipped layer's projections cost a launch
    each, no host branch). None (one torch GEMM over all rows, then the predicated add) at batch > 1, where the
    GEMM reads each weight once anyway, and where only the reference would run it."""
    if keep.shape[0] != 1:
        return None
    op = find(backend, "predicated_linear", like.device, like.dtype)
    if op is None or op.NAME == "reference":
        return None
    # a wrapped linear (LoRA, quantized) runs its own forward: the kernel reads plain weights only
    return lambda linear, rows: (predicated_linear(rows, linear.weight, linear.bias, keep, backend=backend)
                                 if type(linear) is nn.Linear else linear(rows))


def _decode_add(x: torch.Tensor, keep: torch.Tensor, rows: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """x + out on a decode step's kept rows, x (bit-identical) on the others: an index_add of the compacted
    rows, or the device path's add predicated on the flag (the same rounding)."""
    batch = x.shape[0]
    out = out.to(x.dtype)
    if rows is not None:
        return x.view(batch, -1).index_add(0, rows, out).view_as(x)
    return torch.where(keep.view(batch, 1, 1), x + out.unsqueeze(1), x)


def _decode_adapter(hidden: torch.Tensor, z: torch.Tensor, passed: torch.Tensor, device_path: bool,
                    adapter: SkipAdapter, backend: str) -> torch.Tensor:
    """hidden + adapter(z) on a decode step's skipped real rows (`passed` [B]: True where a row is kept or
    padding, which the adapter leaves alone). The device path runs every row with the add predicated on the flag
    (at batch 1 the predicated projection: a kept row reads no adapter weight); the CPU path compacts the
    skipped rows on the host."""
    batch = hidden.shape[0]
    if device_path:
        update = adapter(z[:, 0], decode_projection(backend, ~passed, z)).to(hidden.dtype)
        return torch.where(passed.view(batch, 1, 1), hidden, hidden + update.unsqueeze(1))
    rows = (~passed).nonzero()[:, 0]
    if not rows.numel():
        return hidden
    update = adapter(z[:, 0].index_select(0, rows)).to(hidden.dtype)
    return hidden.view(batch, -1).index_add(0, rows, update).view_as(hidden)


def decode_step(layer: nn.Module, call: LayerCall, state: RoutingState) -> Routed:
    """One new token per sequence. The device path has fixed shapes and no host read: every row goes through
    with a device keep flag [B] (skipped rows take no cache slot, read no cache and stay bit-identical: the add
    is predicated). On the CPU with `host_compact` the kept rows are compacted first (a host read is free there)."""
    st: LayerState = layer.mindskip
    z = st.sublayer.router_norm(layer)(call.x)
    scores, keep, decision = _decode_keep(layer, call, z, state.decision)
    if st.host_compact and keep.device.type == "cpu":
        rows, project = keep.nonzero()[:, 0], None
    else:
        rows, project = None, decode_projection(st.backend, keep, z)
    hidden = call.x
    # nothing kept on the CPU path: no projection, no cache access (unless a skipped row still writes its K/V)
    if rows is None or rows.numel() or st.sublayer.writes_skipped:
        hidden = _decode_add(call.x, keep, rows, st.sublayer.decode(layer, call, z, keep, rows, project))
    adapter = skip_adapter(layer)
    if adapter is not None:
        hidden = _decode_adapter(hidden, z, keep if call.real is None else keep | ~call.real[:, 0], rows is None,
                                 adapter, st.backend)
    return Routed(hidden, scores, keep.unsqueeze(1), decision=decision)


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


def _real_tokens(st: LayerState, batch: int, seq_len: int) -> torch.Tensor | None:
    """The current tokens' real-token mask [B, N] bool (the model's 2-D padding mask, whose last N columns
    cover this chunk when it also covers cached tokens), or None when every token is real."""
    mask = st.model_state.padding_mask
    if mask is None:
        return None
    if mask.shape[0] != batch or mask.shape[1] < seq_len:
        raise ValueError(f"attention_mask must have shape [{batch}, >= {seq_len}] (batch and length of the "
                         f"hidden states), got {tuple(mask.shape)}")
    return mask[:, -seq_len:] != 0


def _routing_state(layer: nn.Module, cache) -> RoutingState | None:
    """The cache's decode state of this layer in inference with a cache, else None (training never uses one)."""
    if cache is None or layer.training:
        return None
    if not isinstance(cache, MindSkipCache):
        raise TypeError(f"cache must be a MindSkipCache for models patched by apply_mindskip (generate and "
                        f"use_cache=True create one), got {type(cache).__name__}")
    return cache.routing_state(layer.mindskip.layer_idx)


def routed_layer_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask=None, position_ids=None,
                         cache=None, use_cache=False, position_embeddings=None, **kwargs) -> torch.Tensor:
    """Decoder-layer forward with the layer's target sub-layer routed (bound to patched layer instances)."""
    st: LayerState = self.mindskip
    state = _routing_state(self, cache)
    batch, seq_len, _ = hidden_states.shape
    # Qwen2/3 attention modules hold their layer's window; Mistral's reads it from the config
    attn = self.self_attn
    window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(attn.config, "sliding_window", None)
    if window is not None and seq_len > window:
        raise NotImplementedError(f"sliding-window attention (window {window}) is not supported by MindSkip "
                                  f"layers for sequences longer than the window ({seq_len})")
    real = _real_tokens(st, batch, seq_len)
    sinks = _sink_flags(st, batch, seq_len, 0 if state is None else state.seen, hidden_states.device)
    x = st.sublayer.prepare(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                            cache=cache if state is not None else None, use_cache=use_cache,
                            position_embeddings=position_embeddings, **kwargs)
    kv = cache.kv_layer(st.layer_idx) if state is not None else None
    call = LayerCall(x, real, position_ids, position_embeddings, sinks, kv, st.backend)
    if state is None:
        routed = TRAINING_FORWARDS[st.rule](self, call) if self.training else prefill(self, call)
    else:
        routed = decode_step(self, call, state) if seq_len == 1 else cached_prefill(self, call, state)
        state.advance(seq_len, routed.decision)
    st.record(routed.scores, routed.keep, real, routed.keep_rate)
    return st.sublayer.finish(self, routed.hidden)
