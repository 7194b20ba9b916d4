"""Vectorised helpers of the feature store's streaming pass: power-of-two ranges and their bins,
batch-independent sample keys, runs in sorted keys, multi-key sorts."""

from __future__ import annotations

import torch
from torch import Tensor

EMPTY_EXP = -(2**20)  # "no activation yet": below any float32 exponent
EMPTY_KEY = 2**62  # larger than any sample key
_PRIME = 2**31 - 1  # sample keys live in [0, 2^31); products stay below 2^62 in int64


def ceil_log2(x: Tensor) -> Tensor:
    """Smallest integer e with x <= 2^e, exactly (x > 0)."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2^exponent, mantissa in [0.5, 1)
    return exponent - (mantissa == 0.5).to(exponent.dtype)


def bin_index(acts: Tensor, exp: Tensor, n_bins: int) -> Tensor:
    """Bin of each activation among n_bins equal bins on [0, 2^exp]. In float64 the scaling by a
    power of two and by n_bins is exact, so a brute-force numpy check gets the same bins."""
    scaled = torch.ldexp(acts.double(), -exp.double()) * n_bins
    return scaled.floor().long().clamp_(0, n_bins - 1)


def sample_keys(token_id: Tensor, latent: Tensor, seed: int) -> Tensor:
    """A pseudo-random key in [0, 2^31) per (global token id, latent): the interval reservoirs keep
    the smallest keys. A hash rather than an RNG stream, so keys do not depend on batching."""
    h = (
        (token_id % _PRIME) * 1_103_515_245 + (latent % _PRIME) * 12_345 + seed * 2_654_435
    ) % _PRIME
    for mult in (0x5BD1E995, 0x27D4EB2F, 0x165667B1):  # odd multipliers < 2^31: no overflow
        h = h ^ (h >> 15)
        h = (h * mult) % _PRIME
    return h ^ (h >> 13)


def rank_in_runs(x: Tensor) -> Tensor:
    """For x sorted along its last dim: each element's rank among the equal values before it."""
    pos = torch.arange(x.shape[-1], device=x.device).expand_as(x)
    change = torch.ones_like(x, dtype=torch.bool)
    change[..., 1:] = x[..., 1:] != x[..., :-1]
    start = torch.where(change, pos, torch.zeros_like(pos)).cummax(dim=-1).values
    return pos - start


def lexsort(*keys: Tensor) -> Tensor:
    """Indices that sort by keys[0], then keys[1], ... (stable sorts, least significant first)."""
    order = torch.arange(keys[0].shape[0], device=keys[0].device)
    for key in reversed(keys):
        order = order[key[order].argsort(stable=True)]
    return order
