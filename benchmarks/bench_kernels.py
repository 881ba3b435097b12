"""Each routing/attention kernel per available backend against the plain PyTorch sequence (the reference
backend: matmul + sigmoid, nonzero + cumsum, index_select, index_add, padded SDPA), and on CUDA varlen
attention also against torch's varlen_attn, compiled FlexAttention and flash-attn (benchmarks/baselines.py).
Keep-masked attention (Router-Tuning's training attention) is timed forward + backward; on CUDA beside
compiled FlexAttention with a mask_mod reading the keep flags, SDPA with the materialised [B, 1, N, N] mask,
and dense causal SDPA (the floor: it ignores the keep flags). The predicated GEMV of a decode row (Triton, CUDA:
a skipped row reads no weight) is timed with all rows kept and all skipped at an attention layer's q/k/v/o
projection shapes (Llama-3-8B's on CUDA), batch 1 and 8, against F.linear (cuBLAS). Kept-query attention
(kv="all": the kept tokens' queries, keep 0.5 and 0.25, against every token's keys through query_positions) is
timed against dense causal SDPA over all queries (what routing replaces) and on CUDA compiled FlexAttention with
a block mask built from the positions.

    python benchmarks/bench_kernels.py                 # CPU, or CUDA when present; < 1 min on CPU
    python benchmarks/bench_kernels.py --smoke         # tiny sizes, a few seconds (CI)
    python benchmarks/bench_kernels.py --csv benchmarks/results/kernels.csv --plot benchmarks/results/kernels.png

Prints one row per (op, dtype, backend): median time, p20/p80, GB/s on CUDA (bytes an ideal kernel must
move), and the speedup over the op's baseline measured in the same process: the reference backend, for
the predicated GEMV (no reference) F.linear, for kept-query attention dense causal SDPA.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import baselines  # noqa: E402
from benchmarks.harness import Row, device_name, measure, print_table, pyplot, write_csv  # noqa: E402
from mindskip_kernels.backends import available  # noqa: E402


@dataclass
class Case:
    op: str                           # backend function name
    label: str                        # shown in the table
    dtype: torch.dtype
    shape: str
    bytes: int                        # minimum bytes moved (for GB/s)
    call: Callable[[object], object]  # backend module -> result
    mode: str = "fwd"                 # what `call` runs: "fwd" or "fwd+bwd"
    baseline: str = "reference"       # the provider the speedup is over
    providers: dict[str, object] | None = None  # the providers timed (None: every one, where it supports op)


def sizes(device: torch.device, smoke: bool) -> dict[str, int]:
    if smoke:
        return {"B": 2, "N": 128, "D": 256, "S": 256, "Hq": 8, "Hkv": 2, "Dh": 64, "L": 128}
    if device.type == "cuda":
        return {"B": 8, "N": 4096, "D": 4096, "S": 8192, "Hq": 32, "Hkv": 8, "Dh": 128, "L": 2048}
    return {"B": 4, "N": 2048, "D": 1024, "S": 2048, "Hq": 32, "Hkv": 8, "Dh": 128, "L": 256}


def cases(device: torch.device, dtype: torch.dtype, sz: dict[str, int]) -> list[Case]:
    b, n, d = sz["B"], sz["N"], sz["D"]
    es = torch.tensor([], dtype=dtype).element_size()
    z = torch.randn(b, n, d, device=device).to(dtype)
    w = (torch.randn(d, device=device) / d**0.5).to(dtype)
    mask = torch.ones(b, n, dtype=torch.bool, device=device)
    keep = torch.rand(b, n, device=device) < 0.5
    idx = keep.reshape(-1).nonzero().squeeze(1)
    t = idx.numel()
    x2d = z.reshape(-1, d)
    values = torch.randn(t, d, device=device).to(dtype)
    scale = torch.rand(t, device=device)
    shape = f"B{b} N{n} D{d}"
    out = [
        Case("router", "router token", dtype, shape, b * n * (d * es + 6),
             lambda m: m.router(z, w, mask, 0.5, "token")),
        Case("router", "router sequence", dtype, shape, b * n * (d * es + 6),
             lambda m: m.router(z, w, mask, 0.5, "sequence")),
        Case("gather", "gather", dtype, f"{shape} T{t}", 2 * t * d * es, lambda m: m.gather(x2d, idx)),
        Case("scatter_add", "scatter_add+scale", dtype, f"{shape} T{t}", (2 * b * n + t) * d * es,
             lambda m: m.scatter_add(x2d, values, idx, scale)),
    ]
    # the routed layer's front end from the hidden states x: RMSNorm -> router -> gather of kept rows. The
    # PyTorch sequence normalizes every row; fused backends fold the norm into the router and the gather.
    gamma = (1 + 0.1 * torch.randn(d, device=device)).to(dtype)
    out.append(Case("router", "norm+router+gather", dtype, f"{shape} T{t}", (2 * b * n + 2 * t) * d * es,
                    lambda m: norm_router_gather(m, z, gamma, w, mask, idx)))
    # decode: one query per sequence against ragged caches (half to full capacity)
    s, hq, hkv, dh = sz["S"], sz["Hq"], sz["Hkv"], sz["Dh"]
    q = torch.randn(b, hq, dh, device=device).to(dtype)
    kc = torch.randn(b, s, hkv, dh, device=device).to(dtype)
    vc = torch.randn(b, s, hkv, dh, device=device).to(dtype)
    lens = torch.linspace(s // 2, s, b, device=device).long()
    kv_bytes = int(lens.sum()) * hkv * dh * es * 2
    out.append(Case("decode_attention", "decode_attention", dtype, f"B{b} S{s} H{hq}/{hkv} Dh{dh}", kv_bytes,
                    lambda m: m.decode_attention(q, kc, vc, lens, None, dh**-0.5)))
    # varlen attention on kept tokens (causal), the prefill of a routed layer: ragged lengths L/2..L
    lv = sz["L"]
    lengths = torch.linspace(lv // 2, lv, b).long()
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int().to(device)
    tv = int(lengths.sum())
    qv = torch.randn(tv, hq, dh, device=device).to(dtype)
    kv = torch.randn(tv, hkv, dh, device=device).to(dtype)
    out.append(Case("varlen_attention", "varlen_attention", dtype, f"B{b} L{lv // 2}..{lv} H{hq}/{hkv} Dh{dh}",
                    (qv.numel() * 2 + kv.numel() * 2) * es,
                    lambda m: m.varlen_attention(qv, kv, kv, cu, cu, lv, lv, True, dh**-0.5)))
    out.append(keep_attention_case(device, dtype, sz))
    return out + predicated_linear_cases(device, dtype, sz)


LINEAR = "F.linear(cuBLAS)"  # the predicated GEMV's baseline (CUDA)


def predicated_linear_cases(device: torch.device, dtype: torch.dtype, sz: dict[str, int]) -> list[Case]:
    """The projections of a decode row, x [B, K] @ W[N, K]^T, at an attention layer's q/k/v/o shapes, batch 1
    and 8, every row kept or every row skipped (a skipped row should cost about a launch)."""
    d, hq, hkv, dh = sz["D"], sz["Hq"], sz["Hkv"], sz["Dh"]
    es = torch.tensor([], dtype=dtype).element_size()
    projections = {"q_proj": (hq * dh, d), "k_proj": (hkv * dh, d), "v_proj": (hkv * dh, d), "o_proj": (d, hq * dh)}
    out = []
    for batch in (1, 8):
        for proj, (n, k) in projections.items():
            w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
            x = torch.randn(batch, k, device=device).to(dtype)
            for label, flag in (("kept", True), ("skipped", False)):
                keep = torch.full((batch,), flag, device=device)
                moved = (n * k + batch * k) * es if flag else 0  # weight and rows, read only when kept
                out.append(Case("predicated_linear", f"predicated_linear {label}", dtype, f"B{batch} {proj} {n}x{k}",
                                moved + batch * (n * es + 1), gemv(x, w, keep), baseline=LINEAR))
    return out


def gemv(x: torch.Tensor, w: torch.Tensor, keep: torch.Tensor) -> Callable[[object], torch.Tensor]:
    return lambda m: m.predicated_linear(x, w, None, keep)


def linear_baseline(device: torch.device) -> dict[str, SimpleNamespace]:
    """A pseudo-backend for predicated_linear on CUDA: F.linear (cuBLAS), which reads the weight whatever the
    keep flags."""
    if device.type != "cuda":
        return {}

    def supports(op: str, dev: torch.device, dtype: torch.dtype) -> bool:
        return op == "predicated_linear" and dev.type == "cuda"

    return {LINEAR: SimpleNamespace(supports=supports, predicated_linear=lambda x, w, b, keep: F.linear(x, w, b))}


def keep_attention_case(device: torch.device, dtype: torch.dtype, sz: dict[str, int]) -> Case:
    """Keep-masked attention forward + backward on one sequence of L tokens, half of them kept."""
    n, hq, hkv, dh = sz["L"], sz["Hq"], sz["Hkv"], sz["Dh"]
    es = torch.tensor([], dtype=dtype).element_size()
    q = torch.randn(1, hq, n, dh, device=device).to(dtype).requires_grad_()
    k, v = (torch.randn(1, hkv, n, dh, device=device).to(dtype).requires_grad_() for _ in range(2))
    grad = torch.randn(1, hq, n, dh, device=device).to(dtype)
    keep = torch.rand(1, n, device=device) < 0.5

    def call(m: object) -> tuple[torch.Tensor, ...]:
        out = m.keep_masked_attention(q, k, v, keep, dh**-0.5)
        return torch.autograd.grad(out, (q, k, v), grad)

    # reads q, k, v, o, dO and writes o, dq, dk, dv at least once (q-sized: q, o twice, dO, dq; kv-sized: k, v
    # twice, dk, dv)
    return Case("keep_masked_attention", "keep_masked_attention", dtype, f"B1 N{n} H{hq}/{hkv} Dh{dh}",
                6 * (q.numel() + k.numel()) * es, call, mode="fwd+bwd")


def keep_attention_baselines(device: torch.device) -> dict[str, SimpleNamespace]:
    """Pseudo-backends for keep_masked_attention on CUDA: compiled FlexAttention (its block mask is built in
    every call, as a training step must for new keep flags), SDPA in the input dtype with the materialised
    boolean mask, and dense causal SDPA (no keep mask: the floor)."""
    if device.type != "cuda":
        return {}

    def supports(op: str, dev: torch.device, dtype: torch.dtype) -> bool:
        return op == "keep_masked_attention" and dev.type == "cuda"

    def sdpa_mask(q, k, v, keep, scale):
        n = keep.shape[1]
        idx = torch.arange(n, device=keep.device)
        mask = (idx[:, None] >= idx[None, :]) & (keep[:, None, None, :] | (idx[:, None] == idx[None, :]))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])

    def sdpa_causal(q, k, v, keep, scale):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])

    return {"flex.keep(compiled)": SimpleNamespace(supports=supports, keep_masked_attention=flex_keep_attention()),
            "sdpa.bool_mask": SimpleNamespace(supports=supports, keep_masked_attention=sdpa_mask),
            "sdpa.causal(no keep)": SimpleNamespace(supports=supports, keep_masked_attention=sdpa_causal)}


def flex_keep_attention() -> Callable[..., torch.Tensor]:
    """keep_masked_attention(q, k, v, keep, scale) by compiled FlexAttention: a mask_mod reading the keep flags
    (key j visible to query i iff j <= i and (keep[b, j] or j == i)), the block mask built per call."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (keep[b, kv_idx] | (kv_idx == q_idx))

        n = keep.shape[1]
        block_mask = create_block_mask(mask_mod, keep.shape[0], None, n, n, device=keep.device)
        return compiled(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])

    return run


