"""A KV cache that stores only what was computed.

`MindSkipCache` is a transformers `DynamicCache` whose routed layers hold a `RoutedKVLayer`: K/V of kept
tokens only, per sequence, in a paged pool of fixed-size blocks (a block table per sequence, like vLLM), so
sequences of the batch have ragged lengths and waste at most one partial block each. Unrouted layers keep
transformers' ordinary `DynamicLayer`. `apply_mindskip` models create it automatically in `generate` and in
forwards with `use_cache=True`.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicCache

from mindskip_kernels.ops import decode_attention, varlen_attention
from mindskip_kernels.routing import RoutingPlan

DEFAULT_BLOCK_SIZE = 16


class RoutedKVLayer(CacheLayerMixin):
    """Paged K/V of the kept tokens of one routed layer.

    pool_k/pool_v: [num_blocks, block_size, Hkv, Dh]; block_table [B, max_blocks] int32 maps a sequence's
    i-th block to a pool block; lengths [B] int32 counts each sequence's stored (kept) tokens. `seen` is the
    number of token positions the layer has processed (kept or not), which is what transformers asks for.
    `decision` holds the per-sequence prefill decision for sequence granularity.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, num_kv_heads: int, head_dim: int, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        super().__init__()
        self.num_kv_heads, self.head_dim, self.block_size = num_kv_heads, head_dim, block_size
        self.reset()

    def reset(self) -> None:
        self.seen = 0
        self.blocks_used = 0
        self.pool_k: torch.Tensor | None = None
        self.pool_v: torch.Tensor | None = None
        self.block_table: torch.Tensor | None = None
        self.lengths: torch.Tensor | None = None
        self.host_lengths: list[int] = []
        self.decision: torch.Tensor | None = None

    # transformers' view of this layer: as long as the dense one would be
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("RoutedKVLayer is filled by MindSkip layers, not by transformers' cache.update")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError("RoutedKVLayer is filled by MindSkip layers, not by transformers' cache.update")

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _unsupported(self, *args, **kwargs) -> None:
        raise NotImplementedError("MindSkipCache does not support beam search, cache cropping or batch reordering")

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _unsupported

    def nbytes(self) -> int:
        """Bytes of K and V in the blocks in use (the logical footprint, block-rounded)."""
        if self.pool_k is None:
            return 0
        per_block = self.block_size * self.num_kv_heads * self.head_dim * self.pool_k.element_size()
        return 2 * self.blocks_used * per_block

    def _reserve(self, counts: list[int], like: torch.Tensor) -> None:
        """Make room for counts[b] more tokens in each sequence b: allocate blocks, grow pool and table."""
        if self.lengths is None:
            batch = len(counts)
            self.lengths = torch.zeros(batch, dtype=torch.int32, device=like.device)
            self.host_lengths = [0] * batch
            self.block_table = torch.zeros(batch, 0, dtype=torch.int32, device=like.device)
            shape = (0, self.block_size, self.num_kv_heads, self.head_dim)
            self.pool_k = like.new_empty(shape)
            self.pool_v = like.new_empty(shape)
        bs = self.block_size
        new_blocks = []  # (sequence, block slot, pool block)
        for b, (old, add) in enumerate(zip(self.host_lengths, counts, strict=True)):
            for slot in range(math.ceil(old / bs), math.ceil((old + add) / bs)):
                new_blocks.append((b, slot, self.blocks_used))
                self.blocks_used += 1
            self.host_lengths[b] = old + add
        if not new_blocks:
            return
        if self.blocks_used > self.pool_k.shape[0]:  # grow by 25% (at least what is needed) to amortise copies
            extra = max(self.blocks_used - self.pool_k.shape[0], self.pool_k.shape[0] // 4)
            pad = self.pool_k.new_empty((extra, *self.pool_k.shape[1:]))
            self.pool_k, self.pool_v = torch.cat([self.pool_k, pad]), torch.cat([self.pool_v, pad])
        width = max(slot for _, slot, _ in new_blocks) + 1
        if width > self.block_table.shape[1]:
            self.block_table = torch.nn.functional.pad(self.block_table, (0, width - self.block_table.shape[1]))
        seq, slot, block = (torch.tensor(c, device=like.device) for c in zip(*new_blocks, strict=True))
        self.block_table[seq, slot] = block.to(torch.int32)

    def _slots(self, seq: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Flat pool row of token `offset` of sequence `seq`."""
        block = self.block_table[seq, offset // self.block_size].long()
        return block * self.block_size + offset % self.block_size

    def append(self, k: torch.Tensor, v: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """Store the kept tokens' K/V [T, Hkv, Dh] at the end of their sequences; returns each token's
        sequence index [T]. Synchronises once with the device (block allocation is on the host)."""
        counts = (plan.cu_seqlens[1:] - plan.cu_seqlens[:-1]).tolist()
        self._reserve(counts, k)
        seq = plan.indices // plan.seq_len
        offset = self.lengths[seq] + (torch.arange(seq.shape[0], device=k.device) - plan.cu_seqlens[seq])
        rows = self._slots(seq, offset)
        self.pool_k.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, rows, k.detach())
        self.pool_v.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, rows, v.detach())
        self.lengths += (plan.cu_seqlens[1:] - plan.cu_seqlens[:-1]).to(torch.int32)
        return seq

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RoutingPlan,
               softmax_scale: float | None, backend: str) -> torch.Tensor:
        """Append the new kept tokens, then attend each over its sequence's cached kept tokens (itself
        included). One new token per sequence (decode) uses the decode-attention kernel over the block
        table; otherwise (prefill, chunked prefill) varlen attention, causal aligned at the end."""
        seq = self.append(k, v, plan)
        if plan.seq_len == 1:
            width = self.block_table.shape[1] * self.block_size
            blocks = self.block_table.index_select(0, seq).flatten()  # the kept sequences' block tables
            kc, vc = (pool.index_select(0, blocks).view(seq.shape[0], width, self.num_kv_heads, self.head_dim)
                      for pool in (self.pool_k, self.pool_v))
            return decode_attention(q, kc, vc, self.lengths.index_select(0, seq), softmax_scale=softmax_scale,
                                    backend=backend)
        cu_k = torch.nn.functional.pad(self.lengths.cumsum(0), (1, 0)).to(torch.int32)
        total = sum(self.host_lengths)
        rows = torch.arange(total, device=q.device)
        seq_k = torch.searchsorted(cu_k[1:].long(), rows, right=True)
        slots = self._slots(seq_k, rows - cu_k.index_select(0, seq_k))
        k_all, v_all = (pool.view(-1, self.num_kv_heads, self.head_dim).index_select(0, slots)
                        for pool in (self.pool_k, self.pool_v))
        return varlen_attention(q, k_all, v_all, plan.cu_seqlens, cu_k, plan.max_seqlen,
                                max(self.host_lengths, default=0), causal=True, softmax_scale=softmax_scale,
                                backend=backend)


class MindSkipCache(DynamicCache):
    """DynamicCache with `RoutedKVLayer`s at the routed layers (see module docstring).

    `nbytes()` is the K/V memory held; `dense_nbytes()` what an ordinary cache would hold for the same
    tokens, so `nbytes() / dense_nbytes()` shows the saving.
    """

    def __init__(self, config, routed_layers: list[int], block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        super().__init__(config=config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        for i in routed_layers:
            self.layers[i] = RoutedKVLayer(config.num_key_value_heads, head_dim, block_size)

    def routed_layer(self, layer_idx: int) -> RoutedKVLayer:
        layer = self.layers[layer_idx]
        if not isinstance(layer, RoutedKVLayer):
            raise TypeError(f"layer {layer_idx} of this MindSkipCache is not routed; build the cache for this model")
        return layer

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
