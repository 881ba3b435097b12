"""Router fitting: routers in closed form from the dense model's own signal, no backward pass.

For each routed layer the dense model shows how much its target sub-layer changes each token:
u_t = ||y_t - x_t|| / ||x_t|| (x the residual stream before the sub-layer, y after it: for attention the
update Attn(LN1 x), for the MLP MLP(LN2 h), for the block the whole layer's). The router (the same
`Linear(D, 1, bias=False)`) is fit by least squares of log u on its input z (the target's RMSNorm output):
one D x D solve per layer. log u is one scale for every layer, so one global threshold then splits the keep
budget across layers the way the signal says; `calibrate` sets it. Token granularity fits the tokens the
router decides (not the `sink_tokens` first real tokens, which are always kept); sequence granularity fits the
sequence's mean z to the log of its mean u.

The statistics stream: per layer the Gram matrix sum z z^T, sum z log u, and the moments of log u, in fp64,
accumulated over batches (the data size is not bounded by memory) and all-reduced across processes under
`torchrun`, then solved once. The label forward is the dense model's own forward with hooks
(`integrations.hf.observe_sublayers`), whatever the architecture and dtype.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from mindskip_kernels import _checks as check
from mindskip_kernels.adapter import AdapterFit, AdapterStats, SkipAdapter
from mindskip_kernels.data import Data, as_items, collate
from mindskip_kernels.tuning import calibrate, distributed, router_tune

EPS = 1e-6  # floor of u before the log (a sub-layer that writes exactly nothing)
# How routers are set: "fit" (least squares, no backward), "tune" (Router-Tuning, the paper), "fit+tune" (fit,
# then FINE_TUNE_STEPS Router-Tuning steps from the fitted routers).
METHODS = ("fit+tune", "fit", "tune")
DEFAULT_METHOD = "fit+tune"
FINE_TUNE_STEPS = 20
CALIBRATION_ITEMS = 64  # training items the global threshold is calibrated on (docs/tuning.md: how many transfer)


@dataclass
class LayerFit:
    """One layer's least-squares fit: samples (tokens, or sequences for sequence granularity) and the R^2 of
    log u on the training data (None where only the adapter was fit), and the adapter's fit if it has one."""

    samples: int
    r2: float | None
    adapter: AdapterFit | None = None


@dataclass
class FitResult:
    """What `fit_routers` did: a LayerFit per routed layer and the seconds it took (label pass + solve); with
    `return_stats`, each adapter's statistics (`AdapterStats.solve` then fits adapters of any kind and rank from
    the same label pass)."""

    layers: dict[int, LayerFit]
    seconds: float
    adapter_stats: dict[int, AdapterStats] | None = None


class LeastSquares:
    """Streaming least-squares statistics of one layer, fp64: G = sum z z^T, b = sum z y, and sum y, sum y^2."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.zy = torch.zeros(dim, dtype=torch.float64, device=device)
        self.y = torch.zeros(3, dtype=torch.float64, device=device)  # count, sum y, sum y^2

    def add(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """Samples z [S, D] with labels y [S]."""
        z, y = z.double(), y.double()
        self.gram += z.T @ z
        self.zy += z.T @ y
        self.y += torch.stack([y.new_tensor(float(y.numel())), y.sum(), y.square().sum()])

    def all_reduce(self) -> None:
        for t in (self.gram, self.zy, self.y):
            torch.distributed.all_reduce(t)

    def solve(self, ridge: float) -> tuple[torch.Tensor, LayerFit]:
        """w minimising ||Z w - y||^2 + ridge * mean(diag G) * ||w||^2, and the fit's R^2."""
        count, total, squares = self.y.tolist()
        if count < 1:
            raise ValueError("no real tokens reached a routed layer: give data with text in it")
        scale = float(self.gram.diagonal().mean()) or 1.0
        eye = torch.eye(self.gram.shape[0], dtype=torch.float64, device=self.gram.device)
        w = torch.linalg.solve(self.gram + ridge * scale * eye, self.zy)
        residual = squares - 2 * float(w @ self.zy) + float(w @ self.gram @ w)
        spread = squares - total * total / count
        return w, LayerFit(int(count), 1.0 - residual / spread if spread > 0 else 0.0)


