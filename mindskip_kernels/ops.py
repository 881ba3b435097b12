"""Public attention ops: packed variable-length sequences, decode over a cache, and the keep-masked
causal attention of Router-Tuning's training forward."""

from __future__ import annotations

import torch

from mindskip_kernels import _checks as check
from mindskip_kernels.backends import needs_grad, resolve


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = True,
                     softmax_scale: float | None = None, query_positions: torch.Tensor | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """Softmax attention within each packed sequence; returns [Tq, Hq, Dh].

    q [Tq, Hq, Dh], k/v [Tk, Hkv, Dh] with Hq % Hkv == 0 (GQA, query head h reads kv head h // (Hq/Hkv)).
    Sequence b owns rows cu_seqlens[b]:cu_seqlens[b+1]. Causal masking is aligned bottom-right: query i of
    a sequence with Lq queries and Lk keys sees keys 0..i+Lk-Lq (top-left, keys 0..i, when Lq == Lk).
    Queries that see no key (empty key sequence) return zeros. max_seqlen_* are upper bounds. Key rows past
    cu_seqlens_k[-1] are unused (never read). What is checked on which device: `_checks.varlen_offsets`.
    query_positions [Tq] int32/int64 (forward only, causal): query t sees its sequence's keys 0..query_positions[t]
    instead of the bottom-right rule (clamped to the keys there are; negative: none). This is attention of a subset
    of the queries against every key (kv="all": the kept tokens' queries, every token's keys).
    """
    check.tensor("q", q, ndim=3, dtypes=check.FLOAT_DTYPES)
    check.tensor("k", k, ndim=3, dtypes=(q.dtype,))
    check.tensor("v", v, ndim=3, dtypes=(q.dtype,))
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k must have head dim {q.shape[2]} like q, got {k.shape[2]}")
    if q.shape[2] == 0:
        raise ValueError(f"q must have a head dim >= 1, got shape {tuple(q.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"number of query heads ({q.shape[1]}) must be a multiple of key/value heads "
                         f"({k.shape[1]}) for grouped-query attention")
    check.varlen_offsets(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    check.query_positions(query_positions, q.shape[0], causal, needs_grad(q, k, v))
    check.same_device(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                      query_positions=query_positions)
    scale = check.softmax_scale(softmax_scale, q.shape[-1])
    op = resolve(backend, "varlen_attention", q.device, q.dtype, needs_grad(q, k, v),
                 empty=q.numel() == 0 or k.numel() == 0, head_dim=q.shape[-1])
    return op.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                               query_positions)


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                 block_table: torch.Tensor | None, batch: int) -> None:
    """The K/V cache arguments shared by the cache attention ops (q already checked): k_cache/v_cache of q's
    dtype, a paged pool [num_blocks, block_size >= 1, Hkv, Dh] when `block_table` [batch, max_blocks] int32
    is given, GQA heads, one length per sequence, one device."""
    check.tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,))
    check.tensor("v_cache", v_cache, ndim=4, dtypes=(q.dtype,))
    check.tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=check.INDEX_DTYPES)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    hq, dh = q.shape[1], q.shape[2]
    if dh == 0:
        raise ValueError(f"q must have a head dim >= 1, got shape {tuple(q.shape)}")
    if block_table is not None:
        check.tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,))
        if block_table.shape[0] != batch:
            raise ValueError(f"block_table must have shape [{batch}, max_blocks] (one row per sequence), got "
                             f"{tuple(block_table.shape)}")
        if k_cache.shape[3] != dh or k_cache.shape[1] < 1:
            raise ValueError(f"k_cache must be a paged pool [num_blocks, block_size >= 1, Hkv, {dh}] with a "
                             f"block_table, got {tuple(k_cache.shape)}")
    if k_cache.shape[2] == 0 or hq % k_cache.shape[2]:
        raise ValueError(f"number of query heads ({hq}) must be a multiple of cache heads ({k_cache.shape[2]})")
    check.shape_match("cache_seqlens", cache_seqlens, (batch,), "one length per sequence")
    check.same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, block_table=block_table)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     *, block_table: torch.Tensor | None = None, softmax_scale: float | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """One new query token per sequence against that sequence's KV cache of ragged length.

    q [B, Hq, Dh]; cache_seqlens [B] int32/int64, sequence b's keys are its rows 0..cache_seqlens[b]-1 (the
    query's own key already appended); a sequence of length 0 gets zeros and reads no cache. The cache is
    either dense, k_cache/v_cache [B, S, Hkv, Dh], or paged like flash-attention's
    `flash_attn_with_kvcache(block_table=...)` and vLLM: pools [num_blocks, block_size, Hkv, Dh] and
    `block_table` [B, max_blocks] int32, row s of sequence b in pool block block_table[b, s // block_size].
    Rows past a sequence's length are never read into the result (they may hold garbage). Returns
    [B, Hq, Dh].
    """
    check.tensor("q", q, ndim=3, dtypes=check.FLOAT_DTYPES)
    batch, _, dh = q.shape
    if block_table is None:
        check.tensor("k_cache", k_cache, ndim=4)
        if k_cache.shape[0] != batch or k_cache.shape[3] != dh:
            raise ValueError(f"k_cache must have shape [{batch}, S, Hkv, {dh}] to match q, got "
                             f"{tuple(k_cache.shape)}")
    _check_cache(q, k_cache, v_cache, cache_seqlens, block_table, batch)
    scale = check.softmax_scale(softmax_scale, dh)
    op = resolve(backend, "paged_decode_attention" if block_table is not None else "decode_attention", q.device,
                 q.dtype, needs_grad(q, k_cache, v_cache), head_dim=dh)
    return op.decode_attention(q, k_cache, v_cache, cache_seqlens, block_table, scale)


