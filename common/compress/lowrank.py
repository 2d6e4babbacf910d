"""Truncated SVD of one linear layer into two factors (served as two matmuls by LowRankLinear)."""

from __future__ import annotations

import torch

from tokenmill.common.errors import InvalidArgument


def choose_rank(
    singular: torch.Tensor, *, rank: int | None, rank_fraction: float | None, energy: float | None
) -> int:
    """The rank to keep: given outright, as a fraction of min(out, in), or the smallest rank whose
    singular values hold `energy` of the total sum of squares."""
    full = singular.numel()
    if rank is not None:
        if rank > full:
            raise InvalidArgument(f"svd rank {rank} exceeds the matrix rank bound min(out, in) = {full}")
        return rank
    if rank_fraction is not None:
        return max(1, round(rank_fraction * full))
    assert energy is not None  # MethodSpec guarantees exactly one of the three
    cumulative = torch.cumsum(singular.double() ** 2, 0)
    total = float(cumulative[-1])
    if total == 0.0:
        return 1
    return min(full, int(torch.searchsorted(cumulative, energy * total * (1 - 1e-12)).item()) + 1)


def truncated_svd(
    weight: torch.Tensor,
    *,
    rank: int | None = None,
    rank_fraction: float | None = None,
    energy: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(u [out, r], v [r, in]) with u @ v the best rank-r approximation of W (Eckart-Young); the
    singular values are split as sqrt into both factors so neither is badly scaled."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    r = choose_rank(s, rank=rank, rank_fraction=rank_fraction, energy=energy)
    root = s[:r].sqrt()
    return (u[:, :r] * root[None, :]).float(), (root[:, None] * vh[:r]).float()
