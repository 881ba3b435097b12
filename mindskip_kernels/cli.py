"""The `mindskip` command (also `python -m mindskip_kernels`): one argparse parser with a subcommand each.

    mindskip info                      versions, backends, how _C was built
    mindskip tune --keep 0.75 ...      Router-Tuning, then one threshold calibrated to the keep rate asked for
    mindskip calibrate --keep 0.5 ...  move trained routers to another keep rate, without training
    mindskip export-layers ...         tuned routers -> a static list of attention layers to drop
    mindskip eval ...                  perplexity, keep rates and speed vs the dense model

Add a subcommand by writing `_name(args) -> int` and registering it in `build_parser`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform

import torch

from mindskip_kernels._checks import GRANULARITIES, KV_RULES, TARGETS
from mindskip_kernels.fitting import CALIBRATION_ITEMS, DEFAULT_METHOD, FINE_TUNE_STEPS, METHODS

# `mindskip tune`'s K/V rule (apply_mindskip's default stays the paper's "kept"): "all" loses far less at the same
# keep rate (README results, docs/tuning.md), for the skipped tokens' K/V projections and no cache saved
DEFAULT_KV = "all"


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
          f"triton {_version('triton')}, transformers {_version('transformers')}")
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


def _tune(args: argparse.Namespace) -> int:
    from mindskip_kernels.fitting import fit_then_tune
    from mindskip_kernels.integrations.hf import apply_mindskip, mindskip_layers, save_routers
    from mindskip_kernels.tuning import distributed, plot_history, write_log

    if args.keep is None and args.method != "tune":
        raise SystemExit(f"--method {args.method} needs a --keep rate (a fitted router's scores have no 0.5 "
                         f"meaning); --keep none is for --method tune (the paper's fixed threshold)")
    model, tokenizer = _load(args)
    apply_mindskip(model, layers=_parse_layers(args.layers), threshold=args.threshold,
                   granularity=args.granularity, backend=args.backend, sink_tokens=args.sink_tokens,
                   target=args.target, kv=args.kv)
    fit, history = fit_then_tune(model, args.data, tokenizer, method=args.method, keep=args.keep,
                                 calibration=args.calibration_data, calibration_items=args.calibration_items,
                                 rule=args.rule, steps=args.steps, batch_size=args.batch_size,
                                 grad_accum=args.grad_accum, lr=args.lr, sparsity_weight=args.sparsity_weight,
                                 target_capacity=args.target_capacity, max_length=args.max_length,
                                 precision=args.precision, seed=args.seed)
    rank, world = distributed()
    if rank == 0:
        info = {"method": args.method, "rule": args.rule, "keep": args.keep, "steps": len(history), "lr": args.lr,
                "seed": args.seed, "sink_tokens": args.sink_tokens, "target": args.target, "kv": args.kv,
                "data": os.fspath(args.data)}
        if fit is not None:
            info["fit"] = {"seconds": fit.seconds, "r2": {str(i): f.r2 for i, f in fit.layers.items()},
                           "samples": {str(i): f.samples for i, f in fit.layers.items()}}
        save_routers(model, args.out, info)
        threshold = next(iter(mindskip_layers(model).values())).mindskip.threshold
        done = [] if fit is None else [f"fitted {len(fit.layers)} routers in {fit.seconds:.1f} s"]
        if history:
            write_log(history, os.path.join(args.out, "train_log.csv"))
            plot_history(history, os.path.join(args.out, "train_curve.png"))
            last = history[-1]
            done.append(f"trained {len(history)} steps on {world} process(es): loss {last['loss']:.4f}, training "
                        f"keep rate {last['keep_rate']:.3f}")
        print(f"{'; '.join(done)}; threshold {threshold:.6f}; wrote {args.out}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from mindskip_kernels.integrations.hf import load_routers, save_routers
    from mindskip_kernels.tuning import calibrate

    model, tokenizer = _load(args)
    load_routers(model, args.routers, backend=args.backend, kv=args.kv)
    result = calibrate(model, args.data, args.keep, tokenizer, batch_size=args.batch_size,
                       max_length=args.max_length)
    save_routers(model, args.out, {"calibrated_from": os.fspath(args.routers), "keep": args.keep,
                                   "calibration_keep": result.keep_rate, "data": os.fspath(args.data)})
    print(f"threshold {result.threshold:.6f} keeps {result.keep_rate:.3f} of routed attention on {args.data} "
          f"(asked {args.keep}); wrote {args.out}")
    return 0


def _export_layers(args: argparse.Namespace) -> int:
    from mindskip_kernels.integrations.hf import load_routers, mindskip_layers
    from mindskip_kernels.layer_drop import layers_to_drop_by_keep_rate
    from mindskip_kernels.tuning import evaluate

    model, tokenizer = _load(args)
    load_routers(model, args.routers, backend=args.backend, kv=args.kv)
    targets = sorted({layer.mindskip.target for layer in mindskip_layers(model).values()})
    if len(targets) != 1:
        raise ValueError(f"export-layers exports the routers of one target; {args.routers} routes {targets}")
    rates = evaluate(model, args.data, tokenizer, batch_size=args.batch_size, max_length=args.max_length).keep_rates
    drop = layers_to_drop_by_keep_rate(rates, n=args.n, keep=args.keep)
    with open(args.out, "w") as f:
        json.dump({"target": targets[0], "drop": drop, "learned_keep_rates": {str(i): r for i, r in rates.items()}},
                  f, indent=2)
    print(f"drop the {targets[0]} of layers {drop} (learned keep rates "
          + ", ".join(f"{i}: {r:.2f}" for i, r in rates.items()) + f"); wrote {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mindskip_kernels.data import as_items
    from mindskip_kernels.integrations.hf import load_routers
    from mindskip_kernels.layer_drop import drop_sublayers
    from mindskip_kernels.tuning import evaluate

    if args.drop_layers:  # checked before any work
        with open(args.drop_layers) as f:
            spec = json.load(f)
        if (not isinstance(spec, dict) or spec.get("target") not in TARGETS or not isinstance(spec.get("drop"), list)
                or not all(isinstance(i, int) for i in spec["drop"])):
            raise ValueError(f"--drop-layers {args.drop_layers}: expected the JSON of `mindskip export-layers` "
                             f"({{'target': one of {TARGETS}, 'drop': [layer indices], ...}})")
    model, tokenizer = _load(args)
    items = as_items(args.data, tokenizer, args.max_length)
    autocast = torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    with autocast:
        evaluate(model, items[: args.batch_size], batch_size=args.batch_size)  # warm-up, untimed
        dense = evaluate(model, items, batch_size=args.batch_size)
        if args.routers:
            load_routers(model, args.routers, backend=args.backend, kv=args.kv)
        else:
            drop_sublayers(model, spec["drop"], spec["target"])
        routed = evaluate(model, items, batch_size=args.batch_size)
    name = "mindskip" if args.routers else "dropped"
    print(f"{'':10}{'perplexity':>12}{'keep rate':>11}{'tokens/s':>11}")
    for label, r in (("dense", dense), (name, routed)):
        print(f"{label:10}{r.perplexity:12.4f}{r.keep_rate:11.3f}{r.tokens / r.seconds:11.1f}")
    print(f"speed vs dense: {dense.seconds / routed.seconds:.2f}x ({routed.tokens} tokens)")
    if routed.keep_rates:
        print("keep rate per layer: " + ", ".join(f"{i}: {k:.3f}" for i, k in routed.keep_rates.items()))
    return 0


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

    ev = sub.add_parser("eval", help="perplexity, keep rate per layer and speed vs dense")
    _add_model(ev, "held-out data, same formats as for tune")
    what = ev.add_mutually_exclusive_group(required=True)
    what.add_argument("--routers", help="directory written by `mindskip tune`, or a state-dict file")
    what.add_argument("--drop-layers", help="JSON file written by `mindskip export-layers`")
    _add_kv_override(ev)
    ev.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
