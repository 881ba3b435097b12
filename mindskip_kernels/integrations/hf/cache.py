"""A KV cache that stores only what was computed.

`MindSkipCache` is a transformers `DynamicCache` whose routed layers hold a `RoutedKVLayer`: K/V of the tokens
that computed them (kept tokens only under the paper's rule; every real token under kv="all"), per sequence, in
a `kv_pool.PagedKVPool` (fixed-size blocks, a block table per sequence, like vLLM), so sequences of the batch
have ragged lengths and waste at most one partial block each. The paged attention ops read the pool in place.
Unrouted layers keep transformers' ordinary `DynamicLayer`.
`apply_mindskip` models create it automatically in `generate` and in forwards with `use_cache=True`.

Sizing: by default each routed layer's pool starts at what the prompt needs and grows by 25% when the
host-side bound of the lengths says it may overflow (one read of the lengths at that point, see
`kv_pool`); `generate` reserves the block tables for its maximum length. Give `num_blocks` (per routed
layer) or `max_bytes` (all routed layers together) for a fixed pool that never reallocates: what a decode
loop captured in a CUDA graph needs; with `static=True` the unrouted layers are transformers' StaticLayer,
so a whole model's decode step can be captured (benchmarks/bench_graph_decode.py).

Decode state has one owner: the cache holds a `RoutingState` per routed layer (how many positions the layer
has seen, and the stored per-sequence decision of sequence granularity), whatever the target: a paged layer's
is its `RoutedKVLayer`'s, an MLP-target layer (a dense cache layer: attention runs for every token) has its own.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicCache, StaticLayer

from mindskip_kernels.kv_pool import DEFAULT_BLOCK_SIZE, PagedKVPool, blocks_for_bytes
from mindskip_kernels.ops import decode_attention, paged_varlen_attention
from mindskip_kernels.routing import RoutingPlan


class RoutingState:
    """A routed layer's decode state: `seen`, the token positions it has processed (kept or not: what
    transformers asks a cache layer for), and `decision`, the per-sequence prefill decision [B] bool of
    sequence granularity (on the device), reused for every later token."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.seen = 0
        self.decision: torch.Tensor | None = None

    def advance(self, num_tokens: int, decision: torch.Tensor | None) -> None:
        """After a forward over `num_tokens` new positions: count them, and store a new decision if one was made."""
        self.seen += num_tokens
        if decision is not None:
            self.decision = decision


