"""Prefill of the routed model with each routed layer's input RMSNorm fused into the router and the gather
(the inference path: `route(norm=)`, `gather(norm=)`) vs the model's own norm module, then route and gather.

    python benchmarks/bench_fused_norm.py                                   # CPU: small Llama, 1 x 2048 tokens
    OMP_NUM_THREADS=1 python benchmarks/bench_fused_norm.py --repeats 30 --skip 0.25 0.5 0.75   # the README's
    python benchmarks/bench_fused_norm.py --smoke                           # tiny model, a few seconds (CI)

Both are timed alternately on the same model, one call each per round, so drift hits both alike; the table
gives each one's p50 [p20, p80] and the per-round ratio unfused / fused.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import Row, device_name, measure, percentiles, print_table, write_csv  # noqa: E402
from benchmarks.models import (  # noqa: E402
    TARGETS,
    build_model,
    calibrate,
    mindskip_layers,
    new_cache,
    parse,
    parser,
    prefill,
    routed_model,
)


def compare_fused(model, ids, skips: list[float], device: torch.device, repeats: int, dev: str) -> list[Row]:
    """Prefill with the input RMSNorm fused into the router and the gather vs the model's own norm module then
    route and gather, timed alternately on the same model (one call each per round: drift hits both alike)."""
    layers = mindskip_layers(model).values()

    def run(fused: bool) -> float:
        for layer in layers:
            layer.mindskip.fuse_norm = fused
        return measure(lambda: prefill(model, ids, lambda: new_cache(model)), device, warmup=0, repeats=1)[0]

    rows, table = [], []
    for skip in skips:
        calibrate(model, ids, skip)
        run(True), run(False)  # warm-up
        times = {True: [], False: []}
        for _ in range(repeats):
            for fused in (True, False):
                times[fused].append(run(fused))
        stats = {fused: percentiles(ts) for fused, ts in times.items()}
        for fused in (True, False):
            rows.append(Row("e2e", "mindskip-" + ("fused" if fused else "unfused") + "-norm", "prefill", "time",
                            "ms", f"{skip}", *stats[fused], dev))
        ratios = [u / f for f, u in zip(times[True], times[False], strict=True)]  # paired: same round
        r50, r20, r80 = percentiles(ratios)
        table.append([f"{skip:.0%}", *(f"{stats[f][0]:.2f} [{stats[f][1]:.2f}, {stats[f][2]:.2f}]"
                                       for f in (True, False)),
                      f"{r50:.3f}x [{r20:.3f}, {r80:.3f}]"])
    for layer in layers:
        layer.mindskip.fuse_norm = True
    print_table(["skipped", "fused ms p50 [p20, p80]", "unfused ms p50 [p20, p80]",
                 "unfused / fused per round p50 [p20, p80]"], table)
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    p = parser(__doc__)
    p.add_argument("--target", choices=TARGETS, default="attention", help="the routed sub-layer")
    args, device, dtype, shapes = parse(p, argv)
    (batch, seq_len), = shapes

    torch.manual_seed(0)
    dense = build_model(args.model, dtype, device)
    model = routed_model(dense, args.target, args.backend)
    ids = torch.randint(0, dense.config.vocab_size, (batch, seq_len), device=device)
    print(f"{args.model}: {dense.config.num_hidden_layers} layers, {len(mindskip_layers(model))} routing "
          f"{args.target}, batch {batch} x {seq_len} tokens, {args.dtype}, {device_name(device)}, "
          f"backend={args.backend}")
    with torch.no_grad():
        rows = compare_fused(model, ids, args.skip, device, args.repeats, device_name(device))
    if args.csv:
        write_csv(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
