"""Synthetic superposition data with planted features: the ground truth for trainer tests and
benchmarks.

Each token is a sparse non-negative combination of `n_features` random unit directions in d
dimensions. Feature i fires with a Zipf-distributed probability (a few common, many rare features,
as in real SAEs), with a magnitude drawn uniformly from [0.5, 1.5]. A trained SAE should find the
directions: its best decoder-row cosine to each planted feature should be close to 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from hooks.activations import Rows
from hooks.cache import write_cache


def planted_features(
    d: int, n_features: int, seed: int = 0, rank: int | None = None
) -> torch.Tensor:
    """(n_features, d) random unit rows, spanning only a random `rank`-dim subspace if given
    (real activations are anisotropic; latents that start outside the data's span die)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, rank or d, generator=g)
    if rank is not None:
        basis, _ = torch.linalg.qr(torch.randn(d, rank, generator=g))  # (d, rank) orthonormal
        features = features @ basis.T
    return features / features.norm(dim=1, keepdim=True)


def firing_probabilities(n_features: int, mean_active: float, zipf: float = 1.0) -> torch.Tensor:
    """(n_features,) Zipf rates scaled so that about `mean_active` features fire per token."""
    rates = 1.0 / torch.arange(1, n_features + 1, dtype=torch.float64) ** zipf
    return (rates * mean_active / rates.sum()).clamp(max=1.0).float()


def sample_codes(probs: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """(n, F) non-negative sparse codes: feature i fires with probs[i], magnitude in [0.5, 1.5]."""
    fire = torch.rand(n, len(probs), generator=g) < probs  # (n, F)
    return fire * (0.5 + torch.rand(n, len(probs), generator=g))


def sample(
    features: torch.Tensor, probs: torch.Tensor, n: int, g: torch.Generator, noise: float = 0.0
) -> torch.Tensor:
    """(n, d) tokens: sum_i fire_i * magnitude_i * feature_i (+ Gaussian noise)."""
    x = sample_codes(probs, n, g) @ features  # (n, d)
    if noise:
        x += noise * torch.randn(x.shape, generator=g)
    return x


def synthetic_rows(
    features: torch.Tensor,
    probs: torch.Tensor,
    chunk: int = 4096,
    seed: int = 0,
    noise: float = 0.0,
    site: str = "synthetic",
    out_features: torch.Tensor | None = None,
):
    """rows_after(cursor) for write_cache: chunk c is generated from seed + c, so any chunk
    can be regenerated on resume. With out_features (F, d_out), site + "_out" holds the same
    codes through those features: a transcoder's planted target."""

    def rows_after(cursor: int) -> Iterator[tuple[int, Rows]]:
        for c in range(cursor, 1 << 40):
            g = torch.Generator().manual_seed(seed * 1_000_003 + c)
            codes = sample_codes(probs, chunk, g)  # (chunk, F)
            x = codes @ features
            if noise:
                x += noise * torch.randn(x.shape, generator=g)
            acts = {site: x}
            if out_features is not None:
                acts[f"{site}_out"] = codes @ out_features
            index = torch.full((chunk,), c, dtype=torch.int64)
            yield (
                c + 1,
                Rows(
                    acts=acts,
                    token=torch.zeros(chunk, dtype=torch.int32),
                    doc=index.int(),
                    pos=torch.arange(chunk, dtype=torch.int32),
                    window=index,
                ),
            )

    return rows_after


def write_synthetic_cache(
    out: Path,
    d: int,
    n_features: int,
    tokens: int,
    mean_active: float = 8.0,
    seed: int = 0,
    zipf: float = 1.0,
    noise: float = 0.0,
    rank: int | None = None,
    progress: bool = False,
    transcode: bool = False,
) -> torch.Tensor:
    """Write a cache of planted-feature activations (site 'synthetic'); returns the features.
    With transcode, site 'synthetic_out' holds the same codes through a second set of features
    (seed + 1), and the return value is (features, out_features)."""
    features = planted_features(d, n_features, seed, rank)
    out_features = planted_features(d, n_features, seed + 1) if transcode else None
    probs = firing_probabilities(n_features, mean_active, zipf)
    wanted = {
        "model": "synthetic",
        "sites": ["synthetic", "synthetic_out"] if transcode else ["synthetic"],
        "d_model": d,
        "dtype": "float32",
        "tokenizer": None,
        "selection": None,  # no text: the rows are planted features
        "planted": {
            "n_features": n_features,
            "mean_active": mean_active,
            "zipf": zipf,
            "noise": noise,
            "seed": seed,
            "rank": rank,
        },
    }
    write_cache(
        out,
        wanted,
        synthetic_rows(features, probs, seed=seed, noise=noise, out_features=out_features),
        tokens,
        shard_tokens=16384,
        progress=progress,
        desc="synthetic",
    )
    return (features, out_features) if transcode else features


def recovery(W_dec: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(n_features,) best cosine between each planted feature and any decoder row."""
    W = W_dec / W_dec.norm(dim=1, keepdim=True)
    return (features @ W.T).max(dim=1).values
