"""The main job: a Llama-shaped model, dense vs MindSkip at the paper's setting, prefill and decode, side by side.

    python benchmarks/bench_e2e.py                    # CPU: small Llama (8 layers, hidden 512), 1 x 2048 tokens
    python benchmarks/bench_e2e.py --model llama3-8b  # default on CUDA: Llama-3-8B shapes, bf16, random weights
    python benchmarks/bench_e2e.py --skip 0 0.25 0.5 0.75 --csv out.csv --plot out.png
    python benchmarks/bench_e2e.py --shapes 1x256 1x2048 4x512 --phases decode   # the README's decode points
    python benchmarks/bench_e2e.py --target attention mlp block --phases prefill --skip 0.5   # per target
    python benchmarks/bench_e2e.py --kv kept all      # both K/V rules side by side (design.md s.1)
    python benchmarks/bench_e2e.py --target block --kv all --adapter linear:64   # a skipped-token adapter
    python benchmarks/bench_e2e.py --smoke            # tiny model, a few seconds (CI)

The same model elsewhere: CUDA-graph decode in bench_graph_decode.py, the fused-RMSNorm prefill comparison in
bench_fused_norm.py (shared pieces in models.py); the predicated GEMV is a kernel in bench_kernels.py.

Routers sit on the last half of the layers minus the final one (the paper's choice) and route each --target:
the attention sub-layer (MindSkip, the default), the MLP, or the whole block (Mixture-of-Depths). For each
skip fraction, every routed layer's threshold is calibrated on the prompt so that that fraction of its
tokens skips the target. "ideal" is measured, never a formula over the routed model's own times. Prefill: the
per-layer ideal (`models.IdealLayer`), the dense model whose routed layers do with stock PyTorch ops only the work
the routed layer does at that keep rate (kv="kept": the dense sub-layer on that many tokens, attending among
themselves; kv="all": every token's K/V projections and the kept rows' queries over every key). Decode (one token
per sequence and step, so a step's work is linear in the tokens that run it): Amdahl's law between the dense step
and the removed-work step (the routed layers' skipped work removed, their K/V projections left under kv="all"),
at the fraction measured on the generated tokens (their routing is not calibrated). "all kept" = dense / the
routed model at threshold 0 and "all skipped" = removed work / the routed model at threshold 1: its fixed cost
(1.00 = none).

Decode also reports the K/V bytes each routed layer moves per step (read: the kept sequences' cached rows,
once, by the paged kernel; written: the kept new rows) next to a dense layer's, and the K/V memory held
relative to a dense cache (the same bytes hold that many times more tokens: sequences x context).
"""

from __future__ import annotations

import os
import sys

import torch
import transformers

from mindskip_kernels._checks import KV_RULES

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import Row, device_name, measure, print_table, pyplot, write_csv  # noqa: E402
from benchmarks.models import (  # noqa: E402
    TARGETS,
    IdealLayer,
    amdahl,
    build_model,
    calibrate,
    decode,
    decode_bytes,
    layers_swapped,
    mindskip_layers,
    new_cache,
    parse,
    parser,
    prefill,
    routed_memory,
    routed_model,
)
from benchmarks.quality import adapter_spec, adapter_suffix  # noqa: E402


def main(argv: list[str] | None = None) -> list[Row]:
    p = parser(__doc__)
    p.add_argument("--shapes", nargs="+", help="BxN prompt shapes, e.g. 1x256 1x2048 4x512 (default: batch x seq-len)")
    p.add_argument("--phases", nargs="+", choices=["prefill", "decode"], default=["prefill", "decode"])
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--target", nargs="+", choices=TARGETS, default=["attention"],
                   help="routed sub-layer(s), one table block each")
    p.add_argument("--kv", nargs="+", choices=KV_RULES, default=["kept"],
                   help="K/V rule(s) of the routed layers, one table block each (the MLP target: kept only)")
    p.add_argument("--adapter", type=adapter_spec, default=(None, None), metavar="SPEC",
                   help="a skipped-token adapter on every routed layer (none, mean, linear, linear:RANK); the ideals "
                        "and the removed work then run it on their skipped rows")
    p.add_argument("--plot")
    args, device, dtype, shapes = parse(p, argv)

    torch.manual_seed(0)
    dense = build_model(args.model, dtype, device)
    models = {(target, kv): routed_model(dense, target, args.backend, kv, *args.adapter) for target in args.target
              for kv in args.kv if (target, kv) != ("mlp", "all")}
    rows, table = [], []
    for (target, kv), model in models.items():
        for batch, seq_len in shapes:
            rows += run_shape(args, dense, model, target, kv, batch, seq_len, device, table)
    print_table(["routed", "shape", "phase", "skipped", "dense ms", "mindskip ms", "speedup", "ideal", "of ideal",
                 "all kept", "all skipped", "KV bytes"], table)
    if args.csv:
        write_csv(rows, args.csv)
    if args.plot:
        plot(table, args.plot)
    return rows


