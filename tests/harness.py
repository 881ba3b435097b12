"""Shared kernel-test harness: the backends under test, random inputs, the tolerance rule of design.md s.4, and
the checks several kernel test files run (fused norm, gradients, keep-masked attention, paged caches, query
positions)."""

from __future__ import annotations

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.backends import available

_AVAILABLE = available()


def backend_params(device: str = "cpu", *, reference: bool = True, skip: dict[str, str | None] | None = None) -> list:
    """Every non-reference backend as a pytest param (after "reference" unless reference=False), skipped where
    it cannot run on `device` or where `skip` gives it a reason (None: no extra reason)."""
    params = []
    for name in ("compiled", "triton"):
        reason = None
        if not _AVAILABLE[name]:
            reason = f"backend {name!r} not available in this install"
        elif device == "cuda" and not torch.cuda.is_available():
            reason = "needs CUDA"
        elif skip and skip.get(name):
            reason = skip[name]
        params.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=reason or "")))
    return ([pytest.param("reference")] if reference else []) + params


# the backend of the cases of the compiled CPU attention kernel's dispatch paths (cases.DISPATCH_CASES, CHUNK_CASES):
# the compiled kernel alone (the reference is the baseline of each check; the cases are too many for Triton's
# interpreter, whose own are ATTN_CASES and POSITION_CASES)
DISPATCH_BACKENDS = [p for p in backend_params("cpu", reference=False) if p.values == ("compiled",)]


def random_keep(batch: int, seq_len: int, pattern: str, device: str = "cpu") -> torch.Tensor:
    """Keep flags [B, N]: 'random' (~half), 'all', 'none', or 'empty_seq' (random, sequence 0 keeps none)."""
    if pattern == "all":
        return torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    if pattern == "none":
        return torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
    keep = torch.rand(batch, seq_len, device=device) < 0.5
    if pattern == "empty_seq":
        keep[0] = False
    return keep


def make_keep(batch: int, n: int, pattern: str, device: str = "cpu") -> torch.Tensor:
    """The harness patterns, plus 'prefix' (only the first 5 tokens kept: later key blocks hold no kept key
    and are skipped by the kernels, earlier ones are not)."""
    if pattern == "prefix":
        keep = torch.zeros(batch, n, dtype=torch.bool, device=device)
        keep[:, :5] = True
        return keep
    return random_keep(batch, n, pattern, device)


def assert_within_rule(out: torch.Tensor, low_ref: torch.Tensor, truth: torch.Tensor, name: str = "out") -> None:
    """flash-attention rule: max |out - truth| <= 2 * max |low_ref - truth| (+ a few ulps of fp32).

    `truth` is the reference in fp64, `low_ref` the reference run in the same precision as `out`.
    """
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten output?)"
    err = (out.double() - truth).abs().max().item() if out.numel() else 0.0
    ref_err = (low_ref.double() - truth).abs().max().item() if out.numel() else 0.0
    floor = 4 * torch.finfo(torch.float32).eps * max(truth.abs().max().item() if truth.numel() else 0.0, 1.0)
    assert err <= 2 * ref_err + floor, f"{name}: max error {err:.3g} > 2 x reference error {ref_err:.3g}"


# ---- RMSNorm and gradients (the fused-norm and backward tests) ------------------------------------------------

EPS = 1e-6


