"""The routed sub-layers: one object per target (attention, MLP, block), chosen once by `apply_mindskip`.

Each has the same small interface, so the layer forward (forward.py) never asks which target it runs:
- `router_norm(layer)`: the RMSNorm whose output the router reads (and the kept rows are packed from);
- `prepare(layer, hidden_states, **layer_kwargs)`: what runs for every token before routing (the MLP target:
  transformers' own attention); `finish(layer, h)`: what runs for every token after (the attention target: the
  MLP);
- `kept_rows(layer, call)`: fn(packed z [T, D], plan) -> the sub-layer's contribution on the kept rows (prefill,
  and the "paper" training rule), through the layer's paged K/V cache when it has one;
- `every_token(layer, call, z, plan)`: its contribution on every row, attention seeing the kept earlier tokens
  and itself (the "every_token" training rule);
- `decode(layer, call, z, keep, rows, project)`: its contribution on a decode step's rows;
- `paged_kv`: whether its layer's cache entry is a paged `RoutedKVLayer`;
- `kv`: the K/V rule (kv_rules.py) the attention and block targets hold ("kept" or "all"); the MLP target's
  attention runs for every token ("kept" by convention: nothing is skipped there);
- `writes_skipped`, `training_rules`: the rule's (a decode step runs with no kept row; the training forwards);
- `observed(layer)` / `stream_after(x, out)`: the modules whose input and output show, in the dense model, the
  residual stream before and after the target (for the training-free drops and router fitting: observe.py).
"""

from __future__ import annotations

import torch
from torch import nn

from mindskip_kernels.attention import Attend
from mindskip_kernels.integrations.hf.kv_rules import KV_RULES, KVRule
from mindskip_kernels.integrations.hf.layer_call import LayerCall, Project, decode_rows
from mindskip_kernels.routing import RoutingPlan, gather


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
    kv: str = "kept"
    writes_skipped: bool = False
    training_rules: tuple[str, ...] = ("every_token", "paper")

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
    """MindSkip: the attention sub-layer runs for the kept tokens under a K/V rule (`kv_rules`: RoPE at the
    original positions; with a cache, through the layer's paged K/V); the MLP runs for every token."""

    name, paged_kv = "attention", True

    def __init__(self, rule: KVRule = KV_RULES["kept"]) -> None:
        self.rule = rule
        self.kv, self.writes_skipped, self.training_rules = rule.name, rule.writes_skipped, rule.training_rules

    def finish(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def kept_rows(self, layer: nn.Module, call: LayerCall) -> Attend:
        return self.rule.prefill(layer, call)

    def every_token(self, layer: nn.Module, call: LayerCall, z: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        return self.rule.training(layer, call, z, plan)

    def decode(self, layer: nn.Module, call: LayerCall, z: torch.Tensor, keep: torch.Tensor,
               rows: torch.Tensor | None, project: Project | None) -> torch.Tensor:
        return self.rule.decode(layer, call, z, keep, rows, project)


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


# (target, K/V rule) -> the routed sub-layer; the MLP target has no K/V rule of its own (its attention is dense)
SUBLAYERS: dict[tuple[str, str], RoutedSublayer] = {("mlp", "kept"): MLPSublayer()} | {
    (cls.name, kv): cls(rule) for cls in (AttentionSublayer, BlockSublayer) for kv, rule in KV_RULES.items()}
