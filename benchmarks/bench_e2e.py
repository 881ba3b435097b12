"""The main job: a Llama-shaped model, dense vs MindSkip at the paper's setting, prefill and decode, side by side.

    python benchmarks/bench_e2e.py                    # CPU: small Llama (8 layers, hidden 512), 1 x 2048 tokens
    python benchmarks/bench_e2e.py --model llama3-8b  # default on CUDA: Llama-3-8B shapes, bf16, random weights
    python benchmarks/bench_e2e.py --skip 0 0.25 0.5 0.75 --csv out.csv --plot out.png
    python benchmarks/bench_e2e.py --compare-fused    # prefill: RMSNorm fused into router + gather, or not

Routers sit on the last half of the layers minus the final one (the paper's choice). For each skip
fraction, every routed layer's threshold is calibrated on the prompt so that that fraction of its tokens
skips attention. "ideal" is Amdahl's law on measured times: the dense time minus that fraction of the
routed layers' attention time (dense minus the same model with every routed attention skipped).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindskip_kernels as mk  # noqa: E402
from benchmarks.harness import Row, device_name, measure, print_table, pyplot, write_csv  # noqa: E402
from mindskip_kernels.integrations.hf import mindskip_layers, new_cache  # noqa: E402

PRESETS = {
    "cpu-small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=8192),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}


def build_model(name: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    if name in PRESETS:
        config = transformers.LlamaConfig(**PRESETS[name], max_position_embeddings=8192,
                                          attn_implementation="sdpa")
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config).to(dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


def calibrate(model: torch.nn.Module, ids: torch.Tensor, skip: float) -> None:
    """Set each routed layer's threshold to the `skip` quantile of its scores on `ids`, layer by layer (a
    layer's input depends on what the earlier ones skipped); skip >= 1 skips everything."""
    layers = mindskip_layers(model)
    for layer in layers.values():
        layer.mindskip.threshold = 1.0 if skip >= 1 else 0.0
    if not 0 < skip < 1:
        return
    for layer in layers.values():
        with torch.no_grad():
            model(ids, use_cache=False, logits_to_keep=1)
        layer.mindskip.threshold = float(torch.quantile(layer.mindskip.last_plan.scores.flatten().double(), skip))


def prefill(model, ids, cache_fn):
    return model(ids, cache=cache_fn(), use_cache=True, logits_to_keep=1)  # as generate() does