def paged_varlen_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cache_seqlens: torch.Tensor, block_table: torch.Tensor, max_seqlen_q: int, *,
                           causal: bool = True, softmax_scale: float | None = None,
                           query_positions: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Packed queries against a paged KV cache (prefill with a cache, chunked prefill); returns [Tq, Hq, Dh].

    q [Tq, Hq, Dh] packed by cu_seqlens_q [B+1]; k_cache/v_cache pools [num_blocks, block_size, Hkv, Dh] and
    block_table [B, max_blocks] int32 as in `decode_attention`. Sequence b's keys are its rows
    0..cache_seqlens[b]-1, the new tokens' own keys already appended; causal masking is aligned bottom-right
    (query i of Lq sees keys 0..i+Lk-Lq). Rows past a sequence's length are never read into the result;
    queries that see no key return zeros. max_seqlen_q is an upper bound on the queries per sequence.
    query_positions [Tq] (forward only, causal): query t sees its sequence's keys 0..query_positions[t], as in
    `varlen_attention` (kv="all": the kept queries of a chunk against the whole cached sequence).
    """
    check.tensor("q", q, ndim=3, dtypes=check.FLOAT_DTYPES)
    check.tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=check.INDEX_DTYPES)
    if cu_seqlens_q.numel() < 1:
        raise ValueError(f"cu_seqlens_q must have B+1 >= 1 entries, got {cu_seqlens_q.numel()}")
    if not isinstance(max_seqlen_q, int) or isinstance(max_seqlen_q, bool) or max_seqlen_q < 0:
        raise ValueError(f"max_seqlen_q must be a non-negative int, got {max_seqlen_q!r}")
    _check_cache(q, k_cache, v_cache, cache_seqlens, block_table, cu_seqlens_q.numel() - 1)
    check.query_positions(query_positions, q.shape[0], causal, needs_grad(q, k_cache, v_cache))
    check.same_device(q=q, cu_seqlens_q=cu_seqlens_q, query_positions=query_positions)
    scale = check.softmax_scale(softmax_scale, q.shape[-1])
    op = resolve(backend, "paged_varlen_attention", q.device, q.dtype, needs_grad(q, k_cache, v_cache),
                 head_dim=q.shape[-1])
    return op.paged_varlen_attention(q, k_cache, v_cache, cu_seqlens_q, cache_seqlens, block_table, max_seqlen_q,
                                     causal, scale, query_positions)


def keep_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, *,
                          softmax_scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Causal attention whose keys are masked by a per-token keep flag: query i sees key j iff j <= i and
    (keep[b, j] or j == i). Returns [B, Hq, N, Dh].

    q [B, Hq, N, Dh], k/v [B, Hkv, N, Dh] (the SDPA layout, Hq % Hkv == 0), keep [B, N] bool. This is the
    training forward of Router-Tuning's default rule: every token computes attention, kept tokens see exactly
    what the inference forward shows them (the kept earlier tokens and themselves), so every token's gate
    gets an LM gradient. Differentiable in q, k, v.
    """
    check.tensor("q", q, ndim=4, dtypes=check.FLOAT_DTYPES)
    check.tensor("k", k, ndim=4, dtypes=(q.dtype,))
    check.tensor("v", v, ndim=4, dtypes=(q.dtype,))
    check.tensor("keep", keep, ndim=2, dtypes=(torch.bool,))
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, hq, n, dh = q.shape
    if k.shape[0] != batch or k.shape[2] != n or k.shape[3] != dh:
        raise ValueError(f"k must have shape [{batch}, Hkv, {n}, {dh}] to match q, got {tuple(k.shape)}")
    if dh == 0:
        raise ValueError(f"q must have a head dim >= 1, got shape {tuple(q.shape)}")
    if k.shape[1] == 0 or hq % k.shape[1]:
        raise ValueError(f"number of query heads ({hq}) must be a multiple of key/value heads ({k.shape[1]}) "
                         f"for grouped-query attention")
    check.shape_match("keep", keep, (batch, n), "[B, N] keep flags of the tokens")
    check.same_device(q=q, k=k, v=v, keep=keep)
    scale = check.softmax_scale(softmax_scale, dh)
    op = resolve(backend, "keep_masked_attention", q.device, q.dtype, needs_grad(q, k, v), head_dim=dh)
    return op.keep_masked_attention(q, k, v, keep, scale)
