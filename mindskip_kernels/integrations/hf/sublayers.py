"""The routed sub-layers: one object per target (attention, MLP, block), chosen once by `apply_mindskip`.

Each has the same small interface, so the layer forward (forward.py) never asks which target it runs:
- `router_norm(layer)`: the RMSNorm whose output the router reads (and the kept rows are packed from);
- `prepare(layer, hidden_states, **layer_kwargs)`: what runs for every token before routing (the MLP target:
  transformers' own attention); `finish(layer, h)`: what runs for every token after (the attention target: the
  MLP);
- `kept_rows(layer, call)`: fn(packed z [T, D], plan) -> the sub-layer's contribution on the kept rows (prefill,
  and the "paper" training rule), through the layer's kept-only K/V cache when it has one;
- `every_token(layer, call, z, plan)`: its contribution on every row, attention seeing the kept earlier tokens
  and itself (the "every_token" training rule);
- `decode(layer, call, z, keep, rows, project)`: its contribution on a decode step's rows;
- `paged_kv`: whether its layer's cache entry is a kept-only paged `RoutedKVLayer`;
- `observed(layer)` / `stream_after(x, out)`: the modules whose input and output show, in the dense model, the
  residual stream before and after the target (for the training-free drops and router fitting: observe.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mindskip_kernels.attention import Attend, apply_rope, packed_attention
from mindskip_kernels.integrations.hf.cache import RoutedKVLayer
from mindskip_kernels.ops import keep_masked_attention
from mindskip_kernels.routing import RoutingPlan, gather

Project = Callable[[nn.Linear, torch.Tensor], torch.Tensor]  # a decode step's linear on its rows


@dataclass(frozen=True)
class LayerCall:
    """What one routed layer's forward works on, normalised once by the forward (vLLM-style metadata):
    x [B, N, D] the routed sub-layer's input, real [B, N] bool (False on padding; None: all real), the model's
    position ids and RoPE cos/sin, sinks [B, N] bool (tokens always kept) or None, kv the layer's kept-only paged
    K/V (inference with a cache, paged targets) or None, and the backend."""

    x: torch.Tensor
    real: torch.Tensor | None
    position_ids: torch.Tensor | None
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    sinks: torch.Tensor | None
    kv: RoutedKVLayer | None
    backend: str


def decode_rows(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """A decode step's [B, 1, D] tensor as rows [R, D]: every row (device path) or the compacted kept ones."""
    return t[:, 0] if rows is None else t[:, 0].index_select(0, rows)


def rope_rows(position_embeddings: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor | None, head_dim: int,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's cos/sin [1 or B, N, Dh] as rows [T, Dh] at flat token indices `idx` (None: every row, N = 1),
    without materialising a [B, N, Dh] copy."""
    rows = (c.reshape(-1, head_dim) for c in position_embeddings)
    return tuple((r if idx is None else r.index_select(0, idx)).to(dtype) for r in rows)


def qkv(attn: nn.Module, z: torch.Tensor, project: Project | None = None
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q/k/v [T, H, Dh] of rows z [T, D] through a transformers attention module (Qwen3's q/k norms too);
    `project(linear, rows)` replaces `linear(rows)` when given."""
    project = project or (lambda linear, rows: linear(rows))
    q, k, v = (project(proj, z).unflatten(-1, (-1, attn.head_dim))
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    if hasattr(attn, "q_norm"):  # Qwen3
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q, k, v


def mlp_rows(mlp: nn.Module, x: torch.Tensor, project: Project | None = None) -> torch.Tensor:
    """The MLP on rows x; with `project` (a decode step's predicated projection) its gate/up/down projections
    (the Llama / Mistral / Qwen form) read no weight for a skipped row."""
    if project is None:
        return mlp(x)
    return project(mlp.down_proj, mlp.act_fn(project(mlp.gate_proj, x)) * project(mlp.up_proj, x))


def dense_attention(layer: nn.Module, hidden_states: torch.Tensor, attention_mask=None, position_ids=None,
                    cache=None, use_cache=False, position_embeddings=None, **kwargs) -> torch.Tensor:
    """x + Attn(LN1 x) through transformers' own attention module for every token (and its ordinary cache
    layer): the MLP target's attention, and an MLP-dropped layer's (layer_drop)."""
    out, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), attention_mask=attention_mask,
                             position_ids=position_ids, cache=cache, use_cache=use_cache,
                             position_embeddings=position_embeddings, **kwargs)
    return hidden_states + out


