"""The MindSkip attention sub-layer: route, gather the kept tokens, attend among them at their original
positions, scatter the result back into the residual. `routed_update` is the one place this happens; the
drop-in module, the functional form and the Hugging Face integration all call it."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mindskip_kernels import _checks as check
from mindskip_kernels.backends import needs_grad
from mindskip_kernels.ops import varlen_attention
from mindskip_kernels.routing import RoutingPlan, gather, route, scatter_add
from mindskip_kernels.rowwise import rms_norm

Attend = Callable[[torch.Tensor, RoutingPlan], torch.Tensor]


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary cos/sin [T, head_dim] at the given positions (the half-split layout of Llama)."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float().unsqueeze(1) * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rope_head_dim(head_dim: object) -> int:
    """RoPE rotates pairs of channels: the head dim must be a positive even int."""
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int (RoPE rotates channel pairs), got {head_dim!r}")
    return head_dim


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, Dh] by cos/sin [T, Dh]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     plan: RoutingPlan, softmax_scale: float | None, backend: str) -> torch.Tensor:
    """RoPE at the kept tokens' original positions, then causal attention among each sequence's kept tokens.
    q [T, Hq, Dh], k/v [T, Hkv, Dh], cos/sin [T, Dh]; returns [T, Hq * Dh]. (With a KV cache the caller
    attends through the cache instead: see integrations/hf/sublayers.py.)"""
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = varlen_attention(q, k, v, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen, plan.max_seqlen,
                           causal=True, softmax_scale=softmax_scale, backend=backend)
    return out.flatten(1)


def straight_through_gate(plan: RoutingPlan, attention_mask: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The hard decision as a gate [B, N] (value exactly 0 or 1) whose gradient passes straight through to
    the score (d gate / d score = 1), and the fraction of real tokens kept, carrying that gradient."""
    real = torch.ones_like(plan.keep) if attention_mask is None else attention_mask != 0
    gate = plan.keep.to(plan.scores.dtype) + (plan.scores - plan.scores.detach())
    return gate, (gate * real).sum() / real.sum().clamp_min(1)


def routed_update(z: torch.Tensor, router_weight: torch.Tensor, attend: Attend, *,
                  residual: torch.Tensor | None = None, threshold: float = 0.5, granularity: str = "token",
                  attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                  norm: tuple[torch.Tensor, float] | None = None, force_keep: torch.Tensor | None = None,
                  plan: RoutingPlan | None = None, training: bool = False,
                  adapter: Callable[[torch.Tensor], torch.Tensor] | None = None, backend: str = "auto"
                  ) -> tuple[torch.Tensor, RoutingPlan, torch.Tensor | None]:
    """One MindSkip sub-layer on normalized states z [B, N, D].

    With `norm` = (weight, eps) of the sub-layer's RMSNorm, z is the un-normalized hidden state x and the
    sub-layer reads RMSNorm(x) (transformers' numerics). In inference that is fused: one pass over x computes
    the norm statistics and the router scores ("router_from_hidden"), and only the kept rows are normalized,
    as they are packed ("gather_norm"). Training (or grad through x) normalizes every row first.

    `force_keep` [B, N] bool: tokens kept whatever their score (see `route`). `plan`: a decision already made
    (e.g. a sequence's stored prefill decision, `RoutingPlan.from_keep`) instead of the router's.
    `attend(packed_z [T, D], plan) -> [T, D]` computes attention for the kept tokens. `adapter(packed_z [S, D])
    -> [S, D]`: the update of the S skipped real tokens (adapter.SkipAdapter), gathered (and normalized) like the
    kept rows and scattered with the complement plan; None leaves them unchanged. Returns (out, plan, keep_rate):
    out = residual (or zeros) with the kept rows += attention (and the skipped ones += adapter). With `training`,
    the hard decision carries the straight-through gradient (forward value exactly 1 on kept rows, d/dscore = 1;
    the adapter's rows are scaled by 1 - gate) and keep_rate is the fraction of real tokens kept, as a tensor
    through which a sparsity loss reaches the router; in inference keep_rate is None (no extra work on the hot
    path: derive it from plan.keep).
    """
    if norm is not None:
        norm = check.norm(norm, z)
        if training or needs_grad(z, router_weight, norm[0]):  # every row normalized, then the unfused path
            z, norm = rms_norm(z, *norm), None  # the reference: kernels fuse the norm instead
    if plan is None:
        plan = route(z, router_weight, threshold=threshold, granularity=granularity,
                     attention_mask=attention_mask, position_ids=position_ids, norm=norm, force_keep=force_keep,
                     backend=backend)
    base = torch.zeros_like(z) if residual is None else residual
    if residual is not None:
        check.shape_match("residual", residual, tuple(z.shape), "the shape of hidden_states")
    gate, keep_rate = straight_through_gate(plan, attention_mask) if training else (None, None)
    if adapter is not None:
        rest = plan.skipped(attention_mask, position_ids, backend=backend)
        if rest.num_kept:
            scale = None if gate is None else (1 - gate).reshape(-1).index_select(0, rest.indices)
            update = adapter(gather(z, rest, norm=norm, backend=backend)).to(base.dtype)
            base = scatter_add(base, update, rest, scale, backend=backend)
    if plan.num_kept == 0:  # nothing to attend (common in decode): skip the gather/attend/scatter launches
        return base if base is not residual else base.clone(), plan, keep_rate
    values = attend(gather(z, plan, norm=norm, backend=backend), plan)
    scale = None if gate is None else gate.reshape(-1).index_select(0, plan.indices)
    out = scatter_add(base, values.to(base.dtype), plan, scale, backend=backend)
    return out, plan, keep_rate


