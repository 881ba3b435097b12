"""How often a model predicts what a reference model predicts: top-1 agreement of the next-token predictions and
the mean KL(reference || model), over the real label tokens of held-out data.

Perplexity averages the loss against the text; two models with the same perplexity can still disagree on many
tokens. Agreement with the dense model measures "the same model, faster" directly: how often the routed (or
dropped) model changes its next-token answer, and how far its whole distribution moves (KL in nats per token).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mindskip_kernels.data import Data, as_items, collate
from mindskip_kernels.tuning import _check_positive


@dataclass
class Agreement:
    """Top-1 agreement (fraction of label tokens where both models' argmax agree), mean KL(reference || model)
    in nats per label token, and the number of label tokens they were measured on."""

    top1: float
    kl: float
    tokens: int


@torch.no_grad()
def agreement(reference: nn.Module, model: nn.Module, data: Data, tokenizer=None, *, batch_size: int = 4,
              max_length: int = 512, reference_cache: dict | None = None, progress: bool = True) -> Agreement:
    """Agreement of `model` with `reference` (e.g. a routed model with its dense base, or an Attention-Drop copy)
    on `data` (a data file, raw examples or tokenized items, as for `evaluate`): one forward per batch per model,
    each on its own device; the positions scored are those perplexity counts (each predicts a label token).
    reference_cache: a dict that keeps the reference's log-probs between calls with the same reference, data and
    batch size (comparing many models with one reference runs it once; it holds scored tokens x vocab floats)."""
    _check_positive(batch_size=batch_size, max_length=max_length)
    items = as_items(data, tokenizer, max_length)
    modes = (reference.training, model.training)
    reference.eval()
    model.eval()
    agree, kl = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    count = 0
    try:
        for start in tqdm(range(0, len(items), batch_size), desc="agreement", disable=not progress):
            batch = collate(items[start : start + batch_size])
            scored = batch["labels"][:, 1:] != -100  # position t predicts label t + 1
            if reference_cache is None or start not in reference_cache:
                log_p = _scored_log_probs(reference, batch, scored)
                if reference_cache is not None:
                    reference_cache[start] = log_p
            log_p = log_p if reference_cache is None else reference_cache[start]
            log_q = _scored_log_probs(model, batch, scored)
            log_q = log_q.to(log_p.device)
            agree += (log_p.argmax(-1) == log_q.argmax(-1)).sum().cpu()
            kl += F.kl_div(log_q, log_p, log_target=True, reduction="sum").double().cpu()
            count += int(scored.sum())
    finally:
        reference.train(modes[0])
        model.train(modes[1])
    if count == 0:
        raise ValueError("data has no label tokens to compare the models on")
    return Agreement(float(agree) / count, float(kl) / count, count)


def twin(model: nn.Module) -> nn.Module:
    """A copy of `model` sharing its parameters and buffers: a new module tree, so patching, dropping or hooking
    layers of one leaves the other as it was (the dense reference), without a second copy of the weights."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _scored_log_probs(model: nn.Module, batch: dict[str, torch.Tensor], scored: torch.Tensor) -> torch.Tensor:
    """fp32 log-softmax of `model`'s logits at the scored positions, [scored tokens, vocab]."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   use_cache=False).logits[:, :-1]
    return logits[scored.to(device)].float().log_softmax(-1)
