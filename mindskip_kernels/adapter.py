"""The skipped token's update (design.md s.1, `adapter=`): instead of passing a routed sub-layer unchanged
(h = x, the paper's), a skipped token gets h = x + U V^T z + b, z the router's input (the target's own RMSNorm
output), a cheap linear stand-in for the sub-layer's update fit in closed form to what the dense model does.

- `SkipAdapter`: the map. "mean": b only; "linear": U V^T z + b, one [D, D] matrix at full rank (rank None),
  else the factors V^T [r, D] (`down`) and U [D, r] (`up`). Its projections are plain `nn.Linear`s, so a decode
  step's predicated projection (`rowwise.predicated_linear`: no weight read for a row that does not need it)
  applies to them as to the model's own.
- `AdapterStats`: the streaming least-squares statistics of one layer (fp64: sums of z, u, z z^T, z u^T and
  ||u||^2 over the fit's samples), all-reducible across processes; `solve` gives the ridge least-squares map with
  an intercept and, for a rank r, the reduced-rank regression (the fitted map projected on the top-r principal
  directions of its own predictions, which minimises the squared error among rank-r maps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mindskip_kernels.rowwise import Project

ADAPTERS = ("mean", "linear")


def check_adapter(kind: object, rank: object, dim: int) -> tuple[str | None, int | None]:
    """(kind, rank) checked: kind None (a skipped token passes unchanged) or one of ADAPTERS; rank None (full)
    or an int in [1, dim], for kind "linear" only."""
    if kind is not None and kind not in ADAPTERS:
        raise ValueError(f"adapter must be None or one of {ADAPTERS}, got {kind!r}")
    if rank is None:
        return kind, None
    if kind != "linear":
        raise ValueError(f'adapter_rank needs adapter="linear" (the rank of its map), got adapter={kind!r}')
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= dim:
        raise ValueError(f"adapter_rank must be None (full rank) or an int in [1, {dim}] (the hidden size), "
                         f"got {rank!r}")
    return kind, rank


def _linear(linear: nn.Linear, rows: torch.Tensor) -> torch.Tensor:
    return linear(rows)


class SkipAdapter(nn.Module):
    """A skipped token's update from z [..., D]: b ("mean") or U V^T z + b ("linear", full rank or rank r).
    Zero-initialised: an adapter that was never fit changes nothing."""

    def __init__(self, dim: int, kind: str = "linear", rank: int | None = None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.kind, self.rank = check_adapter(kind, rank, dim)
        if self.kind is None:
            raise ValueError(f"a SkipAdapter needs a kind, one of {ADAPTERS}")
        self.dim = dim
        make = dict(device=device, dtype=dtype)
        if self.kind == "mean":
            self.bias = nn.Parameter(torch.zeros(dim, **make))
        elif rank is None:
            self.proj = nn.Linear(dim, dim, **make)
        else:
            self.down = nn.Linear(dim, rank, bias=False, **make)
            self.up = nn.Linear(rank, dim, **make)
        for p in self.parameters():
            nn.init.zeros_(p)

    def forward(self, z: torch.Tensor, project: Project | None = None) -> torch.Tensor:
        """The update of rows z [..., D]; `project(linear, rows)` replaces `linear(rows)` when given."""
        if self.kind == "mean":
            return self.bias.to(z.dtype).expand(z.shape)
        project = project or _linear
        if self.rank is None:
            return project(self.proj, z)
        return project(self.up, project(self.down, z))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kind={self.kind!r}, rank={self.rank}"

    @torch.no_grad()
    def set_map(self, weight: torch.Tensor | None, bias: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor]
                | None = None) -> None:
        """Load a solved map: bias b [D]; "linear" full rank: weight [D, D]; rank r: factors (U [D, r], V^T [r, D])."""
        if self.kind == "mean":
            self.bias.copy_(bias)
        elif self.rank is None:
            self.proj.weight.copy_(weight)
            self.proj.bias.copy_(bias)
        else:
            up, down = factors
            self.up.weight.copy_(up)
            self.up.bias.copy_(bias)
            self.down.weight.copy_(down)


@dataclass
class AdapterFit:
    """One layer's adapter fit: samples (tokens) and R^2, the fraction of the update's variance (summed over
    channels) that the map explains on the fit's data."""

    samples: int
    r2: float


class AdapterStats:
    """Streaming fp64 statistics of one layer for the least-squares map u ~ W z + b (module docstring)."""

    def __init__(self, dim: int, device: torch.device | str) -> None:
        make = dict(dtype=torch.float64, device=device)
        self.zz = torch.zeros(dim, dim, **make)
        self.zu = torch.zeros(dim, dim, **make)
        self.sums = torch.zeros(3, dim, **make)  # sum z, sum u, [count, sum ||u||^2, 0...]

    def add(self, z: torch.Tensor, u: torch.Tensor) -> None:
        """Samples z [S, D] (the router's input) with the sub-layer's update u [S, D]."""
        z, u = z.double(), u.double()
        self.zz += z.T @ z
        self.zu += z.T @ u
        self.sums[0] += z.sum(0)
        self.sums[1] += u.sum(0)
        self.sums[2, 0] += z.shape[0]
        self.sums[2, 1] += u.square().sum()

    def all_reduce(self) -> None:
        for t in (self.zz, self.zu, self.sums):
            torch.distributed.all_reduce(t)

    def solve(self, adapter: SkipAdapter, ridge: float) -> AdapterFit:
        """Fit `adapter` in place: "mean" b = mean u; "linear" the ridge least squares (ridge relative to the
        mean variance of z) with b = mean u - W mean z, projected to `adapter.rank` by reduced-rank regression."""
        count = float(self.sums[2, 0])
        if count < 1:
            raise ValueError("no real tokens reached a routed layer: give data with text in it")
        mean_z, mean_u = self.sums[0] / count, self.sums[1] / count
        total = float(self.sums[2, 1]) - count * float(mean_u @ mean_u)  # sum of ||u - mean u||^2
        czz = self.zz / count - torch.outer(mean_z, mean_z)
        czu = self.zu / count - torch.outer(mean_z, mean_u)
        weight = factors = None
        if adapter.kind == "mean":
            bias, explained = mean_u, 0.0
        else:
            scale = float(czz.diagonal().mean()) or 1.0
            eye = torch.eye(czz.shape[0], dtype=czz.dtype, device=czz.device)
            weight = torch.linalg.solve(czz + ridge * scale * eye, czu).T  # [D_u, D_z]
            if adapter.rank is not None:  # the top-r directions of the fitted updates' covariance W Czz W^T
                _, vectors = torch.linalg.eigh(weight @ czz @ weight.T)
                up = vectors[:, -adapter.rank:]
                up = up * up.gather(0, up.abs().argmax(0, keepdim=True)).sign()  # a fixed sign per direction
                factors = (up, up.T @ weight)
                weight = up @ factors[1]
            bias = mean_u - weight @ mean_z
            # explained variance of the centred fit: 2 tr(W Czu) - tr(W Czz W^T), times the count
            explained = count * float(2 * (weight * czu.T).sum() - (weight @ czz * weight).sum())
        adapter.set_map(weight, bias, factors)
        return AdapterFit(int(count), explained / total if total > 0 else 0.0)
