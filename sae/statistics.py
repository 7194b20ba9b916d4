"""Statistics of a batch pooled over data-parallel ranks: each rank sums its part in float64,
`reduce` adds the parts, and only then are they divided or subtracted."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Reduce = Callable[[Tensor], Tensor]  # sums a tensor over ranks (the identity in one process)


def variance(x: Tensor, reduce: Reduce | None = None) -> Tensor:
    """sum ||x - mean x||^2 over the rows of x (N, d), and over all ranks when `reduce` sums.

    Computed from float64 sums so that ranks can add their parts before subtracting.
    """
    xd = x.detach().double()
    flat = xd.reshape(-1)
    stats = torch.cat(
        [
            torch.dot(flat, flat).view(1),  # one pass, no (N, d) temporary of squares
            xd.sum(0),
            # a fill, not new_tensor: copying a host list to the GPU waits for the GPU
            torch.full((1,), x.shape[0], dtype=torch.float64, device=x.device),
        ]
    )
    if reduce is not None:
        stats = reduce(stats)
    total = stats[0] - stats[1:-1].pow(2).sum() / stats[-1].clamp_min(1)
    return total.to(x.dtype)


def scale_and_mean(x: Tensor, d: int, reduce: Reduce | None) -> tuple[float, Tensor]:
    """(s with E||x s||^2 = d, the mean row (d,) in x's units), pooled over ranks by `reduce`."""
    stats = torch.cat(
        [
            x.double().pow(2).sum().view(1),
            x.double().sum(0),
            x.new_tensor([x.shape[0]], dtype=torch.float64),
        ]
    )
    if reduce is not None:
        stats = reduce(stats)
    count = stats[-1].clamp_min(1)
    mean_sq = float(stats[0] / count)
    return math.sqrt(d / max(mean_sq, 1e-12)), stats[1:-1] / count
