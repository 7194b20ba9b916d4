"""The feature map: a seeded 2-D layout of the unit decoder directions under cosine distance, by
UMAP (umap-learn, LargeVis-style negative sampling) or t-SNE (openTSNE, FIt-SNE's interpolation).

The coordinates are stored per feature so the dashboard draws the map without recomputing it and
other analyses' cluster ids can be joined on `feature`.
"""

from __future__ import annotations

import numpy as np

from analysis.geometry.common import open_store, unit_decoder
from analysis.geometry.results import Result
from hooks.errors import UserError

METHODS = ("umap", "tsne")


def umap_coords(
    W: np.ndarray, n_neighbors: int = 15, min_dist: float = 0.05, seed: int = 0, progress=False
) -> np.ndarray:
    """(n, 2) float32 UMAP of the rows of W under cosine distance.

    random_state makes umap-learn run its layout single-threaded, which is what makes it
    reproducible; n_jobs=1 says so rather than letting it warn."""
    import umap

    if not 2 <= n_neighbors < len(W):
        raise UserError(
            f"n_neighbors must be between 2 and {len(W) - 1} (the features mapped - 1), got "
            f"{n_neighbors}."
        )
    model = umap.UMAP(
        n_components=2, n_neighbors=n_neighbors, min_dist=min_dist, metric="cosine",
        random_state=seed, n_jobs=1, verbose=progress, tqdm_kwds={"disable": not progress},
    )  # fmt: skip
    return model.fit_transform(W).astype(np.float32)


def tsne_coords(
    W: np.ndarray, perplexity: float = 30.0, seed: int = 0, progress: bool = False,
    n_iter: int = 500,
) -> np.ndarray:  # fmt: skip
    """(n, 2) float32 t-SNE of the rows of W under cosine distance, with openTSNE's FFT-accelerated
    interpolation (FIt-SNE) for the repulsive forces and a seeded PCA start; n_iter iterations
    follow openTSNE's 250 of early exaggeration."""
    from openTSNE import TSNE

    if not 0 < perplexity < (len(W) - 1) / 3:
        raise UserError(
            f"perplexity must be above 0 and below (features mapped - 1)/3 = "
            f"{(len(W) - 1) / 3:.1f}, got {perplexity}."
        )
    model = TSNE(
        n_components=2, perplexity=perplexity, metric="cosine", initialization="pca",
        negative_gradient_method="fft", n_iter=n_iter, random_state=seed, n_jobs=1,
        verbose=progress,
    )  # fmt: skip
    return np.asarray(model.fit(W), dtype=np.float32)


def map_coords(W: np.ndarray, method: str = "umap", *, n_neighbors=15, min_dist=0.05,
               perplexity=30.0, tsne_iter=500, seed=0, progress=False) -> np.ndarray:  # fmt: skip
    """(n, 2) coordinates of the rows of W by the named method."""
    if method == "umap":
        return umap_coords(W, n_neighbors, min_dist, seed, progress)
    if method == "tsne":
        return tsne_coords(W, perplexity, seed, progress, tsne_iter)
    raise UserError(f"Unknown map method '{method}'; use one of {', '.join(METHODS)}.")


def store_columns(run_path) -> dict[str, np.ndarray] | None:
    """Per-latent `alive` and `density` from the run's feature store, or None if it has none."""
    from pathlib import Path

    if not (Path(run_path) / "features" / "manifest.json").exists():
        return None
    store = open_store(run_path, "The feature map")
    feature = store.features.column("feature").to_numpy()
    alive = np.zeros(store.n_latents, bool)
    density = np.zeros(store.n_latents, np.float64)
    alive[feature] = store.features.column("n_active").to_numpy() > 0
    density[feature] = store.features.column("density").to_numpy()
    return dict(alive=alive, density=density)


def map_figure(table: dict, method: str):
    import plotly.graph_objects as go

    marker = dict(size=3, opacity=0.7)
    if "density" in table:
        marker.update(color=np.log10(table["density"] + 1e-10), colorscale="Viridis",
                      colorbar=dict(title="log10 density"))  # fmt: skip
    fig = go.Figure(
        go.Scattergl(
            x=table["x"],
            y=table["y"],
            mode="markers",
            marker=marker,
            customdata=table["feature"],
            hovertemplate="feature %{customdata}<extra></extra>",
        )  # fmt: skip
    )
    fig.update_layout(title=f"Feature map ({method.upper()} of decoder directions, cosine)")
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, scaleanchor="x")
    return fig


def feature_map(
    run,
    inputs=None,
    *,
    method: str = "umap",
    n_neighbors: int = 15,
    min_dist: float = 0.05,
    perplexity: float = 30.0,
    tsne_iter: int = 500,
    seed: int = 0,
    alive_only: bool = True,
    progress: bool = True,
) -> Result:
    """A 2-D map of the run's unit decoder rows; table "coords" (feature, x, y, and alive/density
    when the run has a feature store). With alive_only and a store, dead latents are left out;
    without a store every latent is mapped."""
    if method not in METHODS:
        raise UserError(f"Unknown map method '{method}'; use one of {', '.join(METHODS)}.")
    n = run.sae.cfg.n_latents
    extra = store_columns(run.path)
    features = np.arange(n)
    if extra is not None and alive_only:
        features = features[extra["alive"]]
    if len(features) < 10:
        raise UserError(
            f"Only {len(features)} {'alive ' if extra is not None and alive_only else ''}"
            f"features to map; the map needs at least 10."
        )
    W = unit_decoder(run.sae, features)  # (m, d)
    xy = map_coords(W, method, n_neighbors=n_neighbors, min_dist=min_dist,
                    perplexity=perplexity, tsne_iter=tsne_iter, seed=seed,
                    progress=progress)  # fmt: skip
    table = dict(feature=features.astype(np.int64), x=xy[:, 0], y=xy[:, 1])
    if extra is not None:
        table.update(alive=extra["alive"][features], density=extra["density"][features])
    summary = dict(
        method=method, n_features=len(features), n_latents=n, alive_only=alive_only,
        has_store=extra is not None, seed=seed, metric="cosine",
        **(dict(n_neighbors=n_neighbors, min_dist=min_dist) if method == "umap"
           else dict(perplexity=perplexity, tsne_iter=tsne_iter)),
    )  # fmt: skip
    return Result(summary, {"coords": table}, {"map": map_figure(table, method)})
