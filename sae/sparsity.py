"""How the kinds other than TopK decide which latents fire in training: BatchTopK's cutoff over
the global batch, the cut that makes each latent fire at the target rate, and the controller
that moves the sparsity penalty of JumpReLU and ReLU until their L0 sits at the target."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from sae.statistics import Reduce

# The sparsity controller: log lambda moves by at most this much per step, in proportion to
# (L0 - target) / target: lambda can change e-fold in 20 steps, and batch-to-batch noise in L0
# of a few percent moves it by a fraction of a percent.
L0_CONTROL_RATE = 0.05
INITIAL_SPARSITY = 0.1  # lambda * k at the start (sign descent reads only its sign anyway)


@torch.no_grad()
def control_sparsity(coefficient: Tensor, l0: Tensor, k: int) -> None:
    """lambda *= exp(rate * clip((L0 - k) / k, -1, 1)), in place: an integral controller."""
    error = ((l0 - k) / k).clamp(-1, 1)
    coefficient.mul_(torch.exp(L0_CONTROL_RATE * error))


def batch_topk(
    acts: Tensor,
    k: int,
    threshold: Tensor,
    rate: float,
    reduce: Reduce | None = None,
    gather: Reduce | None = None,
) -> Tensor:
    """Keep the k*N largest of acts (N, K) over the (global) batch, zeros elsewhere, and move
    `threshold` (a scalar, in place) by an EMA of rate `rate` towards the smallest kept one,
    the threshold for inference.

    Under data parallelism each rank sends its own k*N_global largest values (padded with
    -inf): the global k*N-th value is among them, so the cutoff is exactly one process's.
    """
    with torch.no_grad():
        flat = acts.detach().flatten()  # (N * K,)
        keep = k * acts.shape[0]
        total = flat.numel()
        if gather is not None:
            counts = reduce(acts.new_tensor([acts.shape[0], flat.numel()], dtype=torch.int64))
            rows, total = (int(c) for c in counts.tolist())  # one host sync
            keep = k * rows
            mine = flat.topk(min(keep, flat.numel()), sorted=False).values
            padded = flat.new_full((keep,), -math.inf)
            padded[: mine.numel()] = mine
            candidates = gather(padded)  # (world * keep,), the global top keep among them
        else:
            candidates = flat
        cutoff = candidates.topk(keep, sorted=False).values.min() if keep < total else None
        # The smallest kept positive value, by masks rather than indexing: no host sync.
        kept = candidates > 0 if cutoff is None else (candidates >= cutoff) & (candidates > 0)
        low = torch.where(kept, candidates, math.inf).min().to(threshold.dtype)
        moved = torch.where(threshold == 0, low, (1 - rate) * threshold + rate * low)
        threshold.copy_(torch.where(torch.isfinite(low), moved, threshold))
    return acts if cutoff is None else acts * (acts >= cutoff)


@torch.no_grad()
def rate_cut(pre_chunks: Iterable[Tensor], m: int, gather: Reduce | None = None) -> Tensor:
    """Each latent's m-th largest pre-activation (n,) over chunks of (rows, n), and over all
    ranks with `gather`: the global m largest are among every rank's own m largest."""
    top = None  # (m, n): each latent's m largest so far
    for pre in pre_chunks:
        top = pre.new_full((m, pre.shape[1]), -math.inf) if top is None else top
        top = torch.cat([top, pre]).topk(m, dim=0).values
    if gather is not None:
        top = gather(top.flatten()).view(-1, top.shape[1]).topk(m, dim=0).values
    return top[-1]
