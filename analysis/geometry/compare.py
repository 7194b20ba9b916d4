"""Dictionary comparison of two SAEs with one d_in: their decoders matched one-to-one (Hungarian)
and many-to-one, and their codes on the same tokens compared by SVCCA, linear CKA, relative
representations over shared anchor tokens, and a Procrustes shape distance with its
small-sample bias corrected by a split-half (cross-validated) estimate."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from tqdm import tqdm

from analysis.geometry.codes import Codes, Inputs
from analysis.geometry.common import unit_decoder
from analysis.geometry.results import Result
from analysis.run import Run
from hooks.errors import UserError

DENSE_MATCH = 4096 * 4096  # up to this many pairs the Hungarian runs on the full cosine matrix
CHUNK_ENTRIES = 1 << 23  # dense blocks of at most 8M entries (64 MB in float64)


# -- decoder matching --------------------------------------------------------------------------


def top_matches(W_from: np.ndarray, W_to: np.ndarray, k: int = 1, chunk: int = 1024):
    """((n_from, k) indices, (n_from, k) cosines) of each unit row's k best matches among
    W_to's unit rows, best first, in row chunks so only a (chunk, n_to) block is held."""
    A, B = torch.from_numpy(W_from), torch.from_numpy(W_to)
    k = min(k, len(B))
    idx, cos = [], []
    for start in range(0, len(A), chunk):
        top = (A[start : start + chunk] @ B.T).topk(k, dim=1)  # of (chunk, n_to)
        idx.append(top.indices)
        cos.append(top.values)
    return torch.cat(idx).numpy(), torch.cat(cos).numpy()