DENSE_SDPA = "sdpa.causal(all queries)"  # kept-query attention's baseline


def kept_query_cases(device: torch.device, dtype: torch.dtype, sz: dict[str, int],
                     ours: dict[str, object]) -> list[Case]:
    """Kept-query attention (kv="all"): B sequences of L tokens, the queries of the kept tokens (keep 0.5 and
    0.25) packed with their positions against the keys of every token (query_positions), timed for our
    backends `ours` against dense causal SDPA over all L queries and, on CUDA, compiled FlexAttention."""
    b, n, hq, hkv, dh = sz["B"], sz["L"], sz["Hq"], sz["Hkv"], sz["Dh"]
    es = torch.tensor([], dtype=dtype).element_size()
    q_all = torch.randn(b, hq, n, dh, device=device).to(dtype)
    k_all, v_all = (torch.randn(b, hkv, n, dh, device=device).to(dtype) for _ in range(2))
    k, v = (t.transpose(1, 2).reshape(b * n, hkv, dh) for t in (k_all, v_all))  # packed keys of every token
    cu_k = (torch.arange(b + 1, device=device) * n).int()

    def dense(*_: object) -> torch.Tensor:  # every query of every token: what routing the queries replaces
        return F.scaled_dot_product_attention(q_all, k_all, v_all, is_causal=True, scale=dh**-0.5,
                                              enable_gqa=hq != hkv)

    out = []
    for rate in (0.5, 0.25):
        keep = torch.rand(b, n, device=device) < rate
        keep[:, 0] = True  # no empty sequence
        rows = keep.reshape(-1).nonzero().squeeze(1)  # untimed set-up: the routing plan's compaction
        q = q_all.transpose(1, 2).reshape(b * n, hq, dh).index_select(0, rows)
        positions = rows % n
        counts = keep.sum(1)
        cu_q = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).int()
        max_q = int(counts.max())
        baselines = {DENSE_SDPA: SimpleNamespace(supports=lambda op, dev, dt: True, varlen_attention=dense)}
        if device.type == "cuda":
            baselines["flex.positions(compiled)"] = flex_positions_attention(cu_q, positions, n, q.shape[0], b * n)
        t = q.shape[0]
        out.append(Case("varlen_attention", f"kept-query attention keep {rate}", dtype,
                        f"B{b} L{n} T{t} H{hq}/{hkv} Dh{dh}", (2 * t * hq + 2 * b * n * hkv) * dh * es,
                        kept_query(q, k, v, cu_q, cu_k, max_q, n, positions), baseline=DENSE_SDPA,
                        providers=ours | baselines))
    return out


