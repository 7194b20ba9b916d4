"""Lobes (The Geometry of Concepts): latents that fire in the same blocks of text form clusters
that are also near each other in decoder space.

Two seeded spectral clusterings of the latents that are on in some block: one of their block
co-occurrence affinity (cooccurrence.py), one of their decoder angular similarity. Their AMI is
scored against a permutation null, a logistic regression predicts the co-occurrence lobe from
the decoder direction against random unit directions, and each lobe is named by the tokens its
latents' top examples fire on (from the feature store).
"""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
from tqdm import tqdm

from analysis.geometry.codes import Inputs
from analysis.geometry.common import (
    angular_affinity,
    open_store,
    require_clusterable,
    spectral_labels,
    unit_decoder,
)
from analysis.geometry.cooccurrence import affinity_function, block_matrix, cooccurrence_affinity
from analysis.geometry.results import Result
from analysis.run import Run
from hooks.errors import UserError

SPLITS = ("shuffled", "index")
LABEL_TOKENS = 5  # tokens named per lobe


def z_score(value: float, null: np.ndarray) -> float:
    std = float(np.std(null))
    return (value - float(np.mean(null))) / std if std > 0 else float("nan")


def _entropy(labels: np.ndarray) -> float:
    p = np.unique(labels, return_counts=True)[1] / len(labels)
    return float(-(p * np.log(p)).sum())


def ami_null(
    a: np.ndarray, b: np.ndarray, draws: int, seed: int, progress: bool = False
) -> tuple[float, np.ndarray]:
    """AMI of labelings a and b (sklearn's, arithmetic mean), and its values when b is permuted.

    A permutation keeps both labelings' cluster sizes, so the expected MI and the entropies, the
    costly part of AMI, are computed once; each draw costs one MI."""
    from sklearn.metrics import adjusted_mutual_info_score, mutual_info_score

    ami = float(adjusted_mutual_info_score(a, b))
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(b) for _ in range(draws)]
    try:
        from sklearn.metrics.cluster import contingency_matrix
        from sklearn.metrics.cluster._expected_mutual_info_fast import (
            expected_mutual_information,
        )
    except ImportError:  # sklearn moved its internals: the plain (slower) score per draw
        null = [adjusted_mutual_info_score(a, p) for p in tqdm(perms, disable=not progress)]
        return ami, np.asarray(null)
    if len(np.unique(a)) < 2 or len(np.unique(b)) < 2:
        return ami, np.asarray([adjusted_mutual_info_score(a, p) for p in perms])
    emi = expected_mutual_information(contingency_matrix(a, b, sparse=True), len(a))
    norm = (_entropy(a) + _entropy(b)) / 2
    eps = np.finfo(np.float64).eps
    den = norm - emi
    den = min(den, -eps) if den < 0 else max(den, eps)  # sklearn's guard against 0/0
    null = []
    for p in tqdm(perms, desc="AMI null", disable=not progress, leave=False):
        num = mutual_info_score(a, p) - emi
        null.append((min(num, -eps) if num < 0 else max(num, eps)) / den)
    return ami, np.asarray(null)


def split_indices(
    n: int, test_share: float, split: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices: a seeded shuffle, or the paper's first/last split by index."""
    if split not in SPLITS:
        raise UserError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
    if not 0 < test_share < 1:
        raise UserError(f"--test-share must be between 0 and 1, got {test_share}.")
    order = np.random.default_rng(seed).permutation(n) if split == "shuffled" else np.arange(n)
    n_train = n - max(1, int(round(n * test_share)))
    return np.sort(order[:n_train]), np.sort(order[n_train:])


def _balanced_accuracy(X, y, train, test) -> float:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)  # a test class the training split lacks
        model = LogisticRegression(max_iter=1000).fit(X[train], y[train])
        return float(balanced_accuracy_score(y[test], model.predict(X[test])))


def lobe_regression(
    W: np.ndarray,
    labels: np.ndarray,
    draws: int,
    test_share: float = 0.2,
    split: str = "shuffled",
    seed: int = 0,
    progress: bool = False,
) -> tuple[float, np.ndarray]:
    """Balanced accuracy of a logistic regression predicting labels from the rows of W (n, d),
    and the same for `draws` sets of random unit Gaussian rows (the null)."""
    train, test = split_indices(len(W), test_share, split, seed)
    accuracy = _balanced_accuracy(W, labels, train, test)
    rng = np.random.default_rng(seed + 1)
    null = []
    for _ in tqdm(range(draws), desc="regression null", disable=not progress, leave=False):
        R = rng.standard_normal(W.shape)  # (n, d)
        null.append(_balanced_accuracy(R / np.linalg.norm(R, axis=1, keepdims=True), labels,
                                       train, test))  # fmt: skip
    return accuracy, np.asarray(null)


def lobe_tokens(
    top_tokens: list, labels: np.ndarray, n_lobes: int, top: int = LABEL_TOKENS
) -> list[list[tuple[int, int]]]:
    """Per lobe, its `top` (token id, latents) pairs: the tokens the most of its latents' top
    examples fire on (each latent counts a token once, so one busy latent cannot name a lobe);
    ties go to the smaller token id."""
    counts = [Counter() for _ in range(n_lobes)]
    for tokens, lobe in zip(top_tokens, labels, strict=True):
        counts[lobe].update(set(tokens))
    return [sorted(c.items(), key=lambda t: (-t[1], t[0]))[:top] for c in counts]


