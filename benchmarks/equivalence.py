"""Bit-identity of the model path across two commits: a refactor must not change a single output bit.

    python benchmarks/equivalence.py --old REV            # dump REV (a git worktree) and this tree, compare
    python benchmarks/equivalence.py --dump out.pt        # dump this tree's outputs only
    python benchmarks/equivalence.py --compare a.pt b.pt  # compare two dumps

On tiny random models of the four supported architectures (random RMSNorm weights and biases, random
routers so that routing is mixed), for every target x granularity x sink setting and every CPU backend
(reference, compiled, Triton's interpreter), it records: inference logits without a cache on a left-padded
batch, logits of a cached prefill and of cached decode steps on both decode paths (host compaction of the
kept rows, and the fixed-shape device path), greedy generations with a cache, and for each training rule the
training-mode logits and the routers' gradients. Two dumps are equal only if every tensor is bit-identical.
The old commit runs from a temporary git worktree with this tree's compiled extension copied in (csrc/ must
be the same in both commits).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit: the Triton backend on the CPU

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("llama", "mistral", "qwen2", "qwen3")
CONFIGS = [("attention", "token", 0), ("attention", "token", 1), ("attention", "sequence", 0),
           ("mlp", "token", 1), ("mlp", "sequence", 0), ("block", "token", 1), ("block", "sequence", 0)]
BACKENDS = ("reference", "compiled", "triton")
RULES = ("every_token", "paper")
NEW_TOKENS = 4


def tiny_model(arch: str, seed: int) -> torch.nn.Module:
    """A 4-layer model of `arch` with every weight random, norms and biases included."""
    import transformers

    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
                             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                             "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[arch]
    config = config_cls(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                        attn_implementation="sdpa", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    model.generation_config.eos_token_id = None
    return model


def prompts(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of three prompts (lengths 9, 5, 2)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate((9, 5, 2)):
        ids[b, 9 - n:] = torch.randint(1, 97, (n,), generator=gen)
        mask[b, 9 - n:] = 1
    return ids, mask


def routed(arch: str, target: str, granularity: str, sinks: int, backend: str, device_path: bool):
    """A tiny model with routers on layers 0 and 2 (random, threshold 0.5), on the chosen decode path."""
    import mindskip_kernels as mk
    from mindskip_kernels.integrations import hf

    model = tiny_model(arch, seed=1)
    options = {}
    if not hasattr(hf, "HOST_COMPACT_ON_CPU"):  # the new design: an explicit option
        options["host_compact"] = not device_path
    mk.apply_mindskip(model, layers=[0, 2], granularity=granularity, backend=backend, sink_tokens=sinks,
                      target=target, **options)
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in hf.mindskip_layers(model).values():
            layer.router.weight.normal_(0.0, 3.0 / layer.router.weight.shape[1] ** 0.5)
    return model


def host_compact(device_path: bool):
    """The old commit's module global, set for one run (the new design has an option instead)."""
    from mindskip_kernels.integrations import hf

    if hasattr(hf, "HOST_COMPACT_ON_CPU"):
        hf.HOST_COMPACT_ON_CPU = not device_path