def decode(model, prefilled, steps: int):
    """`steps` greedy decode steps after a prefill's output; returns the cache."""
    cache, nxt = prefilled.cache, prefilled.logits[:, -1:].argmax(-1)
    pos = torch.full_like(nxt, cache.get_seq_length())
    for _ in range(steps):
        out = model(nxt, cache=cache, use_cache=True, position_ids=pos)
        nxt, pos = out.logits[:, -1:].argmax(-1), pos + 1
    return cache


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
        stats = {}
        for fused, ts in times.items():
            q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else [ts[0]] * 9
            stats[fused] = (statistics.median(ts), q[1], q[7])
            rows.append(Row("e2e", "mindskip-" + ("fused" if fused else "unfused") + "-norm", "prefill", "time",
                            "ms", f"{skip}", *stats[fused], dev))
        ratios = [u / f for f, u in zip(times[True], times[False], strict=True)]  # paired: same round
        rq = statistics.quantiles(ratios, n=10, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 9
        table.append([f"{skip:.0%}", *(f"{stats[f][0]:.2f} [{stats[f][1]:.2f}, {stats[f][2]:.2f}]"
                                       for f in (True, False)),
                      f"{statistics.median(ratios):.3f}x [{rq[1]:.3f}, {rq[7]:.3f}]"])
    for layer in layers:
        layer.mindskip.fuse_norm = True
    print_table(["skipped", "fused ms p50 [p20, p80]", "unfused ms p50 [p20, p80]",
                 "unfused / fused per round p50 [p20, p80]"], table)
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--model", default="llama3-8b" if cuda else "cpu-small",
                   help=f"a preset ({', '.join(PRESETS)}) or a Hugging Face model directory")
    p.add_argument("--skip", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                   help="fractions of tokens skipped in each routed layer")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="bfloat16" if cuda else "float32")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--csv")
    p.add_argument("--plot")
    p.add_argument("--smoke", action="store_true", help="tiny model and sizes, a few seconds (CI)")
    p.add_argument("--compare-fused", action="store_true",
                   help="only prefill, RMSNorm fused into the router and gather vs unfused, interleaved")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.seq_len, args.decode_steps, args.repeats = "smoke", 32, 4, 1
    for s in args.skip:
        if not 0.0 <= s < 1.0:
            p.error(f"--skip values must be in [0, 1), got {s}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    torch.manual_seed(0)
    dense = build_model(args.model, dtype, device)
    model = mk.apply_mindskip(copy.deepcopy(dense), backend=args.backend)
    for layer in mindskip_layers(model).values():
        torch.nn.init.normal_(layer.router.weight, std=layer.router.weight.shape[1] ** -0.5)
    ids = torch.randint(0, dense.config.vocab_size, (args.batch, args.seq_len), device=device)
    dev, steps = device_name(device), args.decode_steps
    print(f"{args.model}: {dense.config.num_hidden_layers} layers, {len(mindskip_layers(model))} routed, batch "
          f"{args.batch} x {args.seq_len} tokens, {args.dtype}, {dev}, backend={args.backend}")

    def timings(m, cache_fn):
        """(prefill ms, decode ms per step), the decode loop timed alone after an untimed prefill."""
        t_pre = measure(lambda: prefill(m, ids, cache_fn), device, warmup=1, repeats=args.repeats)
        t_dec = measure(lambda out: decode(m, out, steps), device, warmup=1, repeats=args.repeats,
                        setup=lambda: prefill(m, ids, cache_fn))
        return t_pre, tuple(t / steps for t in t_dec)

    def dense_cache():
        return transformers.DynamicCache(config=dense.config)

    if args.compare_fused:
        with torch.no_grad():
            rows = compare_fused(model, ids, args.skip, device, args.repeats, dev)
        if args.csv:
            write_csv(rows, args.csv)
        return rows
    rows, table = [], []
    with torch.no_grad():
        calibrate(model, ids, 1.0)
        none_pre, none_dec = timings(model, lambda: new_cache(model))  # every routed attention skipped
        for skip in args.skip:  # dense is re-measured next to each point: the machine's speed drifts
            dense_pre, dense_dec = timings(dense, dense_cache)
            calibrate(model, ids, skip)
            pre, dec = timings(model, lambda: new_cache(model))
            cache = decode(model, prefill(model, ids, lambda: new_cache(model)), steps)
            rows += [Row("e2e", "dense", "prefill", "time", "ms", f"{skip}", *dense_pre, dev),
                     Row("e2e", "dense", "decode", "time", "ms/token", f"{skip}", *dense_dec, dev),
                     Row("e2e", "mindskip", "prefill", "time", "ms", f"{skip}", *pre, dev),
                     Row("e2e", "mindskip", "decode", "time", "ms/token", f"{skip}", *dec, dev)]
            for phase, d, n, m in (("prefill", dense_pre, none_pre, pre), ("decode", dense_dec, none_dec, dec)):
                ideal = d[0] / max(d[0] - skip * max(d[0] - n[0], 0.0), 1e-9)
                table.append([phase, f"{skip:.0%}", d[0], m[0], f"{d[0] / m[0]:.2f}x", f"{ideal:.2f}x",
                              f"{(d[0] / m[0]) / ideal:.0%}",
                              f"{cache.nbytes() / cache.dense_nbytes():.0%}" if phase == "decode" else ""])
    print_table(["phase", "skipped", "dense ms", "mindskip ms", "speedup", "ideal", "of ideal", "KV bytes"], table)
    print(f"dense: {1e3 / dense_dec[0] * args.batch:.1f} decode tokens/s, "
          f"{1e3 * args.batch * args.seq_len / dense_pre[0]:.0f} prefill tokens/s; decode ms are per step after a "
          f"{args.seq_len}-token prefill")
    if args.csv:
        write_csv(rows, args.csv)
    if args.plot:
        plot(table, args.plot)
    return rows


def plot(table: list[list], path: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for phase, marker in (("prefill", "o"), ("decode", "s")):
        pts = [r for r in table if r[0] == phase]
        x = [float(r[1].rstrip("%")) for r in pts]
        ax.plot(x, [float(r[4].rstrip("x")) for r in pts], marker + "-", label=f"{phase} measured")
        ax.plot(x, [float(r[5].rstrip("x")) for r in pts], marker + "--", alpha=0.6, label=f"{phase} ideal")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("tokens skipped in routed layers (%)")
    ax.set_ylabel("speedup over dense")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
