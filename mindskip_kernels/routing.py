"""Routing: which tokens run attention (`route` -> `RoutingPlan`), and moving rows in and out of the packed
layout of kept tokens (`gather`, `scatter_add`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mindskip_kernels import _checks as check
from mindskip_kernels.backends import needs_grad, resolve


@dataclass(frozen=True)
class RoutingPlan:
    """The routing decision for a batch [B, N] and its compacted form.

    scores:     [B, N] float32 sigmoid router scores ("sequence": the sequence's score on each token)
    keep:       [B, N] bool, True where attention runs (padding is never kept)
    indices:    [T] int64 flat index b*N+n of each kept token, ascending
    cu_seqlens: [B+1] int32 prefix sum of kept tokens per sequence
    positions:  [T] int64 original position id of each kept token (for RoPE)
    max_seqlen: int, an upper bound on kept tokens per sequence (exact on CPU, N on accelerators, so
                that no device sync is needed)
    """

    scores: torch.Tensor
    keep: torch.Tensor
    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    max_seqlen: int

    @property
    def batch_size(self) -> int:
        return self.keep.shape[0]

    @property
    def seq_len(self) -> int:
        return self.keep.shape[1]

    @property
    def num_kept(self) -> int:
        """T, the number of kept tokens (known from the shape: no sync)."""
        return self.indices.shape[0]

    @classmethod
    def from_keep(cls, keep: torch.Tensor, position_ids: torch.Tensor | None = None, *,
                  scores: torch.Tensor | None = None, backend: str = "auto") -> RoutingPlan:
        """A plan for decisions already known (e.g. a sequence's prefill decision reused later, or a test's
        chosen pattern): keep [B, N] bool, position_ids as in `route`, scores [B, N] (default: keep as 0/1).
        Compacts like `route` (`compact`: one host read of T on accelerators)."""
        check.tensor("keep", keep, ndim=2, dtypes=(torch.bool,))
        device = check.same_device(keep=keep, position_ids=position_ids, scores=scores)
        batch, seq_len = keep.shape
        positions = _position_ids(position_ids, batch, seq_len, device)
        if scores is None:
            scores = keep.float()
        else:
            check.tensor("scores", scores, ndim=2, dtypes=check.FLOAT_DTYPES)
            check.shape_match("scores", scores, (batch, seq_len), "[B, N] like keep")
        indices, cu_seqlens, kept_positions, max_seqlen = compact(keep, positions, backend=backend)
        return cls(scores.float(), keep, indices, cu_seqlens, kept_positions, max_seqlen)

    def skipped(self, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, *,
                backend: str = "auto") -> RoutingPlan:
        """The plan of the real tokens this plan does not keep (where a skipped token's adapter runs), compacted
        like `from_keep`; attention_mask / position_ids as in `route`."""
        real = _padding_mask(attention_mask, self.batch_size, self.seq_len, self.keep.device)
        return RoutingPlan.from_keep(~self.keep & real, position_ids, scores=self.scores, backend=backend)

    @classmethod
    def all_tokens(cls, batch: int, seq_len: int, position_ids: torch.Tensor | None = None, *,
                   device: torch.device | str = "cpu") -> RoutingPlan:
        """The plan that keeps every token of a [B, N] batch with no padding, from the shape alone: the same
        plan `from_keep` gives for an all-True keep, without compaction or a host read."""
        device = torch.device(device)
        positions = _position_ids(position_ids, batch, seq_len, device)
        keep = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        cu_seqlens = torch.arange(batch + 1, dtype=torch.int32, device=device) * seq_len
        return cls(keep.float(), keep, torch.arange(batch * seq_len, device=device), cu_seqlens,
                   positions.reshape(-1), seq_len)


def _padding_mask(attention_mask: torch.Tensor | None, batch: int, seq_len: int,
                  device: torch.device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    check.tensor("attention_mask", attention_mask, ndim=2)
    check.shape_match("attention_mask", attention_mask, (batch, seq_len), "[B, N] of z, 1 = real, 0 = pad")
    return attention_mask != 0


def _position_ids(position_ids: torch.Tensor | None, batch: int, seq_len: int,
                  device: torch.device) -> torch.Tensor:
    if position_ids is None:
        return torch.arange(seq_len, device=device).expand(batch, seq_len)
    check.tensor("position_ids", position_ids, ndim=(1, 2), dtypes=check.INDEX_DTYPES)
    if position_ids.shape[-1] != seq_len or (position_ids.dim() == 2 and position_ids.shape[0] not in (1, batch)):
        raise ValueError(f"position_ids must have shape [{batch}, {seq_len}], [1, {seq_len}] or [{seq_len}], "
                         f"got {tuple(position_ids.shape)}")
    return position_ids.reshape(position_ids.shape[0] if position_ids.dim() == 2 else 1, seq_len).expand(batch, seq_len)


def score(z: torch.Tensor, router_weight: torch.Tensor, *, threshold: float = 0.5, granularity: str = "token",
          attention_mask: torch.Tensor | None = None, norm: tuple[torch.Tensor, float] | None = None,
          force_keep: torch.Tensor | None = None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The router's decision without compaction: (scores [B, N] fp32, keep [B, N] bool), arguments as in
    `route`. Fixed shapes and no host read, so a decode step can use it inside a CUDA graph."""
    check.tensor("z", z, ndim=3, dtypes=check.FLOAT_DTYPES)
    check.tensor("router_weight", router_weight, ndim=(1, 2), dtypes=check.FLOAT_DTYPES)
    if router_weight.numel() != z.shape[-1] or (router_weight.dim() == 2 and router_weight.shape[0] != 1):
        raise ValueError(f"router_weight must have shape [1, {z.shape[-1]}] or [{z.shape[-1]}] "
                         f"(hidden size of z), got {tuple(router_weight.shape)}")
    threshold = check.threshold(threshold)
    granularity = check.granularity(granularity)
    device = check.same_device(z=z, router_weight=router_weight, attention_mask=attention_mask,
                               force_keep=force_keep)
    batch, seq_len, _ = z.shape
    mask = _padding_mask(attention_mask, batch, seq_len, device)
    if norm is None:
        grad = needs_grad(z, router_weight)
        op = resolve(backend, "router", device, z.dtype, grad, empty=z.numel() == 0)
        scores, keep = op.router(z, router_weight, mask, threshold, granularity)
    else:
        gamma, eps = check.norm(norm, z)
        check.same_device(z=z, **{"norm weight": gamma})
        grad = needs_grad(z, router_weight, gamma)
        op = resolve(backend, "router_from_hidden", device, z.dtype, grad, empty=z.numel() == 0)
        scores, keep = op.router_from_hidden(z, gamma, eps, router_weight, mask, threshold, granularity)
    if force_keep is not None:
        check.tensor("force_keep", force_keep, ndim=2, dtypes=(torch.bool,))
        check.shape_match("force_keep", force_keep, (batch, seq_len), "[B, N] of z")
        keep = keep | (force_keep & mask)
    return scores, keep


def compact(keep: torch.Tensor, positions: torch.Tensor, *, backend: str = "auto"
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The packed form of keep [B, N] bool with positions [B, N]: (indices [T], cu_seqlens [B+1], kept
    positions [T], max_seqlen). One host read of T on accelerators; max_seqlen is exact on the CPU (there is no
    device to wait for, and the exact bound keeps padded work small), N elsewhere (no sync)."""
    check.tensor("keep", keep, ndim=2, dtypes=(torch.bool,))
    check.tensor("positions", positions, ndim=2, dtypes=check.INDEX_DTYPES)
    check.shape_match("positions", positions, tuple(keep.shape), "[B, N] like keep")
    check.same_device(keep=keep, positions=positions)
    indices, cu_seqlens, kept_positions = resolve(backend, "compact", keep.device, torch.float32).compact(keep,
                                                                                                           positions)
    exact = keep.device.type == "cpu" and keep.shape[0] > 0
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if exact else keep.shape[1]
    return indices, cu_seqlens, kept_positions, max_seqlen


def route(z: torch.Tensor, router_weight: torch.Tensor, *, threshold: float = 0.5, granularity: str = "token",
          attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
          norm: tuple[torch.Tensor, float] | None = None, force_keep: torch.Tensor | None = None,
          backend: str = "auto") -> RoutingPlan:
    """Score each token (or sequence) with `sigmoid(z @ w)` in fp32, keep it iff score >= threshold, and
    compact the kept tokens.

    z: [B, N, D] normalized hidden states (the input of attention); router_weight: [1, D] or [D];
    attention_mask: [B, N], nonzero = real token (padding is never kept and is excluded from the
    sequence mean); position_ids: [B, N] / [1, N] / [N] original positions (default 0..N-1).
    norm: (weight [D], eps) of an RMSNorm; then z is the un-normalized hidden state and the router reads
    RMSNorm(z) (op "router_from_hidden": one pass over z, the normalized rows are never written).
    force_keep: [B, N] bool, tokens kept whatever their score (e.g. attention sinks; padding still never kept).
    """
    scores, keep = score(z, router_weight, threshold=threshold, granularity=granularity,
                         attention_mask=attention_mask, norm=norm, force_keep=force_keep, backend=backend)
    check.same_device(z=z, position_ids=position_ids)
    positions = _position_ids(position_ids, z.shape[0], z.shape[1], z.device)
    indices, cu_seqlens, kept_positions, max_seqlen = compact(keep, positions, backend=backend)
    return RoutingPlan(scores.float(), keep, indices, cu_seqlens, kept_positions, max_seqlen)


def _check_rows(name: str, x: torch.Tensor, plan: RoutingPlan) -> None:
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a RoutingPlan (from mindskip_kernels.route), got {type(plan).__name__}")
    check.tensor(name, x, ndim=3, dtypes=check.FLOAT_DTYPES)
    if tuple(x.shape[:2]) != tuple(plan.keep.shape):
        raise ValueError(f"{name} must have shape [B, N, D] with [B, N] = {tuple(plan.keep.shape)} "
                         f"(the routed batch), got {tuple(x.shape)}")
    check.same_device(**{name: x, "plan.indices": plan.indices})


def gather(x: torch.Tensor, plan: RoutingPlan, *, norm: tuple[torch.Tensor, float] | None = None,
           backend: str = "auto") -> torch.Tensor:
    """Packed kept rows [T, D]: `x.view(B*N, D)[plan.indices]`; with `norm` = (weight [D], eps) of an RMSNorm,
    those rows normalized (op "gather_norm": only kept rows are normalized, fused with the copy)."""
    _check_rows("x", x, plan)
    rows = x.reshape(plan.batch_size * plan.seq_len, x.shape[-1])
    if norm is None:
        op = resolve(backend, "gather", x.device, x.dtype, needs_grad(x), empty=x.numel() == 0)
        return op.gather(rows, plan.indices)
    gamma, eps = check.norm(norm, x)
    check.same_device(x=x, **{"norm weight": gamma})
    op = resolve(backend, "gather_norm", x.device, x.dtype, needs_grad(x, gamma), empty=x.numel() == 0)
    return op.gather_norm(rows, gamma, eps, plan.indices)


def scatter_add(residual: torch.Tensor, values: torch.Tensor, plan: RoutingPlan,
                scale: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """A copy of `residual` [B, N, D] with `scale * values` [T, D] added to the kept rows.

    Skipped rows are bit-identical to `residual`. `scale` [T] (e.g. the straight-through gate) or None.
    """
    _check_rows("residual", residual, plan)
    check.tensor("values", values, ndim=2)
    check.shape_match("values", values, (plan.num_kept, residual.shape[-1]), "[T kept tokens, D]")
    if values.dtype != residual.dtype:
        raise TypeError(f"values must have the dtype of residual ({residual.dtype}), got {values.dtype}")
    if scale is not None:
        check.tensor("scale", scale, ndim=1, dtypes=check.FLOAT_DTYPES)
        check.shape_match("scale", scale, (plan.num_kept,), "one gate per kept token")
    check.same_device(residual=residual, values=values, scale=scale)
    op = resolve(backend, "scatter_add", residual.device, residual.dtype, needs_grad(residual, values, scale),
                 empty=residual.numel() == 0)
    rows = residual.reshape(plan.batch_size * plan.seq_len, residual.shape[-1])
    out = op.scatter_add(rows, values, plan.indices, scale)
    return out.view_as(residual)
