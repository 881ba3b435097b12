"""The K/V rules of a routed attention (design.md s.1): what a skipped token still computes, and so what the kept
tokens' queries see. One object per rule, held by the attention and block targets (sublayers.py), each with:
- `prefill(layer, call)`: fn(packed kept z [T, D], plan) -> the kept rows' attention output after o_proj
  (through the layer's paged K/V when `call.kv` is set: prefill with a cache, chunked prefill);
- `training(layer, call, z, plan)`: the attention output of every row (the "every_token" training forward);
- `decode(layer, call, z, keep, rows, project)`: a decode step's attention output on its rows;
- `writes_skipped`: whether a skipped token still writes K/V (then a decode step with no kept row still runs);
- `training_rules`: the training forwards (forward.RULES) the rule has.

`KeptKV` ("kept", the paper's MindSkip): a skipped token computes nothing, writes no K/V; the kept tokens attend
among themselves. `AllKV` ("all": skip the query, keep the keys): every real token computes and stores K/V, a
kept token's query attends to every earlier real token and itself; a skipped token computes no query, attention
or o_proj. So `h = x + s * DenseAttn(LN1 x)` and the training forward is the inference forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mindskip_kernels.attention import Attend, apply_rope, packed_attention
from mindskip_kernels.integrations.hf.layer_call import (
    LayerCall,
    Project,
    decode_rows,
    keys_values,
    qkv,
    queries,
    rope_rows,
    token_rope,
)
from mindskip_kernels.ops import keep_masked_attention, varlen_attention
from mindskip_kernels.routing import RoutingPlan, gather


def _o_proj(attn: nn.Module, attended: torch.Tensor, project: Project | None) -> torch.Tensor:
    return attn.o_proj(attended) if project is None else project(attn.o_proj, attended)


def _decode_rope(call: LayerCall, head_dim: int, dtype: torch.dtype, rows: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of a decode step's rows [R or 1, Dh] (every row, or the compacted ones)."""
    cos, sin = rope_rows(call.position_embeddings, None, head_dim, dtype)
    if rows is not None and cos.shape[0] > 1:
        cos, sin = cos.index_select(0, rows), sin.index_select(0, rows)
    return cos, sin


class KVRule:
    """The interface (see the module docstring); subclasses are the rules."""

    name: str
    writes_skipped: bool
    training_rules: tuple[str, ...]

    def prefill(self, layer: nn.Module, call: LayerCall) -> Attend:
        raise NotImplementedError

    def training(self, layer: nn.Module, call: LayerCall, z: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, layer: nn.Module, call: LayerCall, z: torch.Tensor, keep: torch.Tensor,
               rows: torch.Tensor | None, project: Project | None) -> torch.Tensor:
        raise NotImplementedError


