"""Router-Tuning (He et al. 2024): train only the MindSkip routers of a patched causal LM on a small dataset.

Everything but the routers is frozen; the hard keep decision passes its gradient straight through (design.md
section 1), so the LM loss tells each router where attention matters and the sparsity terms push it to skip:

    loss = LM loss + sparsity_weight * sum_l keep_rate_l + sum_l relu(keep_rate_l - target_capacity)

over the routed layers l (the hinge only when `target_capacity` is given). AdamW, cosine schedule with 3 %
linear warm-up, gradient accumulation, fp32 or bf16 autocast. Under `torchrun` / `accelerate launch`
(WORLD_SIZE > 1) the model is wrapped in torch's DistributedDataParallel (gloo on CPU, nccl on CUDA) and
each rank reads its own shard of the data; the routers are the only gradients, so the all-reduce is tiny.

Data: JSON (an array) or JSONL of Alpaca records (`instruction`, optional `input`, `output`; the loss
counts the response tokens only), or plain text (any other extension; split into blocks of `max_length`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

Example = dict[str, str] | str
Item = dict[str, torch.Tensor]
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PRECISIONS = ("fp32", "bf16")
LOG_FIELDS = ("step", "lr", "loss", "lm_loss", "keep_rate")


# ----------------------------------------------------------------------------------------------- data


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _alpaca(record: object, where: str) -> dict[str, str]:
    fields = ("instruction", "input", "output")
    ok = (isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("instruction", "output"))
          and isinstance(record.get("input", ""), str))
    if not ok:
        got = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: expected an Alpaca record with string fields 'instruction' and 'output' "
                         f"(optional 'input'), got {got}")
    return {k: record.get(k, "") for k in fields}


def _json_records(text: str, path: str) -> Iterator[tuple[object, int]]:
    """The elements of a JSON array with the line each starts on."""
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        raise ValueError(f"{path}:{_line_of(text, pos)}: a .json data file must hold an array of Alpaca records "
                         f"(use .jsonl for one record per line)")
    pos += 1
    while True:
        pos += len(text[pos:]) - len(text[pos:].lstrip())
        if text.startswith("]", pos):
            return
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        yield record, _line_of(text, pos)
        pos = end + len(text[end:]) - len(text[end:].lstrip())
        if text.startswith(",", pos):
            pos += 1
        elif not text.startswith("]", pos):
            raise ValueError(f"{path}:{_line_of(text, pos)}: invalid JSON: expected ',' or ']' between records")


def read_examples(path: str | os.PathLike) -> list[Example]:
    """Read a data file: `.json` (array) / `.jsonl` Alpaca records as dicts, anything else as one text.

    Errors name the file and line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON: {e.msg}") from None
            records.append(_alpaca(record, f"{path}:{n}"))
    elif ext == ".json":
        records = [_alpaca(record, f"{path}:{line}") for record, line in _json_records(text, path)]
    else:
        records = [text] if text.strip() else []
    if not records:
        raise ValueError(f"{path}:1: data file holds no examples")
    return records


def _prompt(example: dict[str, str], tokenizer) -> str:
    """The chat template's user turn when the tokenizer has one, else the Alpaca template."""
    if getattr(tokenizer, "chat_template", None):
        content = example["instruction"] + (f"\n\n{example['input']}" if example["input"] else "")
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return (ALPACA_PROMPT_INPUT if example["input"] else ALPACA_PROMPT).format(**example)


