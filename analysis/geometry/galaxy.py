"""The galaxy-scale shape of the decoder point cloud ("The Geometry of Concepts", section 5): the
eigenvalue spectrum of the decoder covariance with its power-law slope and log-determinant, and the
clustering negentropy from a kNN entropy estimate, each beside a Gaussian cloud of the same shape.

Ranks are 1-based and the fit range is inclusive: rank_min=10, rank_max=150 fits ranks 10..150
(141 points; the paper's slice [10:150] fits ranks 11..150). The decoder rows are scaled to unit
norm first, as Gemma Scope's are.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats
from tqdm import tqdm

from analysis.geometry.common import unit_decoder
from analysis.geometry.results import Result
from hooks.errors import UserError

EIG_FLOOR = 1e-10  # eigenvalues are floored here before logs, as in the paper's notebook
EULER_GAMMA = 0.5772156649015329
BOOTSTRAPS = ("distinct", "paper")


# ---------------------------------------------------------------- spectrum


def covariance_spectrum(X: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """(d,) eigenvalues of np.cov(X, rowvar=False), largest first.

    The (d, d) scatter is summed over row chunks in float64, so 65k x 576 rows never need the
    float64 copy and centred copy np.cov makes."""
    n, d = X.shape
    if n < 2:
        raise UserError(f"The covariance spectrum needs at least 2 rows, got {n}.")
    mean = np.zeros(d)
    for i in range(0, n, chunk):
        mean += X[i : i + chunk].sum(0, dtype=np.float64)
    mean /= n
    scatter = np.zeros((d, d))
    for i in range(0, n, chunk):
        block = X[i : i + chunk].astype(np.float64) - mean  # (c, d)
        scatter += block.T @ block
    return np.linalg.eigvalsh(scatter / (n - 1))[::-1].copy()


def power_law_fit(eigenvalues: np.ndarray, rank_min: int = 10, rank_max: int = 150) -> dict:
    """alpha = -slope of linregress(log10 rank, log10 lambda) over 1-based ranks rank_min..rank_max
    (inclusive), with the 95% CI half-width t.ppf(0.975, n-2) * stderr."""
    d = len(eigenvalues)
    if not 1 <= rank_min < rank_max:
        raise UserError(
            f"The fit range must have 1 <= rank_min < rank_max, got {rank_min}..{rank_max}."
        )
    if rank_max > d or rank_max - rank_min < 2:
        raise UserError(
            f"The fit range {rank_min}..{rank_max} needs ranks up to {rank_max} and at least 3 "
            f"points, but the decoder has {d} dimensions; use a range within 1..{d}."
        )
    ranks = np.arange(rank_min, rank_max + 1)
    lam = np.maximum(eigenvalues[rank_min - 1 : rank_max], EIG_FLOOR)
    fit = stats.linregress(np.log10(ranks), np.log10(lam))
    half = float(stats.t.ppf(0.975, len(ranks) - 2) * fit.stderr)
    alpha = -float(fit.slope)
    return dict(
        alpha=alpha, alpha_ci=half, alpha_lo=alpha - half, alpha_hi=alpha + half,
        intercept=float(fit.intercept), r2=float(fit.rvalue**2), n_points=len(ranks),
    )  # fmt: skip


def log_determinant(eigenvalues: np.ndarray, rank_min: int | None = None, rank_max=None) -> float:
    """sum log lambda (natural log), over all eigenvalues or the 1-based ranks rank_min..rank_max."""
    lo = 0 if rank_min is None else rank_min - 1
    lam = eigenvalues[lo:rank_max]
    return float(np.log(np.maximum(lam, EIG_FLOOR)).sum())


def gaussian_like(n: int, d: int, scale: float, seed: int) -> np.ndarray:
    """(n, d) float32 N(0, scale^2) matrix: the baseline cloud with no structure."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d), dtype=np.float32) * np.float32(scale)).astype(np.float32)


# ---------------------------------------------------------------- clustering negentropy