def lobes(
    run: Run,
    inputs: Inputs | None = None,
    *,
    block: int = 256,
    threshold: float = 1.0,
    affinity: str = "phi",
    n_clusters: int = 64,
    neighbours: int = 64,
    null_draws: int = 100,
    regression_draws: int = 10,
    test_share: float = 0.2,
    split: str = "shuffled",
    seed: int = 0,
    progress: bool = True,
) -> Result:
    """Co-occurrence lobes of the run's latents, compared with their decoder geometry.

    The paper's settings: blocks of 256 tokens, "on" above activation 1, phi + 1, 100 draws for
    both nulls, and a first-80% / last-20% split by feature index (split="index"). Here the split
    is shuffled and seeded by default, and the regression null takes 10 draws: each draw is a
    full logistic-regression fit on n x d random rows, so 10 give the null's mean and spread
    at a tenth of the paper's cost (regression_draws=100 for its count). Latents never on in a
    block are dropped (summary n_dropped). Without a feature store the lobes are still found and
    scored; only their token labels are skipped, and labels_note names the command that makes
    the store."""
    affinity_function(affinity)
    split_indices(10, test_share, split, seed)  # bad options fail before the passes
    if null_draws < 1 or regression_draws < 0:
        raise UserError(
            f"--null-draws must be at least 1 and --regression-draws at least 0, got "
            f"{null_draws} and {regression_draws}."
        )
    inputs = inputs or Inputs(run, progress=progress)
    codes = inputs.codes
    steps = tqdm(total=5, desc="lobes", disable=not progress)
    steps.set_postfix_str("blocks")
    B = block_matrix(codes.acts, codes.blocks(block), threshold)  # (T, n)
    n_latents = B.shape[1]
    used = np.flatnonzero(np.asarray(B.sum(0)).ravel() > 0)  # (m,) latents on in some block
    require_clusterable(len(used), n_clusters, f"latents active above {threshold} in some block")
    steps.update()

    steps.set_postfix_str("co-occurrence clusters")
    A = cooccurrence_affinity(B[:, used], affinity, neighbours, progress=progress)
    cooc = spectral_labels(A, n_clusters, seed)
    steps.update()
    steps.set_postfix_str("decoder clusters")
    W = unit_decoder(run.sae, used)  # (m, d)
    geo = spectral_labels(angular_affinity(W, neighbours), n_clusters, seed)
    steps.update()

    steps.set_postfix_str("AMI null")
    ami, ami_perm = ami_null(geo, cooc, null_draws, seed, progress)
    steps.update()
    steps.set_postfix_str("regression")
    acc, acc_null = lobe_regression(W, cooc, regression_draws, test_share, split, seed, progress)
    steps.update()
    steps.close()

    sizes = np.bincount(cooc, minlength=n_clusters)
    names, label_note = _labels(run, used, cooc, n_clusters)
    summary = dict(
        settings=dict(
            block=block, threshold=threshold, affinity=affinity, n_clusters=n_clusters,
            neighbours=neighbours, null_draws=null_draws, regression_draws=regression_draws,
            test_share=test_share, split=split, seed=seed,
        ),
        n_tokens=codes.n_tokens, n_blocks=B.shape[0], n_latents=n_latents,
        n_used=len(used), n_dropped=n_latents - len(used),
        affinity_entries=int(A.nnz),
        ami=ami, ami_null_mean=float(ami_perm.mean()), ami_null_std=float(ami_perm.std()),
        ami_z=z_score(ami, ami_perm),
        balanced_accuracy=acc,
        accuracy_null_mean=float(acc_null.mean()) if len(acc_null) else None,
        accuracy_null_std=float(acc_null.std()) if len(acc_null) else None,
        accuracy_z=z_score(acc, acc_null) if len(acc_null) else None,
        chance=1.0 / n_clusters,
        lobe_sizes=sizes.tolist(),
        lobe_labels=[[t for t, _ in lobe] for lobe in names] if names else None,
        labels_note=label_note,
    )  # fmt: skip
    tables = dict(
        labels=dict(feature=used.astype(np.int32), cooc_lobe=cooc, geometric_lobe=geo),
        lobes=dict(
            lobe=np.arange(n_clusters, dtype=np.int32),
            size=sizes.astype(np.int64),
            label=np.asarray(
                [" | ".join(t for t, _ in lobe) for lobe in names] if names else [""] * n_clusters
            ),
        ),  # fmt: skip
    )
    return Result(summary, tables)


def _labels(run: Run, used: np.ndarray, cooc: np.ndarray, n_clusters: int):
    """Per lobe, [(token string, latents)], or None and why: the lobes stand without a store."""
    try:
        store = open_store(run.path, "Naming the lobes")
    except UserError as e:
        return None, str(e)
    top = store.features.column("top_tokens").to_pylist()
    ids = lobe_tokens([top[i] for i in used], cooc, n_clusters)
    return [[(store.vocab[t], c) for t, c in lobe] for lobe in ids], None
