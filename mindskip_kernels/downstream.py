"""Downstream tasks through lm-evaluation-harness (`lm-eval` 0.4.x, the `eval` extra), as the paper measures its
models: `evaluate_tasks` runs the harness's tasks on one model instance (patched by `apply_mindskip`, dense, or
with sub-layers dropped), `compare_tasks` on several, and `task_table` lays the results side by side.

The harness's `HFLM` wraps the model instance; only its loglikelihood forward is replaced. HFLM scores
right-padded batches without an attention mask: harmless to a dense causal model (a real token never attends to
the padding after it), but a sequence router would average the padding into its decision and routing keep rates
would count it. Here every scored batch carries its mask, so each request's loglikelihood does not depend on what
it was batched with. Generation (`generate_until` tasks) is HFLM's own: left-padded `generate` through the model's
cache (a MindSkipCache on a patched model).

The local tasks shipped in `TASKS_DIR` (standard-library docstrings: multiple choice, loglikelihood, generation,
rolling perplexity) run offline; every other harness task needs its dataset from the Hugging Face hub.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
EXTRA = 'pip install "mindskip_kernels[eval]"'

log = logging.getLogger(__name__)


@dataclass
class TaskResult:
    """One model's run of the harness: {task: {metric: value}} (metric names as the harness reports them, with
    the filter after a comma: "acc,none"), the mean keep rate of the routed layers over the real tokens of every
    forward the harness ran (None for a model without routers), the seconds spent in the loglikelihood
    forwards (prefill), and the harness's per-document samples when asked for."""

    metrics: dict[str, dict[str, float]]
    keep_rate: float | None
    seconds: float
    samples: dict[str, list[dict]] | None = field(default=None, repr=False)


