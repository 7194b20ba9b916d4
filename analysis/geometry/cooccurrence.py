"""Block co-occurrence of SAE latents and its affinities (the "lobes" half of The Geometry of
Concepts): which latents are on in the same blocks of consecutive tokens.

B is the sparse (blocks x latents) on/off matrix and C = B^T B the shared-block counts; C_ii is
latent i's block count n_i and T the number of blocks. Up to DENSE_LIMIT latents the full
affinity matrix is built, as in the paper. Above, C is formed a chunk of latents at a time by a
sparse product (only co-occurring pairs are ever produced) and each latent keeps its
`neighbours` strongest affinities, symmetrised, so 65k latents hold about 65k x 64 entries.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from analysis.geometry.common import DENSE_LIMIT
from hooks.errors import UserError

CHUNK_ENTRIES = 1 << 22  # (chunk x n) scratch per step: 16 MiB of float32 (x ~4 in temporaries)
DENSE_SHARE = 0.01  # B denser than this: a dense BLAS product beats the sparse one
DENSE_BLOCK_BYTES = 1 << 30  # ... if B's dense copy fits in 1 GiB


def block_matrix(acts: sp.csr_matrix, blocks: np.ndarray, threshold: float) -> sp.csr_matrix:
    """(T, n) float32 0/1: latent j is on in block b when a token of b has activation > threshold.

    acts is (N, n) tokens x latents, blocks (N,) each token's block id in 0..T-1."""
    coo = acts.tocoo()
    on = coo.data > threshold
    T = int(blocks.max()) + 1 if len(blocks) else 0
    B = sp.csr_matrix(
        (np.ones(int(on.sum()), np.float32), (blocks[coo.row[on]], coo.col[on])),
        shape=(T, acts.shape[1]),
    )
    B.sum_duplicates()  # a latent on at several tokens of a block counts once
    B.data[:] = 1.0
    return B


# Affinities from the 2x2 table of a pair: n11 blocks with both on, n_i and n_j with each on,
# T blocks in all. Each takes broadcastable arrays and returns float64; 0/0 gives 0.


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.asarray(num, np.float64) / np.asarray(den, np.float64)
    return np.where(np.isfinite(out), out, 0.0)


def phi(n11, ni, nj, T) -> np.ndarray:
    """The phi coefficient + 1, in [0, 2] (the paper's shift, so the affinity is non-negative)."""
    n11, ni, nj = (np.asarray(x, np.float64) for x in (n11, ni, nj))
    n00 = T - ni - nj + n11
    num = n11 * n00 - (ni - n11) * (nj - n11)
    return _ratio(num, np.sqrt(ni * (T - ni) * nj * (T - nj))) + 1.0


def jaccard(n11, ni, nj, T) -> np.ndarray:
    return _ratio(n11, np.asarray(ni, np.float64) + nj - n11)


def dice(n11, ni, nj, T) -> np.ndarray:
    return _ratio(2.0 * np.asarray(n11, np.float64), np.asarray(ni, np.float64) + nj)


def overlap(n11, ni, nj, T) -> np.ndarray:
    return _ratio(n11, np.minimum(ni, nj))


def simple_matching(n11, ni, nj, T) -> np.ndarray:
    """(n00 + n11) / T: agreement on both on and both off."""
    n11 = np.asarray(n11, np.float64)
    return _ratio(T - np.asarray(ni, np.float64) - nj + 2.0 * n11, np.full_like(n11, T))


AFFINITIES = dict(phi=phi, jaccard=jaccard, dice=dice, overlap=overlap, matching=simple_matching)


def affinity_function(name: str):
    if name not in AFFINITIES:
        raise UserError(
            f"Unknown co-occurrence affinity {name!r}; choose one of {', '.join(AFFINITIES)}."
        )
    return AFFINITIES[name]


def cooccurrence_affinity(
    B: sp.csr_matrix,
    affinity: str = "phi",
    neighbours: int = 64,
    dense_limit: int = DENSE_LIMIT,
    dense_blocks: bool | None = None,
    progress: bool = False,
) -> sp.csr_matrix:
    """(n, n) symmetric co-occurrence affinity of the columns of B (T, n), no self loops.

    Up to dense_limit latents: the whole matrix. Above: each latent's `neighbours` strongest
    affinities among the latents it shares a block with (pairs that never co-occur are 0; for
    phi and simple matching the dense matrix would give them a small positive value), the union
    of both directions. A chunk's counts come from a sparse product, or, where B is dense enough
    that a BLAS product of its dense copy is cheaper and that copy is small (dense_blocks=None
    decides), from that; both give the same counts."""
    f = affinity_function(affinity)
    T, n = B.shape
    counts = np.asarray(B.sum(0)).ravel()  # (n,) n_i, the diagonal of C
    if n <= dense_limit:
        C = (B.T @ B).toarray()  # (n, n)
        A = f(C, counts[:, None], counts[None, :], T)
        np.fill_diagonal(A, 0.0)
        return sp.csr_matrix(A.astype(np.float32))
    if dense_blocks is None:
        dense_blocks = B.nnz > DENSE_SHARE * T * n and T * n * 4 <= DENSE_BLOCK_BYTES
    m = min(neighbours, n - 1)
    Bd = B.toarray() if dense_blocks else None  # (T, n) float32: counts exact below 2^24
    Bc = None if dense_blocks else B.tocsc()
    chunk = max(1, CHUNK_ENTRIES // n)
    rows, cols, vals = [], [], []
    for lo in tqdm(range(0, n, chunk), desc="co-occurrence", disable=not progress, leave=False):
        hi = min(lo + chunk, n)
        if dense_blocks:
            C = Bd[:, lo:hi].T @ Bd  # (c, n) shared-block counts
            dense = np.where(C > 0, f(C, counts[lo:hi, None], counts[None, :], T), 0.0)
            dense = dense.astype(np.float32)
        else:
            C = (Bc[:, lo:hi].T @ B).tocoo()  # (c, n): only the pairs that share a block
            r, j = C.row, C.col
            dense = np.zeros((hi - lo, n), np.float32)  # scratch: affinity where n11 > 0
            dense[r, j] = f(C.data, counts[r + lo], counts[j], T)
        dense[np.arange(hi - lo), np.arange(lo, hi)] = 0.0  # no self loops
        top = np.argpartition(-dense, m - 1, axis=1)[:, :m]  # (c, m)
        val = np.take_along_axis(dense, top, 1)
        keep = val > 0
        rows.append(np.nonzero(keep)[0] + lo)
        cols.append(top[keep])
        vals.append(val[keep])
    A = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    )
    return A.maximum(A.T).tocsr()
