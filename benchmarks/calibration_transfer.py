"""How much calibration text the global threshold needs to transfer: keep rate on held-out text vs the request.

    python benchmarks/calibration_transfer.py            # SmolLM2-135M, fitted token routers, CPU
    python benchmarks/calibration_transfer.py --smoke    # a tiny random Llama on bytes, seconds (CI)

Fits the token routers once (`fit_routers` on --fit-blocks training blocks, as `mindskip tune` does), then for
each number of calibration blocks and each keep rate: `calibrate` on the first N training blocks, and measure
the keep rate and perplexity on the held-out blocks (the split of benchmarks/quality.py). Prints the table;
the error |held-out keep - asked| is what docs/tuning.md's choice of CALIBRATION_ITEMS rests on.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindskip_kernels as mk  # noqa: E402
from benchmarks.harness import print_table  # noqa: E402
from benchmarks.quality import model_and_blocks  # noqa: E402
from mindskip_kernels.fitting import fit_routers  # noqa: E402
from mindskip_kernels.integrations.hf import paper_layers  # noqa: E402
from mindskip_kernels.tuning import calibrate, evaluate  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib-blocks", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--keeps", type=float, nargs="+", default=[0.75, 0.5])
    p.add_argument("--fit-blocks", type=int, default=400)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-blocks", type=int, default=24)
    p.add_argument("--sink-tokens", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--smoke", action="store_true", help="tiny random model and sizes (CI)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.seq_len, args.calib_blocks, args.fit_blocks, args.eval_blocks = 32, [2, 8], 8, 4
    base, train, held = model_and_blocks(args.smoke, args.seq_len)
    held = held[: args.eval_blocks]
    dense = evaluate(base, held, batch_size=8).perplexity
    model = mk.apply_mindskip(copy.deepcopy(base), layers=paper_layers(base.config.num_hidden_layers),
                              sink_tokens=args.sink_tokens)
    t0 = time.perf_counter()
    fit_routers(model, train[: args.fit_blocks], progress=False)
    print(f"fitted on {min(args.fit_blocks, len(train))} blocks of {args.seq_len} tokens in "
          f"{time.perf_counter() - t0:.0f} s; held-out {len(held)} blocks, dense ppl {dense:.3f}")
    rows = []
    for keep in args.keeps:
        for n in args.calib_blocks:
            result = calibrate(model, train[:n], keep, progress=False)
            held_out = evaluate(model, held, batch_size=8)
            rows.append([f"{keep:.3f}", n, f"{result.keep_rate:.3f}", f"{held_out.keep_rate:.3f}",
                         f"{held_out.keep_rate - keep:+.3f}", f"{held_out.perplexity / dense:.3f}"])
            print(f"  keep {keep:.3f}, {n} calibration blocks: held-out keep {held_out.keep_rate:.3f}", flush=True)
    print_table(["keep asked", "calibration blocks", "keep on calibration", "keep held-out", "held-out error",
                 "ppl / dense"], rows)


if __name__ == "__main__":
    main()
