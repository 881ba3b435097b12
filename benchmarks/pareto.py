"""Speed against quality, one table and one plot a user can choose an operating point from.

    python benchmarks/pareto.py --quality docs/quality_adapter.csv --speed docs/routed_cost_adapter.csv \
        --shape 1x2048 --out docs/pareto_smollm2

Joins quality.py's rows (held-out ppl / dense, mean over seeds, per method and keep rate) with
bench_routed_cost.py's measured prefill speed on the same model (the median of per-round dense / routed ratios of
interleaved rounds; for CSVs written before those rows, the ratio of the median times) at
the same skipped fraction: a routed method at keep k takes the routed model's time at skip 1 - k of its target,
K/V rule and adapter (random routers calibrated to that skip: the time depends on how many tokens run, not on
which); a static drop of round((1 - k) x routed layers) layers takes that drop's time (Attention / Block Drop:
the kv="kept" configuration's removed-work layers, which compute no K/V; "+ linear ...": the static linear
replacement, the same layers running the adapter on every token). Rows without a measured time are left out.
Writes <out>.csv, <out>.md (the table) and <out>.png.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.harness import print_table, pyplot  # noqa: E402
from benchmarks.quality import DROP_NAMES, static_method  # noqa: E402


def read(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def speed_key(row: dict) -> tuple[str, str]:
    """(bench_routed_cost configuration, point) whose time a quality row runs at."""
    name, keep = row["method"], float(row["keep"])
    base, plus, adapter = name.partition(" + ")
    suffix = plus + adapter if plus else ""
    skip = f"{1 - keep:.0%}"
    if static_method(name):
        target = next(t for t, drop in DROP_NAMES.items() if base == drop)
        return ("mlp" if target == "mlp" else f"{target}-kept") + suffix, f"{skip} drop"
    target = row.get("target", "attention")
    return ("mlp" if target == "mlp" else f"{target}-{row['kv']}") + suffix, skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quality", nargs="+", required=True, help="quality.py CSVs (seeds are averaged)")
    p.add_argument("--speed", nargs="+", required=True, help="bench_routed_cost.py CSVs")
    p.add_argument("--shape", default="1x2048", help="the prompt shape whose prefill times to use")
    p.add_argument("--model", default="smollm2", help="the model name in the speed CSV")
    p.add_argument("--out", required=True, help="output path without extension")
    args = p.parse_args(argv)
    times: dict[tuple[str, str], float] = {}
    paired: dict[tuple[str, str], float] = {}
    for r in read(args.speed):
        model, _, config = r["provider"].partition(" ")
        if model == args.model and r["x"] == args.shape:
            (paired if r["metric"] == "speedup" else times)[config, r["mode"]] = float(r["p50"])
    groups: dict[tuple, list[dict]] = {}
    for r in read(args.quality):
        groups.setdefault((r["method"], r.get("kv", "-"), float(r["keep"])), []).append(r)
    table, points = [], {}
    for (method, kv, keep), group in groups.items():
        config, point = speed_key(group[0])
        if (config, point) in paired:  # the median of per-round dense / point ratios
            fast = paired[config, point]
        elif (config, point) in times and (config, "dense") in times:  # CSVs without them: medians' ratio
            fast = times[config, "dense"] / times[config, point]
        else:
            continue
        ratios = [float(r["ppl_over_dense"]) for r in group]
        spread = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
        agree = statistics.mean(float(r["agreement"]) for r in group)
        label = method if kv == "-" else f"{method}, kv={kv}"
        table.append([label, f"{keep:.3f}", f"{statistics.mean(ratios):.3f} +- {spread:.3f}", f"{agree:.3f}",
                      f"{fast:.2f}x", len(group)])
        points.setdefault(label, []).append((fast, statistics.mean(ratios)))
    headers = ["method", "keep", "ppl / dense", "top-1 agree", f"prefill speed vs dense ({args.shape})", "seeds"]
    print_table(headers, table)
    with open(f"{args.out}.csv", "w", newline="") as f:
        csv.writer(f).writerows([headers, *table])
    with open(f"{args.out}.md", "w") as f:
        f.write("| " + " | ".join(headers) + " |\n|" + "---|" * len(headers) + "\n")
        f.writelines("| " + " | ".join(str(c) for c in row) + " |\n" for row in table)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # more series than the default 10 colours
    for label, pts in points.items():
        pts.sort()
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="s" if static_method(label.split(",")[0]) else "o",
                ls="--" if static_method(label.split(",")[0]) else "-", label=label)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axvline(1.0, color="gray", lw=0.8)
    ax.set(xlabel=f"prefill speed vs dense ({args.shape}, measured)", ylabel="held-out perplexity / dense",
           yscale="log", title="SmolLM2-135M: speed vs quality (up-left is worse, down-right better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{args.out}.png", dpi=120)
    print(f"wrote {args.out}.csv, .md, .png")


if __name__ == "__main__":
    main()
