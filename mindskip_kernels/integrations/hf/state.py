"""What a patched model carries: per-model state (the batch's padding mask, open `record_routing` contexts),
per-layer settings, and what `record_routing` collects."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mindskip_kernels.integrations.hf.sublayers import RoutedSublayer


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
    """Per-layer MindSkip settings (what a forward decided is collected by `record_routing`). `sublayer` is the
    routed target's object, chosen once by `apply_mindskip`; `target` and `kv` are its target and K/V rule."""

    layer_idx: int
    threshold: float
    granularity: str
    backend: str
    model_state: ModelState
    sublayer: RoutedSublayer
    rule: str = "every_token"  # the training forward (RULES); inference is the same for every rule
    sink_tokens: int = 0  # token granularity: the first n real tokens of a sequence are always kept
    fuse_norm: bool = True  # inference: the router's RMSNorm fused into the router and the gather
    # decode on the CPU: compact the kept rows on the host (free there: a skipped row costs no projection);
    # False runs the fixed-shape device path accelerators run (what CUDA graphs capture), e.g. to test it
    host_compact: bool = True

    @property
    def target(self) -> str:
        return self.sublayer.name

    @property
    def kv(self) -> str:
        return self.sublayer.kv

    def record(self, scores: torch.Tensor | None, keep: torch.Tensor, real: torch.Tensor | None,
               keep_rate: torch.Tensor | None) -> None:
        """Hand one forward's decision to the open `record_routing` contexts."""
        if not self.model_state.records:
            return
        entry = RoutingEntry(self.layer_idx, scores, keep, torch.ones_like(keep) if real is None else real,
                             keep_rate)
        for record in self.model_state.records:
            record.entries.append(entry)
