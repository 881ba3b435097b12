"""Shared pieces of the model-level benchmarks (bench_e2e, bench_graph_decode, bench_fused_norm): the model
presets and their construction, the routed copy, threshold calibration, the prefill and decode steps, the
options every model-level script takes, Amdahl's "ideal", and the decode K/V byte and memory accounting.

Routers sit on the last half of the layers minus the final one (the paper's choice). For each skip fraction,
every routed layer's threshold is calibrated on the prompt so that that fraction of its tokens skips the
routed target.
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

import mindskip_kernels as mk
from mindskip_kernels.integrations.hf import TARGETS, RoutedKVLayer, mindskip_layers, new_cache, record_routing

__all__ = ["PRESETS", "SMOKE", "TARGETS", "IdealLayer", "amdahl", "build_model", "calibrate", "decode", "decode_bytes",
           "layers_swapped", "mindskip_layers", "new_cache", "parse", "parser", "prefill", "routed_memory",
           "routed_model"]

PRESETS = {
    "cpu-small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=8192),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}

# --smoke: what it overrides (the options a script has), a few seconds on the CPU (CI)
SMOKE = dict(model="smoke", seq_len=32, decode_steps=4, repeats=1, shapes=None)


def parser(doc: str) -> argparse.ArgumentParser:
    """The options every model-level benchmark takes; a script adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--model", default="llama3-8b" if cuda else "cpu-small",
                   help=f"a preset ({', '.join(PRESETS)}) or a Hugging Face model directory")
    p.add_argument("--skip", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75],
                   help="fractions of tokens skipped in each routed layer")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="bfloat16" if cuda else "float32")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--csv")
    p.add_argument("--smoke", action="store_true", help="tiny model and sizes, a few seconds (CI)")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None
          ) -> tuple[argparse.Namespace, torch.device, torch.dtype, list[tuple[int, int]]]:
    """(args with --smoke applied, device, dtype, prompt shapes (batch, seq_len): --shapes where the script
    has it, else --batch x --seq-len)."""
    args = p.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            if hasattr(args, name):
                setattr(args, name, value)
    for s in args.skip:
        if not 0.0 <= s < 1.0:
            p.error(f"--skip values must be in [0, 1), got {s}")
    names = getattr(args, "shapes", None) or [f"{args.batch}x{args.seq_len}"]
    shapes = [tuple(int(n) for n in s.lower().split("x")) for s in names]
    return args, torch.device(args.device), getattr(torch, args.dtype), shapes


