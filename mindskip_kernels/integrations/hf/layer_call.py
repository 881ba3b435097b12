"""What one routed layer's forward works on (`LayerCall`, normalised once by forward.py), and the row helpers the
routed sub-layers and K/V rules share: the q/k/v projections of rows and RoPE at chosen rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mindskip_kernels.integrations.hf.cache import RoutedKVLayer
from mindskip_kernels.rowwise import Project


@dataclass(frozen=True)
class LayerCall:
    """What one routed layer's forward works on, normalised once by the forward (vLLM-style metadata):
    x [B, N, D] the routed sub-layer's input, real [B, N] bool (False on padding; None: all real), the model's
    position ids and RoPE cos/sin, sinks [B, N] bool (tokens always kept) or None, kv the layer's paged K/V
    (inference with a cache, paged targets) or None, and the backend."""

    x: torch.Tensor
    real: torch.Tensor | None
    position_ids: torch.Tensor | None
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    sinks: torch.Tensor | None
    kv: RoutedKVLayer | None
    backend: str


def decode_rows(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """A decode step's [B, 1, D] tensor as rows [R, D]: every row (device path) or the compacted kept ones."""
    return t[:, 0] if rows is None else t[:, 0].index_select(0, rows)


def rope_rows(position_embeddings: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor | None, head_dim: int,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's cos/sin [1 or B, N, Dh] as rows [T, Dh] at flat token indices `idx` (None: every row, N = 1),
    without materialising a [B, N, Dh] copy."""
    rows = (c.reshape(-1, head_dim) for c in position_embeddings)
    return tuple((r if idx is None else r.index_select(0, idx)).to(dtype) for r in rows)


def token_rope(position_embeddings: tuple[torch.Tensor, torch.Tensor], indices: torch.Tensor, seq_len: int,
               head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin rows [T, Dh] of the tokens at flat indices b*N+n of a [B, N] batch (the model's cos/sin are
    [1, N, Dh] when every sequence has the same positions, else [B, N, Dh])."""
    idx = indices % seq_len if position_embeddings[0].shape[0] == 1 else indices
    return rope_rows(position_embeddings, idx, head_dim, dtype)


def _linear(linear: nn.Linear, rows: torch.Tensor) -> torch.Tensor:
    return linear(rows)


def queries(attn: nn.Module, z: torch.Tensor, project: Project | None = None) -> torch.Tensor:
    """q [T, Hq, Dh] of rows z [T, D] through a transformers attention module (Qwen3's q norm too);
    `project(linear, rows)` replaces `linear(rows)` when given."""
    q = (project or _linear)(attn.q_proj, z).unflatten(-1, (-1, attn.head_dim))
    return attn.q_norm(q) if hasattr(attn, "q_norm") else q


def keys_values(attn: nn.Module, z: torch.Tensor, project: Project | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [T, Hkv, Dh] of rows z [T, D] (Qwen3's k norm too), like `queries`."""
    k, v = ((project or _linear)(proj, z).unflatten(-1, (-1, attn.head_dim)) for proj in (attn.k_proj, attn.v_proj))
    return (attn.k_norm(k) if hasattr(attn, "k_norm") else k), v


def qkv(attn: nn.Module, z: torch.Tensor, project: Project | None = None
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of the same rows (`queries`, `keys_values`)."""
    return (queries(attn, z, project), *keys_values(attn, z, project))
