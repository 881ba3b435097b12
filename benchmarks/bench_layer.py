"""One Llama-shaped attention sub-layer: dense vs MindSkip at several skip fractions, side by side.

    python benchmarks/bench_layer.py                 # CPU default: hidden 2048, 16 heads / 4 KV heads, 2048 tokens
    python benchmarks/bench_layer.py --smoke         # tiny sizes, a few seconds (CI)

"ideal" is the dense sub-layer run on only the kept number of tokens: what a perfect MindSkip would cost.
Speedup = dense / mindskip; efficiency = speedup / ideal speedup. "all kept" is the dense sub-layer's time over
the MindSkip layer keeping every token (threshold 0): the whole fixed cost, attention kernel included (1.00 = none);
"routing ops" is route + gather + scatter alone as a fraction of the dense sub-layer.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindskip_kernels as mk  # noqa: E402
from benchmarks.harness import Row, device_name, measure, print_table, pyplot, write_csv  # noqa: E402
from mindskip_kernels.attention import MindSkipAttention, apply_rope, rope_cos_sin  # noqa: E402


def dense_sublayer(layer: MindSkipAttention, x: torch.Tensor) -> torch.Tensor:
    """x + causal self-attention over every token (the same weights, SDPA), i.e. the unrouted layer."""
    b, n, _ = x.shape
    q = layer.q_proj(x).view(b, n, layer.num_heads, layer.head_dim)
    k = layer.k_proj(x).view(b, n, layer.num_kv_heads, layer.head_dim)
    v = layer.v_proj(x).view(b, n, layer.num_kv_heads, layer.head_dim)
    cos, sin = rope_cos_sin(torch.arange(n, device=x.device), layer.head_dim, layer.rope_theta, x.dtype)
    q, k = (apply_rope(t.reshape(b * n, -1, layer.head_dim), cos.repeat(b, 1), sin.repeat(b, 1)).view(b, n, -1,
            layer.head_dim) for t in (q, k))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=layer.num_heads != layer.num_kv_heads)
    return x + layer.o_proj(out.transpose(1, 2).reshape(b, n, -1))


def threshold_for_skip(layer: MindSkipAttention, x: torch.Tensor, skip: float) -> float:
    """The router threshold that skips the given fraction of tokens (a quantile of the real scores)."""
    scores = mk.route(x, layer.router.weight, threshold=0.0, backend="reference").scores.flatten()
    return float(torch.quantile(scores.double(), skip)) if skip > 0 else 0.0


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--skips", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--backend", default="auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--csv", help="write rows to this CSV file")
    p.add_argument("--plot", help="write a PNG of the speedups to this file")
    p.add_argument("--smoke", action="store_true", help="tiny sizes for CI")
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.heads, args.kv_heads, args.seq_len, args.repeats = 128, 4, 2, 64, 2
    for s in args.skips:
        if not 0.0 <= s < 1.0:
            p.error(f"--skips values must be in [0, 1), got {s}")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    torch.manual_seed(0)
    layer = MindSkipAttention(args.hidden, args.heads, args.kv_heads, backend=args.backend).to(device, dtype).eval()
    torch.nn.init.normal_(layer.router.weight, std=args.hidden**-0.5)
    x = torch.randn(args.batch, args.seq_len, args.hidden, device=device, dtype=dtype)
    dev = device_name(device)
    table, rows = [], []
    with torch.no_grad():
        for skip in args.skips:  # dense is re-measured next to each point: the machine's speed drifts
            dense = measure(lambda: dense_sublayer(layer, x), device, repeats=args.repeats)
            layer.threshold = 0.0
            all_kept = measure(lambda: layer(x, residual=x), device, repeats=args.repeats)
            layer.threshold = threshold_for_skip(layer, x, skip)
            plan = mk.route(x, layer.router.weight, threshold=layer.threshold, backend=args.backend)
            kept = max(1, plan.num_kept // args.batch)
            ideal = measure(lambda kept=kept: dense_sublayer(layer, x[:, :kept]), device, repeats=args.repeats)
            ms = measure(lambda: layer(x, residual=x), device, repeats=args.repeats)
            vals = torch.randn(plan.num_kept, args.hidden, device=device, dtype=dtype)

            def machinery(plan=plan, vals=vals):
                mk.route(x, layer.router.weight, threshold=layer.threshold, backend=args.backend)
                mk.gather(x, plan, backend=args.backend)
                mk.scatter_add(x, vals, plan, backend=args.backend)

            over = measure(machinery, device, repeats=args.repeats)
            kept_frac = plan.num_kept / (args.batch * args.seq_len)
            rows += [Row("attn_sublayer", "dense", "fwd", "time", "ms", f"{skip}", *dense, dev),
                     Row("attn_sublayer", "mindskip", "fwd", "time", "ms", f"{skip}", *ms, dev),
                     Row("attn_sublayer", "ideal", "fwd", "time", "ms", f"{skip}", *ideal, dev),
                     Row("attn_sublayer", "mindskip_all_kept", "fwd", "time", "ms", f"{skip}", *all_kept, dev),
                     Row("attn_sublayer", "mindskip_overhead", "fwd", "time", "ms", f"{skip}", *over, dev)]
            speedup, ideal_speedup = dense[0] / ms[0], dense[0] / ideal[0]
            table.append([f"{1 - kept_frac:.0%}", dense[0], ms[0], ideal[0], f"{speedup:.2f}x",
                          f"{ideal_speedup:.2f}x", f"{speedup / ideal_speedup:.0%}", f"{dense[0] / all_kept[0]:.2f}",
                          f"{over[0] / dense[0]:.1%}"])

    print(f"attention sub-layer, hidden {args.hidden}, {args.heads}/{args.kv_heads} heads, batch {args.batch} x "
          f"{args.seq_len} tokens, {str(dtype).removeprefix('torch.')}, {dev}, backend={args.backend}")
    print_table(["skipped", "dense ms", "mindskip ms", "ideal ms", "speedup", "ideal speedup", "efficiency",
                 "all kept", "routing ops"], table)
    if args.csv:
        write_csv(rows, args.csv)
    if args.plot:
        plot(table, args.plot)
    return rows


def plot(table: list[list], path: str) -> None:
    plt = pyplot()

    skips = [float(r[0].rstrip("%")) for r in table]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(skips, [float(r[4].rstrip("x")) for r in table], "o-", label="MindSkip (measured)")
    ax.plot(skips, [float(r[5].rstrip("x")) for r in table], "s--", label="ideal (dense on kept tokens)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("tokens skipped (%)")
    ax.set_ylabel("speedup over dense")
    ax.set_title("attention sub-layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