def build_model(name: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    if name in PRESETS:
        config = transformers.LlamaConfig(**PRESETS[name], max_position_embeddings=8192,
                                          attn_implementation="sdpa")
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config).to(dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


def routed_model(dense: torch.nn.Module, target: str, backend: str, kv: str = "kept", adapter: str | None = None,
                 adapter_rank: int | None = None) -> torch.nn.Module:
    """A copy of `dense` with random routers (scores spread out, so the calibrated thresholds skip real
    fractions) on the paper's layers, routing `target` under the K/V rule `kv`, with a skipped-token adapter of
    that kind and rank (random weights: for timing)."""
    model = mk.apply_mindskip(copy.deepcopy(dense), backend=backend, target=target, kv=kv, adapter=adapter,
                              adapter_rank=adapter_rank)
    for layer in mindskip_layers(model).values():
        torch.nn.init.normal_(layer.router.weight, std=layer.router.weight.shape[1] ** -0.5)
        for p in layer.skip_adapter.parameters() if adapter else ():
            torch.nn.init.normal_(p, std=0.01)
    return model


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


def amdahl(dense_ms: float, none_ms: float, skipped: float) -> float:
    """Amdahl's law on measured times: the speedup when `skipped` of the routed targets' time goes, that time
    being dense minus `none_ms`, the same model with every routed target's work removed (bench_e2e: the
    removed-work model; a step whose work is linear in its tokens, like a decode step)."""
    return dense_ms / max(dense_ms - skipped * max(dense_ms - none_ms, 0.0), 1e-9)


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


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, Dh] rotated by cos/sin [B, T, Dh] (Llama's half-split layout)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class IdealLayer(nn.Module):
    """The per-layer ideal: a dense decoder layer doing, with stock PyTorch ops on its weights and no routing,
    gather or scatter, only the work of a routed layer whose target runs for `kept` tokens of each sequence.
    kv="kept": the dense sub-layer on the first `kept` tokens (they attend among themselves, as kept tokens do);
    kv="all": every token's K/V projections, then for a fixed spread of `kept` rows their queries over every key
    up to their position (SDPA with that boolean mask, by chunks of 64 queries), o_proj (and the MLP for a
    block). kept=0: the removed-work layer (the skipped work gone, the K/V projections left under kv="all"). With
    `adapter` (a SkipAdapter), the other rows get x + adapter(norm(x)), the target's RMSNorm (kept=0: the static
    linear replacement). No cache is read or written and no padding is assumed: for timing prefill, and decode
    steps with kept=0."""

    def __init__(self, layer: nn.Module, target: str, kv: str, kept: int, seq_len: int,
                 adapter: nn.Module | None = None) -> None:
        super().__init__()
        self.layer, self.target, self.kv, self.kept, self.adapter = layer, target, kv, kept, adapter
        g = torch.Generator().manual_seed(kept)  # kv="all": a fixed spread of kept rows, positions ascending
        order = torch.randperm(seq_len, generator=g)
        self.register_buffer("rows", order[:kept].sort().values, persistent=False)
        self.register_buffer("others", order[kept:].sort().values, persistent=False)

    def _skipped(self, x: torch.Tensor) -> torch.Tensor:
        """Skipped rows x [B, S, D]: unchanged, or x + adapter(norm(x))."""
        if self.adapter is None:
            return x
        norm = self.layer.post_attention_layernorm if self.target == "mlp" else self.layer.input_layernorm
        return x + self.adapter(norm(x))

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, **kwargs) -> torch.Tensor:
        x, layer, t = hidden_states, self.layer, self.kept
        cos, sin = position_embeddings
        if self.kv == "all":
            return self._kv_all(x, cos, sin)
        if self.target == "block":
            if t == 0:
                return self._skipped(x)
            head = layer(x[:, :t], position_embeddings=(cos[:, :t], sin[:, :t]))
            return torch.cat((head, self._skipped(x[:, t:])), 1)
        if self.target == "attention":
            if t:
                head = x[:, :t]
                head = head + layer.self_attn(layer.input_layernorm(head), (cos[:, :t], sin[:, :t]), None)[0]
                x = torch.cat((head, self._skipped(x[:, t:])), 1)
            else:
                x = self._skipped(x)
            return x + layer.mlp(layer.post_attention_layernorm(x))
        x = x + layer.self_attn(layer.input_layernorm(x), (cos, sin), None)[0]  # mlp target
        if t == 0:
            return self._skipped(x)
        head = x[:, :t]
        return torch.cat((head + layer.mlp(layer.post_attention_layernorm(head)), self._skipped(x[:, t:])), 1)

    def _kv_all(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Every token's K/V; the kept rows' queries over every key up to their position, o_proj (+ MLP: block)."""
        layer, attn = self.layer, self.layer.self_attn
        b, n, _ = x.shape
        z = layer.input_layernorm(x)
        k = attn.k_proj(z).view(b, n, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(z).view(b, n, -1, attn.head_dim).transpose(1, 2)
        k = _rope(k, cos, sin)
        if self.kept:
            rows = self.rows
            q = attn.q_proj(z[:, rows]).view(b, self.kept, -1, attn.head_dim).transpose(1, 2)
            q = _rope(q, cos[:, rows], sin[:, rows])
            out = torch.cat([self._attend(q[:, :, c0:c0 + 64], k, v, rows[c0:c0 + 64], attn.scaling)
                             for c0 in range(0, self.kept, 64)], 2)
            h = x[:, rows] + attn.o_proj(out.transpose(1, 2).flatten(2))
            if self.target == "block":
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            x = x.index_copy(1, rows, h)
        if self.adapter is not None:  # the other rows (kept=0: every row, e.g. of a decode step)
            x = x.index_copy(1, self.others, self._skipped(x[:, self.others])) if self.kept else self._skipped(x)
        if self.target == "block":
            return x
        return x + layer.mlp(layer.post_attention_layernorm(x))

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
        """Queries q [B, H, c, Dh] at positions `rows` (ascending) over keys 0..rows[-1] with the causal boolean mask:
        by chunks of 64 queries, the least work stock SDPA does for a sparse set of queries (on the CPU it does not
        skip masked blocks)."""
        keys = int(rows[-1]) + 1
        mask = torch.arange(keys) <= rows[:, None]
        return F.scaled_dot_product_attention(q, k[:, :, :keys], v[:, :, :keys], attn_mask=mask, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])


@contextlib.contextmanager
def layers_swapped(model: nn.Module, layers: list[nn.Module]):
    """`model` runs with its decoder layers replaced by `layers` inside the block (e.g. IdealLayer's)."""
    original = model.model.layers
    model.model.layers = nn.ModuleList(layers)
    try:
        yield model
    finally:
        model.model.layers = original
