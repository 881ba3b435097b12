"""The oracle router of benchmarks/quality.py: an unrealisable ceiling for routers under each K/V rule.

At every routed layer it computes the dense attention of the layer's current stream for every token and keeps
the tokens whose update is large, `log ||Attn(LN1 x)_t|| - log ||x_t|| >= threshold` (one global threshold
across the routed layers, calibrated like `mindskip_kernels.tuning.calibrate`; the first `sink_tokens` of each
block always kept). No router can do this (it needs the attention it would skip), so the rows show how far
trained routers are from the best a token-level decision can do. Built from forward hooks on the plain
transformers model (no MindSkip code on its path): kv="all" zeroes the skipped tokens' attention output (their
K/V stay); kv="kept" recomputes the attention with the skipped tokens masked out as keys, then zeroes them.
Inputs are unpadded blocks (as quality.py feeds them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from mindskip_kernels.data import Item, collate


class Oracle:
    """Hooks that route the given layers' attention by the oracle signal (see the module docstring)."""

    def __init__(self, model: nn.Module, layers: list[int], kv: str, sink_tokens: int = 1) -> None:
        if kv not in ("kept", "all"):
            raise ValueError(f"kv must be 'kept' or 'all', got {kv!r}")
        self.model, self.layers, self.kv, self.sink_tokens = model, layers, kv, sink_tokens
        self.threshold = 0.0
        self.kept = self.total = 0
        self.scores: list[torch.Tensor] = []

    def _attention_hook(self, stream: dict):
        def hook(attn: nn.Module, args, kwargs, output):
            out = output[0]
            x = stream.pop("x")
            score = (out.float().norm(dim=-1).clamp_min(1e-30).log() - x.float().norm(dim=-1).clamp_min(1e-30).log())
            keep = score >= self.threshold
            keep[:, : self.sink_tokens] = True
            self.scores.append(score.flatten())
            self.kept += int(keep.sum())
            self.total += keep.numel()
            if self.kv == "kept":  # attention among the kept tokens: skipped ones are no one's key
                n = keep.shape[1]
                eye = torch.eye(n, dtype=torch.bool, device=keep.device)
                mask = (torch.ones_like(eye).tril() & keep[:, None, None, :]) | eye
                out = attn.forward(**{**kwargs, "attention_mask": mask})[0]
            return (out * keep.unsqueeze(-1).to(out.dtype), *output[1:])

        return hook

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        layers = self.model.model.layers
        handles = []
        try:
            for i in self.layers:
                stream: dict = {}
                handles.append(layers[i].register_forward_pre_hook(
                    lambda m, args, kwargs, s=stream: s.__setitem__("x", kwargs.get("hidden_states", args[0]
                                                                                     if args else None)),
                    with_kwargs=True))
                handles.append(layers[i].self_attn.register_forward_hook(self._attention_hook(stream),
                                                                         with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def calibrate(self, items: list[Item], keep: float, batch_size: int = 4, iterations: int = 10,
                  tolerance: float = 0.005) -> float:
        """Set the threshold so that the routed layers keep the fraction `keep` of tokens on `items` (the
        quantile of the scores seen, inside a shrinking bracket: later layers' scores move with earlier
        decisions); returns the keep rate achieved."""
        lo, hi = float("-inf"), float("inf")
        achieved = 1.0
        for _ in range(iterations):
            self.kept = self.total = 0
            self.scores = []
            with self.active():
                for start in range(0, len(items), batch_size):
                    batch = collate(items[start: start + batch_size])
                    self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                               logits_to_keep=1)
            achieved = self.kept / max(self.total, 1)
            if abs(achieved - keep) <= tolerance:
                break
            if achieved > keep:
                lo = self.threshold
            else:
                hi = self.threshold
            proposal = float(torch.quantile(torch.cat(self.scores)[: 2**24], 1.0 - keep))
            bracketed = lo < proposal < hi or float("inf") in (-lo, hi)
            self.threshold = proposal if bracketed else (lo + hi) / 2
        return achieved