class RoutedKVLayer(CacheLayerMixin):
    """Paged K/V of the kept tokens of one routed layer (a `PagedKVPool`, created at the first append), and
    the layer's `routing` state (`RoutingState`)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, num_kv_heads: int, head_dim: int, block_size: int = DEFAULT_BLOCK_SIZE, *,
                 num_blocks: int | None = None, max_length: int | None = None) -> None:
        super().__init__()
        self.num_kv_heads, self.head_dim, self.block_size = num_kv_heads, head_dim, block_size
        self.num_blocks, self.max_length = num_blocks, max_length
        self.routing = RoutingState()
        self.reset()

    def reset(self) -> None:
        self.routing.reset()
        self.pool: PagedKVPool | None = None

    # transformers' view of this layer: as long as the dense one would be
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("RoutedKVLayer is filled by MindSkip layers, not by transformers' cache.update")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError("RoutedKVLayer is filled by MindSkip layers, not by transformers' cache.update")

    def get_seq_length(self) -> int:
        return self.routing.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.routing.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _unsupported(self, *args, **kwargs) -> None:
        raise NotImplementedError("MindSkipCache does not support beam search, cache cropping or batch reordering")

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _unsupported

    @property
    def lengths(self) -> torch.Tensor | None:
        """[B] int32 stored (kept) tokens per sequence, on the device."""
        return None if self.pool is None else self.pool.lengths

    @property
    def block_table(self) -> torch.Tensor | None:
        return None if self.pool is None else self.pool.block_table

    @property
    def blocks_used(self) -> int:
        """Blocks handed out (reads the device counter: for inspection, not the hot path)."""
        return 0 if self.pool is None else int(self.pool.next_block[0])

    def nbytes(self) -> int:
        """Bytes of K and V in the blocks in use (the logical footprint, block-rounded)."""
        return 0 if self.pool is None else self.pool.nbytes()

    def _pool_for(self, batch: int, rows: int, like: torch.Tensor) -> PagedKVPool:
        """The pool, created for `batch` sequences on the first append (`rows`: that append's rows per
        sequence at most, the default initial size)."""
        if self.pool is None:
            blocks = self.num_blocks
            if blocks is None:  # default: what the first append may need, grown later on demand
                blocks = batch * max(1, math.ceil(rows / self.block_size))
            width = math.ceil(max(self.max_length or 0, rows, 1) / self.block_size)
            self.pool = PagedKVPool(batch, self.num_kv_heads, self.head_dim, num_blocks=blocks,
                                    block_size=self.block_size, max_blocks_per_seq=width, dtype=like.dtype,
                                    device=like.device, growable=self.num_blocks is None)
        return self.pool

    def append(self, k: torch.Tensor, v: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """Append the K/V [T, Hkv, Dh] (RoPE applied) of the rows of `plan` (the kept tokens; under kv="all"
        every real token) at the end of their sequences. Returns the lengths before [B] int64 (a copy)."""
        pool = self._pool_for(plan.batch_size, plan.seq_len, k)
        before = pool.lengths.long()
        seq = plan.indices // plan.seq_len
        rank = torch.arange(seq.shape[0], device=k.device) - plan.cu_seqlens.long().index_select(0, seq)
        pool.append(k, v, seq, rank, plan.cu_seqlens[1:] - plan.cu_seqlens[:-1], max_per_seq=plan.seq_len)
        return before

    def attend(self, q: torch.Tensor, plan: RoutingPlan, softmax_scale: float | None, backend: str,
               query_positions: torch.Tensor | None = None) -> torch.Tensor:
        """The queries [T, Hq, Dh] of `plan`'s rows over their sequences' cached keys (the paged varlen op reads
        the pool in place): causal aligned at the end, or with query_positions [T] up to those cache rows.
        Returns [T, Hq, Dh]."""
        pool = self._pool_for(plan.batch_size, plan.seq_len, q)
        return paged_varlen_attention(q, pool.k, pool.v, plan.cu_seqlens, pool.lengths, pool.block_table,
                                      plan.max_seqlen, causal=True, softmax_scale=softmax_scale,
                                      query_positions=query_positions, backend=backend)

    def attend_prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RoutingPlan,
                       softmax_scale: float | None, backend: str) -> torch.Tensor:
        """The kept rule's prefill and chunked prefill: append the kept tokens' K/V, then attend each kept query
        over its sequence's cached kept tokens. Returns [T, Hq, Dh]."""
        self.append(k, v, plan)
        return self.attend(q, plan, softmax_scale, backend)

    def attend_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                      softmax_scale: float | None, backend: str, rows: torch.Tensor | None = None,
                      write: torch.Tensor | None = None) -> torch.Tensor:
        """One new token per sequence, keep [B] bool a device flag per sequence. Device path (rows None): every
        sequence's q [B, ...] goes through; kept ones attend over their cache, skipped ones read no cache and get
        zeros; fixed shapes, no host read (unless the pool's capacity bound is hit, see `kv_pool`). With `rows`
        (the kept sequences, compacted on the host where that is free), q holds those rows only. Who appends:
        by default the kept rows (k/v like q, a skipped row takes no slot); with `write` [B] bool (kv="all") k/v
        hold every sequence's row and those with the flag append. Returns attention [R, Hq, Dh] for q's rows."""
        batch = keep.shape[0]
        pool = self._pool_for(batch, 1, k)
        every = torch.arange(batch, device=k.device)
        if write is not None:
            pool.append(k, v, every, torch.zeros_like(every), write.to(torch.int32), valid=write, max_per_seq=1)
        elif rows is None:
            pool.append(k, v, every, torch.zeros_like(every), keep.to(torch.int32), valid=keep, max_per_seq=1)
        else:
            pool.append(k, v, rows, torch.zeros_like(rows), keep.to(torch.int32), max_per_seq=1)
        if rows is None:
            lengths, table = torch.where(keep, pool.lengths, 0), pool.block_table  # 0: the kernel exits early
        else:
            lengths, table = pool.lengths.index_select(0, rows), pool.block_table.index_select(0, rows)
        return decode_attention(q, pool.k, pool.v, lengths, block_table=table, softmax_scale=softmax_scale,
                                backend=backend)


