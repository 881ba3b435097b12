"""The routed vLLM models: vLLM's own Llama / Mistral / Qwen2 / Qwen3 classes whose chosen decoder layers route.

A routed layer (token granularity, kv="all"; design.md s.1) on the flattened tokens of a step:
- the router reads the layer's input_layernorm output z (vLLM's fused add + RMSNorm, as the dense layer);
  keep iff sigmoid(z . w) >= threshold, or the token is one of the first `sink_tokens` of its sequence;
- every token's K and V are projected (the K/V rows of the fused qkv weight, split off at load), RoPE'd at its
  position and written through vLLM's cache update (`unified_kv_cache_update`), as the dense layer writes them;
- only the kept tokens project their query (the Q rows of the weight), attend and run o_proj; the attention of
  the kept queries runs in vLLM's own CPU attention kernel over vLLM's paged cache, each maximal run of
  consecutive kept tokens of a request being one pseudo-request (query length = run length, keys = its
  request's block table up to the run's last position; causal masking is bottom-right aligned, so each kept
  query sees exactly its request's keys 0..its position). Other attention backends take the dense attention
  call (the queries of skipped rows set to zero, their output dropped: correct, no attention saved);
- the attention target: skipped rows add nothing (or the adapter's update), then the MLP runs for every token;
  the block target: the kept rows run the post-attention norm and the MLP, a skipped row passes the whole
  layer unchanged (or gets the adapter's update).

The routed part of a layer is one opaque custom op (`torch.ops.vllm.mindskip_routed_sublayer`): its shapes are
data-dependent and it reads the kept count on the host (one read per routed layer and step: free on the CPU, a
sync on a GPU), so torch.compile does not trace into it, and it must not be captured in a CUDA graph: run with
`enforce_eager=True`, or add "vllm::mindskip_routed_sublayer" to `compilation_config.splitting_ops` (untested
here, no GPU). Under tensor parallelism every rank holds the same hidden states and routers, so every rank
takes the same decisions and calls the row-parallel o_proj / MLP down projection with the same rows.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import weakref

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention.attention import get_attention_context, unified_kv_cache_update
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.utils.torch_utils import direct_register_custom_op

from mindskip_kernels.adapter import SkipAdapter
from mindskip_kernels.integrations.vllm.routers import CONFIG_KEY, RoutedLayerSpec, read_routers
from mindskip_kernels.routing import score

# MINDSKIP_VLLM_ATTENTION=dense: the dense attention call for every backend (the fallback, testable on the CPU)
ATTENTION_ENV = "MINDSKIP_VLLM_ATTENTION"
_LAYERS: weakref.WeakValueDictionary[str, Routing] = weakref.WeakValueDictionary()
_NAMES = itertools.count()


class Routing(nn.Module):
    """A routed decoder layer's router (fp32 [1, D], loaded from the routers directory, not the checkpoint),
    settings and adapter, and its attention's fused qkv projection split in two (`q_proj` for the kept rows,
    `kv_proj` for every row: vLLM's CPU GEMMs prepack a weight whole, so a row slice of it cannot be run);
    `update` is the routed part of the layer forward."""

    def __init__(self, layer: nn.Module, spec: RoutedLayerSpec, hidden_size: int, prefix: str) -> None:
        super().__init__()
        self.router = nn.Linear(hidden_size, 1, bias=False, dtype=torch.float32)
        qkv = layer.self_attn.qkv_proj
        make = dict(bias=qkv.bias is not None, params_dtype=qkv.weight.dtype)
        self.q_proj = ReplicatedLinear(hidden_size, layer.self_attn.q_size, prefix=f"{prefix}.q_proj", **make)
        self.kv_proj = ReplicatedLinear(hidden_size, 2 * layer.self_attn.kv_size, prefix=f"{prefix}.kv_proj", **make)
        self.threshold, self.target, self.sink_tokens = spec.threshold, spec.target, spec.sink_tokens
        self.skip_adapter = None if spec.adapter is None else SkipAdapter(hidden_size, spec.adapter[0],
                                                                          spec.adapter[1])
        self.spec = spec
        self.layer = [layer]  # not a submodule: the layer owns this module
        self.name = f"mindskip.{next(_NAMES)}"
        _LAYERS[self.name] = self

    @torch.no_grad()
    def load(self) -> None:
        """After vLLM's weight loading: copy the router (and adapter) weights of the spec in, split the loaded
        qkv projection (this rank's shard) into q_proj and kv_proj and drop it."""
        self.router.weight.copy_(self.spec.weight)
        attn = self.layer[0].self_attn
        q_size = attn.q_size
        for part, rows in ((self.q_proj, slice(0, q_size)), (self.kv_proj, slice(q_size, None))):
            part.weight.copy_(attn.qkv_proj.weight[rows])
            if part.bias is not None:
                part.bias.copy_(attn.qkv_proj.bias[rows])
        del attn.qkv_proj
        if self.skip_adapter is not None:
            self.skip_adapter.load_state_dict(self.spec.adapter[2])

    def update(self, z: torch.Tensor, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The routed sub-layer on z = input_layernorm(x) [N, D]: the attention target's update (zero on skipped
        rows, or their adapter update), or the block target's new hidden states."""
        layer = self.layer[0]
        attn = layer.self_attn
        meta, attn_layer, kv_cache, _ = get_attention_context(attn.attn.layer_name)
        n = z.shape[0]
        if meta is None:  # vLLM's profile / warm-up run: dense shapes, no cache
            keep = torch.ones(n, dtype=torch.bool, device=z.device)
        else:
            sinks = positions < self.sink_tokens
            keep = score(z.unsqueeze(0), self.router.weight, threshold=self.threshold,
                         force_keep=sinks.unsqueeze(0))[1][0]
            keep[getattr(meta, "num_actual_tokens", n):] = False  # padding rows
        kept = keep.nonzero().squeeze(1)  # the host read of the kept count
        every = kept.numel() == n  # all kept (no gathers, vLLM's own attention metadata)
        q_size, hd = attn.q_size, attn.head_dim
        heads, kv_heads = q_size // hd, attn.kv_size // hd
        k, v = self.kv_proj(z)[0].split([attn.kv_size, attn.kv_size], dim=-1)
        if hasattr(attn, "k_norm"):  # Qwen3's per-head norms
            k = attn.k_norm(k.reshape(-1, kv_heads, hd)).view(k.shape)
        k, _ = attn.rotary_emb(positions, k.contiguous())
        if meta is not None:
            unified_kv_cache_update(k.view(n, kv_heads, hd), v.contiguous().view(n, kv_heads, hd),
                                    attn.attn.layer_name)
        if kept.numel() == 0:  # the whole step skips: no Q, attention, o_proj (block: MLP); on every TP rank
            return self._combine(layer, z, x, keep, kept, None)
        q = self.q_proj(z if every else z.index_select(0, kept))[0]
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q.view(-1, heads, hd)).view(q.shape)
        q, _ = attn.rotary_emb(positions if every else positions.index_select(0, kept), q)
        if meta is None:
            o = torch.zeros_like(q)
        else:
            o = _kept_attention(q.view(-1, heads, hd), kept, positions, meta, attn_layer, kv_cache, n)
        o, _ = attn.o_proj(o.reshape(kept.numel(), q_size))
        return self._combine(layer, z, x, keep, kept, o)

    def _combine(self, layer: nn.Module, z: torch.Tensor, x: torch.Tensor, keep: torch.Tensor,
                 kept: torch.Tensor, o: torch.Tensor | None) -> torch.Tensor:
        """Scatter the kept rows' result o (None: none kept); the skipped rows get nothing or the adapter's
        update."""
        every = kept.numel() == x.shape[0]
        if self.target == "attention":
            base = torch.zeros_like(x)
            if o is None or every:
                out = base if o is None else o.to(x.dtype)
            else:
                out = torch.zeros_like(x).index_copy_(0, kept, o.to(x.dtype))
        else:
            base = x
            out = x.clone()
            if o is not None:
                hidden, residual = layer.post_attention_layernorm(o.to(x.dtype), out if every
                                                                  else x.index_select(0, kept))
                rows = residual + layer.mlp(hidden)
                out = rows if every else out.index_copy_(0, kept, rows)
        if self.skip_adapter is not None and not every:
            skipped = (~keep).nonzero().squeeze(1)
            rows = base.index_select(0, skipped) + self.skip_adapter(z.index_select(0, skipped)).to(x.dtype)
            out.index_copy_(0, skipped, rows)
        return out


