"""Router-Tuning (He et al. 2024): train only the MindSkip routers of a patched causal LM on a small dataset,
then calibrate one keep threshold so the model keeps the fraction of attention the user asked for.

Everything but the routers is frozen. The forward uses the hard keep decision and its gradient passes straight
through to the score (design.md s.1). The default rule, "every_token", computes attention for every token in
training (each query sees the kept earlier tokens and itself, so a kept token sees exactly the inference
forward) and gates every row, so the LM loss reaches every router decision; "paper" reproduces the authors'
code (only kept tokens attend and carry the gradient). With `keep`, the training threshold follows the score
quantile that keeps that fraction (one global threshold across routed layers: the routers learn which layers
and tokens matter at the rate they will run at), and after training `calibrate` fixes it on calibration data.

    loss = LM loss + sparsity_weight * sum_l keep_rate_l + sum_l relu(keep_rate_l - target_capacity)

(the last two optional; the paper code's sparsity term). AdamW, cosine schedule with linear warm-up, gradient
accumulation, fp32 or bf16 autocast. Under `torchrun` / `accelerate launch` (WORLD_SIZE > 1) the model is
wrapped in DistributedDataParallel (gloo on CPU, nccl on CUDA) and each rank reads its own shard of the data.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from mindskip_kernels.data import Data, Item, as_items, collate

PRECISIONS = ("fp32", "bf16")
LOG_FIELDS = ("step", "lr", "loss", "lm_loss", "keep_rate", "threshold")


def _hf():
    from mindskip_kernels.integrations import hf  # imports transformers: only when used

    return hf


def distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group that torchrun / accelerate launch describe in the
    environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _routers(model: nn.Module) -> dict[int, nn.Module]:
    layers = _hf().mindskip_layers(model)
    if not layers:
        raise ValueError("model has no MindSkip routers: call mindskip_kernels.apply_mindskip(model) first")
    return layers


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")


def _check_keep(keep: float | None, allow_none: bool = True) -> None:
    if keep is None and allow_none:
        return
    if not isinstance(keep, (int, float)) or isinstance(keep, bool) or not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be the fraction of routed attention to run, in (0, 1], got {keep!r}")


def keep_threshold(scores: torch.Tensor, keep: float) -> float:
    """The threshold t such that `scores >= t` keeps the fraction `keep` of `scores` (ties kept)."""
    scores = scores.reshape(-1).float()
    if scores.numel() == 0:
        raise ValueError("no router scores to calibrate on (the calibration data has no real tokens)")
    n_keep = round(keep * scores.numel())
    if n_keep == 0:
        return min(1.0, float(torch.nextafter(scores.max(), scores.new_tensor(math.inf))))  # above all, in fp32
    return float(scores.kthvalue(scores.numel() - n_keep + 1).values)


def _global_threshold(scores: torch.Tensor, keep: float, world: int) -> float:
    """keep_threshold of the local scores, averaged over the processes (all ranks agree)."""
    value = torch.tensor(keep_threshold(scores, keep), dtype=torch.float64)
    if world > 1:
        value = value.to(_device_for_collectives())
        torch.distributed.all_reduce(value)
        value = value.cpu() / world
    return min(max(float(value), 0.0), 1.0)


def _device_for_collectives() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
        else torch.device("cpu")


def router_tune(model: nn.Module, data: Data, tokenizer=None, *, keep: float | None = 0.75,
                rule: str = "every_token", steps: int | None = None, batch_size: int = 4, grad_accum: int = 1,
                lr: float = 1e-3, weight_decay: float = 0.0, warmup_ratio: float = 0.03,
                sparsity_weight: float = 0.0, target_capacity: float | None = None, max_length: int = 512,
                precision: str = "fp32", calibration: Data | None = None, calibration_items: int = 16,
                seed: int = 0, tune_adapters: bool = False, progress: bool = True) -> list[dict[str, float]]:
    """Train the routers of a model patched by `apply_mindskip`; everything else stays frozen (the layers'
    skipped-token adapters too, unless `tune_adapters`: then they train with the routers, from their fit).

    keep: the fraction of routed sub-layers (layer x token pairs; attention, MLP or block by the layers' target)
    to run, in (0, 1]. Training follows it with one global threshold (the quantile of the last step's scores),
    then `calibrate` sets that threshold on `calibration` (default: the first `calibration_items` training
    items) and writes it into every routed layer. keep=None trains at the layers' fixed thresholds (the paper:
    0.5, with `sparsity_weight`).
    rule: "every_token" (default) or "paper" (see the module docstring). data: a data file (see
    `mindskip_kernels.data.read_examples`), raw examples, or tokenized items; `tokenizer` is needed unless
    items are given. steps: optimizer steps (default: one pass over the data), each of `grad_accum`
    micro-batches of `batch_size` per process. Returns the training log, one dict per optimizer step with the
    fields of `LOG_FIELDS`. The model is left in eval mode with its previous `requires_grad` flags.
    """
    from transformers import get_cosine_schedule_with_warmup

    hf = _hf()
    layers = _routers(model)
    _check_keep(keep)
    if rule not in hf.RULES:
        raise ValueError(f"rule must be one of {hf.RULES}, got {rule!r}")
    ruled = sorted(i for i, layer in layers.items() if rule not in layer.mindskip.sublayer.training_rules)
    if ruled:
        kv = layers[ruled[0]].mindskip.kv
        raise ValueError(f'rule {rule!r} is not a training forward of kv="{kv}" (layers {ruled}); it has '
                         f'{layers[ruled[0]].mindskip.sublayer.training_rules} (under kv="all" the training forward '
                         f'is the inference forward)')
    _check_positive(batch_size=batch_size, grad_accum=grad_accum, lr=lr, max_length=max_length,
                    calibration_items=calibration_items)
    if steps is not None:
        _check_positive(steps=steps)
    if sparsity_weight < 0:
        raise ValueError(f"sparsity_weight must be >= 0, got {sparsity_weight}")
    if target_capacity is not None and not 0.0 <= target_capacity <= 1.0:
        raise ValueError(f"target_capacity must be a keep rate in [0, 1], got {target_capacity}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    items = as_items(data, tokenizer, max_length)
    calib_items = items[:calibration_items] if calibration is None else as_items(calibration, tokenizer, max_length)
    rank, world = distributed()
    device = next(model.parameters()).device
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0

    torch.manual_seed(seed)
    sampler = torch.utils.data.DistributedSampler(items, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    loader = torch.utils.data.DataLoader(items, batch_size=batch_size, sampler=sampler,
                                         collate_fn=lambda b: collate(b, pad_id))
    steps = steps or math.ceil(len(loader) / grad_accum)

    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    params = [layer.router.weight for layer in layers.values()]
    if tune_adapters:
        adapters = [layer.skip_adapter for layer in layers.values() if hasattr(layer, "skip_adapter")]
        if not adapters:
            raise ValueError("tune_adapters=True, but no routed layer has a skipped-token adapter: "
                             "apply_mindskip(..., adapter='linear' or 'mean')")
        params += [p for adapter in adapters for p in adapter.parameters()]
    for p in params:
        p.requires_grad_(True)
    for layer in layers.values():
        layer.mindskip.rule = rule
    model.train()
    wrapped = model
    if world > 1:
        # A router whose layer skips every token gets no gradient under the paper rule: allow unused ones.
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * steps), steps)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def batches() -> Iterator[Item]:
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    history: list[dict[str, float]] = []
    stream = batches()
    bar = tqdm(total=steps, desc="router-tune", disable=not (progress and rank == 0))
    try:
        for step in range(1, steps + 1):
            totals = torch.zeros(3, device=device)  # loss, LM loss, mean keep rate, summed over micro-batches
            scores = []
            for micro in range(grad_accum):
                batch = {k: v.to(device) for k, v in next(stream).items()}
                sync = micro == grad_accum - 1 or world == 1  # DDP all-reduces on the last micro-batch only
                with contextlib.nullcontext() if sync else wrapped.no_sync(), hf.record_routing(model) as rec:
                    with autocast:
                        lm_loss = wrapped(**batch, use_cache=False).loss.float()
                        rates = rec.training_keep_rates()
                        loss = lm_loss + sparsity_weight * rates.sum()
                        if target_capacity is not None:
                            loss = loss + torch.relu(rates - target_capacity).sum()
                    (loss / grad_accum).backward()
                totals += torch.stack([loss.detach(), lm_loss.detach(), rates.detach().mean()])
                if keep is not None:
                    scores.append(rec.real_scores())
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if keep is not None:  # the next step runs at the rate asked for, with the routers as they are now
                hf.set_thresholds(model, _global_threshold(torch.cat(scores), keep, world))
            if world > 1:
                torch.distributed.all_reduce(totals)
            loss_v, lm_v, rate_v = (totals / (grad_accum * world)).tolist()  # one sync per step, for the log
            threshold = next(iter(layers.values())).mindskip.threshold
            history.append({"step": step, "lr": schedule.get_last_lr()[0], "loss": loss_v, "lm_loss": lm_v,
                            "keep_rate": rate_v, "threshold": threshold})
            bar.set_postfix(loss=f"{loss_v:.4f}", keep=f"{rate_v:.3f}")
            bar.update()
    finally:
        bar.close()
        model.eval()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    if keep is not None:
        calibrate(model, calib_items, keep, batch_size=batch_size, progress=False)
    return history


@dataclass
class Calibration:
    """The global threshold `calibrate` set, and the keep rate it gives on the calibration data."""

    threshold: float
    keep_rate: float


@torch.no_grad()
def calibrate(model: nn.Module, data: Data, keep: float, tokenizer=None, *, batch_size: int = 4,
              max_length: int = 512, tolerance: float = 0.005, max_iterations: int = 12,
              progress: bool = True) -> Calibration:
    """Set one global threshold across the routed layers so that they keep the fraction `keep` of (layer,
    real token) pairs on `data` (within `tolerance` when `max_iterations` forwards suffice), and return it with
    the keep rate achieved there.

    Each iteration runs the data at the current threshold and moves it to the `keep` quantile of the scores
    seen, inside a bracket that shrinks like bisection: a layer's scores change with the earlier layers'
    decisions, so one quantile is not enough. One global threshold (not one per layer) lets the routers decide
    which layers' attention matters."""
    _check_keep(keep, allow_none=False)
    _check_positive(batch_size=batch_size, max_length=max_length, max_iterations=max_iterations,
                    tolerance=tolerance)
    hf = _hf()
    _routers(model)
    items = as_items(data, tokenizer, max_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def run(threshold: float) -> tuple[float, torch.Tensor]:
        hf.set_thresholds(model, threshold)
        with hf.record_routing(model) as rec:
            for start in range(0, len(items), batch_size):
                batch = collate(items[start : start + batch_size])
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      use_cache=False, logits_to_keep=1)
        rates = rec.keep_rates()
        return sum(rates.values()) / len(rates), rec.real_scores()

    low, high = 0.0, 1.0  # keep(low) >= keep >= keep(high)
    best = (math.inf, 0.5, 1.0)  # (|error|, threshold, keep rate)
    threshold = next(iter(hf.mindskip_layers(model).values())).mindskip.threshold
    bar = tqdm(total=max_iterations, desc="calibrate", disable=not progress)
    try:
        for _ in range(max_iterations):
            rate, scores = run(threshold)
            bar.update()
            bar.set_postfix(keep=f"{rate:.4f}", threshold=f"{threshold:.6f}")
            best = min(best, (abs(rate - keep), threshold, rate))
            if abs(rate - keep) <= tolerance:
                break
            low, high = (threshold, high) if rate > keep else (low, threshold)
            guess = keep_threshold(scores, keep)
            threshold = guess if low < guess < high else (low + high) / 2
        hf.set_thresholds(model, best[1])
    finally:
        bar.close()
        model.train(was_training)
    return Calibration(best[1], best[2])


@dataclass
class EvalResult:
    """Held-out perplexity over the label tokens, keep rate per routed layer (token-weighted), and speed."""

    perplexity: float
    keep_rates: dict[int, float]
    tokens: int
    seconds: float

    @property
    def keep_rate(self) -> float:
        """Mean keep rate over the routed layers (1.0 for a model without routers)."""
        return sum(self.keep_rates.values()) / len(self.keep_rates) if self.keep_rates else 1.0


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, tokenizer=None, *, batch_size: int = 4,
             max_length: int = 512) -> EvalResult:
    """Perplexity of `model` (patched or not) on `data` (as for `router_tune`), with keep rates and time."""
    _check_positive(batch_size=batch_size, max_length=max_length)
    items = as_items(data, tokenizer, max_length)
    device = next(model.parameters()).device
    hf = _hf()
    routed = bool(hf.mindskip_layers(model))
    was_training = model.training
    model.eval()
    nll, count, seconds = 0.0, 0, 0.0
    with hf.record_routing(model) if routed else contextlib.nullcontext() as rec:
        for start in range(0, len(items), batch_size):
            batch = {k: v.to(device) for k, v in collate(items[start : start + batch_size]).items()}
            t0 = time.perf_counter()
            loss = model(**batch, use_cache=False).loss
            seconds += time.perf_counter() - t0
            n = int((batch["labels"][:, 1:] != -100).sum())
            nll, count = nll + float(loss) * n, count + n
    model.train(was_training)
    real_total = sum(int(it["input_ids"].numel()) for it in items)
    return EvalResult(math.exp(nll / max(count, 1)), rec.keep_rates() if routed else {}, real_total, seconds)


def write_log(history: Sequence[dict[str, float]], path: str | os.PathLike) -> None:
    """The training log as CSV (columns `LOG_FIELDS`)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(history)


def plot_history(history: Sequence[dict[str, float]], path: str | os.PathLike, title: str = "Router-Tuning") -> None:
    """Loss and mean keep rate per optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax_loss, ax_keep) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(steps, [h["loss"] for h in history], label="total loss")
    ax_loss.plot(steps, [h["lm_loss"] for h in history], label="LM loss")
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_keep.plot(steps, [h["keep_rate"] for h in history], color="tab:green")
    ax_keep.set(xlabel="optimizer step", ylabel="fraction of tokens whose attention runs",
                title="mean keep rate (routed layers)", ylim=(0, 1.05))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