def _lm_eval():
    """The lm_eval package, or an ImportError naming the extra that installs it."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401
        import lm_eval.tasks  # noqa: F401
    except ImportError as e:
        raise ImportError(f"downstream tasks need lm-evaluation-harness ({e}): {EXTRA}") from None
    return lm_eval


def task_manager(include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                 tasks: Sequence[str] | None = None):
    """The harness's TaskManager over `TASKS_DIR`, the task folders of `include_path` (missing folders are a
    FileNotFoundError naming them) and the harness's own tasks. Reading the harness's index (thousands of YAML
    files) takes seconds: with `tasks` it is skipped when every name is in the local folders."""
    lm_eval = _lm_eval()
    extra = [] if include_path is None else (
        [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path))
    for path in extra:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"include_path {os.fspath(path)} is not a directory of task YAML files")
    paths = [TASKS_DIR, *map(os.fspath, extra)]
    if tasks is not None:
        local = lm_eval.tasks.TaskManager(include_path=paths, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return lm_eval.tasks.TaskManager(include_path=paths)


def check_tasks(tasks: Sequence[str], manager) -> list[str]:
    """`tasks` if the harness knows every name (task, group or tag), else a ValueError naming the others."""
    tasks = list(tasks)
    if not tasks:
        raise ValueError("tasks is empty: name at least one harness task")
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        local = _lm_eval().tasks.TaskManager(include_path=TASKS_DIR, include_defaults=False).all_tasks
        raise ValueError(f"unknown task(s) {', '.join(unknown)}: not in lm-eval's tasks (`lm-eval ls tasks`) nor "
                         f"in the include paths; the offline local tasks are {', '.join(local)} (the tag "
                         f"mindskip_stdlib is all of them)")
    return tasks


class _KeepCounter:
    """Kept and real (layer, token) pairs of a patched model, summed over the forwards run inside `count()`
    (on the device: no sync per forward)."""

    def __init__(self, model: nn.Module):
        from mindskip_kernels.integrations.hf import mindskip_layers

        self.model = model
        self.routed = bool(mindskip_layers(model))
        self.kept: dict[int, torch.Tensor] = {}
        self.real: dict[int, torch.Tensor] = {}

    @contextlib.contextmanager
    def count(self) -> Iterator[None]:
        if not self.routed:
            yield
            return
        from mindskip_kernels.integrations.hf import record_routing

        with record_routing(self.model) as rec:
            yield
        for e in rec.entries:
            self.kept[e.layer_idx] = self.kept.get(e.layer_idx, 0) + (e.keep & e.real).sum()
            self.real[e.layer_idx] = self.real.get(e.layer_idx, 0) + e.real.sum()

    def keep_rate(self) -> float | None:
        """Mean over the routed layers of the fraction of real tokens kept (None without routers)."""
        if not self.routed:
            return None
        if not self.real:
            return math.nan
        return sum(float(self.kept[i]) / max(float(self.real[i]), 1.0) for i in self.real) / len(self.real)


@functools.cache
def _harness_lm_class():
    """HFLM with a masked loglikelihood forward (defined on first use: lm_eval is an optional dependency)."""
    lm_eval = _lm_eval()
    from lm_eval.models.utils import Collator
    from tqdm.auto import tqdm

    class HarnessLM(lm_eval.models.huggingface.HFLM):
        """HFLM over a model instance whose loglikelihood batches carry their attention mask; counts the routed
        layers' keep rate over every forward and times the loglikelihood forwards."""

        def __init__(self, model: nn.Module, tokenizer, *, batch_size: int, max_length: int | None,
                     dtype: torch.dtype | None):
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                             mixed_precision_dtype=dtype)
            self.routing = _KeepCounter(model)
            self.seconds = 0.0

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            """(loglikelihood, is greedy) per (key, context tokens, continuation tokens) request, in order: longest
            first, right-padded with a mask; requests differing only in their last token share one row."""
            order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                             group_by="contexts" if self.logits_cache else None,
                             group_fn=lambda r: r[-2] + r[-1][:-1])
            results: list[tuple[float, bool]] = []
            truncated = 0
            bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm)
            for chunk in order.get_batched(n=override_bs or self.batch_size):
                rows = [(ctx + cont)[-(self.max_length + 1) :][:-1] for _, ctx, cont in chunk]
                truncated += sum(len(ctx) + len(cont) > self.max_length + 1 for _, ctx, cont in chunk)
                logits = self._forward(rows)
                for (key, ctx, cont), row, row_logits in zip(chunk, rows, logits, strict=True):
                    scored = row_logits[len(row) - len(cont) : len(row)].unsqueeze(0)  # [1, len(cont), vocab]
                    for key_, cont_, logits_ in order.get_cache(req_str=key, cxt_toks=ctx, cont_toks=cont,
                                                                logits=scored):
                        answer = _score(logits_[0, -len(cont_) :], cont_)
                        results.append(answer)
                        if key_ is not None:
                            self.cache_hook.add_partial("loglikelihood", key_, answer)
                        bar.update()
            bar.close()
            if truncated:
                log.warning("%d loglikelihood requests were longer than max_length %d: cut from the left",
                            truncated, self.max_length)
            return order.get_original(results)

        @torch.no_grad()
        def _forward(self, rows: list[list[int]]) -> torch.Tensor:
            """Logits [B, longest, vocab] of right-padded token rows, with their attention mask; timed."""
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, row in enumerate(rows):
                ids[b, : len(row)] = torch.tensor(row)
                mask[b, : len(row)] = 1
            autocast = torch.autocast(self.device.type, dtype=self.mixed_precision_dtype,
                                      enabled=self.mixed_precision_dtype is not None)
            _synchronize(self.device)
            t0 = time.perf_counter()
            with autocast, self.routing.count():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                    use_cache=False).logits
            _synchronize(self.device)
            self.seconds += time.perf_counter() - t0
            return logits

        def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
            with self.routing.count():
                return super()._model_generate(context, max_length, stop, **generation_kwargs)

    return HarnessLM