def kth_neighbour_distance(x: np.ndarray, k: int = 1, chunk: int = 1024) -> np.ndarray:
    """(n,) Euclidean distance of each row to its k-th nearest row, the row itself counting as the
    0th (so bootstrap duplicates give 0, as with the paper's sorted cdist rows).

    Candidates come from a float32 matmul in row chunks (never n x n); their distances are then
    recomputed exactly in float64, since the matmul form loses ~1e-3 near zero."""
    n = len(x)
    if not 1 <= k < n:
        raise UserError(f"knn_k must be between 1 and {n - 1} (rows - 1), got {k}.")
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    sq = (t * t).sum(1)  # (n,)
    t64 = t.double()
    out = np.empty(n)
    for i in range(0, n, chunk):
        rows = t[i : i + chunk]  # (c, d)
        d2 = sq[i : i + chunk, None] + sq[None, :] - 2.0 * rows @ t.T  # (c, n)
        idx = d2.topk(k + 1, dim=1, largest=False).indices  # (c, k+1)
        exact = (t64[i : i + chunk, None, :] - t64[idx]).norm(dim=2)  # (c, k+1)
        out[i : i + chunk] = exact.sort(dim=1).values[:, k].numpy()
    return out


def knn_entropy(x: np.ndarray, k: int = 1, th: float = 1e-2, counts=None) -> float:
    """The paper's kNN entropy estimate of the (n, d) cloud x, as its notebook codes it:
    H = d mean log(rho_k + th) + mean log lambda[:d] + log(n - 1) - Psi, with
    Psi = -gamma + sum_{i<=k} 1/i (that is psi(k + 1)) and lambda the covariance eigenvalues.

    counts (n,) weighs each row as that many copies in both means and the covariance, while rho
    and n stay those of the distinct rows: a bootstrap resample scored without zero distances."""
    n, d = x.shape
    rho = kth_neighbour_distance(x, k)
    if counts is None:
        lam = covariance_spectrum(x)
        mean_log_rho = float(np.mean(np.log(rho + th)))
    else:
        lam = np.linalg.eigvalsh(np.atleast_2d(np.cov(x, rowvar=False, fweights=counts)))[::-1]
        mean_log_rho = float(np.average(np.log(rho + th), weights=counts))
    log_v = float(np.mean(np.log(np.maximum(lam[:d], EIG_FLOOR))))
    psi = -EULER_GAMMA + float(np.sum(1.0 / np.arange(1, k + 1)))
    return d * mean_log_rho + log_v + math.log(n - 1) - psi


def gaussian_entropy(eigenvalues: np.ndarray, d: int) -> float:
    """Entropy of the Gaussian with the top-d covariance eigenvalues: d/2 (1 + log 2 pi) + 1/2 sum
    log lambda[:d]; no cloud of that covariance has more."""
    lam = np.maximum(eigenvalues[:d], EIG_FLOOR)
    return d / 2 * (1 + math.log(2 * math.pi)) + 0.5 * float(np.log(lam).sum())


