"""Each attention op of the package against PyTorch's SDPA on the same problem, interleaved in one process.

A routed layer's attention must cost no more than the dense model's SDPA call for the same work: this prints,
per op and shape, the op's median time, SDPA's on the same problem, and their ratio (SDPA / op: >= 1 means the
op is at least as fast; the target is >= 0.95). The problems:

- varlen: B sequences of L tokens packed, causal (a routed layer's kept tokens attending among themselves) vs
  `F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)` on [B, H, L, Dh] (the dense model's call).
- varlen kept queries: a fraction `keep` of each sequence's queries over every key up to its own position
  (`query_positions`, kv="all") vs SDPA with the boolean mask built from the positions (the same problem), and
  vs dense causal SDPA of every query (what the routed layer replaces: the ratio a routed layer can save).
- paged varlen: L/2 new queries per sequence over an L-token paged cache (chunked prefill, bottom-right causal)
  vs SDPA on the contiguous cache with the bottom-right boolean mask.
- decode / paged decode: one query per sequence over an L-token cache vs SDPA of a [B, H, 1, Dh] query over the
  [B, Hkv, L, Dh] cache (a transformers DynamicCache's layout).
- keep-masked (training): causal attention with a random half of the keys masked vs SDPA with that mask.

    python benchmarks/bench_attention_sdpa.py                     # SmolLM2 and Llama head layouts, fp32 + bf16
    python benchmarks/bench_attention_sdpa.py --full              # 1-8 sequences x 64-4096 tokens, Dh 64/128
    python benchmarks/bench_attention_sdpa.py --smoke             # tiny, a few seconds (CI)
    python benchmarks/bench_attention_sdpa.py --csv out.csv --plot out.png

Timings alternate op and SDPA call by call (`measure_pair`), so drift on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.harness import Row, device_name, measure_pair, print_table, pyplot, write_csv  # noqa: E402
from mindskip_kernels import ops  # noqa: E402

# (query heads, KV heads, head dim): SmolLM2-135M, the bench_e2e CPU model, Llama-3-8B
HEADS = {"smollm2": (9, 3, 64), "cpu-small": (8, 2, 64), "llama3": (32, 8, 128)}


def problems(b: int, n: int, heads: tuple[int, int, int], dtype: torch.dtype, keep: float
             ) -> list[tuple[str, Callable[[], object], Callable[[], object]]]:
    """(name, op call, SDPA call on the same problem) for one shape."""
    hq, hkv, dh = heads
    g = torch.Generator().manual_seed(0)
    scale = dh**-0.5

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    q, k, v = rnd(b * n, hq, dh), rnd(b * n, hkv, dh), rnd(b * n, hkv, dh)
    cu = torch.arange(0, b * n + 1, n, dtype=torch.int32)
    qd, kd, vd = (t.view(b, n, -1, dh).transpose(1, 2) for t in (q, k, v))  # [B, H, N, Dh] views
    gqa = hq != hkv
    out = [("varlen causal",
            lambda: ops.varlen_attention(q, k, v, cu, cu, n, n, softmax_scale=scale),
            lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, enable_gqa=gqa))]

    # kept queries over every key (kv="all"): `keep` of each sequence's tokens, at their positions
    chosen = torch.rand(b, n, generator=g) < keep
    chosen[:, 0] = True
    counts = chosen.sum(1)
    tq = int(counts.sum())
    cuq = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).int()
    pos = chosen.nonzero()[:, 1]
    qk = rnd(tq, hq, dh)
    width = int(counts.max())
    qpad = torch.zeros(b, width, hq, dh, dtype=dtype)
    allowed = torch.zeros(b, 1, width, n, dtype=torch.bool)
    for i in range(b):
        rows = slice(int(cuq[i]), int(cuq[i + 1]))
        qpad[i, : counts[i]] = qk[rows]
        allowed[i, 0, : counts[i]] = torch.arange(n) <= pos[rows, None]
    qpad = qpad.transpose(1, 2)
    out.append((f"varlen kept queries {keep:.0%}",
                lambda: ops.varlen_attention(qk, k, v, cuq, cu, width, n, softmax_scale=scale, query_positions=pos),
                lambda: F.scaled_dot_product_attention(qpad, kd, vd, attn_mask=allowed, scale=scale, enable_gqa=gqa)))
    out.append((f"varlen kept queries {keep:.0%} vs dense causal",
                lambda: ops.varlen_attention(qk, k, v, cuq, cu, width, n, softmax_scale=scale, query_positions=pos),
                lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, enable_gqa=gqa)))

    # a paged cache of n rows per sequence in shuffled 16-row blocks; n/2 new queries (chunked prefill)
    bs, blocks = 16, -(-n // 16)
    perm = torch.randperm(b * blocks, generator=g)
    table = perm.view(b, blocks).int()
    kpool, vpool = rnd(b * blocks, bs, hkv, dh), rnd(b * blocks, bs, hkv, dh)
    rows_of = (table.long()[:, :, None] * bs + torch.arange(bs)).flatten(1)[:, :n]  # [B, n] pool rows
    kc = kpool.flatten(0, 1)[rows_of]  # [B, n, Hkv, Dh]: the same keys, contiguous
    vc = vpool.flatten(0, 1)[rows_of]
    lens = torch.full((b,), n, dtype=torch.int32)
    half = max(n // 2, 1)
    qn = rnd(b * half, hq, dh)
    cun = torch.arange(0, b * half + 1, half, dtype=torch.int32)
    bottom_right = torch.arange(n)[None, :] <= torch.arange(half)[:, None] + n - half
    qnd = qn.view(b, half, hq, dh).transpose(1, 2)
    kcd, vcd = kc.transpose(1, 2), vc.transpose(1, 2)
    out.append(("paged varlen (chunk of L/2)",
                lambda: ops.paged_varlen_attention(qn, kpool, vpool, cun, lens, table, half, softmax_scale=scale),
                lambda: F.scaled_dot_product_attention(qnd, kcd, vcd, attn_mask=bottom_right, scale=scale,
                                                       enable_gqa=gqa)))

    q1 = rnd(b, hq, dh)
    q1d = q1.unsqueeze(2)
    out.append(("decode",
                lambda: ops.decode_attention(q1, kc, vc, lens, softmax_scale=scale),
                lambda: F.scaled_dot_product_attention(q1d, kcd, vcd, scale=scale, enable_gqa=gqa)))
    out.append(("paged decode",
                lambda: ops.decode_attention(q1, kpool, vpool, lens, block_table=table, softmax_scale=scale),
                lambda: F.scaled_dot_product_attention(q1d, kcd, vcd, scale=scale, enable_gqa=gqa)))

    keep_flags = torch.rand(b, n, generator=g) < 0.5
    idx = torch.arange(n)
    km = (idx[:, None] >= idx[None, :]) & (keep_flags[:, None, None, :] | torch.eye(n, dtype=torch.bool))
    out.append(("keep-masked (training fwd)",
                lambda: ops.keep_masked_attention(qd, kd, vd, keep_flags, softmax_scale=scale),
                lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=km, scale=scale, enable_gqa=gqa)))
    return out


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["1x2048", "4x128", "4x512"], help="BxL, e.g. 1x2048 4x128")
    p.add_argument("--heads", nargs="+", choices=HEADS, default=["smollm2", "llama3"])
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    p.add_argument("--keep", type=float, default=0.5, help="kept fraction of queries in the kept-queries problem")
    p.add_argument("--ops", nargs="+", help="only the problems whose name starts with one of these")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--full", action="store_true", help="1/4/8 x 64..4096 tokens, every head layout")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds (CI)")
    p.add_argument("--csv")
    p.add_argument("--plot")
    args = p.parse_args(argv)
    shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]
    heads = args.heads
    if args.full:
        shapes = [(b, n) for b, n in itertools.product((1, 4, 8), (64, 256, 1024, 4096)) if b * n <= 8192]
        heads = list(HEADS)
    if args.smoke:
        shapes, heads, args.dtypes, args.repeats = [(2, 64)], ["smollm2"], ["float32"], 2
    cpu = torch.device("cpu")
    dev = device_name(cpu)
    rows, table = [], []
    with torch.no_grad():
        for (b, n), head, dtype_name in itertools.product(shapes, heads, args.dtypes):
            dtype = getattr(torch, dtype_name)
            for name, op, sdpa in problems(b, n, HEADS[head], dtype, args.keep):
                if args.ops and not any(name.startswith(o) for o in args.ops):
                    continue
                t_op, t_sdpa = measure_pair(op, sdpa, repeats=args.repeats)
                shape = f"{b}x{n} {head} {dtype_name}"
                rows += [Row("attention_vs_sdpa", "mindskip", name, "time", "ms", shape, *t_op, dev),
                         Row("attention_vs_sdpa", "sdpa", name, "time", "ms", shape, *t_sdpa, dev)]
                table.append([name, shape, t_op[0], t_sdpa[0], f"{t_sdpa[0] / t_op[0]:.2f}x",
                              f"[{t_sdpa[1] / t_op[2]:.2f}, {t_sdpa[2] / t_op[1]:.2f}]"])
    print(f"CPU attention ops vs SDPA on the same problem ({dev}, torch {torch.__version__})")
    print_table(["problem", "shape", "op ms", "SDPA ms", "SDPA / op", "[p20, p80]"], table)
    if args.csv:
        write_csv(rows, args.csv)
    if args.plot:
        plot(table, args.plot)
    return rows


def plot(table: list[list], path: str) -> None:
    """A heat map: problems x (shape, heads, dtype), each cell SDPA time / op time (log colour scale, red below 1)."""
    import numpy as np
    from matplotlib.colors import LogNorm

    plt = pyplot()
    problems = list(dict.fromkeys(r[0] for r in table))
    shapes = list(dict.fromkeys(r[1] for r in table))
    grid = np.full((len(problems), len(shapes)), np.nan)
    for r in table:
        grid[problems.index(r[0]), shapes.index(r[1])] = float(r[4].rstrip("x"))
    fig, ax = plt.subplots(figsize=(1.0 * len(shapes) + 4, 0.5 * len(problems) + 2))
    image = ax.imshow(grid, cmap="RdYlGn", norm=LogNorm(vmin=0.25, vmax=4))
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(shapes)), shapes, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(problems)), problems, fontsize=7)
    fig.colorbar(image, ax=ax, label="SDPA time / op time (>= 0.95: the target)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
