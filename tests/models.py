"""The shared test models: tiny transformers models of the four supported architectures, their routers, the
tokenizer corpus, and the generation helpers the model tests share.

transformers initialises every RMSNorm weight to one and every projection bias to zero. With those, the two
norms of a layer are the same function and a norm's weight is a no-op, so a router that reads the wrong norm,
or a fused norm that drops its weight, would pass every test. Here every RMSNorm weight (input_layernorm,
post_attention_layernorm, the final norm, Qwen3's q_norm / k_norm) is drawn around one and every bias the
architecture has (Qwen2's q/k/v) is random: deterministic in `seed`, like the rest of the model, and drawn
from a generator of their own so that the global RNG after a build (which tests draw their inputs from) is the
same as with transformers' initialisation alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
import transformers

from mindskip_kernels.integrations.hf import mindskip_layers, new_cache, record_routing

ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}
NORM_STD = 0.5  # RMSNorm weights are 1 + NORM_STD * randn
BIAS_STD = 0.1  # the size of a projection's output of a normalised row (48 inputs, weights of std 0.02) is ~0.14


def randomize_norms_and_biases(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every RMSNorm weight to 1 + NORM_STD * randn, every nn.Linear bias to BIAS_STD * randn (in place),
    drawn from a generator seeded with `seed` (the global RNG is not touched)."""
    gen = torch.Generator().manual_seed(1_000_003 + seed)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.copy_(1 + NORM_STD * torch.randn(module.weight.shape, generator=gen))
            elif isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.copy_(BIAS_STD * torch.randn(module.bias.shape, generator=gen))
    return model


def tiny_model(arch: str = "llama", layers: int = 4, seed: int = 0) -> torch.nn.Module:
    config_cls, model_cls = ARCHS[arch]
    config = config_cls(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                        attn_implementation="sdpa", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = randomize_norms_and_biases(model_cls(config).eval(), seed)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model


def tiny_llama(vocab: int, seed: int = 0) -> transformers.LlamaForCausalLM:
    """The tuning tests' tiny Llama, of the tokenizer's vocabulary (see `train_tokenizer`)."""
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                                      num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return randomize_norms_and_biases(transformers.LlamaForCausalLM(config).eval(), seed)


def randomize_routers(model, std: float = 2.0) -> None:
    with torch.no_grad():
        for layer in mindskip_layers(model).values():
            layer.router.weight.normal_(0.0, std / layer.router.weight.shape[1] ** 0.5)


# ---- a real tokenizer, trained here (no download) -------------------------------------------------------------

TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 12
        + "Routers decide which tokens attend; the rest pass through. " * 12)
RECORDS = [{"instruction": "Repeat the word", "input": w, "output": f"{w} {w} {w}"}
           for w in ("fox", "dog", "stitch", "time", "router", "token")]


def train_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer, trained on TEXT and RECORDS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT, json.dumps(RECORDS)], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


# ---- generation -----------------------------------------------------------------------------------------------

NEW = 10  # new tokens of `greedy` and `reference_sequence_generation`


def left_padded_prompts(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, length in enumerate(lengths):
        ids[b, n - length :] = torch.randint(1, 97, (length,), generator=gen)
        mask[b, n - length :] = 1
    return ids, mask


def greedy(model, ids, mask, use_cache: bool) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, use_cache=use_cache,
                              pad_token_id=0)


def reference_sequence_generation(model, prompt: torch.Tensor) -> torch.Tensor:
    """Step-by-step full recomputation of one sequence, with each routed layer forced to its prefill decision."""
    layers = mindskip_layers(model)
    saved = {i: layer.mindskip.threshold for i, layer in layers.items()}
    with torch.no_grad():
        with record_routing(model) as rec:
            model(prompt.unsqueeze(0), use_cache=False)
        for entry in rec.entries:  # scores are < 1, so threshold 1.0 skips and 0.0 keeps
            layers[entry.layer_idx].mindskip.threshold = 0.0 if bool(entry.keep.any()) else 1.0
        ids = prompt.unsqueeze(0)
        for _ in range(NEW):
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    for i, layer in layers.items():
        layer.mindskip.threshold = saved[i]
    return ids[0, prompt.shape[0] :]


def run_cache(model, ids, mask, steps: int = 6, cache=None):
    """Prefill plus `steps` greedy decode steps through an explicit cache (a MindSkipCache: `cache`, or
    new_cache(model, block_size=4)); returns the cache."""
    cache = new_cache(model, block_size=4) if cache is None else cache
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            pos = pos[:, -1:] + 1
            out = model(nxt, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
    assert out.cache is cache
    return cache


# ---- several processes ----------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(path, source: str, nproc: int | None = None) -> None:
    """Write `source` (dedented) to `path` and run it with the repo on the path: under torchrun with `nproc`
    CPU processes (gloo), or as one plain process when nproc is None. Fails the test with its stderr."""
    path.write_text(textwrap.dedent(source))
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, *launcher, str(path)], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