def prepare_cloud(X: np.ndarray, n_pca: int, n_sample: int, seed: int) -> np.ndarray:
    """The paper's preparation: a seeded subsample of n_sample rows (all if fewer), each dimension
    standardised, then PCA to n_pca components (capped at the rows and dimensions there are)."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    if len(X) > n_sample:
        X = X[np.sort(rng.choice(len(X), n_sample, replace=False))]
    X = X.astype(np.float64)
    std = X.std(0)
    X = (X - X.mean(0)) / np.where(std > 0, std, 1.0)
    n_comp = min(n_pca, X.shape[1], len(X) - 1)
    return PCA(n_components=n_comp, random_state=seed).fit_transform(X).astype(np.float32)


def clustering_negentropy(
    X: np.ndarray,
    *,
    n_pca: int = 100,
    n_sample: int = 10000,
    n_boot: int = 30,
    knn_k: int = 1,
    th: float = 1e-2,
    bootstrap: str = "distinct",
    seed: int = 0,
    progress: bool = False,
    desc: str = "negentropy",
) -> dict:
    """Clustering = H_gauss - mean over n_boot bootstrap resamples of the kNN entropy, on the
    prepared cloud, with a 95% t-based error bar t.ppf(0.975, n_boot-1) * std/sqrt(n_boot).

    Resampling with replacement duplicates rows. bootstrap="paper" scores the resample as the
    paper's notebook does, so each duplicate's rho is 0 (floored by th): nearly two thirds of the
    points then add d log th whatever the cloud, which swamps the contrast between clustered and
    Gaussian clouds. bootstrap="distinct" (the default) takes rho among the distinct rows drawn
    and weighs each by its count. `negentropy_full` is the difference on the cloud itself."""
    if bootstrap not in BOOTSTRAPS:
        raise UserError(f"Unknown bootstrap '{bootstrap}'; use one of {', '.join(BOOTSTRAPS)}.")
    if n_boot < 2:
        raise UserError(f"n_boot must be at least 2 for an error bar, got {n_boot}.")
    x = prepare_cloud(X, n_pca, n_sample, seed)  # (m, p)
    h_gauss = gaussian_entropy(covariance_spectrum(x), x.shape[1])
    rng = np.random.default_rng(seed + 1)
    boots = []
    for _ in tqdm(range(n_boot), desc=desc, disable=not progress):
        idx = rng.integers(0, len(x), len(x))
        if bootstrap == "paper":
            boots.append(knn_entropy(x[idx], knn_k, th))
        else:
            rows, counts = np.unique(idx, return_counts=True)
            boots.append(knn_entropy(x[rows], knn_k, th, counts))
    boots = np.asarray(boots)
    half = float(stats.t.ppf(0.975, n_boot - 1) * boots.std(ddof=1) / math.sqrt(n_boot))
    return dict(
        negentropy=h_gauss - float(boots.mean()), negentropy_ci=half,
        negentropy_full=h_gauss - knn_entropy(x, knn_k, th), h_gauss=h_gauss,
        h_knn=float(boots.mean()), n_sample=len(x), n_pca=x.shape[1], bootstrap=bootstrap,
    )  # fmt: skip


# ---------------------------------------------------------------- the analysis


def galaxy_arrays(
    W: np.ndarray,
    *,
    rank_min: int = 10,
    rank_max: int = 150,
    n_pca: int = 100,
    n_sample: int = 10000,
    n_boot: int = 30,
    knn_k: int = 1,
    th: float = 1e-2,
    bootstrap: str = "distinct",
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict, dict]:
    """(summary, spectrum table) for the (n, d) decoder rows W and a Gaussian cloud of W's shape
    whose variance is W's mean eigenvalue (so the two spectra plot at one height)."""
    n, d = W.shape
    lam = covariance_spectrum(W)
    G = gaussian_like(n, d, math.sqrt(max(float(lam.mean()), EIG_FLOOR)), seed)
    lam_g = covariance_spectrum(G)
    opts = dict(n_pca=n_pca, n_sample=n_sample, n_boot=n_boot, knn_k=knn_k, th=th,
                bootstrap=bootstrap, seed=seed)  # fmt: skip
    neg = clustering_negentropy(W, **opts, progress=progress, desc="negentropy (decoder)")
    neg_g = clustering_negentropy(G, **opts, progress=progress, desc="negentropy (Gaussian)")
    fit, fit_g = power_law_fit(lam, rank_min, rank_max), power_law_fit(lam_g, rank_min, rank_max)
    summary = dict(
        n_features=n, d=d, rank_min=rank_min, rank_max=rank_max,
        ranks="1-based, inclusive", **fit,
        logdet=log_determinant(lam), logdet_fit_range=log_determinant(lam, rank_min, rank_max),
        **neg,
        baseline=dict(
            kind=f"seeded Gaussian of the decoder's shape {n}x{d}", **fit_g,
            logdet=log_determinant(lam_g),
            logdet_fit_range=log_determinant(lam_g, rank_min, rank_max),
            **{k: v for k, v in neg_g.items() if k not in ("n_sample", "n_pca", "bootstrap")},
        ),
        n_boot=n_boot, knn_k=knn_k, th=th, seed=seed,
    )  # fmt: skip
    table = dict(rank=np.arange(1, d + 1), eigenvalue=lam, baseline=lam_g)
    return summary, table