def _pair_cos(W_a: np.ndarray, W_b: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(E,) cosines of the row pairs (r, c), 65k pairs at a time (never an (E, d) copy)."""
    out = np.empty(len(r))
    for s in range(0, len(r), 1 << 16):
        out[s : s + (1 << 16)] = np.einsum(
            "ij,ij->i", W_a[r[s : s + (1 << 16)]], W_b[c[s : s + (1 << 16)]], dtype=np.float64
        )
    return out


def hungarian_match(W_a: np.ndarray, W_b: np.ndarray, neighbours: int = 32, tops=None):
    """((m,) rows of a, (m,) matched rows of b, (m,) cosines, method): the one-to-one matching
    of unit rows that maximises the summed cosine, m = min(n_a, n_b).

    Up to DENSE_MATCH pairs it is scipy's exact linear_sum_assignment on the full cosine matrix.
    Above, it is the exact matching restricted to a sparse bipartite graph holding each row's
    `neighbours` best partners in both directions (scipy's min_weight_full_bipartite_matching on
    2 - cos > 0): a pair is left out only if both of its rows have `neighbours` better options.
    If that graph has no full matching, the lists are doubled until it does. `tops`: the two
    directions' top_matches with at least `neighbours` columns, if already computed."""
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    n_a, n_b = len(W_a), len(W_b)
    if n_a * n_b <= DENSE_MATCH:
        C = W_a.astype(np.float64) @ W_b.T.astype(np.float64)  # (n_a, n_b)
        rows, cols = linear_sum_assignment(C, maximize=True)
        return rows, cols, C[rows, cols], "dense"
    while True:
        if tops is None or min(t[0].shape[1] for t in tops) < min(neighbours, n_a, n_b):
            tops = (top_matches(W_a, W_b, neighbours), top_matches(W_b, W_a, neighbours))
        (ab, _), (ba, _) = tops
        ab, ba = ab[:, :neighbours], ba[:, :neighbours]
        r = np.concatenate([np.repeat(np.arange(n_a), ab.shape[1]), ba.ravel()])
        c = np.concatenate([ab.ravel(), np.repeat(np.arange(n_b), ba.shape[1])])
        key = np.unique(r.astype(np.int64) * n_b + c)  # a pair listed from both sides once
        r, c = key // n_b, key % n_b
        G = sp.csr_matrix((2.0 - _pair_cos(W_a, W_b, r, c), (r, c)), shape=(n_a, n_b))
        try:
            rows, cols = min_weight_full_bipartite_matching(G)
            break
        except ValueError:
            if neighbours >= min(n_a, n_b):
                raise
            neighbours *= 2
    return rows, cols, _pair_cos(W_a, W_b, rows, cols), f"sparse kNN graph, {neighbours} neighbours"


# -- codes of shared tokens --------------------------------------------------------------------


def shared_codes(codes_a: Codes, codes_b: Codes, where: tuple[str, str]) -> int:
    """How many leading tokens both code sets share, or one sentence if they share none."""
    n = min(codes_a.n_tokens, codes_b.n_tokens)
    same = codes_a.tokens[:n] == codes_b.tokens[:n]
    if n == 0 or not same.all():
        first = int(np.argmin(same)) if n else 0
        raise UserError(
            f"{where[0]} and {where[1]} share no tokens to compare codes on (their held-out "
            f"token ids differ from position {first}); compare runs of one model, tokenizer and "
            "text source."
        )
    return n


def _csr(X) -> sp.csr_matrix:
    return sp.csr_matrix(X, dtype=np.float64)


def _centred_gram_fro2(X: sp.csr_matrix, Y: sp.csr_matrix) -> float:
    """||X_c^T Y_c||_F^2 for centred columns, in column blocks of X, never N x N: each
    (block, p_y) slice of X^T Y minus N mu_x mu_y^T is squared and summed."""
    N = X.shape[0]
    mu_x, mu_y = np.asarray(X.mean(0)).ravel(), np.asarray(Y.mean(0)).ravel()
    Xc = X.tocsc()
    step = max(1, CHUNK_ENTRIES // max(Y.shape[1], 1))
    total = 0.0
    for s in range(0, X.shape[1], step):
        block = (Xc[:, s : s + step].T @ Y).toarray()  # (step, p_y)
        block -= N * np.outer(mu_x[s : s + step], mu_y)
        total += float((block**2).sum())
    return total


def linear_cka(X, Y) -> float:
    """Linear CKA of (N, p_x) and (N, p_y) activations (sparse or dense), in the feature-space
    form ||X_c^T Y_c||^2 / (||X_c^T X_c|| ||Y_c^T Y_c||), so no N x N Gram matrix is built."""
    X, Y = _csr(X), _csr(Y)
    xy = _centred_gram_fro2(X, Y)
    xx, yy = _centred_gram_fro2(X, X), _centred_gram_fro2(Y, Y)
    return float(xy / np.sqrt(xx * yy)) if xx > 0 and yy > 0 else float("nan")


def top_components(X, max_dims: int, variance: float, seed: int, n_iter: int = 4):
    """((N, r) orthonormal left singular vectors, (r,) singular values, captured share) of the
    centred X, r the fewest dims keeping `variance` of the total, at most max_dims.

    A seeded randomized SVD (Halko et al.) with the centring applied inside each product, so a
    sparse X is never densified; small X get an exact SVD."""
    X = _csr(X)
    N, p = X.shape
    mu = np.asarray(X.mean(0)).ravel()
    total = float(X.multiply(X).sum() - N * (mu**2).sum())
    k = min(max_dims + 10, N, p)
    if k == min(N, p):  # the whole spectrum fits: exact
        U, S, _ = np.linalg.svd(X.toarray() - mu, full_matrices=False)
    else:
        fwd = lambda M: X @ M - np.outer(np.ones(N), mu @ M)  # noqa: E731  X_c M, (N, k)
        back = lambda Q: X.T @ Q - np.outer(mu, Q.sum(0))  # noqa: E731  X_c^T Q, (p, k)
        Q = np.linalg.qr(fwd(np.random.default_rng(seed).standard_normal((p, k))))[0]
        for _ in range(n_iter):  # power iterations sharpen the top of a flat spectrum
            Q = np.linalg.qr(fwd(np.linalg.qr(back(Q))[0]))[0]
        Ub, S, _ = np.linalg.svd(back(Q).T, full_matrices=False)  # of Q^T X_c, (k, p)
        U = Q @ Ub
    share = np.cumsum(S**2) / max(total, 1e-300)
    r = min(int(np.searchsorted(share, variance - 1e-12) + 1), max_dims, len(S))
    r = max(1, r)
    return U[:, :r], S[:r], float(share[r - 1])


def svcca(Ua: np.ndarray, Ub: np.ndarray) -> np.ndarray:
    """Canonical correlations of two (N, r) orthonormal, centred bases: the singular values of
    Ua^T Ub (CCA on whitened data), the SVCCA paper's similarity once averaged."""
    return np.clip(np.linalg.svd(Ua.T @ Ub, compute_uv=False), 0.0, 1.0)


def _alignment(Pa: np.ndarray, Pb: np.ndarray) -> float:
    """cos of the angular Procrustes distance: ||Pa^T Pb||_* / (||Pa|| ||Pb||), both centred."""
    Pa, Pb = Pa - Pa.mean(0), Pb - Pb.mean(0)
    norm = np.linalg.norm(Pa) * np.linalg.norm(Pb)
    return float(np.linalg.svd(Pa.T @ Pb, compute_uv=False).sum() / max(norm, 1e-300))


def procrustes_distance(Pa, Pb, groups: np.ndarray | None = None, seed: int = 0) -> dict:
    """The angular Procrustes shape distance arccos(alignment) of (N, r_a) and (N, r_b) (Williams
    et al. 2021), plug-in and split-half.

    The plug-in nuclear norm fits the rotation to the same samples it scores, so sampling noise
    adds alignment: independent representations look closer than their population distance
    (pi/2). The split-half estimate fits the rotation on one half of the samples and scores it
    on the other (both ways, averaged); a rotation that never saw the scored half adds no
    chance alignment, so its expectation for independent data is the population value. Halves
    split whole groups (documents), since neighbouring tokens are not independent samples."""
    Pa, Pb = np.asarray(Pa, dtype=np.float64), np.asarray(Pb, dtype=np.float64)
    groups = np.arange(len(Pa)) if groups is None else np.asarray(groups)
    ids = np.unique(groups)
    if len(ids) < 2:
        raise UserError("The split-half Procrustes distance needs tokens of at least 2 documents.")
    first = np.isin(groups, np.random.default_rng(seed).permutation(ids)[: len(ids) // 2])
    halves = []
    for fit, score in ((first, ~first), (~first, first)):
        A, B = Pa[fit] - Pa[fit].mean(0), Pb[fit] - Pb[fit].mean(0)
        U, _, Vt = np.linalg.svd(A.T @ B, full_matrices=False)
        C, D = Pa[score] - Pa[score].mean(0), Pb[score] - Pb[score].mean(0)
        norm = np.linalg.norm(C) * np.linalg.norm(D)
        halves.append(float(np.trace((U @ Vt).T @ (C.T @ D)) / max(norm, 1e-300)))
    plug, split = _alignment(Pa, Pb), float(np.mean(halves))
    return dict(
        plugin=float(np.arccos(np.clip(plug, -1, 1))),
        split_half=float(np.arccos(np.clip(split, -1, 1))),
        plugin_alignment=plug, split_half_alignment=split,
    )  # fmt: skip


def relative_similarity(X, Y, n_anchors: int, seed: int) -> dict:
    """Relative representations (Moschella et al.): each token as its cosines to shared anchor
    tokens, in each run; their mean per-token cosine between the runs (anchors and all-zero
    tokens left out), beside the same with the tokens of one run shuffled (chance)."""
    X, Y = _csr(X), _csr(Y)
    rng = np.random.default_rng(seed)
    norms = lambda M: np.sqrt(np.asarray(M.multiply(M).sum(1)).ravel())  # noqa: E731
    nx, ny = norms(X), norms(Y)
    live = np.flatnonzero((nx > 0) & (ny > 0))
    if len(live) < 3:
        raise UserError("Fewer than 3 shared tokens have active latents in both runs.")
    anchors = np.sort(rng.choice(live, size=min(n_anchors, len(live) // 2), replace=False))
    rel = []
    for M, n in ((X, nx), (Y, ny)):
        Mn = sp.diags(1 / np.maximum(n, 1e-300)) @ M  # unit rows
        R = (Mn @ Mn[anchors].T).toarray()  # (N, A)
        rel.append(R / np.maximum(np.linalg.norm(R, axis=1, keepdims=True), 1e-300))
    rows = np.setdiff1d(live, anchors)
    Ra, Rb = rel[0][rows], rel[1][rows]
    mean = float(np.einsum("ij,ij->i", Ra, Rb).mean())
    null = float(np.einsum("ij,ij->i", Ra, Rb[rng.permutation(len(rows))]).mean())
    return dict(mean_cos=mean, shuffled_cos=null, n_anchors=len(anchors), n_tokens=len(rows))


def code_similarity(X, Y, groups=None, *, anchors: int, variance: float, max_dims: int, seed: int):
    """SVCCA, linear CKA, relative-representation and Procrustes numbers of two (N, p) codes."""
    Ua, Sa, share_a = top_components(X, max_dims, variance, seed)
    Ub, Sb, share_b = top_components(Y, max_dims, variance, seed + 1)
    corr = svcca(Ua, Ub)
    shuffled = svcca(Ua, Ub[np.random.default_rng(seed).permutation(len(Ub))])
    return dict(
        svcca=float(corr.mean()), svcca_shuffled=float(shuffled.mean()),
        svcca_dims=[len(Sa), len(Sb)], svcca_variance=[share_a, share_b],
        cka=linear_cka(X, Y),
        relative=relative_similarity(X, Y, anchors, seed),
        procrustes=procrustes_distance(Ua * Sa, Ub * Sb, groups, seed),
    )  # fmt: skip


def _shares(cos: np.ndarray) -> dict:
    return {"above_0.7": float((cos > 0.7).mean()), "above_0.9": float((cos > 0.9).mean())}


def compare(
    run_a: Run,
    run_b: Run,
    inputs_a: Inputs | None = None,
    inputs_b: Inputs | None = None,
    *,
    n_tokens: int = 32768,
    anchors: int = 300,
    svcca_variance: float = 0.99,
    max_dims: int = 256,
    neighbours: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> Result:
    """Compare two SAEs of one d_in: decoder matching, and their codes on the shared tokens.
    The Procrustes distance is on the same top principal components SVCCA keeps."""
    d_a, d_b = run_a.sae.cfg.d_in, run_b.sae.cfg.d_in
    if d_a != d_b:
        raise UserError(
            f"{run_a.path} has d_in {d_a} and {run_b.path} has d_in {d_b}; compare needs two SAEs "
            "on activations of one width."
        )
    bar = tqdm(total=3, desc="compare", disable=not progress)
    W_a, W_b = unit_decoder(run_a.sae), unit_decoder(run_b.sae)
    sparse = len(W_a) * len(W_b) > DENSE_MATCH
    tops = top_matches(W_a, W_b, neighbours if sparse else 1)  # one pass serves both uses
    tops = (tops, top_matches(W_b, W_a, neighbours if sparse else 1))
    (idx_ab, cos_ab), (idx_ba, cos_ba) = ((i[:, 0], c[:, 0]) for i, c in tops)
    rows, cols, cos, method = hungarian_match(W_a, W_b, neighbours, tops)
    bar.update()
    wide = "a" if len(W_a) > len(W_b) else "b"
    summary = dict(
        run_a=str(run_a.path), run_b=str(run_b.path),  # the page checks which runs these were
        n_latents=[len(W_a), len(W_b)], hungarian=dict(_shares(cos), method=method,
        mean_cos=float(cos.mean())), many_to_one=dict(_shares(cos_ab if wide == "a" else cos_ba),
        wider=wide), best_match_a=_shares(cos_ab), best_match_b=_shares(cos_ba),
    )  # fmt: skip
    inputs_a = inputs_a or Inputs(run_a, n_tokens, progress=progress)
    inputs_b = inputs_b or Inputs(run_b, n_tokens, progress=progress)
    codes_a, codes_b = inputs_a.codes, inputs_b.codes
    n = min(shared_codes(codes_a, codes_b, (str(run_a.path), str(run_b.path))), n_tokens)
    bar.update()
    summary["codes"] = code_similarity(
        codes_a.acts[:n], codes_b.acts[:n], codes_a.doc[:n], anchors=anchors,
        variance=svcca_variance, max_dims=max_dims, seed=seed,
    )  # fmt: skip
    summary["codes"]["n_tokens"] = n
    bar.update()
    bar.close()
    hung_a = np.full(len(W_a), -1)
    hung_a[rows] = cols
    hung_cos = np.full(len(W_a), np.nan)
    hung_cos[rows] = cos
    tables = dict(
        matches_a=dict(feature=np.arange(len(W_a)), best_match=idx_ab, best_cos=cos_ab,
                       hungarian_match=hung_a, hungarian_cos=hung_cos),
        matches_b=dict(feature=np.arange(len(W_b)), best_match=idx_ba, best_cos=cos_ba),
    )  # fmt: skip
    return Result(summary, tables)