def _kept_attention(q: torch.Tensor, kept: torch.Tensor, positions: torch.Tensor, meta, attn_layer: nn.Module,
                    kv_cache: torch.Tensor, n: int) -> torch.Tensor:
    """Attention of the kept queries q [T, H, Dh] (tokens `kept` of the step) over vLLM's paged cache."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    impl = attn_layer.impl
    out = torch.empty_like(q)
    if kept.numel() == n:  # every token kept: vLLM's own call
        impl.forward(attn_layer, q, None, None, kv_cache, meta, output=out)
        return out
    runs_ok = (isinstance(impl, CPUAttentionBackendImpl) and meta.causal and meta.dynamic_causal is None
               and not meta.use_sdpa_prefill and os.environ.get(ATTENTION_ENV, "runs") != "dense")
    if not runs_ok:  # any backend: the dense call, skipped rows' queries zero, their output dropped
        full = q.new_zeros((n, *q.shape[1:]))
        full.index_copy_(0, kept, q)
        dense = torch.empty_like(full)
        impl.forward(attn_layer, full, None, None, kv_cache, meta, output=dense)
        return dense.index_select(0, kept)
    from vllm import _custom_ops as ops
    from vllm import envs

    # each maximal run of consecutive kept tokens of one request is a pseudo-request
    request = torch.searchsorted(meta.query_start_loc[1:], kept, right=True)
    starts = torch.ones_like(kept, dtype=torch.bool)
    starts[1:] = (kept[1:] != kept[:-1] + 1) | (request[1:] != request[:-1])
    first = starts.nonzero().squeeze(1)
    query_start_loc = torch.cat([first, first.new_tensor([kept.numel()])]).to(torch.int32)
    last = kept.index_select(0, query_start_loc[1:].long() - 1)
    seq_lens = (positions.index_select(0, last) + 1).to(torch.int32)
    block_table = meta.block_table.index_select(0, request.index_select(0, first))
    scheduler = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=first.numel(), num_heads=impl.num_heads, num_kv_heads=impl.num_kv_heads, head_dim=impl.head_size,
        seq_lens=seq_lens, dtype=q.dtype, query_start_loc=query_start_loc, causal=True,
        sliding_window_size=impl.sliding_window, isa=attn_layer.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        kv_cache_dtype=impl.kv_cache_dtype)
    runs = dataclasses.replace(meta, num_actual_tokens=kept.numel(), max_query_len=int(query_start_loc.diff().max()),
                               query_start_loc=query_start_loc, max_seq_len=int(seq_lens.max()), seq_lens=seq_lens,
                               block_table=block_table, scheduler_metadata=scheduler)
    impl.forward(attn_layer, q, None, None, kv_cache, runs, output=out)
    return out


def mindskip_routed_sublayer(z: torch.Tensor, x: torch.Tensor, positions: torch.Tensor, name: str) -> torch.Tensor:
    """The routed part of decoder layer `name` (an opaque op for torch.compile: data-dependent shapes inside)."""
    return _LAYERS[name].update(z, x, positions)


def _fake(z: torch.Tensor, x: torch.Tensor, positions: torch.Tensor, name: str) -> torch.Tensor:
    return torch.empty_like(x)


direct_register_custom_op("mindskip_routed_sublayer", mindskip_routed_sublayer, fake_impl=_fake)


def _routed_forward(self: nn.Module, positions: torch.Tensor, hidden_states: torch.Tensor,
                    residual: torch.Tensor | None, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A routed decoder layer's forward (replaces the instance's): vLLM's dense layer around the routed op.
    Extra layer arguments (Mistral's `t_cond`) serve only features refused at build."""
    if residual is None:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
    else:
        hidden_states, residual = self.input_layernorm(hidden_states, residual)
    out = torch.ops.vllm.mindskip_routed_sublayer(hidden_states, residual, positions, self.mindskip.name)
    if self.mindskip.target == "block":  # the next layer's fused add: 0 + out == out exactly
        return torch.zeros_like(out), out
    hidden_states, residual = self.post_attention_layernorm(out, residual)
    return self.mlp(hidden_states), residual