def run_shape(args, dense, model, target: str, kv: str, batch: int, seq_len: int, device: torch.device,
              table: list) -> list[Row]:
    """Every skip fraction at one prompt shape, dense re-measured next to each point (interleaved)."""
    ids = torch.randint(0, dense.config.vocab_size, (batch, seq_len), device=device)
    tokens = torch.randint(0, dense.config.vocab_size, (args.decode_steps, batch, 1), device=device)
    dev, steps, shape = device_name(device), args.decode_steps, f"{batch}x{seq_len}"
    print(f"{args.model}: {dense.config.num_hidden_layers} layers, {len(mindskip_layers(model))} routing {target} "
          f"(kv={kv}), "
          f"batch {batch} x {seq_len} tokens, {args.dtype}, {dev}, backend={args.backend}")
    measure_prefill, measure_decode = "prefill" in args.phases, "decode" in args.phases

    def timings(m, cache_fn):
        """(prefill ms, decode ms per step), the decode loop timed alone after an untimed prefill."""
        none = (float("nan"),) * 3
        t_pre = measure(lambda: prefill(m, ids, cache_fn), device, warmup=1, repeats=args.repeats) \
            if measure_prefill else none
        t_dec = measure(lambda out: decode(m, out, tokens), device, warmup=1, repeats=args.repeats,
                        setup=lambda: prefill(m, ids, cache_fn)) if measure_decode else none
        return t_pre, tuple(t / steps for t in t_dec)

    def dense_cache():
        return transformers.DynamicCache(config=dense.config)

    base, routed_idx = list(dense.model.layers), set(mindskip_layers(model))

    adapters = {i: getattr(model.model.layers[i], "skip_adapter", None) for i in routed_idx}

    def ideal_layers(kept: int) -> list[torch.nn.Module]:
        return [IdealLayer(layer, target, kv, kept, seq_len, adapters[i]) if i in routed_idx else layer
                for i, layer in enumerate(base)]

    rows = []
    with torch.no_grad():
        for skip in args.skip:  # every reference is re-measured next to each point: the machine's speed drifts
            calibrate(model, ids, 0.0)
            all_pre, all_dec = timings(model, lambda: new_cache(model))  # every token kept
            calibrate(model, ids, 1.0)
            none_pre, none_dec = timings(model, lambda: new_cache(model))  # every routed target skipped
            with layers_swapped(dense, ideal_layers(0)):
                removed_pre, removed_dec = timings(dense, dense_cache)
            dense_pre, dense_dec = timings(dense, dense_cache)
            if measure_prefill:
                with layers_swapped(dense, ideal_layers(round((1 - skip) * seq_len))):
                    ideal_pre = measure(lambda: prefill(dense, ids, dense_cache), device, warmup=1,
                                        repeats=args.repeats)
            calibrate(model, ids, skip)
            pre, dec = timings(model, lambda: new_cache(model))
            kept: list[dict[int, torch.Tensor]] = []
            prefilled = prefill(model, ids, lambda: new_cache(model))
            if measure_decode:
                decode(model, prefilled, tokens, kept)
            cache = prefilled.cache
            fractions = [torch.cat(list(step.values())).float().mean().item() for step in kept]
            decode_skip = 1.0 - sum(fractions) / max(len(fractions), 1)
            point, name = f"{shape}/{skip}", "mindskip" if target == "attention" else f"mindskip-{target}"
            name += "" if kv == "kept" else "-kv_all"
            rows += [Row("e2e", "dense", "prefill", "time", "ms", point, *dense_pre, dev),
                     Row("e2e", "dense", "decode", "time", "ms/token", point, *dense_dec, dev),
                     Row("e2e", name, "prefill", "time", "ms", point, *pre, dev),
                     Row("e2e", name, "decode", "time", "ms/token", point, *dec, dev)]
            phases = (("prefill", dense_pre, all_pre, none_pre, removed_pre, pre, skip),
                      ("decode", dense_dec, all_dec, none_dec, removed_dec, dec, decode_skip))
            for phase, d, a, n, r, m, skipped in phases:
                if phase not in args.phases:
                    continue
                ideal = d[0] / ideal_pre[0] if phase == "prefill" else amdahl(d[0], r[0], skipped)
                routed = (target if kv == "kept" else f"{target} kv=all") + adapter_suffix(args.adapter)
                table.append([routed, shape, phase, f"{skipped:.0%}", d[0], m[0], f"{d[0] / m[0]:.2f}x",
                              f"{ideal:.2f}x", f"{(d[0] / m[0]) / ideal:.0%}", f"{d[0] / a[0]:.2f}",
                              f"{r[0] / n[0]:.2f}",
                              f"{cache.nbytes() / cache.dense_nbytes():.0%}" if phase == "decode" else ""])
            if measure_decode and target != "mlp":  # MLP-target layers keep a dense cache layer
                read, written, dense_read = decode_bytes(model, cache, kept[-1])
                held = routed_memory(model, cache)
                print(f"  {shape} skip {skip:.0%}: decode K/V bytes per routed layer per step: read "
                      f"{read / 1e3:.1f} kB (kept cache once) + written {written / 1e3:.2f} kB (new rows) vs "
                      f"dense read {dense_read / 1e3:.1f} kB; routed layers hold {held:.0%} of dense K/V -> "
                      f"{1 / max(held, 1e-9):.2f}x the tokens (sequences x context) in the same bytes")
    if measure_decode:
        print(f"  dense: {1e3 / dense_dec[0] * batch:.1f} decode tokens/s after a {seq_len}-token prefill")
    return rows


def plot(table: list[list], path: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for target, shape in dict.fromkeys((r[0], r[1]) for r in table):
        for phase, marker in (("prefill", "o"), ("decode", "s")):
            pts = [r for r in table if r[:3] == [target, shape, phase]]
            if not pts:
                continue
            x = [float(r[3].rstrip("%")) for r in pts]
            label = f"{target} {shape} {phase}"
            ax.plot(x, [float(r[6].rstrip("x")) for r in pts], marker + "-", label=f"{label} measured")
            ax.plot(x, [float(r[7].rstrip("x")) for r in pts], marker + "--", alpha=0.6, label=f"{label} ideal")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("tokens skipped in routed layers (%)")
    ax.set_ylabel("speedup over dense")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