class KeptKV(KVRule):
    """The paper's rule: kept tokens attend among themselves (RoPE at their original positions); a skipped token
    writes no K/V, in prefill or in the cache."""

    name, writes_skipped, training_rules = "kept", False, ("every_token", "paper")

    def prefill(self, layer: nn.Module, call: LayerCall) -> Attend:
        attn = layer.self_attn

        def attend(zp: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
            q, k, v = qkv(attn, zp)
            cos, sin = token_rope(call.position_embeddings, plan.indices, plan.seq_len, attn.head_dim, q.dtype)
            if call.kv is None:
                return attn.o_proj(packed_attention(q, k, v, cos, sin, plan, attn.scaling, call.backend))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            return attn.o_proj(call.kv.attend_prefill(q, k, v, plan, attn.scaling, call.backend).flatten(1))

        return attend

    def training(self, layer: nn.Module, call: LayerCall, z: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """Every token's query sees the kept earlier tokens and itself (a kept token: what inference shows it)."""
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
        cos, sin = _decode_rope(call, attn.head_dim, q.dtype, rows)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attended = call.kv.attend_decode(q, k, v, keep, attn.scaling, call.backend, rows).flatten(1)
        return _o_proj(attn, attended, project).to(call.x.dtype)


def _dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
    """Causal attention of every token over the earlier real tokens and itself (SDPA; q [B, Hq, N, Dh], k/v
    [B, Hkv, N, Dh]): the dense model's attention."""
    mask = None
    if real is not None:
        n = q.shape[2]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        mask = (causal & real[:, None, None, :]) | torch.eye(n, dtype=torch.bool, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


class AllKV(KVRule):
    """Skip the query, keep the keys: every real token writes K/V; a kept token attends to all earlier real
    tokens of its sequence and itself."""

    name, writes_skipped, training_rules = "all", True, ("every_token",)

    def prefill(self, layer: nn.Module, call: LayerCall) -> Attend:
        """Every real token's K/V first (stored in the layer's cache when there is one, even if no token is
        kept), then fn(zp, plan): the kept queries over their sequences' keys up to their own position."""
        attn = layer.self_attn
        batch, seq_len = call.x.shape[:2]
        if call.real is None:  # every token real: the plan from the shape, no compaction
            keys = RoutingPlan.all_tokens(batch, seq_len, call.position_ids, device=call.x.device)
            rank = torch.arange(seq_len, device=call.x.device).repeat(batch)
        else:
            keys = RoutingPlan.from_keep(call.real, call.position_ids, backend=call.backend)  # every real token
            rank = call.real.long().cumsum(1).flatten() - 1  # a token's key row: its rank among its real tokens
        z = layer.input_layernorm(call.x)
        k, v = keys_values(attn, z.flatten(0, 1) if call.real is None else gather(z, keys, backend=call.backend))
        k = apply_rope(k, *token_rope(call.position_embeddings, keys.indices, seq_len, attn.head_dim, k.dtype))
        before = None if call.kv is None else call.kv.append(k, v, keys)

        def attend(zp: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
            q = queries(attn, zp)
            q = apply_rope(q, *token_rope(call.position_embeddings, plan.indices, seq_len, attn.head_dim, q.dtype))
            limit = rank.index_select(0, plan.indices)
            if before is None:
                out = varlen_attention(q, k, v, plan.cu_seqlens, keys.cu_seqlens, plan.max_seqlen, keys.max_seqlen,
                                       softmax_scale=attn.scaling, query_positions=limit, backend=call.backend)
            else:  # rows of the whole cached sequence: after what was cached before this chunk
                limit = limit + before.index_select(0, plan.indices // seq_len)
                out = call.kv.attend(q, plan, attn.scaling, call.backend, query_positions=limit)
            return attn.o_proj(out.flatten(1))

        return attend

    def training(self, layer: nn.Module, call: LayerCall, z: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """The dense model's attention for every token (the gate then keeps or drops each row's update)."""
        attn = layer.self_attn
        q, k, v = qkv(attn, z)
        cos, sin = (c.to(q.dtype) for c in call.position_embeddings)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return attn.o_proj(_dense_causal(q, k, v, call.real, attn.scaling).transpose(1, 2).flatten(2))

    def decode(self, layer: nn.Module, call: LayerCall, z: torch.Tensor, keep: torch.Tensor,
               rows: torch.Tensor | None, project: Project | None) -> torch.Tensor:
        """Every real row appends its K/V (plain projections); the kept rows compute q (at batch 1 the
        predicated projection: no q/o weight read for a skipped row), attend over the whole cache, o_proj."""
        attn = layer.self_attn
        k, v = keys_values(attn, z[:, 0])
        q = queries(attn, decode_rows(z, rows), project)
        cos, sin = _decode_rope(call, attn.head_dim, q.dtype, None)
        k = apply_rope(k, cos, sin)
        q = apply_rope(q, *_decode_rope(call, attn.head_dim, q.dtype, rows))
        write = torch.ones_like(keep) if call.real is None else call.real[:, 0]
        attended = call.kv.attend_decode(q, k, v, keep, attn.scaling, call.backend, rows, write=write).flatten(1)
        return _o_proj(attn, attended, project).to(call.x.dtype)


KV_RULES: dict[str, KVRule] = {rule.name: rule for rule in (KeptKV(), AllKV())}