def rmsnorm(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """RMSNorm computed in the precision of x (fp64 for the truth)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * gamma


def _grads(fn, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    """[fn(*inputs), d inputs] for the upstream gradient grad_out."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves]


def check_grads(fn_for, inputs: list[torch.Tensor], grad_out: torch.Tensor, dtype: torch.dtype,
                 names: list[str]) -> None:
    """Triton at `dtype` within the tolerance rule of the reference at `dtype`, both against fp64."""
    low_inputs = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
    out = _grads(fn_for("triton"), low_inputs, grad_out.to(dtype))
    low = _grads(fn_for("reference"), low_inputs, grad_out.to(dtype))
    truth = _grads(fn_for("reference"), [t.double() if t.is_floating_point() else t for t in low_inputs],
                   grad_out.to(dtype).double())
    for name, o, lo, t in zip(names, out, low, truth, strict=True):
        assert o.dtype == lo.dtype, name
        assert_within_rule(o, lo, t, name)


# ---- keep_masked_attention ------------------------------------------------------------------------------------


def _laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A differentiable view of t [B, H, N, Dh] in another memory layout: 'padded' (rows of Dh + 8 whose last
    8 columns are NaN: memory the kernels must never read), 'bnhd' (the [B, N, H, Dh] layout of a projection
    viewed as heads, as HF models pass it) or 'contiguous'."""
    if layout == "padded":
        nan = torch.full((*t.shape[:-1], 8), float("nan"), dtype=t.dtype, device=t.device)
        return torch.cat([t, nan], dim=-1)[..., : t.shape[-1]]
    if layout == "bnhd":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return t


def _forward_backward(backend: str, inputs: list[torch.Tensor], keep: torch.Tensor, grad: torch.Tensor,
                      layout: str) -> list[torch.Tensor]:
    """[out, dq, dk, dv] of keep_masked_attention on `layout` views of the inputs (and of the gradient)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = mk.keep_masked_attention(*(_laid_out(t, layout) for t in leaves), keep, backend=backend)
    out.backward(_laid_out(grad, layout))
    return [out.detach()] + [t.grad for t in leaves]


def check_forward_backward(inputs: list[torch.Tensor], keep: torch.Tensor, grad: torch.Tensor, layout: str) -> None:
    """Triton's out, dq, dk, dv (inputs q, k, v in `layout`) within the tolerance rule of the reference at the
    inputs' dtype, both against the fp64 reference."""
    dtype = inputs[0].dtype
    out = _forward_backward("triton", inputs, keep, grad, layout)
    low = _forward_backward("reference", inputs, keep, grad, "contiguous")
    truth = _forward_backward("reference", [t.double() for t in inputs], keep, grad.double(), "contiguous")
    # dq and dk are sums of p * (dp - delta) with dp = dO . V: where they cancel to zero (a query that sees only
    # itself has dq = 0) what is left is fp32 rounding of terms of that size, so their floor is relative to it
    group = inputs[0].shape[1] // inputs[1].shape[1]
    dp = torch.einsum("bhid,bhjd->bhij", grad.double(), inputs[2].double().repeat_interleave(group, 1))
    size = dp.abs().max().item() * inputs[0].shape[-1] ** -0.5 * max(t.abs().max().item() for t in inputs[:2])
    cancel = max(1.0, size)
    for name, o, lo, t in zip(["out", "dq", "dk", "dv"], out, low, truth, strict=True):
        assert o.dtype == dtype, name
        s = cancel if name in ("dq", "dk") else 1.0
        assert_within_rule(o.double() / s, lo.double() / s, t / s, name)


# ---- paged KV caches -----------------------------------------------------------------------------------------

GARBAGE_BLOCK = 10**6  # unused block-table entries: reading one would address far outside the pool


def paged(dense_k: torch.Tensor, dense_v: torch.Tensor, lengths: list[int], block_size: int, spare: int = 3
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pools [num_blocks, block_size, Hkv, Dh] holding rows 0..lengths[b]-1 of the dense caches [B, S, Hkv, Dh]
    in randomly shuffled blocks (plus `spare` unused ones); every other pool row is NaN and every unused table
    entry is out of range, so a kernel that reads past a length fails."""
    batch, _, hkv, dh = dense_k.shape
    need = [-(-n // block_size) for n in lengths]
    num_blocks = sum(need) + spare
    order = torch.randperm(num_blocks).tolist()
    pools = [torch.full((num_blocks, block_size, hkv, dh), float("nan"), dtype=dense_k.dtype) for _ in range(2)]
    table = torch.full((batch, max(need, default=0) + 1), GARBAGE_BLOCK, dtype=torch.int32)
    for b, n in enumerate(lengths):
        for i in range(need[b]):
            block = order.pop()
            table[b, i] = block
            rows = slice(i * block_size, min((i + 1) * block_size, n))
            count = rows.stop - rows.start
            pools[0][block, :count] = dense_k[b, rows]
            pools[1][block, :count] = dense_v[b, rows]
    return pools[0], pools[1], table


# ---- query positions (kv="all": kept queries against every key of their sequence) ----------------------------


def query_positions(lengths_q: list[int], lengths_k: list[int], pattern: str) -> torch.Tensor:
    """Positions int64 [sum(lengths_q)], one per packed query: 'kept' (increasing, a random pick of each sequence's
    key positions, as kv="all" passes its kept tokens), 'shuffled' (the same in random order), 'wild' (random in
    -3..Lk+2: negative ones see no key, ones past the end every key) or 'bottom_right' (the last Lq positions,
    the ordinary causal rule: whole key blocks visible to a block of queries)."""
    out = []
    for lq, lk in zip(lengths_q, lengths_k, strict=True):
        if pattern == "wild":
            pos = torch.randint(-3, lk + 3, (lq,))
        elif pattern == "bottom_right":
            pos = torch.arange(lk - lq, lk)
        else:
            pick = torch.randperm(lk)[:lq] if lq <= lk else torch.randint(0, max(lk, 1), (lq,))
            pos = pick.sort().values
            if pattern == "shuffled":
                pos = pos[torch.randperm(lq)]
        out.append(pos)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def dispatch_positions(lengths_q: list[int], lengths_k: list[int], mode: str
                       ) -> tuple[bool, torch.Tensor | None, torch.Tensor]:
    """A cases.DISPATCH_MODES mode as (causal, query_positions or None, the positions masked_sdpa masks with):
    'causal' (bottom-right), 'not_causal' (every key), 'index' (query t of a sequence at position t),
    'index_clamped' (the same, each sequence's last query far past the end), 'one_lower' / 'one_higher' (the last
    sequence's third-last query at its index -1 / +1)."""
    if mode == "causal":
        return True, None, query_positions(lengths_q, lengths_k, "bottom_right")
    if mode == "not_causal":
        return False, None, torch.full((sum(lengths_q),), max(lengths_k, default=0))
    pos = torch.cat([torch.arange(n) for n in lengths_q])
    ends = torch.tensor(lengths_q).cumsum(0)
    if mode == "index_clamped":
        pos[[int(e) - 1 for e, n in zip(ends, lengths_q, strict=True) if n]] += 1000
    elif mode in ("one_lower", "one_higher"):
        pos[int(ends[-1]) - 3] += -1 if mode == "one_lower" else 1
    elif mode != "index":
        raise ValueError(f"unknown mode {mode!r}")
    return True, pos, pos


def chunk_positions(sequences: list[tuple[int, list[tuple[int, str]]]]
                    ) -> tuple[list[int], list[int], torch.Tensor]:
    """(query lengths, key lengths, positions) of a cases.CHUNK_CASES case: per sequence its number of keys Lk and
    its queries' positions run by run: 'index' (query t at t), 'lower' (t - 1), 'ragged' (increasing random from -1:
    different key counts), 'same' (one random position below Lk - 1 for the run), 'none' (negative: no key), 'all'
    (Lk - 1 or past it: every key), 'shuffled' (distinct random positions in any order), 'wild' (random in
    -3..Lk+2)."""
    lengths_q, lengths_k, out = [], [], []
    for lk, runs in sequences:
        t = 0
        for n, kind in runs:
            index = torch.arange(t, t + n)
            if kind in ("index", "lower"):
                pos = index - int(kind == "lower")
            elif kind == "ragged":
                pos = torch.randint(-1, lk, (n,)).sort().values
                pos[0] = -1
            elif kind == "same":
                pos = torch.full((n,), int(torch.randint(0, lk - 1, ())))
            elif kind == "none":
                pos = torch.randint(-5, 0, (n,))
            elif kind == "all":
                pos = torch.randint(lk - 1, lk + 5, (n,))
            elif kind == "shuffled":
                pos = torch.randperm(lk)[:n]
            elif kind == "wild":
                pos = torch.randint(-3, lk + 3, (n,))
            else:
                raise ValueError(f"unknown kind {kind!r}")
            out.append(pos)
            t += n
        lengths_q.append(t)
        lengths_k.append(lk)
    return lengths_q, lengths_k, torch.cat(out)


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                positions: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The independent oracle of query positions, in fp64: per sequence, dense SDPA with a boolean mask built
    here (query t sees key j iff j <= positions[t]); a query that sees no key gets zeros."""
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for b in range(cu_q.numel() - 1):
        rows_q, rows_k = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        qs, ks, vs = (t.double().transpose(0, 1) for t in (q[rows_q], k[rows_k], v[rows_k]))  # [H, L, Dh]
        mask = torch.arange(ks.shape[1], device=q.device)[None, :] <= positions[rows_q].long()[:, None]
        if not mask.any():
            continue
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale,
                                                             enable_gqa=True)
        out[rows_q] = torch.where(mask.any(1)[:, None, None], o.transpose(0, 1), 0.0)
    return out


def bad_query_positions(rows: int) -> dict[str, tuple[dict, bool, type, str]]:
    """Bad query_positions for an op with `rows` query rows: name -> (kwargs, inputs require grad, exception,
    message). The public functions raise these before any backend runs."""
    pos = torch.arange(rows)
    return {
        "dtype": (dict(query_positions=pos.float()), False, TypeError, "query_positions must have dtype"),
        "rank": (dict(query_positions=pos.view(1, rows)), False, ValueError, "query_positions must have 1 dim"),
        "shape": (dict(query_positions=pos[1:]), False, ValueError, f"query_positions must have shape [{rows}]"),
        "not causal": (dict(query_positions=pos, causal=False), False, ValueError, "needs causal=True"),
        "requires grad": (dict(query_positions=pos), True, ValueError, "query_positions is forward only"),
    }
