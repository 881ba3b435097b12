"""The main job: a Llama-shaped model, dense vs MindSkip at the paper's setting, prefill and decode, side by side.

    python benchmarks/bench_e2e.py                    # CPU: small Llama (8 layers, hidden 512), 1 x 2048 tokens
    python benchmarks/bench_e2e.py --model llama3-8b  # default on CUDA: Llama-3-8B shapes, bf16, random weights
    python benchmarks/bench_e2e.py --skip 0 0.25 0.5 0.75 --csv out.csv --plot out.png
    python benchmarks/bench_e2e.py --compare-fused    # prefill: RMSNorm fused into router + gather, or not
    python benchmarks/bench_e2e.py --shapes 1x256 1x2048 4x512 --phases decode   # the README's decode points
    python benchmarks/bench_e2e.py --target attention mlp block --phases prefill --skip 0.5   # per target

Routers sit on the last half of the layers minus the final one (the paper's choice) and route each --target:
the attention sub-layer (MindSkip, the default), the MLP, or the whole block (Mixture-of-Depths). For each
skip fraction, every routed layer's threshold is calibrated on the prompt so that that fraction of its
tokens skips the target. "ideal" is Amdahl's law on measured times: the dense time minus that fraction of
the routed targets' time (dense minus the same model with every routed target skipped); for decode the
fraction is the one measured on the generated tokens (their routing is not calibrated).

Decode also reports the K/V bytes each routed layer moves per step (read: the kept sequences' cached rows,
once, by the paged kernel; written: the kept new rows) next to a dense layer's, and the K/V memory held
relative to a dense cache (the same bytes hold that many times more tokens: sequences x context).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindskip_kernels as mk  # noqa: E402
from benchmarks.harness import Row, device_name, measure, print_table, pyplot, write_csv  # noqa: E402
from mindskip_kernels.integrations.hf import (  # noqa: E402
    TARGETS,
    RoutedKVLayer,  # noqa: E402
    mindskip_layers,
    new_cache,
    record_routing,
)

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
    for i, layer in layers.items():
        with torch.no_grad(), record_routing(model) as rec:
            model(ids, use_cache=False, logits_to_keep=1)
        scores = next(e.scores for e in rec.entries if e.layer_idx == i)
        layer.mindskip.threshold = float(torch.quantile(scores.flatten().double(), skip))


def prefill(model, ids, cache_fn):
    return model(ids, cache=cache_fn(), use_cache=True, logits_to_keep=1)  # as generate() does


def decode(model, prefilled, tokens: torch.Tensor, kept: list[dict[int, torch.Tensor]] | None = None):
    """Decode steps after a prefill's output, feeding tokens [steps, B, 1] (random ids, like the prompt's, so
    the thresholds calibrated on the prompt skip about the same fraction of them; a random model's greedy
    output would repeat one token); returns the cache. With `kept` (untimed runs), appends each step's
    keep flags [B] per routed layer."""
    cache = prefilled.cache
    pos = torch.full_like(tokens[0], cache.get_seq_length())
    for nxt in tokens:
        with record_routing(model) if kept is not None else contextlib.nullcontext() as rec:
            model(nxt, cache=cache, use_cache=True, position_ids=pos)
        pos = pos + 1
        if kept is not None:
            kept.append({e.layer_idx: e.keep.flatten() for e in rec.entries})
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


def decode_bytes(model, cache, last: dict[int, torch.Tensor]) -> tuple[float, float, float]:
    """K/V bytes per routed layer in the last decode step, whose keep flags per layer are `last` (mean over
    routed layers): (read by the paged kernel: the kept sequences' cached rows once, written: the kept new
    rows, a dense layer's read)."""
    read = written = 0.0
    layers = [i for i in mindskip_layers(model) if isinstance(cache.layers[i], RoutedKVLayer)]
    for i in layers:
        routed = cache.layers[i]
        row = 2 * routed.num_kv_heads * routed.head_dim * routed.pool.k.element_size()
        keep = last[i]
        read += float((routed.lengths.long() * keep).sum()) * row
        written += float(keep.sum()) * row
    dense = keep.numel() * cache.get_seq_length() * row
    return read / len(layers), written / len(layers), dense


def routed_memory(model, cache) -> float:
    """K/V bytes the routed layers hold, as a fraction of what dense layers would hold for the same tokens."""
    layers = [i for i in mindskip_layers(model) if isinstance(cache.layers[i], RoutedKVLayer)]
    per_layer = cache.dense_nbytes() / len(cache.layers)
    return sum(cache.layers[i].nbytes() for i in layers) / (per_layer * len(layers))


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--model", default="llama3-8b" if cuda else "cpu-small",
                   help=f"a preset ({', '.join(PRESETS)}) or a Hugging Face model directory")
    p.add_argument("--skip", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75],
                   help="fractions of tokens skipped in each routed layer")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--shapes", nargs="+", help="BxN prompt shapes, e.g. 1x256 1x2048 4x512 (default: batch x seq-len)")
    p.add_argument("--phases", nargs="+", choices=["prefill", "decode"], default=["prefill", "decode"])
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="bfloat16" if cuda else "float32")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--target", nargs="+", choices=TARGETS, default=["attention"],
                   help="routed sub-layer(s), one table block each (--compare-fused / --graph-decode: the first)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--csv")
    p.add_argument("--plot")
    p.add_argument("--smoke", action="store_true", help="tiny model and sizes, a few seconds (CI)")
    p.add_argument("--compare-fused", action="store_true",
                   help="only prefill, RMSNorm fused into the router and gather vs unfused, interleaved")
    p.add_argument("--graph-decode", action="store_true",
                   help="CUDA: decode tokens/s with whole-step CUDA graphs, dense (HF static cache) vs MindSkip "
                        "(fixed pool, static unrouted layers), at each --shapes and --skip")
    p.add_argument("--predicated-gemv", action="store_true",
                   help="CUDA: the Triton predicated projection of a decode row (kept / skipped) vs cuBLAS "
                        "(F.linear) at the model's q/k/v/o shapes, batch 1 and 8")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.seq_len, args.decode_steps, args.repeats, args.shapes = "smoke", 32, 4, 1, None
    for s in args.skip:
        if not 0.0 <= s < 1.0:
            p.error(f"--skip values must be in [0, 1), got {s}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    shapes = [tuple(int(n) for n in s.lower().split("x")) for s in args.shapes or [f"{args.batch}x{args.seq_len}"]]

    torch.manual_seed(0)
    dense = build_model(args.model, dtype, device)
    if args.predicated_gemv:
        return predicated_gemv(args, dense, device)
    models = {target: routed_model(dense, target, args.backend) for target in args.target}
    model = models[args.target[0]]
    if args.compare_fused:
        batch, seq_len = shapes[0]
        ids = torch.randint(0, dense.config.vocab_size, (batch, seq_len), device=device)
        with torch.no_grad():
            rows = compare_fused(model, ids, args.skip, device, args.repeats, device_name(device))
        if args.csv:
            write_csv(rows, args.csv)
        return rows
    if args.graph_decode:
        return graph_decode(args, dense, model, shapes, device)
    rows, table = [], []
    for target, model in models.items():
        for batch, seq_len in shapes:
            rows += run_shape(args, dense, model, target, batch, seq_len, device, table)
    print_table(["target", "shape", "phase", "skipped", "dense ms", "mindskip ms", "speedup", "ideal", "of ideal",
                 "KV bytes"], table)
    if args.csv:
        write_csv(rows, args.csv)
    if args.plot:
        plot(table, args.plot)
    return rows


def routed_model(dense: torch.nn.Module, target: str, backend: str) -> torch.nn.Module:
    """A copy of `dense` with random routers (scores spread out, so the calibrated thresholds skip real
    fractions) on the paper's layers, routing `target`."""
    model = mk.apply_mindskip(copy.deepcopy(dense), backend=backend, target=target)
    for layer in mindskip_layers(model).values():
        torch.nn.init.normal_(layer.router.weight, std=layer.router.weight.shape[1] ** -0.5)
    return model


def run_shape(args, dense, model, target: str, batch: int, seq_len: int, device: torch.device,
              table: list) -> list[Row]:
    """Every skip fraction at one prompt shape, dense re-measured next to each point (interleaved)."""
    ids = torch.randint(0, dense.config.vocab_size, (batch, seq_len), device=device)
    tokens = torch.randint(0, dense.config.vocab_size, (args.decode_steps, batch, 1), device=device)
    dev, steps, shape = device_name(device), args.decode_steps, f"{batch}x{seq_len}"
    print(f"{args.model}: {dense.config.num_hidden_layers} layers, {len(mindskip_layers(model))} routing {target}, "
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

    rows = []
    with torch.no_grad():
        for skip in args.skip:  # dense and "none" are re-measured next to each point: the machine's speed drifts
            calibrate(model, ids, 1.0)
            none_pre, none_dec = timings(model, lambda: new_cache(model))  # every routed target skipped
            dense_pre, dense_dec = timings(dense, dense_cache)
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
            rows += [Row("e2e", "dense", "prefill", "time", "ms", point, *dense_pre, dev),
                     Row("e2e", "dense", "decode", "time", "ms/token", point, *dense_dec, dev),
                     Row("e2e", name, "prefill", "time", "ms", point, *pre, dev),
                     Row("e2e", name, "decode", "time", "ms/token", point, *dec, dev)]
            phases = (("prefill", dense_pre, none_pre, pre, skip), ("decode", dense_dec, none_dec, dec, decode_skip))
            for phase, d, n, m, skipped in phases:
                if phase not in args.phases:
                    continue
                ideal = d[0] / max(d[0] - skipped * max(d[0] - n[0], 0.0), 1e-9)
                table.append([target, shape, phase, f"{skipped:.0%}", d[0], m[0], f"{d[0] / m[0]:.2f}x",
                              f"{ideal:.2f}x", f"{(d[0] / m[0]) / ideal:.0%}",
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


def graph_step_ms(m, ids: torch.Tensor, cache, steps: int, repeats: int) -> tuple[float, float, float]:
    """Prefill eagerly, capture one whole decode step in a CUDA graph, replay it `steps` times per repeat (the
    next token and position advanced on the device between replays); ms per step (median, p10, p90)."""
    batch, seq_len = ids.shape
    m(ids, cache=cache, use_cache=True, logits_to_keep=1)
    nxt = torch.randint(0, m.config.vocab_size, (batch, 1), device=ids.device)
    pos = torch.full((batch, 1), seq_len, device=ids.device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        m(nxt, cache=cache, use_cache=True, position_ids=pos, logits_to_keep=1)  # warm-up: compile, handles
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = m(nxt, cache=cache, use_cache=True, position_ids=pos, logits_to_keep=1)

    def run():
        for _ in range(steps):
            graph.replay()
            nxt.copy_(out.logits[:, -1:].argmax(-1))
            pos.add_(1)

    t = measure(run, ids.device, warmup=1, repeats=repeats)
    return tuple(x / steps for x in t)


def graph_decode(args, dense, model, shapes, device) -> list[Row]:
    """Decode tokens/s with CUDA graphs: dense (transformers' StaticCache) vs MindSkip (fixed pool sized for the
    run, static unrouted layers), and MindSkip with every routed attention skipped (for the ideal)."""
    if device.type != "cuda":
        raise SystemExit("--graph-decode needs CUDA")
    rows, table, dev = [], [], device_name(device)
    steps = args.decode_steps
    with torch.no_grad():
        for batch, seq_len in shapes:
            ids = torch.randint(0, dense.config.vocab_size, (batch, seq_len), device=device)
            max_len = seq_len + 2 * (args.repeats + 2) * steps + 8  # every replay appends one token

            def mindskip_cache(batch=batch, max_len=max_len):
                blocks = batch * -(-max_len // 16)  # the dense-equivalent bound: never grows, never reads
                return new_cache(model, num_blocks=blocks, max_length=max_len, static=True)

            calibrate(model, ids, 1.0)
            none = graph_step_ms(model, ids, mindskip_cache(), steps, args.repeats)
            for skip in args.skip:
                d = graph_step_ms(dense, ids, transformers.StaticCache(config=dense.config, max_cache_len=max_len),
                                  steps, args.repeats)
                calibrate(model, ids, skip)
                m = graph_step_ms(model, ids, mindskip_cache(), steps, args.repeats)
                ideal = d[0] / max(d[0] - skip * max(d[0] - none[0], 0.0), 1e-9)
                rows += [Row("e2e", "dense-graph", "decode", "time", "ms/token", f"{batch}x{seq_len}/{skip}", *d, dev),
                         Row("e2e", "mindskip-graph", "decode", "time", "ms/token", f"{batch}x{seq_len}/{skip}", *m,
                             dev)]
                table.append([f"{batch}x{seq_len}", f"{skip:.0%}", f"{1e3 * batch / d[0]:.0f}",
                              f"{1e3 * batch / m[0]:.0f}", f"{d[0] / m[0]:.2f}x", f"{ideal:.2f}x",
                              f"{(d[0] / m[0]) / ideal:.0%}"])
    print_table(["shape", "skipped (prompt)", "dense tok/s", "mindskip tok/s", "speedup", "ideal", "of ideal"],
                table)
    if args.csv:
        write_csv(rows, args.csv)
    return rows


def predicated_gemv(args, dense, device) -> list[Row]:
    """Time the Triton predicated projection (all rows kept, all skipped) against F.linear (cuBLAS) on the
    first layer's q/k/v/o weights; a skipped row should cost about a launch."""
    from mindskip_kernels.backends import triton as tri

    attn, dtype, dev = dense.model.layers[0].self_attn, getattr(torch, args.dtype), device_name(device)
    rows, table = [], []
    with torch.no_grad():
        for batch in (1, 8):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                w = getattr(attn, name).weight
                x = torch.randn(batch, w.shape[1], device=device, dtype=dtype)
                times = {"cublas": measure(lambda x=x, w=w: torch.nn.functional.linear(x, w), device,
                                           repeats=args.repeats)}
                for label, flag in (("kept", True), ("skipped", False)):
                    keep = torch.full((batch,), flag, device=device)
                    times[label] = measure(lambda x=x, w=w, keep=keep: tri.predicated_linear(x, w, None, keep), device,
                                           repeats=args.repeats)
                for impl, t in times.items():
                    rows.append(Row("gemv", impl, name, "time", "ms", f"{batch}x{tuple(w.shape)}", *t, dev))
                table.append([batch, name, tuple(w.shape), times["cublas"][0], times["kept"][0], times["skipped"][0],
                              f"{times['cublas'][0] / times['skipped'][0]:.1f}x"])
    print_table(["batch", "proj", "weight", "cuBLAS ms", "kept ms", "skipped ms", "skip vs cuBLAS"], table)
    if args.csv:
        write_csv(rows, args.csv)
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
