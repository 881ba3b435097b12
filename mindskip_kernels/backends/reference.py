"""Plain-PyTorch reference backend: the semantics every kernel is tested against.

Vectorised (no Python loop over tokens), runs on any device and in fp64, and is differentiable, so it is
also the CPU training path. Compaction uses `nonzero()`, which synchronises with an accelerator: the
Triton and compiled backends avoid that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mindskip_kernels.backends import ops_of

NAME = "reference"
OPS = ops_of(NAME)
DIFFERENTIABLE = OPS  # plain autograd


def supports(op: str, device: torch.device, dtype: torch.dtype) -> bool:
    return op in OPS


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for low precision, fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def router(z: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, threshold: float,
           granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [B,N] (sigmoid of the router logit) and keep flags [B,N]; `mask` [B,N] bool marks real tokens."""
    ct = compute_dtype(z.dtype)
    w = weight.reshape(-1).to(ct)
    if granularity == "token":
        scores = torch.sigmoid(z.to(ct) @ w)
    else:
        # padding is left out by selection: a NaN/Inf in a pad row times 0 would still poison the sum
        zsum = torch.where(mask.unsqueeze(-1), z.to(ct), 0.0).sum(1)
        zmean = zsum / mask.sum(1, dtype=ct).clamp_min(1.0).unsqueeze(1)
        scores = torch.sigmoid(zmean @ w).unsqueeze(1).expand(mask.shape)
    keep = (scores >= threshold) & mask
    return scores, keep


def rms_norm(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim with the numerics of transformers' Llama/Qwen RMSNorm: variance in fp32 (fp64
    stays fp64), `gamma * normed.to(x.dtype)`; returns x's dtype."""
    xc = x.to(compute_dtype(x.dtype))
    normed = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    return (gamma * normed.to(x.dtype)).to(x.dtype)