def tokenize_examples(examples: Sequence[Example], tokenizer, max_length: int = 512) -> list[Item]:
    """Token ids and labels per training item: texts are split into blocks of `max_length` tokens (labels =
    ids); an Alpaca record becomes prompt + response + EOS with the prompt's labels masked (-100). Records
    whose prompt alone fills `max_length` are dropped with a warning."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    items, dropped = [], 0
    for ex in examples:
        if isinstance(ex, str):
            ids = tokenizer(ex, add_special_tokens=False)["input_ids"]
            for start in range(0, len(ids) - 1, max_length):
                block = torch.tensor(ids[start : start + max_length])
                if block.numel() >= 2:
                    items.append({"input_ids": block, "labels": block.clone()})
            continue
        prompt = tokenizer(_prompt(ex, tokenizer), add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        response = tokenizer(ex["output"], add_special_tokens=False)["input_ids"] + eos
        if len(prompt) >= max_length or not response:
            dropped += 1
            continue
        ids = torch.tensor((prompt + response)[:max_length])
        labels = ids.clone()
        labels[: len(prompt)] = -100
        items.append({"input_ids": ids, "labels": labels})
    if dropped:
        warnings.warn(f"dropped {dropped} records whose prompt fills max_length={max_length} tokens", stacklevel=2)
    if not items:
        raise ValueError("data yields no training items (every text is shorter than 2 tokens or every prompt "
                         "fills max_length)")
    return items


def collate(items: Sequence[Item], pad_id: int = 0) -> Item:
    """Right-pad a list of items into a batch with `attention_mask` (padding labels are -100)."""
    n = max(it["input_ids"].numel() for it in items)
    batch = {"input_ids": torch.full((len(items), n), pad_id, dtype=torch.long),
             "labels": torch.full((len(items), n), -100, dtype=torch.long),
             "attention_mask": torch.zeros(len(items), n, dtype=torch.long)}
    for b, it in enumerate(items):
        m = it["input_ids"].numel()
        batch["input_ids"][b, :m], batch["labels"][b, :m], batch["attention_mask"][b, :m] = (
            it["input_ids"], it["labels"], 1)
    return batch


def _items(data: str | os.PathLike | Sequence[Example] | Sequence[Item], tokenizer, max_length: int) -> list[Item]:
    if isinstance(data, (str, os.PathLike)):
        data = read_examples(data)
    data = list(data)
    if data and isinstance(data[0], dict) and "input_ids" in data[0]:
        return data
    if tokenizer is None:
        raise ValueError("tokenizer is required when data is a file or raw examples (not tokenized items)")
    return tokenize_examples(data, tokenizer, max_length)


# ----------------------------------------------------------------------------------------------- training


def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group that torchrun / accelerate launch describe in the
    environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _mindskip_layers(model: nn.Module) -> dict[int, nn.Module]:
    from mindskip_kernels.integrations.hf import mindskip_layers  # imports transformers: only when used

    return mindskip_layers(model)


def _routers(model: nn.Module) -> dict[int, nn.Module]:
    layers = _mindskip_layers(model)
    if not layers:
        raise ValueError("model has no MindSkip routers: call mindskip_kernels.apply_mindskip(model) first")
    return layers


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")


def router_tune(model: nn.Module, data: str | os.PathLike | Sequence[Example] | Sequence[Item],
                tokenizer=None, *, steps: int | None = None, batch_size: int = 4, grad_accum: int = 1,
                lr: float = 1e-5, weight_decay: float = 0.0, warmup_ratio: float = 0.03,
                sparsity_weight: float = 5e-3, target_capacity: float | None = None, max_length: int = 512,
                precision: str = "fp32", seed: int = 0, progress: bool = True) -> list[dict[str, float]]:
    """Train the routers of a model patched by `apply_mindskip`; everything else stays frozen.

    data: a data file (see `read_examples`), raw examples, or items from `tokenize_examples`; `tokenizer`
    is needed unless items are given. steps: optimizer steps (default: one pass over the data), each of
    `grad_accum` micro-batches of `batch_size` per process. lr 1e-5 is the paper's. Returns the training
    log, one dict per optimizer step with the fields of `LOG_FIELDS`. The model is left in eval mode with
    its previous `requires_grad` flags.
    """
    from transformers import get_cosine_schedule_with_warmup

    layers = _routers(model)
    _check_positive(batch_size=batch_size, grad_accum=grad_accum, lr=lr, max_length=max_length)
    if steps is not None:
        _check_positive(steps=steps)
    if sparsity_weight < 0:
        raise ValueError(f"sparsity_weight must be >= 0, got {sparsity_weight}")
    if target_capacity is not None and not 0.0 <= target_capacity <= 1.0:
        raise ValueError(f"target_capacity must be a keep rate in [0, 1], got {target_capacity}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    items = _items(data, tokenizer, max_length)
    rank, world = _distributed()
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
    for p in params:
        p.requires_grad_(True)
    model.train()
    wrapped = model
    if world > 1:
        # A router whose layer skips every token gets no gradient when sparsity_weight = 0: allow unused ones.
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
            for micro in range(grad_accum):
                batch = {k: v.to(device) for k, v in next(stream).items()}
                sync = micro == grad_accum - 1 or world == 1  # DDP all-reduces on the last micro-batch only
                with contextlib.nullcontext() if sync else wrapped.no_sync():
                    with autocast:
                        lm_loss = wrapped(**batch, use_cache=False).loss.float()
                        rates = torch.stack([layer.mindskip.last_keep_rate.float() for layer in layers.values()])
                        loss = lm_loss + sparsity_weight * rates.sum()
                        if target_capacity is not None:
                            loss = loss + torch.relu(rates - target_capacity).sum()
                    (loss / grad_accum).backward()
                totals += torch.stack([loss.detach(), lm_loss.detach(), rates.detach().mean()])
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if world > 1:
                torch.distributed.all_reduce(totals)
            loss_v, lm_v, rate_v = (totals / (grad_accum * world)).tolist()  # one sync per step, for the log
            history.append({"step": step, "lr": schedule.get_last_lr()[0], "loss": loss_v, "lm_loss": lm_v,
                            "keep_rate": rate_v})
            bar.set_postfix(loss=f"{loss_v:.4f}", keep=f"{rate_v:.3f}")
            bar.update()
    finally:
        bar.close()
        model.eval()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    return history


# ----------------------------------------------------------------------------------------------- evaluation


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
def evaluate(model: nn.Module, data: str | os.PathLike | Sequence[Example] | Sequence[Item], tokenizer=None,
             *, batch_size: int = 4, max_length: int = 512) -> EvalResult:
    """Perplexity of `model` (patched or not) on `data` (as for `router_tune`), with keep rates and time."""
    _check_positive(batch_size=batch_size, max_length=max_length)
    items = _items(data, tokenizer, max_length)
    device = next(model.parameters()).device
    layers = _mindskip_layers(model)
    was_training = model.training
    model.eval()
    nll, count, seconds = 0.0, 0, 0.0
    kept = dict.fromkeys(layers, 0.0)
    for start in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate(items[start : start + batch_size]).items()}
        t0 = time.perf_counter()
        loss = model(**batch, use_cache=False).loss
        seconds += time.perf_counter() - t0
        n = int((batch["labels"][:, 1:] != -100).sum())
        nll, count = nll + float(loss) * n, count + n
        real = int(batch["attention_mask"].sum())
        for i, layer in layers.items():
            kept[i] += layer.mindskip.keep_rate() * real
    model.train(was_training)
    real_total = sum(int(it["input_ids"].numel()) for it in items)
    return EvalResult(math.exp(nll / max(count, 1)), {i: k / real_total for i, k in kept.items()},
                      real_total, seconds)


# ----------------------------------------------------------------------------------------------- outputs


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


# ----------------------------------------------------------------------------------------------- command line


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               tokenizer: str | os.PathLike | None = None):
    """(model, tokenizer) from a transformers directory or hub name, or a `.gguf` file (dequantized).

    `tokenizer`: a directory or hub name to take the tokenizer from (default: the model's own), for a model
    folder saved without one; a local folder without tokenizer files is a clear error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.fspath(path)
    kwargs = {}
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model file {path} does not exist")
        path, kwargs["gguf_file"] = os.path.split(os.path.abspath(path))
    tok_path, tok_kwargs = (path, kwargs) if tokenizer is None else (os.fspath(tokenizer), {})
    if (not tok_kwargs and os.path.isdir(tok_path)
            and not any(os.path.isfile(os.path.join(tok_path, f)) for f in TOKENIZER_FILES)):
        raise ValueError(f"{tok_path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): give one with "
                         f"--tokenizer DIR_OR_HUB_NAME (load_model(..., tokenizer=...) in Python), or save it into "
                         f"the folder with tokenizer.save_pretrained({tok_path!r})")
    tok = AutoTokenizer.from_pretrained(tok_path, **tok_kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device)
    return model.eval(), tok


def _add_common(p, data_help: str) -> None:
    p.add_argument("--model", required=True, help="transformers model directory (or hub name) or a .gguf file")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory or hub name (default: the model's), for a model saved without one")
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512, help="tokens per item (longer ones are cut / split)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="under torchrun, cuda means cuda:LOCAL_RANK")
    p.add_argument("--backend", default="auto", help="MindSkip kernel backend (auto, reference, triton, compiled)")


def add_commands(subparsers) -> None:
    """Register `mindskip tune` and `mindskip eval` on an argparse subparsers object."""
    tune = subparsers.add_parser(
        "tune", help="Router-Tuning: train only the MindSkip routers",
        description="Train the MindSkip routers of a causal LM (all else frozen). Multi-GPU / multi-process: "
                    "torchrun --nproc_per_node N -m mindskip_kernels tune ... (or accelerate launch -m ...).")
    _add_common(tune, "JSON/JSONL Alpaca records (instruction, input, output) or plain text")
    tune.add_argument("--out", required=True, help="directory for routers, train_log.csv and train_curve.png")
    tune.add_argument("--layers", default=None,
                      help="N = the last N layers before the final one (default: half, the paper's), or a "
                           "comma-separated list of layer indices")
    tune.add_argument("--granularity", choices=("token", "sequence"), default="token")
    tune.add_argument("--threshold", type=float, default=0.5)
    tune.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one pass over the data)")
    tune.add_argument("--lr", type=float, default=1e-5)
    tune.add_argument("--sparsity-weight", type=float, default=5e-3)
    tune.add_argument("--target-capacity", type=float, default=None, help="keep-rate hinge target per layer")
    tune.add_argument("--grad-accum", type=int, default=1)
    tune.add_argument("--seed", type=int, default=0)
    tune.set_defaults(func=_tune_command)
    ev = subparsers.add_parser("eval", help="perplexity, keep rate per layer and speed of routers vs dense")
    _add_common(ev, "held-out data, same formats as for tune")
    ev.add_argument("--routers", required=True, help="directory written by `mindskip tune`, or a state-dict file")
    ev.set_defaults(func=_eval_command)


def _parse_layers(value: str | None) -> int | list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",")] if "," in value else int(value)
    except ValueError:
        raise ValueError(f"--layers must be an int or a comma-separated list of ints, got {value!r}") from None