def _labels(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """u = ||y - x|| / ||x|| per token [B, N], fp32."""
    x, y = x.float(), y.float()
    return (y - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)


def _check_fit_args(ridge: float, batch_size: int, max_length: int) -> None:
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _label_pass(model: nn.Module, items: list, targets: dict[int, str], observe, *, batch_size: int,
                progress: bool, desc: str) -> None:
    """The dense model's forward over this process's share of `items` with observe(i, x, y, real [B, N] bool)
    called for each layer in `targets` ({layer: target}; patched layers run their dense forward)."""
    from mindskip_kernels.integrations import hf

    rank, world = distributed()
    mine = items[rank::world]
    device = next(model.parameters()).device
    real: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    bar = tqdm(total=math.ceil(len(mine) / batch_size), desc=desc, disable=not (progress and rank == 0))
    try:
        with hf.dense_forward(model), hf.observe_sublayers(model, targets, lambda i, x, y: observe(i, x, y, real[0])):
            for first in range(0, len(mine), batch_size):
                batch = collate(mine[first : first + batch_size])
                real[:] = [batch["attention_mask"].to(device).bool()]
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      use_cache=False, logits_to_keep=1)
                bar.update()
    finally:
        bar.close()
        model.train(was_training)


@torch.no_grad()
def fit_routers(model: nn.Module, data: Data, tokenizer=None, *, batch_size: int = 4, max_length: int = 512,
                ridge: float = 1e-4, routers: bool = True, return_stats: bool = False,
                progress: bool = True) -> FitResult:
    """Fit the routers of a model patched by `apply_mindskip` to the dense model's signal (module docstring),
    in place, for every routed layer's target and granularity, and in the same label pass the skipped-token
    adapters of the layers that have one (`apply_mindskip(..., adapter=)`: least squares of the target's update
    y - x on z over the tokens the router decides; adapter.AdapterStats). Thresholds are untouched: `calibrate`
    next. data: as for `router_tune`. ridge: the L2 penalty relative to the mean diagonal of the Gram matrix (a
    tiny one keeps directions that the data never excites at zero). routers=False fits only the adapters (for
    routers that are then tuned from zero, or loaded). return_stats: keep the adapters' statistics in the result
    (2 D x D fp64 matrices per layer)."""
    from mindskip_kernels.integrations import hf

    _check_fit_args(ridge, batch_size, max_length)
    layers = hf.mindskip_layers(model)
    if not layers:
        raise ValueError("model has no MindSkip routers: call mindskip_kernels.apply_mindskip(model) first")
    adapters = {i: layer.skip_adapter for i, layer in layers.items() if hasattr(layer, "skip_adapter")}
    if not routers and not adapters:
        raise ValueError("routers=False fits only the skipped-token adapters, and no routed layer has one: "
                         "apply_mindskip(..., adapter='linear' or 'mean')")
    items = as_items(data, tokenizer, max_length)
    device = next(model.parameters()).device
    moments = {i: LeastSquares(layer.router.weight.shape[1], device) for i, layer in layers.items()}
    stats = {i: AdapterStats(layer.router.weight.shape[1], device) for i, layer in layers.items() if i in adapters}

    def observe(i: int, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> None:
        layer = layers[i]
        z = layer.mindskip.sublayer.router_norm(layer)(x).float()
        decided = mask  # attention sinks are kept whatever the router says: neither routed nor adapted
        if layer.mindskip.granularity == "token":
            decided = mask & (mask.long().cumsum(1) > layer.mindskip.sink_tokens)
        if i in stats:
            stats[i].add(z[decided], (y.float() - x.float())[decided])
        if not routers:
            return
        u = _labels(x, y)
        if layer.mindskip.granularity == "token":
            moments[i].add(z[decided], torch.log(u[decided].clamp_min(EPS)))
            return
        weight = mask.float().unsqueeze(-1)
        count = weight.sum(1).clamp_min(1)
        has_tokens = mask.any(1)
        z_mean, u_mean = (z * weight).sum(1) / count, (u * mask).sum(1) / count[:, 0]
        moments[i].add(z_mean[has_tokens], torch.log(u_mean[has_tokens].clamp_min(EPS)))

    start = time.perf_counter()
    what = "routers" + (" + adapters" if adapters else "") if routers else "adapters"
    _label_pass(model, items, {i: layer.mindskip.target for i, layer in layers.items()}, observe,
                batch_size=batch_size, progress=progress, desc=f"fit {what} (label pass)")
    _, world = distributed()
    fits = {}
    for i, layer in layers.items():
        adapter_fit = None
        if i in stats:
            if world > 1:
                stats[i].all_reduce()
            adapter_fit = stats[i].solve(adapters[i], ridge)
        if not routers:
            fits[i] = LayerFit(adapter_fit.samples, None, adapter_fit)
            continue
        if world > 1:
            moments[i].all_reduce()
        w, fits[i] = moments[i].solve(ridge)
        fits[i].adapter = adapter_fit
        layer.router.weight.copy_(w.to(layer.router.weight.dtype).unsqueeze(0))
    return FitResult(fits, time.perf_counter() - start, stats if return_stats else None)


@torch.no_grad()
def fit_replacement(model: nn.Module, data: Data, layers: list[int], tokenizer=None, *, target: str = "block",
                    adapter: str = "linear", adapter_rank: int | None = None, batch_size: int = 4,
                    max_length: int = 512, ridge: float = 1e-4, progress: bool = True) -> dict[int, SkipAdapter]:
    """Static linear replacement (ReplaceMe-style, the rival of routing with an adapter): for each of `layers`
    of an unpatched model, the map of `target`'s RMSNorm output to its update on every real token, fit on the
    dense model like `fit_routers`' adapters. `layer_drop.drop_sublayers(..., replacement=)` puts them in place
    of the dropped sub-layers."""
    from mindskip_kernels.integrations import hf
    from mindskip_kernels.integrations.hf.sublayers import SUBLAYERS

    _check_fit_args(ridge, batch_size, max_length)
    sublayer = SUBLAYERS[check.target(target), "kept"]  # the norm its router would read; no K/V rule involved
    all_layers = hf.base_model(model).layers
    layers = hf.choose_layers(len(all_layers), list(layers))
    if not layers:
        raise ValueError("layers is empty: give the decoder layers whose target to replace")
    ref = sublayer.router_norm(all_layers[layers[0]]).weight
    maps = {i: SkipAdapter(ref.shape[0], adapter, adapter_rank, device=ref.device, dtype=ref.dtype) for i in layers}
    stats = {i: AdapterStats(ref.shape[0], ref.device) for i in layers}

    def observe(i: int, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> None:
        z = sublayer.router_norm(all_layers[i])(x).float()
        stats[i].add(z[mask], (y.float() - x.float())[mask])

    items = as_items(data, tokenizer, max_length)
    _label_pass(model, items, dict.fromkeys(layers, target), observe, batch_size=batch_size, progress=progress,
                desc="fit replacements (label pass)")
    _, world = distributed()
    for i in layers:
        if world > 1:
            stats[i].all_reduce()
        stats[i].solve(maps[i], ridge)
    return maps


def fit_then_tune(model: nn.Module, data: Data, tokenizer=None, *, method: str = DEFAULT_METHOD,
                  keep: float | None = 0.75, calibration: Data | None = None,
                  calibration_items: int = CALIBRATION_ITEMS, steps: int | None = None, batch_size: int = 4,
                  max_length: int = 512, progress: bool = True, **tune_kwargs
                  ) -> tuple[FitResult | None, list[dict[str, float]]]:
    """Set the routers of a patched model by `method` (METHODS) and calibrate the global threshold to `keep` on
    `calibration` (default: the first `calibration_items` training items). "fit+tune" fits, calibrates, then
    runs `steps` (default FINE_TUNE_STEPS) Router-Tuning steps from there; "tune" is `router_tune` as it is
    (steps default: one pass), after fitting the layers' skipped-token adapters if they have them (the routers
    then train with the adapters in the forward). tune_kwargs go to `router_tune` (e.g. tune_adapters=True).
    Returns (the fit or None, the training log)."""
    from mindskip_kernels.integrations import hf

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if keep is None and method != "tune":
        raise ValueError(f"method {method!r} needs a keep rate (fitted scores have no 0.5 meaning); keep=None is "
                         f"for method 'tune'")
    if not isinstance(calibration_items, int) or calibration_items < 1:
        raise ValueError(f"calibration_items must be a positive int, got {calibration_items!r}")
    items = as_items(data, tokenizer, max_length)
    calib = items[:calibration_items] if calibration is None else as_items(calibration, tokenizer, max_length)
    fit = None
    if method != "tune":
        fit = fit_routers(model, items, batch_size=batch_size, max_length=max_length, progress=progress)
        calibrate(model, calib, keep, batch_size=batch_size, max_length=max_length, progress=progress)
    elif any(hasattr(layer, "skip_adapter") for layer in hf.mindskip_layers(model).values()):
        fit = fit_routers(model, items, batch_size=batch_size, max_length=max_length, routers=False,
                          progress=progress)
    history = []
    if method != "fit":
        steps = steps if steps is not None or method == "tune" else FINE_TUNE_STEPS
        history = router_tune(model, items, keep=keep, steps=steps, batch_size=batch_size, max_length=max_length,
                              calibration=calib, progress=progress, **tune_kwargs)
    return fit, history
