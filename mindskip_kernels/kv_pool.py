"""A paged K/V pool that stores only the rows a routed layer computed, with appends that never read device data.

`PagedKVPool` preallocates K/V blocks [num_blocks, block_size, Hkv, Dh] (sized by the user: a block count or
a byte budget, like vLLM's `gpu_memory_utilization`), a block table [B, max_blocks] int32, the lengths [B]
int32 and a free-block counter, all on the device. `append` writes kept rows at slots computed on the
device and hands out blocks by bumping the counter: no `.tolist()`, `.item()` or `nonzero()`, so a decode
step can be captured in a CUDA graph. A skipped row takes no slot: it is written to a scratch block that no
table entry points to, and its length does not grow.

Capacity without host reads: the host keeps an upper bound of every sequence's length (each append may add
at most its row count). Only when that bound no longer fits the pool or the table does `append` read the
exact lengths back (one sync, a documented rare point: with a pool sized for the work it never happens in
a decode step that a graph captures), and then grows the pool by 25% (`growable=True`) or raises. The
paged attention ops read the pool in place (`decode_attention(block_table=...)`,
`paged_varlen_attention`). No transformers import: `integrations.hf.cache.MindSkipCache` wraps one pool per
routed layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mindskip_kernels.backends._alloc import empty

DEFAULT_BLOCK_SIZE = 16


def blocks_for_bytes(max_bytes: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                     pools: int = 1) -> int:
    """How many blocks each of `pools` pools gets from a byte budget for all of them (like vLLM's memory budget)."""
    return int(max_bytes) // (PagedKVPool.block_bytes(block_size, num_kv_heads, head_dim, dtype) * pools)


class PoolFullError(RuntimeError):
    """The pool cannot hold the appended rows and may not grow."""


class PagedKVPool:
    """Paged K/V of one layer for a batch of `batch` sequences (see the module docstring).

    k, v:        [num_blocks + 1, block_size, Hkv, Dh]; the last block is scratch for skipped rows
    block_table: [B, max_blocks] int32, sequence b's i-th block (entries past its length are never read)
    lengths:     [B] int32, rows stored per sequence
    next_block:  [1] int32, the free-block counter (blocks are handed out in order; a new pool per batch)
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, *, num_blocks: int | None = None,
                 max_bytes: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE, max_blocks_per_seq: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 growable: bool = True) -> None:
        for name, value in (("batch", batch), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("block_size", block_size), ("max_blocks_per_seq", max_blocks_per_seq)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "batch" else 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if (num_blocks is None) == (max_bytes is None):
            raise ValueError("give exactly one of num_blocks and max_bytes (the pool's size)")
        if max_bytes is not None:
            num_blocks = blocks_for_bytes(max_bytes, block_size, num_kv_heads, head_dim, dtype)
        if not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks must be a non-negative int, got {num_blocks!r}")
        self.batch, self.num_kv_heads, self.head_dim, self.block_size = batch, num_kv_heads, head_dim, block_size
        self.growable = growable
        device = torch.device(device)
        shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.k, self.v = empty(shape, dtype, device), empty(shape, dtype, device)  # NaN in tests: never handed out
        self.block_table = torch.zeros(batch, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self.next_block = torch.zeros(1, dtype=torch.int32, device=device)
        self._bound = [0] * batch  # host upper bound of each length: exact after a sync, else grown by appends
        self.syncs = 0  # how often append had to read the lengths (the rare point); tests assert on it

    @staticmethod
    def block_bytes(block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of K and V in one block."""
        return 2 * block_size * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    @property
    def num_blocks(self) -> int:
        return self.k.shape[0] - 1

    @property
    def scratch_block(self) -> int:
        return self.num_blocks

    def _blocks_needed(self, lengths: list[int]) -> int:
        return sum(math.ceil(n / self.block_size) for n in lengths)

    def _ensure_capacity(self, added: int) -> None:
        """Make sure every sequence can grow by `added` rows: host arithmetic on the bound; reads the exact
        lengths (one sync) only when the bound does not fit, then widens the table / grows the pool."""
        bound = [n + added for n in self._bound]
        if self._blocks_needed(bound) <= self.num_blocks and max(bound, default=0) <= self.capacity_per_seq():
            self._bound = bound
            return
        self.syncs += 1
        exact = self.lengths.tolist()  # the rare point: the bound no longer fits
        bound = [n + added for n in exact]
        self._bound = bound
        width = math.ceil(max(bound, default=0) / self.block_size)
        if width > self.block_table.shape[1]:
            self.block_table = F.pad(self.block_table, (0, width - self.block_table.shape[1]))
        used = int(self.next_block[0])
        need = used + sum(math.ceil(n / self.block_size) - math.ceil(e / self.block_size)
                          for n, e in zip(bound, exact, strict=True))
        if need > self.num_blocks:
            if not self.growable:
                raise PoolFullError(f"the K/V pool holds {self.num_blocks} blocks of {self.block_size} rows and "
                                    f"{need} are needed; give the pool more num_blocks / max_bytes")
            self._grow(max(need, self.num_blocks + self.num_blocks // 4))

    def capacity_per_seq(self) -> int:
        return self.block_table.shape[1] * self.block_size

    def _grow(self, num_blocks: int) -> None:
        """Reallocate the pools with `num_blocks` blocks (+ scratch), keeping the used ones."""
        old = self.num_blocks
        for name in ("k", "v"):
            pool = getattr(self, name)
            grown = empty((num_blocks + 1, *pool.shape[1:]), pool.dtype, pool.device)
            grown[:old].copy_(pool[:old])
            setattr(self, name, grown)

    def append(self, k: torch.Tensor, v: torch.Tensor, seq: torch.Tensor, rank: torch.Tensor,
               counts: torch.Tensor, valid: torch.Tensor | None = None, max_per_seq: int | None = None) -> None:
        """Store rows k/v [R, Hkv, Dh]: row i is the rank[i]-th new row of sequence seq[i]; counts [B] is the
        number of new rows per sequence. Rows with valid[i] False (a skipped decode row) are not stored.
        `max_per_seq` bounds counts (default R) for the host-side capacity check. Everything else runs on
        the device: blocks from the counter, slots from the table."""
        self._ensure_capacity(k.shape[0] if max_per_seq is None else max_per_seq)
        bs, width = self.block_size, self.block_table.shape[1]
        old = self.lengths.long()
        new = old + counts.long()
        old_blocks, new_blocks = (old + bs - 1) // bs, (new + bs - 1) // bs
        grant = new_blocks - old_blocks
        first = self.next_block.long() + torch.cumsum(grant, 0) - grant  # first new block of each sequence
        col = torch.arange(width, device=k.device)
        fresh = (col >= old_blocks.unsqueeze(1)) & (col < new_blocks.unsqueeze(1))
        ids = first.unsqueeze(1) + col - old_blocks.unsqueeze(1)
        self.block_table.copy_(torch.where(fresh, ids.to(torch.int32), self.block_table))
        self.next_block.add_(grant.sum().to(torch.int32))
        offset = old.index_select(0, seq) + rank
        block = self.block_table[seq, (offset // bs).clamp(max=width - 1)].long()
        rows = block * bs + offset % bs
        if valid is not None:
            rows = torch.where(valid, rows, self.scratch_block * bs)  # skipped: the scratch block, no slot
        self.k.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, rows, k.detach().to(self.k.dtype))
        self.v.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, rows, v.detach().to(self.v.dtype))
        self.lengths.copy_(new.to(torch.int32))

    def gather(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence b's stored K/V [len, Hkv, Dh] (a copy; one sync: for tests and inspection)."""
        n = int(self.lengths[b])
        s = torch.arange(n, device=self.k.device)
        block = self.block_table[b].long()[s // self.block_size]
        return self.k[block, s % self.block_size], self.v[block, s % self.block_size]

    def nbytes(self) -> int:
        """Bytes of the blocks handed out (one sync)."""
        return int(self.next_block[0]) * self.block_bytes(self.block_size, self.num_kv_heads, self.head_dim,
                                                          self.k.dtype)