def _score(logits: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
    """(sum of the continuation's log-probabilities, whether it is the greedy continuation) from its logits."""
    target = torch.tensor(continuation, device=logits.device)
    log_probs = logits.float().log_softmax(-1)
    return float(log_probs.gather(-1, target[:, None]).sum()), bool((log_probs.argmax(-1) == target).all())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _metrics(results: dict) -> dict[str, dict[str, float]]:
    """{task or group: {metric: value}} of the top-level entries (a group's subtasks are left out), numbers only,
    without the standard errors."""
    inner = {t for subtasks in results.get("group_subtasks", {}).values() for t in subtasks}
    table = {**results.get("results", {}), **results.get("groups", {})}
    return {name: {k: float(v) for k, v in entry.items()
                   if "_stderr" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "sample_len"}
            for name, entry in table.items() if name not in inner}


def evaluate_tasks(model: nn.Module, tokenizer, tasks: Sequence[str], *, num_fewshot: int | None = None,
                   limit: int | float | None = None,
                   include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None, batch_size: int = 8,
                   max_length: int | None = None, dtype: torch.dtype | None = None, log_samples: bool = False,
                   manager=None) -> TaskResult:
    """Run lm-evaluation-harness `tasks` (names of tasks, groups or tags) on `model` with `tokenizer`.

    num_fewshot / limit: the harness's (None: each task's own few-shot setting, every document; limit < 1 is a
    fraction). include_path: extra task folders (`TASKS_DIR` is always included). max_length: tokens per request
    (default: the model's maximum positions); dtype: autocast dtype (e.g. torch.bfloat16). log_samples keeps the
    harness's per-document records in `TaskResult.samples`. manager: a `task_manager()` to reuse across calls.
    The harness's own seeds are kept (its few-shot draws are those of `lm_eval --tasks ...`)."""
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if num_fewshot is not None and (not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise ValueError(f"num_fewshot must be an int >= 0, got {num_fewshot!r}")
    if limit is not None and not limit > 0:
        raise ValueError(f"limit must be positive (documents per task, or a fraction < 1), got {limit!r}")
    manager = task_manager(include_path, tasks) if manager is None else manager
    tasks = check_tasks(tasks, manager)
    lm = _harness_lm_class()(model, tokenizer, batch_size=batch_size, max_length=max_length, dtype=dtype)
    was_training = model.training
    try:
        results = _lm_eval().simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                             task_manager=manager, log_samples=log_samples)
    finally:
        model.train(was_training)
    return TaskResult(_metrics(results), lm.routing.keep_rate(), lm.seconds,
                      results.get("samples") if log_samples else None)


def compare_tasks(models: Mapping[str, nn.Module], tokenizer, tasks: Sequence[str], **kwargs) -> dict[str, TaskResult]:
    """`evaluate_tasks` of each named model in turn, with one task index (kwargs as for `evaluate_tasks`)."""
    manager = kwargs.pop("manager", None) or task_manager(kwargs.pop("include_path", None), tasks)
    return {name: evaluate_tasks(model, tokenizer, tasks, manager=manager, **kwargs) for name, model in models.items()}


def task_table(results: Mapping[str, TaskResult], reference: str | None = None) -> str:
    """A markdown table of the results side by side: task, metric, one column per model, and with `reference`
    (e.g. "dense") the delta of every other model against it; then the keep rate on the task data and the prefill
    seconds of each model."""
    names = list(results)
    others = [n for n in names if n != reference] if reference in results else []
    rows = [["task", "metric", *names, *(f"{n} - {reference}" for n in others)]]
    for task, metrics in results[names[0]].metrics.items():
        for metric in metrics:
            value = {n: results[n].metrics.get(task, {}).get(metric, math.nan) for n in names}
            rows.append([task, metric.replace(",none", ""), *(f"{value[n]:.4f}" for n in names),
                         *(f"{value[n] - value[reference]:+.4f}" for n in others)])
    blank = [""] * len(others)
    rows.append(["keep rate (task data)", "", *("-" if r.keep_rate is None else f"{r.keep_rate:.3f}"
                                                  for r in results.values()), *blank])
    rows.append(["prefill seconds", "", *(f"{r.seconds:.1f}" for r in results.values()), *blank])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                                 strict=True))) + " |"
             for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
