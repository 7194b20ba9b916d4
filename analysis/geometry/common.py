"""Decoder geometry that several analyses share: unit decoder rows, the sparse nearest-neighbour
angular affinity, seeded spectral clustering, and the store the labels come from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from analysis.store.encode import decoder_neighbours
from hooks.errors import UserError

DENSE_LIMIT = 4096  # up to this many latents the full n x n affinity is cheap (64 MiB)


def unit_decoder(sae, features: np.ndarray | None = None) -> np.ndarray:
    """(n, d) float32 decoder rows scaled to unit norm (all latents, or those in `features`)."""
    W = sae.W_dec.detach().float().cpu()
    if features is not None:
        W = W[torch.as_tensor(features, dtype=torch.long)]
    return (W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)).numpy()


def angular(cos: np.ndarray) -> np.ndarray:
    """The papers' angular similarity 1 - arccos(cos)/pi, in [0, 1]."""
    return 1.0 - np.arccos(np.clip(cos, -1.0, 1.0)) / np.pi


def angular_affinity(W: np.ndarray, neighbours: int = 64) -> sp.csr_matrix:
    """(n, n) symmetric angular similarity of unit rows W, no self loops.

    Up to DENSE_LIMIT rows it is the full matrix, as in the papers; above, only each row's
    `neighbours` nearest rows are held (the union of both directions), so 65k latents need
    about 65k x 64 entries rather than 4.3 billion."""
    n = len(W)
    if n <= DENSE_LIMIT:
        A = angular(W @ W.T)
        np.fill_diagonal(A, 0.0)
        return sp.csr_matrix(A.astype(np.float32))
    ids, cos = decoder_neighbours(torch.from_numpy(W), top=min(neighbours, n - 1))  # (n, m)
    rows = np.repeat(np.arange(n), ids.shape[1])
    A = sp.csr_matrix((angular(cos.numpy().ravel()), (rows, ids.numpy().ravel())), shape=(n, n))
    return A.maximum(A.T).tocsr()


def require_clusterable(n_items: int, n_clusters: int, what: str) -> None:
    if n_clusters < 2:
        raise UserError(f"--clusters must be at least 2, got {n_clusters}.")
    if n_items < max(2 * n_clusters, 10):
        raise UserError(
            f"Only {n_items} {what} to cluster into {n_clusters} clusters; at least "
            f"{max(2 * n_clusters, 10)} are needed. Use fewer clusters or an SAE with more "
            "active latents (analyze more tokens)."
        )


def spectral_labels(affinity: sp.spmatrix | np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """(n,) cluster ids from seeded spectral clustering of a precomputed affinity.

    The random_state seeds both the eigensolver's start vector and k-means, so the same seed
    gives the same clusters (the multi-dimensional features paper's unseeded run does not).
    Above DENSE_LIMIT rows the eigenvectors come from LOBPCG: ARPACK's shift-invert mode
    factorises the sparse Laplacian, whose fill-in takes minutes at 9k latents, where LOBPCG
    takes seconds."""
    from sklearn.cluster import SpectralClustering

    require_clusterable(affinity.shape[0], n_clusters, "latents")
    solver = "lobpcg" if affinity.shape[0] > DENSE_LIMIT else "arpack"
    model = SpectralClustering(
        n_clusters=n_clusters,
        affinity="precomputed",
        assign_labels="kmeans",
        random_state=seed,
        eigen_solver=solver,
    )
    return model.fit_predict(affinity).astype(np.int32)


def open_store(run_path: Path, what: str):
    """The run's feature store, or one sentence naming the command that makes it."""
    from analysis.store.read import FeatureStore

    folder = Path(run_path) / "features"
    if not (folder / "manifest.json").exists():
        raise UserError(
            f"{what} needs the feature store of {run_path}, which has none; run "
            f"`saewb analyze {run_path}` first."
        )
    return FeatureStore(folder)
