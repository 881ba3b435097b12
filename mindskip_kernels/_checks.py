"""Argument checks shared by every public function: each failure names the argument and what was expected."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
GRANULARITIES = ("token", "sequence")
# What a router decides to run (the paper's Table 1): the attention sub-layer (MindSkip), the MLP sub-layer (its
# router reads post_attention_layernorm), or the whole decoder block (Mixture-of-Depths; input_layernorm).
TARGETS = ("attention", "mlp", "block")
# What a skipped token still computes (design.md s.1): no K/V (the paper's rule), or its K/V, only the query skipped
KV_RULES = ("kept", "all")


def kv_rule(value: object, granularity: str, target: str) -> str:
    """A K/V rule valid for the granularity and target: "all" only for token routing of attention or blocks
    (with sequence routing or the MLP target no one would read a skipped token's K/V)."""
    if value not in KV_RULES:
        raise ValueError(f"kv must be one of {KV_RULES}, got {value!r}")
    if value == "all" and (granularity != "token" or target == "mlp"):
        raise ValueError(f'kv="all" (skipped tokens keep their K/V) needs granularity="token" and target '
                         f'"attention" or "block", got granularity={granularity!r}, target={target!r}')
    return value


def tensor(name: str, t: object, ndim: int | tuple[int, ...] | None = None,
           dtypes: tuple[torch.dtype, ...] | None = None) -> torch.Tensor:
    """Check that `t` is a tensor of the given rank(s) and dtype(s)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        ranks = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in ranks:
            want = " or ".join(str(r) for r in ranks)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).removeprefix('torch.')}")
    return t


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Check that all given tensors (None ignored) live on one device; return it."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}: move them to one device")
    return first.device


def threshold(value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1] (a sigmoid score), got {value!r}")
    return float(value)


def granularity(value: str) -> str:
    if value not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {value!r}")
    return value


def target(value: object) -> str:
    if value not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {value!r}")
    return value


def backend(value: object) -> str:
    """One of the backend names (checked where it is stored, not only when an op first runs)."""
    from mindskip_kernels.backends import NAMES

    if value not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {value!r}")
    return value


def norm(value: object, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """An RMSNorm given as (weight [D] over x's last dim, eps >= 0)."""
    if not isinstance(value, tuple) or len(value) != 2:
        raise TypeError(f"norm must be a (weight, eps) tuple of an RMSNorm, got {type(value).__name__}")
    gamma, eps = value
    tensor("norm weight", gamma, ndim=1, dtypes=FLOAT_DTYPES)
    shape_match("norm weight", gamma, (x.shape[-1],), "RMSNorm weight over the hidden size")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"norm eps must be a number >= 0, got {eps!r}")
    return gamma, float(eps)


def shape_match(name: str, t: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {tuple(t.shape)}")


def softmax_scale(value: object, head_dim: int) -> float:
    """The attention logit scale: a finite number, default 1 / sqrt(head_dim)."""
    if value is None:
        return head_dim ** -0.5
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"softmax_scale must be a finite number or None (1/sqrt(head dim)), got {value!r}")
    return float(value)


def positive_int(name: str, value: object) -> int:
    """An int >= 1 (a count of heads, a hidden size, a head dim)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def query_positions(positions: torch.Tensor | None, rows_q: int, causal: bool, grad: bool) -> None:
    """The optional per-query key limits of the varlen attention ops: [Tq] int32/int64, with causal=True, on
    inputs that need no gradient (forward only, on every backend). Any value is valid (clamped by the kernels)."""
    if positions is None:
        return
    tensor("query_positions", positions, ndim=1, dtypes=INDEX_DTYPES)
    if positions.shape[0] != rows_q:
        raise ValueError(f"query_positions must have shape [{rows_q}] (one per query row), got "
                         f"{tuple(positions.shape)}")
    if not causal:
        raise ValueError("query_positions needs causal=True (it is the causal rule, per query)")
    if grad:
        raise ValueError("query_positions is forward only: call it on tensors that do not require grad")


def varlen_offsets(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, rows_q: int, rows_k: int,
                   max_seqlen_q: object, max_seqlen_k: object) -> None:
    """The sequence offsets of `varlen_attention`, checked once for every backend.

    Everywhere: both are 1-D int32/int64 with the same B + 1 >= 1 entries, and max_seqlen_* are ints >= 0.
    On the CPU the values are checked too (free there): each cu_seqlens starts at 0 and never decreases,
    cu_seqlens_q ends at rows_q (the query rows), cu_seqlens_k at most at rows_k (key rows past it are unused),
    and max_seqlen_* bound every length. On an accelerator reading the values would cost a host sync, so
    like flash-attention they are trusted there (and under torch.compile, where they would break the graph):
    wrong offsets give undefined results. The messages are those
    of the compiled extension's own check (csrc/cpu/attention_cpu.cpp).
    """
    tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=INDEX_DTYPES)
    tensor("cu_seqlens_k", cu_seqlens_k, ndim=1, dtypes=INDEX_DTYPES)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel() or cu_seqlens_q.numel() < 1:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both have B + 1 >= 1 entries, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if cu_seqlens_q.device.type != "cpu" or torch.compiler.is_compiling():  # traced: values unknown
        return
    for name, cu, rows, exact, bound in (("cu_seqlens_q", cu_seqlens_q, rows_q, True, max_seqlen_q),
                                         ("cu_seqlens_k", cu_seqlens_k, rows_k, False, max_seqlen_k)):
        c = cu.tolist()  # one host copy of B + 1 ints: ATen ops per check would cost more than the check
        i = next((i for i in range(len(c)) if (c[i] < c[i - 1] if i else c[0] != 0)), None)
        if i is not None:
            raise ValueError(f"{name} must be non-decreasing from 0, got {name}[{i}] = {c[i]}")
        if c[-1] > rows or (exact and c[-1] != rows):
            raise ValueError(f"{name} must end at {'' if exact else 'most '}{rows} (rows of the packed tensor), "
                             f"got {c[-1]}")
        longest = max((c[j + 1] - c[j] for j in range(len(c) - 1)), default=0)
        name_max = "max_seqlen_q" if exact else "max_seqlen_k"
        if longest > bound:
            raise ValueError(f"{name_max} must be at least the longest sequence in {name} ({longest}), "
                             f"got {bound}")


def sink_tokens(value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"sink_tokens must be a non-negative int (tokens always kept), got {value!r}")
    return value
