"""The feature map and the galaxy analysis against planted truth: clusters of decoder directions
stay apart in 2-D, a planted power-law spectrum comes back with its slope, the Gaussian baseline
follows Marchenko-Pastur, clustered clouds carry more negentropy than Gaussian ones, and the same
seed gives the same numbers."""

import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from scipy import stats
from scipy.spatial.distance import cdist
from scipy.stats import ortho_group
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from analysis.geometry import galaxy as gx
from analysis.geometry.map import feature_map
from analysis.store.layout import FORMAT, VERSION
from hooks.errors import UserError
from sae.config import SAEConfig
from sae.model import SAE


def planted_directions(n_clusters=6, per=100, d=64, noise=0.15, seed=0):
    """(n, d) unit rows around n_clusters random unit centres (cosine to the centre ~0.64)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_clusters), per)
    W = centres[labels] + noise * rng.standard_normal((len(labels), d))
    return (W / np.linalg.norm(W, axis=1, keepdims=True)).astype(np.float32), labels


def run_with(W, path):
    n, d = W.shape
    sae = SAE(SAEConfig(d_in=d, n_latents=n, k=4))
    with torch.no_grad():
        sae.W_dec.copy_(torch.from_numpy(W) * 3.0)  # rows of norm 3: the analyses rescale them
    return SimpleNamespace(path=path, sae=sae)


def write_store(run_path, n_active):
    """A minimal feature store: the manifest and the per-latent scalars the map reads."""
    folder = run_path / "features"
    folder.mkdir(parents=True)
    n = len(n_active)
    pq.write_table(
        pa.table(
            dict(
                feature=np.arange(n),
                density=n_active / 1000.0,
                n_active=n_active,
                mean_act=np.ones(n),
                max_act=np.ones(n),
                label=[""] * n,
            )  # fmt: skip
        ),
        folder / "features.parquet",
    )
    pq.write_table(pa.table(dict(token=["a"])), folder / "vocab.parquet")
    pq.write_table(pa.table(dict(feature=np.zeros(1, np.int64))), folder / "examples.parquet")
    manifest = dict(format=FORMAT, version=VERSION, sae_sha256="0" * 64, n_latents=n)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def knn_agreement(xy, labels):
    return cross_val_score(KNeighborsClassifier(10), xy, labels, cv=5).mean()


# ---------------------------------------------------------------- feature map


def test_umap_keeps_planted_clusters_apart_and_is_deterministic(tmp_path):
    W, labels = planted_directions()
    run = run_with(W, tmp_path)
    a = feature_map(run, method="umap", seed=0, progress=False)
    coords = a.tables["coords"]
    assert np.array_equal(coords["feature"], np.arange(len(W)))
    xy = np.column_stack([coords["x"], coords["y"]])
    assert knn_agreement(xy, labels) >= 0.9
    shuffled = np.random.default_rng(1).permutation(labels)
    assert knn_agreement(xy, shuffled) < 0.4  # the score does fail when the map holds no clusters
    b = feature_map(run, method="umap", seed=0, progress=False)
    assert np.array_equal(coords["x"], b.tables["coords"]["x"])
    assert np.array_equal(coords["y"], b.tables["coords"]["y"])
    assert "alive" not in coords and a.summary["has_store"] is False


def test_tsne_keeps_planted_clusters_apart_and_is_deterministic(tmp_path):
    W, labels = planted_directions()
    run = run_with(W, tmp_path)
    kw = dict(method="tsne", tsne_iter=150, seed=3, progress=False)
    a, b = feature_map(run, **kw), feature_map(run, **kw)
    xy = np.column_stack([a.tables["coords"]["x"], a.tables["coords"]["y"]])
    assert knn_agreement(xy, labels) >= 0.9
    assert np.array_equal(a.tables["coords"]["x"], b.tables["coords"]["x"])
    assert np.array_equal(a.tables["coords"]["y"], b.tables["coords"]["y"])


def test_map_leaves_dead_latents_out_when_the_store_says(tmp_path, monkeypatch):
    import analysis.geometry.map as fmap

    seen = []  # the rows handed to the layout, which a cheap stand-in lays out as coordinates 0, 1
    monkeypatch.setattr(fmap, "map_coords", lambda W, method, **kw: seen.append(W) or W[:, :2])
    W, _ = planted_directions(n_clusters=2, per=40)
    n_active = np.where(np.arange(len(W)) % 4 == 0, 0, 5)  # every fourth latent is dead
    write_store(tmp_path, n_active)
    run = run_with(W, tmp_path)
    kw = dict(method="tsne", progress=False)
    alive = feature_map(run, **kw).tables["coords"]
    assert np.array_equal(alive["feature"], np.nonzero(n_active)[0])
    assert np.allclose(seen[0], W[n_active > 0], atol=1e-6)  # unit rows of the alive latents
    assert np.allclose(alive["x"], W[n_active > 0, 0], atol=1e-6)
    assert alive["alive"].all() and np.allclose(alive["density"], 5 / 1000)
    every = feature_map(run, alive_only=False, **kw).tables["coords"]
    assert np.array_equal(every["feature"], np.arange(len(W)))
    assert np.array_equal(every["alive"], n_active > 0)


def test_map_refuses_an_unknown_method(tmp_path):
    run = run_with(planted_directions(per=5)[0], tmp_path)
    with pytest.raises(UserError, match="Unknown map method 'pca'"):
        feature_map(run, method="pca", progress=False)


# ---------------------------------------------------------------- spectrum


def test_planted_power_law_slope_comes_back_within_10_percent():
    rng = np.random.default_rng(0)
    d, n, alpha = 200, 20000, 1.2
    ranks = np.arange(1, d + 1)
    Q = ortho_group.rvs(d, random_state=0)
    X = (rng.standard_normal((n, d)) * np.sqrt(ranks**-alpha)) @ Q  # cov = Q^T diag(r^-a) Q
    lam = gx.covariance_spectrum(X.astype(np.float32), chunk=3000)
    ref = np.sort(np.linalg.eigvalsh(np.cov(X, rowvar=False)))[::-1]
    assert np.allclose(lam, ref, rtol=1e-4)
    fit = gx.power_law_fit(lam, 10, 150)
    assert abs(fit["alpha"] - alpha) < 0.1 * alpha
    assert fit["n_points"] == 141
    direct = stats.linregress(np.log10(ranks[9:150]), np.log10(ref[9:150]))
    assert np.isclose(fit["alpha"], -direct.slope, rtol=1e-4)


def test_slope_ci_covers_the_planted_slope_at_its_stated_rate():
    """Spectra r^-alpha with log-normal jitter (small enough to keep the ranks in order, so the
    fit's residuals are independent), through rows whose covariance is exactly that spectrum; the
    95% CI should cover alpha in about 95% of 60 seeds."""
    d, n, alpha = 60, 200, 1.2
    ranks = np.arange(1, d + 1)
    covered = 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        lam = ranks**-alpha * np.exp(0.003 * rng.standard_normal(d))
        Z = rng.standard_normal((n, d))
        Z -= Z.mean(0)
        Z = np.linalg.qr(Z)[0] * np.sqrt(n - 1)  # columns orthonormal: cov(Z) = I exactly
        X = Z * np.sqrt(lam) @ ortho_group.rvs(d, random_state=seed)
        fit = gx.power_law_fit(gx.covariance_spectrum(X), 5, 55)
        covered += fit["alpha_lo"] <= alpha <= fit["alpha_hi"]
    assert 51 <= covered <= 60  # 95% of 60 is 57; 51 is about 3 binomial sd below


def marchenko_pastur_ranked(n, d, var, ranks):
    """Expected descending eigenvalues of a Gaussian n x d sample covariance at 1-based ranks:
    Marchenko-Pastur quantiles at 1 - (r - 1/2)/d, from its density on a fine grid."""
    g = d / (n - 1)
    a, b = var * (1 - np.sqrt(g)) ** 2, var * (1 + np.sqrt(g)) ** 2
    x = np.linspace(a, b, 200001)
    pdf = np.sqrt(np.maximum((b - x) * (x - a), 0)) / (2 * np.pi * var * g * x)
    cdf = np.concatenate([[0], np.cumsum((pdf[1:] + pdf[:-1]) / 2 * np.diff(x))])
    return np.interp(1 - (ranks - 0.5) / d, cdf / cdf[-1], x)


def test_gaussian_baseline_follows_marchenko_pastur():
    W, _ = planted_directions(n_clusters=3, per=1000, d=100)
    summary, table = gx.galaxy_arrays(W, rank_min=10, rank_max=80, n_pca=10, n_sample=300,
                                      n_boot=2)  # fmt: skip
    base = summary["baseline"]
    var = table["eigenvalue"].mean()
    ranks = np.arange(10, 81)
    ref = stats.linregress(
        np.log10(ranks), np.log10(marchenko_pastur_ranked(3000, 100, var, ranks))
    )
    assert abs(base["alpha"] - -ref.slope) < 0.015
    assert np.isclose(table["baseline"].mean(), var, rtol=0.05)  # scaled to the decoder's level
    assert np.isclose(base["logdet"], np.log(table["baseline"]).sum())


def test_fit_range_outside_the_spectrum_is_refused():
    with pytest.raises(UserError, match=r"fit range 10\.\.150 .* 64 dimensions"):
        gx.power_law_fit(np.ones(64), 10, 150)


# ---------------------------------------------------------------- negentropy


def test_kth_neighbour_distance_matches_brute_force_with_duplicates():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 7)).astype(np.float32)
    x = x[np.concatenate([np.arange(300), [0, 0, 5]])]  # point 0 thrice, point 5 twice
    D = np.sort(cdist(x.astype(np.float64), x.astype(np.float64)), axis=1)
    for k in (1, 3):
        got = gx.kth_neighbour_distance(x, k, chunk=64)
        assert np.allclose(got, D[:, k], atol=1e-6)
    assert gx.kth_neighbour_distance(x, 1)[0] == 0 and gx.kth_neighbour_distance(x, 1)[5] == 0


def test_knn_entropy_is_the_papers_formula():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 5)) * [3, 2, 1, 1, 0.5]
    rho = np.sort(cdist(x, x), axis=1)[:, 2]
    lam = np.linalg.eigvalsh(np.cov(x, rowvar=False))
    psi = -0.577216 + 1 + 1 / 2
    ref = 5 * np.mean(np.log(rho + 1e-2)) + np.mean(np.log(lam)) + np.log(199) - psi
    assert np.isclose(gx.knn_entropy(x, k=2), ref, atol=1e-4)


def test_clustered_cloud_has_more_negentropy_than_a_gaussian_one():
    rng = np.random.default_rng(0)
    centres = 3 * rng.standard_normal((10, 64))
    clustered = centres[rng.integers(0, 10, 800)] + 0.1 * rng.standard_normal((800, 64))
    kw = dict(n_pca=20, n_sample=800, n_boot=4)
    c = gx.clustering_negentropy(clustered, **kw)
    g = gx.clustering_negentropy(rng.standard_normal((800, 64)), **kw)
    assert c["negentropy"] - c["negentropy_ci"] > g["negentropy"] + g["negentropy_ci"] + 10
    assert abs(c["negentropy"] - c["negentropy_full"]) < 2  # the bootstrap is not biased
    # the paper's duplicate-zero bootstrap loses the contrast (both near d * -log th)
    p = gx.clustering_negentropy(clustered, **kw, bootstrap="paper")
    assert p["negentropy"] - c["negentropy"] > 20


def test_galaxy_is_deterministic_and_tabulates_the_spectrum(tmp_path):
    W, _ = planted_directions(n_clusters=4, per=100, d=40)
    run = run_with(W, tmp_path)
    kw = dict(rank_min=3, rank_max=30, n_pca=10, n_sample=300, n_boot=3, progress=False)
    a, b = gx.galaxy(run, seed=5, **kw), gx.galaxy(run, seed=5, **kw)
    assert a.summary == b.summary
    for col in ("rank", "eigenvalue", "baseline"):
        assert np.array_equal(a.tables["spectrum"][col], b.tables["spectrum"][col])
    assert np.array_equal(a.tables["spectrum"]["rank"], np.arange(1, 41))
    assert a.summary["negentropy"] > a.summary["baseline"]["negentropy"]
    other = gx.galaxy(run, seed=6, **kw).summary
    assert other["baseline"]["alpha"] != a.summary["baseline"]["alpha"]  # the seed is used
    assert a.summary["alpha"] == other["alpha"]  # the decoder spectrum itself has no randomness


def test_galaxy_by_layer_tables_and_finds_the_steepest_layer():
    def summary(alpha):
        return dict(alpha=alpha, alpha_ci=0.1, logdet=-5.0, negentropy=2.0, negentropy_ci=0.5,
                    baseline=dict(alpha=0.1, negentropy=0.0))  # fmt: skip

    res = gx.galaxy_by_layer([("l12", 12, summary(1.4)), ("l3", 3, summary(0.9)),
                              ("l20", 20, summary(1.1))])  # fmt: skip
    t = res.tables["by_layer"]
    assert t["layer"].tolist() == [3, 12, 20] and t["name"].tolist() == ["l3", "l12", "l20"]
    assert t["alpha"].tolist() == [0.9, 1.4, 1.1]
    assert res.summary["steepest_layer"] == 12 and res.summary["steepest_run"] == "l12"
    assert len(res.figures["by_layer"].data) == 4
    with pytest.raises(UserError, match="at least one"):
        gx.galaxy_by_layer([])
