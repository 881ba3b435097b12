"""External attention baselines for bench_kernels (CUDA only): PyTorch's varlen_attn, flash-attn's
flash_attn_varlen_func (when installed) and compiled FlexAttention with a per-sequence causal block mask.

Each is a pseudo-backend with the backend interface's `supports(op, device, dtype)` and
`varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)`, so the benchmark times them beside
ours on the same packed data.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import torch

HALF = (torch.float16, torch.bfloat16)


def _varlen_only(device: torch.device, dtype: torch.dtype, op: str, dtypes=HALF) -> bool:
    return op == "varlen_attention" and device.type == "cuda" and dtype in dtypes


def torch_varlen() -> SimpleNamespace:
    from torch.nn.attention.varlen import varlen_attn

    def run(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(-1, 0) if causal else (-1, -1),
                           enable_gqa=q.shape[1] != k.shape[1])

    return SimpleNamespace(supports=lambda op, device, dtype: _varlen_only(device, dtype, op), varlen_attention=run)


def flash_attn() -> SimpleNamespace:
    from flash_attn import flash_attn_varlen_func

    def run(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal)

    return SimpleNamespace(supports=lambda op, device, dtype: _varlen_only(device, dtype, op), varlen_attention=run)


def flex_attention() -> SimpleNamespace:
    """Compiled FlexAttention over the packed tokens as one batch row; the block mask (same sequence, causal)
    is built once per cu_seqlens, as a model would once per routed layer."""
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as flex

    compiled = torch.compile(flex)
    masks: dict[tuple, object] = {}

    def block_mask(cu: torch.Tensor, total: int, causal: bool):
        key = (cu.data_ptr(), total, causal)
        if key not in masks:
            seq = torch.searchsorted(cu[1:].long(), torch.arange(total, device=cu.device), right=True)

            def mask_mod(b, h, q_idx, kv_idx):
                same = seq[q_idx] == seq[kv_idx]
                return same & (kv_idx <= q_idx) if causal else same

            masks[key] = create_block_mask(mask_mod, 1, None, total, total, device=cu.device)
        return masks[key]

    def run(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        mask = block_mask(cu_q, q.shape[0], causal)
        out = compiled(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), block_mask=mask, scale=scale,
                       enable_gqa=q.shape[1] != k.shape[1])
        return out[0].transpose(0, 1)

    return SimpleNamespace(supports=lambda op, device, dtype: _varlen_only(device, dtype, op, HALF + (torch.float32,)),
                           varlen_attention=run)


def available(device: torch.device) -> dict[str, SimpleNamespace]:
    """The baselines that can run here (none on CPU)."""
    if device.type != "cuda":
        return {}
    out = {"torch.varlen": torch_varlen(), "flex(compiled)": flex_attention()}
    if importlib.util.find_spec("flash_attn") is not None:
        out["flash-attn"] = flash_attn()
    return out