class MindSkipCache(DynamicCache):
    """DynamicCache with `RoutedKVLayer`s at the routed layers (see module docstring).

    `nbytes()` is the K/V memory held; `dense_nbytes()` what an ordinary cache would hold for the same
    tokens, so `nbytes() / dense_nbytes()` shows the saving.
    """

    def __init__(self, config, paged_layers: list[int], block_size: int = DEFAULT_BLOCK_SIZE, *,
                 num_blocks: int | None = None, max_bytes: int | None = None, max_length: int | None = None,
                 dtype: torch.dtype | None = None, static: bool = False, dense_routed_layers: tuple[int, ...] = ()
                 ) -> None:
        """paged_layers: the routed layers whose cache holds kept K/V only (a `RoutedKVLayer` each);
        dense_routed_layers: routed layers with an ordinary cache layer (the MLP target)."""
        super().__init__(config=config)
        if static:  # unrouted layers as transformers' StaticLayer: the whole decode step can be graph-captured
            if max_length is None:
                raise ValueError("static=True needs max_length (the static layers' capacity)")
            self.layers = [StaticLayer(max_cache_len=max_length) for _ in self.layers]
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if max_bytes is not None:  # a byte budget for all routed layers' K/V, like vLLM's memory budget
            if num_blocks is not None:
                raise ValueError("give at most one of num_blocks and max_bytes")
            dtype = dtype or getattr(config, "dtype", None) or torch.float32
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            num_blocks = blocks_for_bytes(max_bytes, block_size, config.num_key_value_heads, head_dim, dtype,
                                          pools=max(len(paged_layers), 1))
        for i in paged_layers:
            self.layers[i] = RoutedKVLayer(config.num_key_value_heads, head_dim, block_size, num_blocks=num_blocks,
                                           max_length=max_length)
            # static: every layer has fixed shapes, so transformers builds the full static-size mask in decode
            # (a non-compileable cache lets SDPA skip the mask for one query, which static layers cannot take)
            self.layers[i].is_compileable = static
        self.routing = {i: self.layers[i].routing for i in paged_layers} | {i: RoutingState()
                                                                             for i in dense_routed_layers}

    def routing_state(self, layer_idx: int) -> RoutingState:
        """The decode state of routed layer `layer_idx` (TypeError if this cache does not route it)."""
        if layer_idx not in self.routing:
            raise TypeError(f"layer {layer_idx} of this MindSkipCache is not routed; build the cache for this model "
                            f"(new_cache(model))")
        return self.routing[layer_idx]

    def kv_layer(self, layer_idx: int) -> RoutedKVLayer | None:
        """The kept-only paged K/V of a routed layer, or None where the layer keeps a dense cache layer."""
        layer = self.layers[layer_idx]
        return layer if isinstance(layer, RoutedKVLayer) else None

    def reset(self) -> None:
        super().reset()
        for state in self.routing.values():
            state.reset()

    def nbytes(self) -> int:
        total = 0
        for layer in self.layers:
            if isinstance(layer, RoutedKVLayer):
                total += layer.nbytes()
            elif getattr(layer, "keys", None) is not None and layer.keys.numel():
                total += 2 * layer.keys.numel() * layer.keys.element_size()
        return total

    def dense_nbytes(self) -> int:
        """K/V bytes of an ordinary cache over the same tokens (every layer, every position)."""
        dense = [layer for layer in self.layers
                 if not isinstance(layer, RoutedKVLayer) and getattr(layer, "keys", None) is not None]
        if not dense:
            return 0
        per_layer = 2 * dense[0].keys.numel() * dense[0].keys.element_size()  # the final layer never routes
        return per_layer * len(self.layers)
