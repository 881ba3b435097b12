"""CUDA: decode tokens/s with whole-step CUDA graphs, dense (transformers' StaticCache) vs MindSkip (fixed K/V
pool sized for the run, static unrouted layers), at each prompt shape and skip fraction.

    python benchmarks/bench_graph_decode.py --shapes 1x512 8x512 --skip 0.5   # Llama-3-8B shapes, bf16 (CUDA)
    python benchmarks/bench_graph_decode.py --model llama3-8b --shapes 1x512 8x512 --skip 0.5 --decode-steps 16 \
        --repeats 2 --csv decode_graphs.csv                                   # as benchmarks/gpu_check.sh
    python benchmarks/bench_graph_decode.py --smoke   # tiny model; without CUDA: the same steps eagerly (CI)

Each measurement prefills eagerly, captures one decode step in a CUDA graph and replays it --decode-steps
times per repeat (the next token and position advanced on the device between replays). "ideal" is Amdahl's
law on measured times, with MindSkip's every-routed-target-skipped step as the floor; the skip fraction is
the one calibrated on the prompt. Without CUDA the script stops (it measures graphs), except with --smoke,
which runs the same caches and steps eagerly, with no graph: a check that the code runs, not a measurement.
"""

from __future__ import annotations

import os
import sys

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import Row, device_name, measure, print_table, write_csv  # noqa: E402
from benchmarks.models import TARGETS, amdahl, build_model, calibrate, new_cache, parse, parser, routed_model  # noqa: E402


def step_ms(m, ids: torch.Tensor, cache, steps: int, repeats: int) -> tuple[float, float, float]:
    """Prefill eagerly, capture one whole decode step in a CUDA graph, replay it `steps` times per repeat (the
    next token and position advanced on the device between replays); ms per step (median, p20, p80). Off
    CUDA the step runs eagerly instead (--smoke)."""
    batch, seq_len = ids.shape
    m(ids, cache=cache, use_cache=True, logits_to_keep=1)
    nxt = torch.randint(0, m.config.vocab_size, (batch, 1), device=ids.device)
    pos = torch.full((batch, 1), seq_len, device=ids.device)

    def step():
        return m(nxt, cache=cache, use_cache=True, position_ids=pos, logits_to_keep=1)

    if ids.device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up: compile, handles
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()

        def replay():
            graph.replay()
            return out
    else:
        replay = step

    def run():
        for _ in range(steps):
            nxt.copy_(replay().logits[:, -1:].argmax(-1))
            pos.add_(1)

    t = measure(run, ids.device, warmup=1, repeats=repeats)
    return tuple(x / steps for x in t)


def main(argv: list[str] | None = None) -> list[Row]:
    p = parser(__doc__)
    p.add_argument("--shapes", nargs="+", help="BxN prompt shapes, e.g. 1x512 8x512 (default: batch x seq-len)")
    p.add_argument("--decode-steps", type=int, default=32, help="graph replays (decode steps) per repeat")
    p.add_argument("--target", choices=TARGETS, default="attention", help="the routed sub-layer")
    args, device, dtype, shapes = parse(p, argv)
    if device.type != "cuda":
        if not args.smoke:
            raise SystemExit("bench_graph_decode.py needs CUDA (without it, --smoke runs the steps eagerly, "
                             "as a check that the code runs)")
        print(f"no CUDA ({device}): the decode steps run eagerly, without CUDA graphs: a code check, "
              "not a measurement")

    torch.manual_seed(0)
    dense = build_model(args.model, dtype, device)
    model = routed_model(dense, args.target, args.backend)
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
            none = step_ms(model, ids, mindskip_cache(), steps, args.repeats)  # every routed target skipped
            for skip in args.skip:
                d = step_ms(dense, ids, transformers.StaticCache(config=dense.config, max_cache_len=max_len),
                            steps, args.repeats)
                calibrate(model, ids, skip)
                m = step_ms(model, ids, mindskip_cache(), steps, args.repeats)
                ideal = amdahl(d[0], none[0], skip)
                point = f"{batch}x{seq_len}/{skip}"
                rows += [Row("e2e", "dense-graph", "decode", "time", "ms/token", point, *d, dev),
                         Row("e2e", "mindskip-graph", "decode", "time", "ms/token", point, *m, dev)]
                table.append([f"{batch}x{seq_len}", f"{skip:.0%}", f"{1e3 * batch / d[0]:.0f}",
                              f"{1e3 * batch / m[0]:.0f}", f"{d[0] / m[0]:.2f}x", f"{ideal:.2f}x",
                              f"{(d[0] / m[0]) / ideal:.0%}"])
    print_table(["shape", "skipped (prompt)", "dense tok/s", "mindskip tok/s", "speedup", "ideal", "of ideal"],
                table)
    if args.csv:
        write_csv(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
