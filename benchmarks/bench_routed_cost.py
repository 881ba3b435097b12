"""What a routed model costs against the work it runs: prefill (a forward without cache), interleaved rounds.

For each model, prompt shape and routed configuration (target x K/V rule), every round times one forward of:
- dense: the plain model;
- all kept / all skipped: the routed model at threshold 0 / 1 (its fixed overheads, with no work saved or left);
- removed work: the dense model with every routed layer's skipped work removed and nothing else (block kv="kept":
  the layers deleted; block kv="all": only LN1 + the K/V projections left; attention kv="kept": the attention
  sub-layer removed; attention kv="all": its K/V projections left; mlp: the MLP removed) — what "all skipped"
  should cost;
- at each skip fraction f (thresholds calibrated on the prompt; the skip achieved is printed): the routed model;
  its per-layer ideal, the dense model whose routed layers do, with stock PyTorch ops on the dense weights, only
  the work the routed layer does when (1 - f) of each sequence's tokens run the target (kv="kept": the dense
  sub-layer on the first (1 - f) N tokens, which attend among themselves exactly like kept tokens; kv="all":
  every token's K/V projections, the kept rows' q / o projections (and MLP for a block) and SDPA of their queries
  over every key with the causal-by-position boolean mask); and the static drop a user would pick instead, the
  removed-work layers in round(f x routed layers) of the routed layers and the rest dense.
With --adapters (a skipped-token adapter per routed layer), the skipped rows of the ideal, the removed work and the
static drop get the same adapter (the static drop is then the static linear replacement): the work left includes
the adapter's.
Reported per point: median ms over rounds, and per-round ratios (median [p20, p80]) against dense, against the
ideal ("of ideal" = ideal / routed time), and "of drop's saving" = (dense - routed) / (dense - drop) on the medians.

    python benchmarks/bench_routed_cost.py                                  # SmolLM2-135M (offline) + cpu-small
    python benchmarks/bench_routed_cost.py --model smollm2 --shapes 4x128 1x2048 --configs block-all
    python benchmarks/bench_routed_cost.py --model smollm2 --configs block-all --adapters none linear linear:64
    python benchmarks/bench_routed_cost.py --smoke                          # tiny model, a few seconds (CI)

Targets (issue 25): all kept >= 0.97x dense; all skipped >= 0.97x of removed work; at f = 25/50/75 % the time
saved >= 95 % of the static drop's; routed >= 95 % of its ideal. The SDPA kernel table is bench_attention_sdpa.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.harness import Row, device_name, percentiles, print_table, write_csv  # noqa: E402
from benchmarks.models import IdealLayer, build_model, layers_swapped, mindskip_layers, routed_model  # noqa: E402
from benchmarks.quality import adapter_spec, adapter_suffix  # noqa: E402
from mindskip_kernels.integrations.hf import record_routing  # noqa: E402

CONFIGS = {"attention-kept": ("attention", "kept"), "attention-all": ("attention", "all"), "mlp": ("mlp", "kept"),
           "block-all": ("block", "all"), "block-kept": ("block", "kept")}


def load(name: str) -> nn.Module:
    if name == "smollm2":
        from benchmarks.quality import smollm2

        return smollm2()[0].eval()
    return build_model(name, torch.float32, torch.device("cpu"))


def calibrate(model: nn.Module, ids: torch.Tensor, skip: float, passes: int = 2) -> float:
    """Thresholds so that about `skip` of each routed layer's tokens skip its target (each pass sets every layer's
    threshold to the quantile of the scores it saw in the previous one); returns the fraction skipped."""
    layers = mindskip_layers(model)
    for layer in layers.values():
        layer.mindskip.threshold = 1.0 if skip >= 1 else 0.0
    for _ in range(passes if 0 < skip < 1 else 0):
        with torch.no_grad(), record_routing(model) as rec:
            model(ids, use_cache=False, logits_to_keep=1)
        for e in rec.entries:
            layers[e.layer_idx].mindskip.threshold = float(torch.quantile(e.scores.flatten().double(), skip))
    with torch.no_grad(), record_routing(model) as rec:
        model(ids, use_cache=False, logits_to_keep=1)
    return 1.0 - statistics.fmean(e.keep.float().mean().item() for e in rec.entries)


def swap_layers(dense: nn.Module, layers: list[nn.Module]):
    """A forward of `dense` with its decoder layers replaced by `layers` for the call."""
    def run(ids: torch.Tensor) -> None:
        with layers_swapped(dense, layers):
            dense(ids, use_cache=False, logits_to_keep=1)
    return run


def run_config(args, dense: nn.Module, model_name: str, config: str, batch: int, seq_len: int,
               rows: list[Row], table: list[list], spec: tuple[str | None, int | None] = (None, None)) -> None:
    target, kv = CONFIGS[config]
    routed = routed_model(dense, target, args.backend, kv, *spec)
    routed_idx = sorted(mindskip_layers(routed))
    adapters = {i: routed.model.layers[i].skip_adapter for i in routed_idx} if spec[0] else {}
    config += adapter_suffix(spec)
    base = list(dense.model.layers)
    ids = torch.randint(0, dense.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))

    def ideal(kept: int, which: list[int]) -> list[nn.Module]:
        """IdealLayer's in `which` (with the routed layers' adapters: for kept=0, the static linear replacement)."""
        return [IdealLayer(layer, target, kv, kept, seq_len, adapters.get(i)) if i in which else layer
                for i, layer in enumerate(base)]

    thresholds: dict[str, list[float]] = {}
    skipped: dict[str, float] = {}
    for name, f in [] if args.drops_only else [("all kept", 0.0), ("all skipped", 1.0)] + [(f"{f:.0%}", f)
                                                                                        for f in args.skip]:
        skipped[name] = calibrate(routed, ids, f)
        thresholds[name] = [routed.model.layers[i].mindskip.threshold for i in routed_idx]

    def routed_at(name: str):
        def run(ids: torch.Tensor) -> None:
            for i, t in zip(routed_idx, thresholds[name], strict=True):
                routed.model.layers[i].mindskip.threshold = t
            routed(ids, use_cache=False, logits_to_keep=1)
        return run

    calls = {"dense": lambda ids: dense(ids, use_cache=False, logits_to_keep=1),
             "all kept": routed_at("all kept"), "all skipped": routed_at("all skipped"),
             "removed work": swap_layers(dense, ideal(0, routed_idx))}
    if args.drops_only:
        calls = {"dense": calls["dense"]}
    for f in args.skip:
        kept = round((1 - f) * seq_len)
        m = round(f * len(routed_idx))  # dropped layers, spread evenly over the routed ones
        dropped = [routed_idx[j * len(routed_idx) // m] for j in range(m)] if m else []
        if not args.drops_only:
            calls[f"{f:.0%}"] = routed_at(f"{f:.0%}")
            calls[f"{f:.0%} ideal"] = swap_layers(dense, ideal(kept, routed_idx))
        calls[f"{f:.0%} drop"] = swap_layers(dense, ideal(0, dropped))
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for call in calls.values():  # warm-up
            call(ids)
        for _ in tqdm(range(args.repeats), desc=f"{model_name} {batch}x{seq_len} {config}", unit="round",
                      leave=False):
            for name, call in calls.items():
                t0 = time.perf_counter()
                call(ids)
                times[name].append((time.perf_counter() - t0) * 1e3)
    shape, dev = f"{batch}x{seq_len}", device_name(torch.device("cpu"))

    def ratio(num: str, den: str) -> tuple[float, float, float]:
        return percentiles([a / b for a, b in zip(times[num], times[den], strict=True)])

    def cell(r: tuple[float, float, float]) -> str:
        return f"{r[0]:.2f} [{r[1]:.2f}, {r[2]:.2f}]"

    for name, ts in times.items():
        rows.append(Row("routed_cost", f"{model_name} {config}", name, "time", "ms", shape, *percentiles(ts), dev))
        if name != "dense":  # dense / this, per round (paired: robust to the machine's drift between rounds)
            rows.append(Row("routed_cost", f"{model_name} {config}", name, "speedup", "x", shape,
                            *ratio("dense", name), dev))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    table.append([model_name, shape, config, "dense", "0%", med["dense"], "1.00", "", ""])
    if args.drops_only:
        for f in args.skip:
            table.append([model_name, shape, config, f"  static drop {f:.0%}", "", med[f"{f:.0%} drop"],
                          cell(ratio("dense", f"{f:.0%} drop")), "", ""])
        print_table(HEADERS, table[-(1 + len(args.skip)):])
        return
    table.append([model_name, shape, config, "all kept", f"{skipped['all kept']:.0%}", med["all kept"],
                  cell(ratio("dense", "all kept")), "", ""])
    table.append([model_name, shape, config, "all skipped", f"{skipped['all skipped']:.0%}", med["all skipped"],
                  cell(ratio("dense", "all skipped")), cell(ratio("removed work", "all skipped")), ""])
    table.append([model_name, shape, config, "removed work", "100%", med["removed work"],
                  cell(ratio("dense", "removed work")), "", ""])
    for f in args.skip:
        p = f"{f:.0%}"
        saved = (med["dense"] - med[p]) / (med["dense"] - med[f"{p} drop"])  # of medians: a per-round ratio of
        # two small differences is mostly noise
        table.append([model_name, shape, config, f"skip {p}", f"{skipped[p]:.0%}", med[p], cell(ratio("dense", p)),
                      cell(ratio(f"{p} ideal", p)), f"{saved:.0%}"])
        table.append([model_name, shape, config, f"  ideal {p}", "", med[f"{p} ideal"],
                      cell(ratio("dense", f"{p} ideal")), "", ""])
        table.append([model_name, shape, config, f"  static drop {p}", "", med[f"{p} drop"],
                      cell(ratio("dense", f"{p} drop")), "", ""])
    print_table(HEADERS, table[-(4 + 3 * len(args.skip)):])


HEADERS = ["model", "shape", "routed", "point", "skipped", "ms", "dense / this", "ideal / routed",
           "of drop's saving"]


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["smollm2", "cpu-small"],
                   help="smollm2 (the offline SmolLM2-135M), a preset of benchmarks/models.py, or an HF folder")
    p.add_argument("--shapes", nargs="+", default=["4x128", "4x512", "1x2048"])
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=["attention-kept", "attention-all", "mlp",
                                                                     "block-all"])
    p.add_argument("--skip", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--adapters", type=adapter_spec, nargs="+", default=[(None, None)], metavar="SPEC",
                   help="skipped-token adapters to run each config with (none, mean, linear, linear:RANK); the "
                        "ideal, removed work and static drop then carry the same adapter on their skipped rows")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--drops-only", action="store_true",
                   help="time dense and the static drops only (the rivals' rows: Attention / Block Drop under "
                        "kv=kept configurations, the static linear replacement with --adapters)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--csv")
    p.add_argument("--smoke", action="store_true", help="tiny model, one shape, one round (CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.shapes, args.repeats, args.skip = ["smoke"], ["2x32"], 1, [0.5]
    torch.manual_seed(0)
    rows: list[Row] = []
    table: list[list] = []
    for model_name in args.model:
        dense = load(model_name)
        for shape in args.shapes:
            batch, seq_len = (int(s) for s in shape.lower().split("x"))
            for config in args.configs:
                for spec in args.adapters:
                    print(f"{model_name} {shape} {config}{adapter_suffix(spec)} ({args.repeats} interleaved rounds)",
                          flush=True)
                    run_config(args, dense, model_name, config, batch, seq_len, rows, table, spec)
    print(f"\nAll points (CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32, prefill, no cache):")
    print_table(HEADERS, table)
    if args.csv:
        write_csv(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