class _Routed:
    """Mixin for a vLLM causal LM: read the routers named by config.mindskip_routers, route those layers."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        model_config = vllm_config.model_config
        config = model_config.hf_config
        if vllm_config.quant_config is not None:
            raise ValueError("the MindSkip vLLM plugin runs unquantized models only (it slices the qkv weight)")
        path = getattr(config, CONFIG_KEY, None)
        if path is None:
            raise ValueError(f"config.json has no {CONFIG_KEY!r}: write the model folder with `mindskip "
                             f"export-vllm`, or pass hf_overrides={{{CONFIG_KEY!r}: ROUTERS_DIR, ...}}")
        path = os.path.join(model_config.model, path)  # an absolute path stays as it is
        specs = read_routers(path, model_type=config.model_type, hidden_size=config.hidden_size,
                             num_layers=config.num_hidden_layers)
        self.mindskip_layers: dict[int, nn.Module] = {}
        for i, layer in enumerate(self.model.layers):
            if i in specs and hasattr(layer, "self_attn"):  # a pipeline stage holds only its own layers
                if getattr(layer.self_attn, "do_llama_4_scaling", False):
                    raise ValueError("the MindSkip vLLM plugin does not run Llama-4 attention scaling")
                if getattr(layer, "ada_rms_norm_t_cond", None) is not None:
                    raise ValueError("the MindSkip vLLM plugin does not run Mistral's ada_rms_norm_t_cond")
                layer.mindskip = Routing(layer, specs[i], config.hidden_size, f"{prefix}.model.layers.{i}.mindskip")
                layer.forward = _routed_forward.__get__(layer)
                self.mindskip_layers[i] = layer

    def load_weights(self, weights) -> set[str]:
        """vLLM's loading of the checkpoint, then the routers (and adapters) from the routers directory."""
        loaded = super().load_weights(weights)
        for layer in self.mindskip_layers.values():
            layer.mindskip.load()
        ours = {name for name, _ in self.named_parameters() if ".mindskip." in name}
        return set(loaded) | ours


class MindSkipLlamaForCausalLM(_Routed, LlamaForCausalLM):
    """vLLM's LlamaForCausalLM with MindSkip routing."""


class MindSkipMistralForCausalLM(_Routed, MistralForCausalLM):
    """vLLM's MistralForCausalLM with MindSkip routing."""


class MindSkipQwen2ForCausalLM(_Routed, Qwen2ForCausalLM):
    """vLLM's Qwen2ForCausalLM with MindSkip routing."""


class MindSkipQwen3ForCausalLM(_Routed, Qwen3ForCausalLM):
    """vLLM's Qwen3ForCausalLM with MindSkip routing."""