def _load(args):
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return load_model(args.model, device=device, tokenizer=args.tokenizer)


def _tune_command(args) -> int:
    from mindskip_kernels.integrations.hf import apply_mindskip, save_routers

    model, tokenizer = _load(args)
    apply_mindskip(model, layers=_parse_layers(args.layers), threshold=args.threshold,
                   granularity=args.granularity, backend=args.backend)
    history = router_tune(model, args.data, tokenizer, steps=args.steps, batch_size=args.batch_size,
                          grad_accum=args.grad_accum, lr=args.lr, sparsity_weight=args.sparsity_weight,
                          target_capacity=args.target_capacity, max_length=args.max_length,
                          precision=args.precision, seed=args.seed)
    rank, world = _distributed()
    if rank == 0:
        save_routers(model, args.out)
        write_log(history, os.path.join(args.out, "train_log.csv"))
        plot_history(history, os.path.join(args.out, "train_curve.png"))
        last = history[-1]
        print(f"trained {len(history)} steps on {world} process(es): loss {last['loss']:.4f}, "
              f"keep rate {last['keep_rate']:.3f}; wrote {args.out}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


def _eval_command(args) -> int:
    from mindskip_kernels.integrations.hf import load_routers

    model, tokenizer = _load(args)
    items = _items(args.data, tokenizer, args.max_length)
    autocast = torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    with autocast:
        evaluate(model, items[: args.batch_size], batch_size=args.batch_size)  # warm-up, untimed
        dense = evaluate(model, items, batch_size=args.batch_size)
        load_routers(model, args.routers, backend=args.backend)
        routed = evaluate(model, items, batch_size=args.batch_size)
    print(f"{'':10}{'perplexity':>12}{'keep rate':>11}{'tokens/s':>11}")
    for name, r in (("dense", dense), ("mindskip", routed)):
        print(f"{name:10}{r.perplexity:12.4f}{r.keep_rate:11.3f}{r.tokens / r.seconds:11.1f}")
    print(f"speed vs dense: {dense.seconds / routed.seconds:.2f}x ({routed.tokens} tokens)")
    print("keep rate per layer: " + ", ".join(f"{i}: {k:.3f}" for i, k in routed.keep_rates.items()))
    return 0