def kept_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int,
               max_k: int, positions: torch.Tensor) -> Callable[[object], torch.Tensor]:
    """A backend module -> its varlen attention of the kept queries with their positions."""
    return lambda m: m.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, True, q.shape[-1] ** -0.5, positions)


def flex_positions_attention(cu_q: torch.Tensor, positions: torch.Tensor, n: int, rows_q: int,
                             rows_k: int) -> SimpleNamespace:
    """Compiled FlexAttention over the packed kept queries and all keys as one batch row: query t sees key j iff
    both are of one sequence and j's position <= positions[t] (the block mask built once, as per routed layer)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)
    seq_q = torch.searchsorted(cu_q[1:].long(), torch.arange(rows_q, device=cu_q.device), right=True)

    def mask_mod(b, h, q_idx, kv_idx):
        return (seq_q[q_idx] == kv_idx // n) & (kv_idx % n <= positions[q_idx])

    block_mask = create_block_mask(mask_mod, 1, None, rows_q, rows_k, device=cu_q.device)

    def run(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, query_positions):
        out = compiled(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), block_mask=block_mask, scale=scale,
                       enable_gqa=q.shape[1] != k.shape[1])
        return out[0].transpose(0, 1)

    return SimpleNamespace(supports=lambda op, dev, dt: dev.type == "cuda", varlen_attention=run)


def norm_router_gather(m: object, x: torch.Tensor, gamma: torch.Tensor, w: torch.Tensor, mask: torch.Tensor,
                       idx: torch.Tensor) -> torch.Tensor:
    """Fused when the backend has router_from_hidden/gather_norm, else rms_norm + router + gather."""
    if hasattr(m, "router_from_hidden") and hasattr(m, "gather_norm"):
        m.router_from_hidden(x, gamma, 1e-6, w, mask, 0.5, "token")
        return m.gather_norm(x.reshape(-1, x.shape[-1]), gamma, 1e-6, idx)
    z = torch.nn.functional.rms_norm(x, (x.shape[-1],), gamma, 1e-6)
    m.router(z, w, mask, 0.5, "token")
    return m.gather(z.reshape(-1, x.shape[-1]), idx)


def compaction_case(device: torch.device, sz: dict[str, int]) -> Case:
    b, n = sz["B"], sz["N"]
    keep = torch.rand(b, n, device=device) < 0.5
    pos = torch.arange(n, device=device).expand(b, n)
    return Case("compact", "compact", torch.bool, f"B{b} N{n}", b * n * 9 + int(keep.sum()) * 16,
                lambda m: m.compact(keep, pos))


def providers(device: torch.device) -> list[str]:
    """Backends to time here; Triton only on CUDA (its CPU interpreter is for tests, never timed)."""
    names = ["reference"] + [name for name, ok in available().items() if ok and name != "reference"]
    return [name for name in names if device.type == "cuda" or name != "triton"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default: torch's")
    parser.add_argument("--csv", help="write rows to this CSV (benchmarks/harness.py schema)")
    parser.add_argument("--plot", help="write a PNG of the speedups over the baseline")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sz = sizes(device, args.smoke)
    repeats = 3 if args.smoke else 10
    modules = {name: importlib.import_module(f"mindskip_kernels.backends.{name}") for name in providers(device)}
    modules |= baselines.available(device)  # external varlen attention libraries, side by side (CUDA)
    modules |= keep_attention_baselines(device)
    modules |= linear_baseline(device)
    ours = {name: modules[name] for name in providers(device)}
    all_cases = [compaction_case(device, sz)]
    for name in args.dtypes.split(","):
        all_cases += cases(device, getattr(torch, name), sz) + kept_query_cases(device, getattr(torch, name), sz, ours)

    rows: list[Row] = []
    table: list[list[object]] = []
    dev_name = device_name(device)
    for case in all_cases:
        ref_ms = None
        timed = modules if case.providers is None else case.providers
        for name in sorted(timed, key=lambda name, case=case: name != case.baseline):  # the baseline first
            mod = timed[name]
            dtype = torch.float32 if case.dtype == torch.bool else case.dtype
            if not mod.supports(case.op, device, dtype):
                continue
            p50, p20, p80 = measure(lambda mod=mod, case=case: case.call(mod), device, repeats=repeats)
            ref_ms = p50 if name == case.baseline else ref_ms
            speedup = ref_ms / p50 if ref_ms else float("nan")
            gbs = case.bytes / p50 / 1e6 if device.type == "cuda" else float("nan")
            dt = str(case.dtype).removeprefix("torch.")
            rows.append(Row(case.label, name, case.mode, "time", "ms", f"{dt} {case.shape}", p50, p20, p80,
                            dev_name))
            table.append([case.label, dt, case.shape, name, p50, p20, p80, gbs, speedup])
    print(f"device: {dev_name}, torch {torch.__version__}")
    print_table(["op", "dtype", "shape", "backend", "p50 ms", "p20 ms", "p80 ms", "GB/s", "x vs baseline"], table)
    if args.csv:
        write_csv(rows, args.csv)
    if args.plot:
        plot(table, args.plot, dev_name)
    return 0


def plot(table: list[list[object]], path: str, title: str) -> None:
    """Bar chart of the speedup over the baseline, one bar per (op, dtype, backend)."""
    plt = pyplot()

    bars = [(f"{r[0]}\n{r[1]} {r[3]}", r[8]) for r in table if r[3] not in ("reference", LINEAR, DENSE_SDPA)]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(bars)), 4))
    ax.bar(range(len(bars)), [s for _, s in bars])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(bars)), [label for label, _ in bars], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speedup over the baseline (x)")
    ax.set_title(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