class RoutedSublayer:
    """The interface (see the module docstring); subclasses are the targets."""

    name: str
    paged_kv: bool

    def router_norm(self, layer: nn.Module) -> nn.Module:
        return layer.input_layernorm

    def prepare(self, layer: nn.Module, hidden_states: torch.Tensor, **layer_kwargs) -> torch.Tensor:
        return hidden_states

    def finish(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return h

    def observed(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(source, sink): the source's input is the stream before the target, the sink's output the target's."""
        return layer, layer.self_attn

    def stream_after(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The residual stream after the target, from the stream before it and the sink's output."""
        return x + out

    def kept_rows(self, layer: nn.Module, call: LayerCall) -> Attend:
        raise NotImplementedError

    def every_token(self, layer: nn.Module, call: LayerCall, z: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, layer: nn.Module, call: LayerCall, z: torch.Tensor, keep: torch.Tensor,
               rows: torch.Tensor | None, project: Project | None) -> torch.Tensor:
        raise NotImplementedError


class AttentionSublayer(RoutedSublayer):
    """MindSkip: the attention sub-layer runs among the kept tokens (RoPE at their original positions; with a
    cache, over each sequence's cached kept tokens); the MLP runs for every token."""

    name, paged_kv = "attention", True

    def finish(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def kept_rows(self, layer: nn.Module, call: LayerCall) -> Attend:
        attn, cos = layer.self_attn, call.position_embeddings[0]

        def attend(zp: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
            q, k, v = qkv(attn, zp)
            idx = plan.indices % plan.seq_len if cos.shape[0] == 1 else plan.indices
            cos_rows, sin_rows = rope_rows(call.position_embeddings, idx, attn.head_dim, q.dtype)
            if call.kv is None:
                return attn.o_proj(packed_attention(q, k, v, cos_rows, sin_rows, plan, attn.scaling, call.backend))
            q, k = apply_rope(q, cos_rows, sin_rows), apply_rope(k, cos_rows, sin_rows)
            return attn.o_proj(call.kv.attend_prefill(q, k, v, plan, attn.scaling, call.backend).flatten(1))

        return attend

    def every_token(self, layer: nn.Module, call: LayerCall, z: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        attn = layer.self_attn
        q, k, v = qkv(attn, z)
        cos, sin = (c.to(q.dtype) for c in call.position_embeddings)  # [1 or B, N, Dh]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, Dh]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = keep_masked_attention(q, k, v, plan.keep, softmax_scale=attn.scaling, backend=call.backend)
        return attn.o_proj(out.transpose(1, 2).flatten(2))

    def decode(self, layer: nn.Module, call: LayerCall, z: torch.Tensor, keep: torch.Tensor,
               rows: torch.Tensor | None, project: Project | None) -> torch.Tensor:
        """Kept rows append their K/V and attend over their paged cache; on the device path skipped rows take
        no slot and read no cache (`RoutedKVLayer.attend_decode`)."""
        attn = layer.self_attn
        q, k, v = qkv(attn, decode_rows(z, rows), project)
        cos, sin = rope_rows(call.position_embeddings, None, attn.head_dim, q.dtype)
        if rows is not None and cos.shape[0] > 1:
            cos, sin = cos.index_select(0, rows), sin.index_select(0, rows)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attended = call.kv.attend_decode(q, k, v, keep, attn.scaling, call.backend, rows).flatten(1)
        return (attn.o_proj(attended) if project is None else project(attn.o_proj, attended)).to(call.x.dtype)


class MLPSublayer(RoutedSublayer):
    """The MLP sub-layer routed: attention runs for every token first (transformers' own, a dense cache layer);
    the router reads post_attention_layernorm."""

    name, paged_kv = "mlp", False

    def router_norm(self, layer: nn.Module) -> nn.Module:
        return layer.post_attention_layernorm

    def observed(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        return layer.post_attention_layernorm, layer.mlp

    def prepare(self, layer: nn.Module, hidden_states: torch.Tensor, **layer_kwargs) -> torch.Tensor:
        return dense_attention(layer, hidden_states, **layer_kwargs)

    def kept_rows(self, layer: nn.Module, call: LayerCall) -> Attend:
        return lambda zp, plan: layer.mlp(zp)

    def every_token(self, layer: nn.Module, call: LayerCall, z: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        return layer.mlp(z)

    def decode(self, layer: nn.Module, call: LayerCall, z: torch.Tensor, keep: torch.Tensor,
               rows: torch.Tensor | None, project: Project | None) -> torch.Tensor:
        return mlp_rows(layer.mlp, decode_rows(z, rows), project)


class BlockSublayer(AttentionSublayer):
    """The whole decoder block routed (Mixture-of-Depths): attention among the kept tokens, then the MLP on the
    same packed rows; skipped tokens pass the block unchanged."""

    name, paged_kv = "block", True

    def finish(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return h

    def observed(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        return layer, layer

    def stream_after(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out

    @staticmethod
    def block_out(layer: nn.Module, x: torch.Tensor, attn_out: torch.Tensor, project: Project | None = None
                  ) -> torch.Tensor:
        """The block's contribution on rows x given their attention output: attn + mlp(ln2(x + attn)), so that
        x + g * out is the block at g = 1 and x at g = 0."""
        return attn_out + mlp_rows(layer.mlp, layer.post_attention_layernorm(x + attn_out), project)

    def kept_rows(self, layer: nn.Module, call: LayerCall) -> Attend:
        attend = super().kept_rows(layer, call)

        def block(zp: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:  # x gathered un-normalized: its residual
            return self.block_out(layer, gather(call.x, plan, backend=call.backend), attend(zp, plan).to(call.x.dtype))

        return block

    def every_token(self, layer: nn.Module, call: LayerCall, z: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        return self.block_out(layer, call.x, super().every_token(layer, call, z, plan))

    def decode(self, layer: nn.Module, call: LayerCall, z: torch.Tensor, keep: torch.Tensor,
               rows: torch.Tensor | None, project: Project | None) -> torch.Tensor:
        attn_out = super().decode(layer, call, z, keep, rows, project)
        return self.block_out(layer, decode_rows(call.x, rows), attn_out, project)


SUBLAYERS: dict[str, RoutedSublayer] = {s.name: s for s in (AttentionSublayer(), MLPSublayer(), BlockSublayer())}