def router_from_hidden(x: torch.Tensor, gamma: torch.Tensor, eps: float, weight: torch.Tensor, mask: torch.Tensor,
                       threshold: float, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`router` on RMSNorm(x) * gamma: x [B,N,D] is the un-normalized hidden state."""
    return router(rms_norm(x, gamma, eps), weight, mask, threshold, granularity)


def compact(keep: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """indices [T] (flat b*N+n, ascending), cu_seqlens [B+1] int32, positions [T] int64."""
    indices = keep.reshape(-1).nonzero().squeeze(1)
    cu_seqlens = F.pad(keep.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    positions = position_ids.reshape(-1).index_select(0, indices).long()
    return indices, cu_seqlens, positions


def gather(x2d: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return x2d.index_select(0, indices)


def gather_norm(x2d: torch.Tensor, gamma: torch.Tensor, eps: float, indices: torch.Tensor) -> torch.Tensor:
    """RMSNorm(x2d[indices]) * gamma -> [T, D]: only the gathered rows are normalized."""
    return rms_norm(x2d.index_select(0, indices), gamma, eps)


def scatter_add(residual2d: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                scale: torch.Tensor | None) -> torch.Tensor:
    if scale is not None:
        values = values * scale.to(values.dtype).unsqueeze(1)
    return residual2d.index_add(0, indices, values)


def _to_padded(x: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int) -> tuple[torch.Tensor, tuple]:
    """Packed [T,H,D] -> padded [B,H,L,D] plus the (sequence, offset) index of every packed row.

    Rows past cu_seqlens[-1] (unused, may hold anything) land in a spare sequence B that is dropped."""
    batch = cu_seqlens.numel() - 1
    cu = cu_seqlens.long()
    rows = torch.arange(x.shape[0], device=x.device)
    seq = torch.searchsorted(cu[1:], rows, right=True)
    offset = torch.where(seq < batch, rows - cu.index_select(0, seq), 0)
    padded = x.new_zeros(batch + 1, max_len, x.shape[1], x.shape[2])
    padded[seq, offset] = x
    return padded[:batch].transpose(1, 2), (seq, offset)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                     softmax_scale: float, query_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Attention per sequence of packed tokens, GQA, fp32 accumulation; causal aligned bottom-right, or with
    `query_positions` query t sees keys 0..query_positions[t].

    Sequences are padded to the given maxima and run through SDPA with a mask; a query that sees no key
    (empty key sequence) gets zeros.
    """
    ct = compute_dtype(q.dtype)
    len_q = max(int(max_seqlen_q), 1)
    len_k = max(int(max_seqlen_k), 1)
    qp, (seq_q, off_q) = _to_padded(q.to(ct), cu_seqlens_q, len_q)
    kp, _ = _to_padded(k.to(ct), cu_seqlens_k, len_k)
    vp, _ = _to_padded(v.to(ct), cu_seqlens_k, len_k)

    n_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long().view(-1, 1, 1, 1)
    n_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long().view(-1, 1, 1, 1)
    i = torch.arange(len_q, device=q.device).view(1, 1, -1, 1)
    j = torch.arange(len_k, device=q.device).view(1, 1, 1, -1)
    allowed = j < n_k
    if query_positions is not None:
        last = torch.full((cu_seqlens_q.numel(), len_q), -1, dtype=torch.long, device=q.device)
        last[seq_q, off_q] = query_positions.long()  # rows past cu_seqlens_q[-1] land in the spare sequence
        allowed = allowed & (j <= last[:-1].view(-1, 1, len_q, 1))
    elif causal:
        allowed = allowed & (j <= i + (n_k - n_q))
    has_key = allowed.any(-1, keepdim=True)
    allowed = allowed | (~has_key & (j == 0))  # keep fully-masked rows finite; zeroed below
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=allowed, scale=softmax_scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    out = out * has_key
    return out.transpose(1, 2)[seq_q, off_q].to(q.dtype)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     block_table: torch.Tensor | None, softmax_scale: float) -> torch.Tensor:
    """One query per sequence against its cached keys 0..cache_seqlens[b]-1; length 0 gives zeros.
    q [B, Hq, Dh]; caches [B, S, Hkv, Dh], or with `block_table` [B, max_blocks] paged pools
    [num_blocks, block_size, Hkv, Dh] (sequence b's row s in block block_table[b, s // block_size]).
    Rows past a sequence's length never enter the product (they may hold anything, NaN included)."""
    ct = compute_dtype(q.dtype)
    batch, hq, dh = q.shape
    hkv = k_cache.shape[2]
    if block_table is not None:  # the truth for paged kernels: copy each sequence's blocks out (tests only)
        width = block_table.shape[1] * k_cache.shape[1]
        blocks = block_table.long().clamp(0, max(k_cache.shape[0] - 1, 0)).reshape(-1)
        k_cache, v_cache = (pool.index_select(0, blocks).view(batch, width, hkv, dh) if pool.shape[0] else
                            pool.new_zeros(batch, width, hkv, dh) for pool in (k_cache, v_cache))
    valid = torch.arange(k_cache.shape[1], device=q.device) < cache_seqlens.long().unsqueeze(1)  # [B, S]
    mask = valid.view(batch, k_cache.shape[1], 1, 1)
    k, v = (torch.where(mask, c.to(ct), 0.0) for c in (k_cache, v_cache))  # unused rows: out by selection
    qg = q.to(ct).view(batch, hkv, hq // hkv, dh) if hkv else q.to(ct).view(batch, 0, 1, dh)
    logits = torch.einsum("bhgd,bshd->bhgs", qg, k) * softmax_scale
    logits = logits.masked_fill(~valid.view(batch, 1, 1, k_cache.shape[1]), float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all-masked rows -> zeros
    return torch.einsum("bhgs,bshd->bhgd", probs, v).reshape(batch, hq, dh).to(q.dtype)


def paged_varlen_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cache_seqlens: torch.Tensor, block_table: torch.Tensor, max_seqlen_q: int, causal: bool,
                           softmax_scale: float, query_positions: torch.Tensor | None = None) -> torch.Tensor:
    """`varlen_attention` with sequence b's keys = rows 0..cache_seqlens[b]-1 of the paged pools (lengths
    clamped to the table's capacity), gathered by selection so other pool rows never enter (tests only: one
    host read of the total)."""
    bs = k_cache.shape[1]
    width = block_table.shape[1] * bs if k_cache.shape[0] else 0
    lens = cache_seqlens.long().clamp(0, width)
    cu_k = F.pad(lens.cumsum(0), (1, 0))
    rows = torch.arange(int(cu_k[-1]), device=q.device)
    seq = torch.searchsorted(cu_k[1:], rows, right=True)
    s = rows - cu_k.index_select(0, seq)
    block = block_table.long()[seq, s // bs].clamp(0, max(k_cache.shape[0] - 1, 0))
    k, v = (pool[block, s % bs] for pool in (k_cache, v_cache))
    return varlen_attention(q, k, v, cu_seqlens_q, cu_k.to(torch.int32), max_seqlen_q, width, causal, softmax_scale,
                            query_positions)


def keep_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                          softmax_scale: float) -> torch.Tensor:
    """Causal attention where query i sees key j iff j <= i and (keep[j] or j == i); GQA, fp32 accumulation.
    q [B, Hq, N, Dh], k/v [B, Hkv, N, Dh], keep [B, N] bool; returns [B, Hq, N, Dh]. Every query sees at
    least itself, so no row is empty."""
    ct = compute_dtype(q.dtype)
    n = q.shape[2]
    idx = torch.arange(n, device=q.device)
    causal = idx.view(n, 1) >= idx.view(1, n)
    allowed = causal & (keep[:, None, None, :] | torch.eye(n, dtype=torch.bool, device=q.device))
    out = F.scaled_dot_product_attention(q.to(ct), k.to(ct), v.to(ct), attn_mask=allowed, scale=softmax_scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.to(q.dtype)


def predicated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      keep: torch.Tensor) -> torch.Tensor:
    """x @ weight.T + bias on rows with keep set (fp32 accumulation for low precision), zeros elsewhere."""
    xc = x.to(compute_dtype(x.dtype))
    y = F.linear(xc, weight.to(xc.dtype), None if bias is None else bias.to(xc.dtype))
    return torch.where(keep.unsqueeze(1), y, 0).to(x.dtype)