def spectrum_figure(table: dict, summary: dict):
    import plotly.graph_objects as go

    rank = table["rank"]
    fit_ranks = np.arange(summary["rank_min"], summary["rank_max"] + 1)
    fig = go.Figure()
    for name, col, s, dash in (
        ("decoder", "eigenvalue", summary, None),
        ("Gaussian", "baseline", summary["baseline"], "dot"),
    ):
        fig.add_scatter(x=rank, y=np.maximum(table[col], EIG_FLOOR), mode="lines", name=name,
                        line=dict(dash=dash))  # fmt: skip
        fig.add_scatter(
            x=fit_ranks, y=10 ** s["intercept"] * fit_ranks ** (-s["alpha"]), mode="lines",
            name=f"{name} fit: alpha={s['alpha']:.3f} ± {s['alpha_ci']:.3f}",
            line=dict(dash="dash", width=3),
        )  # fmt: skip
    fig.update_xaxes(type="log", title="rank")
    fig.update_yaxes(type="log", title="eigenvalue of the decoder covariance")
    fig.update_layout(title="Decoder covariance spectrum")
    return fig


def galaxy(
    run,
    inputs=None,
    *,
    rank_min: int = 10,
    rank_max: int = 150,
    n_pca: int = 100,
    n_sample: int = 10000,
    n_boot: int = 30,
    knn_k: int = 1,
    th: float = 1e-2,
    bootstrap: str = "distinct",
    seed: int = 0,
    progress: bool = True,
) -> Result:
    """Spectrum slope, log-determinant and clustering negentropy of the run's unit decoder rows
    (all latents, as the paper), each beside a Gaussian baseline. Needs only the SAE."""
    W = unit_decoder(run.sae)  # (n, d)
    summary, table = galaxy_arrays(
        W, rank_min=rank_min, rank_max=rank_max, n_pca=n_pca, n_sample=n_sample, n_boot=n_boot,
        knn_k=knn_k, th=th, bootstrap=bootstrap, seed=seed, progress=progress,
    )  # fmt: skip
    return Result(summary, {"spectrum": table}, {"spectrum": spectrum_figure(table, summary)})


# ---------------------------------------------------------------- several layers


def galaxy_by_layer(results: list[tuple[str, int, dict]]) -> Result:
    """Slope, log-determinant and negentropy by layer from several runs' galaxy summaries, given as
    (run name, layer, summary); a table "by_layer" and a figure of both against the layer."""
    if not results:
        raise UserError("The slope-by-layer comparison needs at least one run's galaxy summary.")
    rows = sorted(results, key=lambda r: (r[1], r[0]))
    for name, _, s in rows:
        if "alpha" not in s or "baseline" not in s:
            raise UserError(f"The summary of {name} is not a galaxy summary (no 'alpha').")

    def col(get, dtype=np.float64):
        return np.asarray([get(s) for _, _, s in rows], dtype=dtype)

    table = dict(
        name=np.asarray([r[0] for r in rows]), layer=np.asarray([r[1] for r in rows], np.int64),
        alpha=col(lambda s: s["alpha"]), alpha_ci=col(lambda s: s["alpha_ci"]),
        logdet=col(lambda s: s["logdet"]), negentropy=col(lambda s: s["negentropy"]),
        negentropy_ci=col(lambda s: s["negentropy_ci"]),
        baseline_alpha=col(lambda s: s["baseline"]["alpha"]),
        baseline_negentropy=col(lambda s: s["baseline"]["negentropy"]),
    )  # fmt: skip
    steep = int(np.argmax(table["alpha"]))
    summary = dict(
        runs=table["name"].tolist(), layers=table["layer"].tolist(),
        alpha=table["alpha"].tolist(), alpha_ci=table["alpha_ci"].tolist(),
        steepest_layer=int(table["layer"][steep]), steepest_run=str(table["name"][steep]),
    )  # fmt: skip
    return Result(summary, {"by_layer": table}, {"by_layer": by_layer_figure(table)})


def by_layer_figure(table: dict):
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08)
    layer = table["layer"]
    for row, key, label in ((1, "alpha", "power-law slope alpha"), (2, "negentropy", "negentropy")):
        fig.add_scatter(
            x=layer, y=table[key], error_y=dict(type="data", array=table[f"{key}_ci"]),
            mode="lines+markers", name=label, text=table["name"], row=row, col=1,
        )  # fmt: skip
        fig.add_scatter(x=layer, y=table[f"baseline_{key}"], mode="lines", line=dict(dash="dot"),
                        name=f"Gaussian {label}", row=row, col=1)  # fmt: skip
        fig.update_yaxes(title=label, row=row, col=1)
    fig.update_xaxes(title="layer", row=2, col=1)
    fig.update_layout(title="Galaxy structure by layer (95% CIs)")
    return fig