def mindskip_attention(hidden_states: torch.Tensor, router_weight: torch.Tensor, q_weight: torch.Tensor,
                       k_weight: torch.Tensor, v_weight: torch.Tensor, o_weight: torch.Tensor, *,
                       num_heads: int, num_kv_heads: int, residual: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                       biases: tuple[torch.Tensor | None, ...] = (None, None, None, None),
                       threshold: float = 0.5, granularity: str = "token", rope_theta: float = 10000.0,
                       softmax_scale: float | None = None, training: bool = False, backend: str = "auto"
                       ) -> torch.Tensor:
    """Functional MindSkip self-attention (Llama-style: q/k/v/o projections, GQA, RoPE, causal).

    hidden_states [B, N, D] is the attention input (already normalized); the router reads it. Returns the
    attention output with exact zeros on skipped rows or, with `residual`, residual + attention on kept
    rows (skipped rows bit-identical).
    """
    check.tensor("hidden_states", hidden_states, ndim=3, dtypes=check.FLOAT_DTYPES)
    check.positive_int("num_heads", num_heads)
    check.positive_int("num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
    check.tensor("q_weight", q_weight, ndim=2, dtypes=check.FLOAT_DTYPES)
    if q_weight.shape[0] % num_heads:
        raise ValueError(f"q_weight rows ({q_weight.shape[0]}) must be num_heads ({num_heads}) x head_dim")
    head_dim = _rope_head_dim(q_weight.shape[0] // num_heads)
    hidden, inner, kv = hidden_states.shape[-1], num_heads * head_dim, num_kv_heads * head_dim
    for name, w, shape in (("q_weight", q_weight, (inner, hidden)), ("k_weight", k_weight, (kv, hidden)),
                           ("v_weight", v_weight, (kv, hidden)), ("o_weight", o_weight, (hidden, inner))):
        check.tensor(name, w, ndim=2, dtypes=check.FLOAT_DTYPES)
        check.shape_match(name, w, shape, f"{num_heads} query / {num_kv_heads} key-value heads of dim {head_dim}, "
                                          f"hidden size {hidden}")
    qb, kb, vb, ob = biases

    def attend(zp: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        q = F.linear(zp, q_weight, qb).view(-1, num_heads, head_dim)
        k = F.linear(zp, k_weight, kb).view(-1, num_kv_heads, head_dim)
        v = F.linear(zp, v_weight, vb).view(-1, num_kv_heads, head_dim)
        cos, sin = rope_cos_sin(plan.positions, head_dim, rope_theta, q.dtype)
        return F.linear(packed_attention(q, k, v, cos, sin, plan, softmax_scale, backend), o_weight, ob)

    out, _, _ = routed_update(hidden_states, router_weight, attend, residual=residual, threshold=threshold,
                              granularity=granularity, attention_mask=attention_mask,
                              position_ids=position_ids, training=training, backend=backend)
    return out


class MindSkipAttention(nn.Module):
    """Drop-in causal self-attention with a MindSkip router (Llama-style projections, GQA, RoPE).

    The router is `nn.Linear(hidden_size, 1, bias=False)`, zero-initialised (score 0.5 = default threshold,
    so everything is kept until it is trained). `forward(hidden_states, residual=None, position_ids=None,
    attention_mask=None)`: see `mindskip_attention`.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, *, bias: bool = False, rope_theta: float = 10000.0,
                 threshold: float = 0.5, granularity: str = "token", backend: str = "auto") -> None:
        super().__init__()
        check.positive_int("hidden_size", hidden_size)
        self.num_heads = check.positive_int("num_heads", num_heads)
        self.num_kv_heads = num_heads if num_kv_heads is None else check.positive_int("num_kv_heads", num_kv_heads)
        if head_dim is None and hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads}), or give "
                             f"head_dim")
        self.head_dim = _rope_head_dim(hidden_size // num_heads if head_dim is None else head_dim)
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        self.threshold = check.threshold(threshold)
        self.granularity = check.granularity(granularity)
        self.rope_theta = rope_theta
        self.backend = check.backend(backend)
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=bias)
        self.router = nn.Linear(hidden_size, 1, bias=False)
        nn.init.zeros_(self.router.weight)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        projs = (self.q_proj, self.k_proj, self.v_proj, self.o_proj)
        return mindskip_attention(
            hidden_states, self.router.weight, *(p.weight for p in projs), num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, residual=residual, position_ids=position_ids,
            attention_mask=attention_mask, biases=tuple(p.bias for p in projs), threshold=self.threshold,
            granularity=self.granularity, rope_theta=self.rope_theta, training=self.training,
            backend=self.backend)