def record(arch: str, target: str, granularity: str, sinks: int, backend: str, out: dict) -> None:
    """Every output of one configuration, into `out` under keys naming it."""
    from mindskip_kernels.integrations.hf import new_cache

    key = f"{arch}/{target}/{granularity}/sink{sinks}/{backend}"
    ids, mask = prompts(seed=3)
    for device_path in (False, True):
        host_compact(device_path)
        model = routed(arch, target, granularity, sinks, backend, device_path)
        path = "device" if device_path else "host"
        with torch.no_grad():
            if not device_path:
                out[f"{key}/nocache"] = model(ids, attention_mask=mask, use_cache=False).logits
            cache = new_cache(model)
            step = model(ids, attention_mask=mask, cache=cache, use_cache=True)
            out[f"{key}/{path}/prefill"] = step.logits
            nxt, m = step.logits[:, -1:].argmax(-1), mask
            for i in range(3):
                m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
                step = model(nxt, attention_mask=m, cache=cache, use_cache=True)
                out[f"{key}/{path}/decode{i}"] = step.logits
                nxt = step.logits[:, -1:].argmax(-1)
            out[f"{key}/{path}/generate"] = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                                           do_sample=False, pad_token_id=0)
    host_compact(False)
    if backend == "compiled":
        return  # no backward in the compiled backend: training runs on reference / triton
    for rule in RULES:
        model = routed(arch, target, granularity, sinks, backend, False)
        model.train()
        for layer in model.model.layers:
            if hasattr(layer, "mindskip"):
                layer.mindskip.rule = rule
        logits = model(ids, attention_mask=mask, use_cache=False).logits
        logits.float().square().mean().backward()
        out[f"{key}/train-{rule}"] = logits.detach()
        for i, layer in enumerate(model.model.layers):
            if hasattr(layer, "router") and layer.router.weight.grad is not None:
                out[f"{key}/train-{rule}/grad{i}"] = layer.router.weight.grad.clone()


def dump(path: str, quick: bool) -> None:
    from tqdm.auto import tqdm

    import mindskip_kernels

    print(f"dumping {mindskip_kernels.__file__}", file=sys.stderr)
    out: dict[str, torch.Tensor] = {}
    cases = [(a, *c, b) for a in ARCHS for c in CONFIGS for b in BACKENDS]
    if quick:
        cases = [c for c in cases if c[0] == "qwen2" and c[4] != "triton"]
    for arch, target, granularity, sinks, backend in tqdm(cases, desc="configurations"):
        record(arch, target, granularity, sinks, backend, out)
    torch.save(out, path)
    print(f"{len(out)} tensors -> {path}", file=sys.stderr)


def compare(a_path: str, b_path: str) -> int:
    a, b = torch.load(a_path), torch.load(b_path)
    missing = sorted(set(a) ^ set(b))
    differ = [k for k in sorted(set(a) & set(b)) if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
              or not torch.equal(a[k], b[k])]
    for k in missing:
        print(f"only in one dump: {k}")
    for k in differ:
        print(f"differs: {k} (max abs diff {(a[k].double() - b[k].double()).abs().max().item():.3g})")
    print(f"{len(set(a) & set(b)) - len(differ)} of {len(set(a) | set(b))} tensors bit-identical")
    return 1 if missing or differ else 0


def old_vs_new(rev: str, quick: bool) -> int:
    """Dump `rev` from a temporary worktree (with this tree's built extension) and this tree, then compare."""
    tmp = tempfile.mkdtemp(prefix="equivalence-")
    old_tree = os.path.join(tmp, "old")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", old_tree, rev], check=True)
    try:
        for lib in glob.glob(os.path.join(ROOT, "mindskip_kernels", "_C*.so")):
            shutil.copy(lib, os.path.join(old_tree, "mindskip_kernels"))
        dumps = []
        for name, tree in (("old", old_tree), ("new", ROOT)):
            dumps.append(os.path.join(tmp, f"{name}.pt"))
            env = dict(os.environ, PYTHONPATH=tree)
            cmd = [sys.executable, os.path.abspath(__file__), "--dump", dumps[-1]] + (["--quick"] if quick else [])
            subprocess.run(cmd, cwd=tree, env=env, check=True)
        return compare(*dumps)
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", old_tree], check=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--old", metavar="REV", help="compare commit REV with this tree")
    group.add_argument("--dump", metavar="FILE")
    group.add_argument("--compare", nargs=2, metavar=("A", "B"))
    p.add_argument("--quick", action="store_true", help="one architecture, no Triton (a smoke run)")
    args = p.parse_args(argv)
    if args.old:
        return old_vs_new(args.old, args.quick)
    if args.dump:
        dump(args.dump, args.quick)
        return 0
    return compare(*args.compare)


if __name__ == "__main__":
    sys.exit(main())
