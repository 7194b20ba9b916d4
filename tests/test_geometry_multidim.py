"""Multi-dimensional features: planted circular, 1-D and mixed clusters, the two indices against
brute force and known shapes, the circle fit on planted circles, and the run-level entry."""

import dataclasses
import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from analysis.geometry.calendar import (
    SETS,
    carrying_cluster,
    circle_fit,
    encode_probes,
    last_token_of,
    neighbour_share,
    probe_texts,
)
from analysis.geometry.irreducibility import (
    cluster_pca,
    mixture_fraction,
    mixture_index,
    mutual_information,
    separability_index,
    standardise,
)
from analysis.geometry.multidim import canonical, graph_clusters, members, multidim, rank_clusters
from analysis.run import open_run
from hooks.errors import UserError

CIRCLE, LINE, MIXED, NOISE = range(8), range(8, 11), range(11, 15), range(15, 25)


def planted(d: int = 24, n_tokens: int = 3000, seed: int = 0):
    """(W_dec (25, d), acts CSR (n_tokens, 25)).

    Latents 0-7: unit rows at 45 degree steps round the plane (e0, e1); a token on that feature
    has an angle theta and the two latents either side of it fire with the weights that put
    x_hat exactly on the unit circle. Latents 8-10: three rows near e2 (cosine ~0.9), each
    firing alone (a bundle of 1-D features). Latents 11-14: four rows near e4 firing together
    with independent magnitudes. Latents 15-24: orthogonal basis rows firing at random."""
    rng = np.random.default_rng(seed)
    W = np.zeros((25, d))
    phi = 2 * np.pi * np.arange(8) / 8
    W[CIRCLE, 0], W[CIRCLE, 1] = np.cos(phi), np.sin(phi)
    for j, i in enumerate(LINE):
        W[i, 2], W[i, 3 + (j % 2)] = 1.0, 0.5 * (-1) ** j
    for j, i in enumerate(MIXED):
        W[i, 5], W[i, 6 + j] = 1.0, 0.4
    for j, i in enumerate(NOISE):
        W[i, 10 + j] = 1.0
    W[8:] /= np.linalg.norm(W[8:], axis=1, keepdims=True)
    A = np.zeros((n_tokens, 25))
    kind = rng.integers(0, 3, n_tokens)
    for t in np.flatnonzero(kind == 0):
        theta = rng.uniform(0, 2 * np.pi)
        j = int(theta // (np.pi / 4)) % 8
        pair = [j, (j + 1) % 8]
        A[t, pair] = np.linalg.solve(W[pair, :2].T, [np.cos(theta), np.sin(theta)])
    for t in np.flatnonzero(kind == 1):
        A[t, rng.choice(list(LINE))] = rng.uniform(0.5, 1.5)
    for t in np.flatnonzero(kind == 2):
        A[t, list(MIXED)] = rng.uniform(0, 1, 4) * (rng.random(4) < 0.7)
    A[:, list(NOISE)] = rng.uniform(0.5, 1, (n_tokens, 10)) * (rng.random((n_tokens, 10)) < 0.1)
    return W.astype(np.float32), sp.csr_matrix(A.astype(np.float32))


def test_planted_circle_is_clustered_alone_and_ranked_first():
    W, acts = planted()
    labels = graph_clusters(W, cutoff=0.5, top_k=3)
    groups = {tuple(np.flatnonzero(labels == c)) for c in range(labels.max() + 1)}
    assert groups == {tuple(CIRCLE), tuple(LINE), tuple(MIXED)}  # the noise rows stay out
    assert (labels[list(NOISE)] == -1).all()
    scores = rank_clusters(acts, W, labels, seed=0, progress=False)
    first = scores.order[0]
    assert tuple(np.flatnonzero(labels == first)) == tuple(CIRCLE)
    assert scores.score[first] > 1.5 * np.sort(scores.score)[-2]
    # The reconstructions of the circle lie in the plane (e0, e1): two PCs hold all variance.
    assert scores.explained[first, :2].sum() > 0.999
    again = rank_clusters(acts, W, labels, seed=0, progress=False)
    np.testing.assert_array_equal(again.score, scores.score)


def test_cluster_labels_are_canonical_and_members_match_a_scan():
    labels = np.random.default_rng(5).integers(-1, 40, 500)
    labels[labels == 7] = 8  # a cluster of twice the size
    labels[np.flatnonzero(labels == 9)[1:]] = -1  # a singleton, dropped by min_size 2
    out = canonical(labels, 2, 1000)
    groups = members(out)
    assert len(groups) == out.max() + 1 == 38
    for c, group in enumerate(groups):
        np.testing.assert_array_equal(group, np.flatnonzero(out == c))
    sizes = [len(g) for g in groups]
    assert sizes == sorted(sizes, reverse=True) and set(groups[0]) == set(
        np.flatnonzero(labels == 8)
    )
    assert (out[labels == 9] == -1).all() and members(np.full(3, -1)) == []


def test_cluster_pca_equals_pca_of_the_dense_reconstructions():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(1)
    F, W = rng.random((300, 6)), rng.normal(size=(6, 20))
    scores, ratio, transform = cluster_pca(F, W, 5)
    ref = PCA(5, svd_solver="full").fit(F @ W)
    np.testing.assert_allclose(ratio, ref.explained_variance_ratio_, rtol=1e-6)
    np.testing.assert_allclose(np.abs(scores), np.abs(ref.transform(F @ W)), atol=1e-8)
    G = rng.random((10, 6))
    np.testing.assert_allclose(np.abs(transform(G)), np.abs(ref.transform(G @ W)), atol=1e-8)


def brute_mixture(x, eps=0.1):
    """The hard fraction maximised over a grid of 180 directions and 301 offsets."""
    x = standardise(x)
    b = np.linspace(-3, 3, 301)[:, None]  # (301, 1)
    best = 0.0
    for phi in np.linspace(0, np.pi, 180, endpoint=False):
        y = x @ np.array([np.cos(phi), np.sin(phi)]) + b  # (301, n)
        z = y / np.sqrt((y**2).mean(1, keepdims=True))
        best = max(best, float((np.abs(z) < eps).mean(1).max()))
    a = np.array([1.0, 0.0])
    assert mixture_fraction(x, a, 0.5, eps) == float(
        (np.abs(z := x @ a + 0.5) / np.sqrt((z**2).mean()) < eps).mean()
    )
    return best


def test_mixture_index_is_high_for_a_point_mass_and_a_line_and_low_for_a_circle():
    rng = np.random.default_rng(2)
    n = 1000
    t = rng.uniform(0.5, 1.5, n)
    mass = rng.random(n) < 0.5
    mix = np.where(mass[:, None], 0.0, np.c_[t, 2 * t])  # a 1-D feature that is off half the time
    theta = rng.uniform(0, 2 * np.pi, n)
    circle = np.c_[np.cos(theta), np.sin(theta)]
    m_mix, m_circle = mixture_index(mix, seed=0), mixture_index(circle, seed=0)
    assert m_mix >= mass.mean() - 0.01 and m_circle < 0.3
    for x, m in ((mix, m_mix), (circle, m_circle)):
        assert abs(m - brute_mixture(x)) < 0.02  # gradient ascent finds the brute-force maximum


def test_separability_index_is_zero_for_independent_coordinates_and_high_for_a_circle():
    rng = np.random.default_rng(3)
    theta = rng.uniform(0, 2 * np.pi, 2000)
    circle = np.c_[np.cos(theta), np.sin(theta)] + 0.02 * rng.normal(size=(2000, 2))
    independent = np.c_[rng.normal(size=2000), rng.exponential(size=2000)]
    assert separability_index(independent) < 0.05
    assert separability_index(circle) > 0.5
    # Rotating the independent pair makes it dependent; the minimum over angles undoes that.
    c, s = np.cos(0.5), np.sin(0.5)
    assert separability_index(independent @ np.array([[c, -s], [s, c]])) < 0.05
    # The vectorised histogram MI equals numpy.histogram2d's.
    u, v = circle.T
    p, _, _ = np.histogram2d(u, v, bins=10, range=[[-1.5, 1.5], [-1.5, 1.5]])
    p /= p.sum()
    outer = p.sum(1)[:, None] * p.sum(0)[None, :]
    ref = (p[p > 0] * np.log(p[p > 0] / outer[p > 0])).sum()
    assert mutual_information(u[None], v[None], 10, 1.5)[0] == pytest.approx(ref, rel=1e-9)


def test_circle_fit_recovers_a_noisy_planted_circle_and_not_a_shuffled_one():
    rng = np.random.default_rng(4)
    index = np.repeat(np.arange(12), 10)  # 12 months, 10 sentences each
    phase = 2 * np.pi * index / 12
    P = rng.normal(scale=0.3, size=(120, 5))  # PCs 1, 2, 4, 5: noise
    P[:, 2], P[:, 3] = 3 + 2 * np.cos(phase + 1.0), -1 + 2 * np.sin(phase + 1.0)  # PCs 3-4
    P[:, 2:4] += 0.1 * rng.normal(size=(120, 2))
    fit = circle_fit(P, index, 12)
    assert fit["pair"] == (2, 3) and fit["r2"] > 0.95 and fit["neighbour_share"] == 1.0
    shuffled = circle_fit(P, rng.permutation(index), 12)
    assert shuffled["r2"] < 0.2 and shuffled["neighbour_share"] < 0.5
    assert neighbour_share(np.array([0.0, 2.0, 1.0, 3.0]), np.arange(4), 4) == 0.5


def test_the_carrying_cluster_is_specific_not_just_frequent():
    # cluster 0 fires on everything; cluster 1 fires on 80% of the set and rarely elsewhere
    mass = np.c_[np.ones(10), np.r_[np.ones(8), np.zeros(2)], np.r_[np.ones(3), np.zeros(7)] * 9]
    baseline = np.array([1.0, 0.01, 0.001])
    assert carrying_cluster(mass, baseline)[:2] == (1, 0.8)  # cluster 2 covers under half
    assert carrying_cluster(np.zeros((4, 3)), baseline)[0] == -1


def test_probe_texts_are_varied_and_locate_the_name(tokenizer):
    texts = probe_texts()
    for name, (items, _) in SETS.items():
        mine = [t for t in texts if t[0] == name]
        assert len(mine) >= 10 * len(items)
        frames = {text.replace(items[i], "{}") for _, i, text, _ in mine}
        assert len(frames) >= 10
    text = "Last Monday it rained."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    j = last_token_of(tokenizer, text, text.index("Monday") + 6)
    assert tokenizer.decode(ids[: j + 1]) == "Last Monday"


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, tokenizer):
    from conftest import build_planted_run

    path, _ = build_planted_run(tmp_path_factory.mktemp("planted"), tokenizer, docs=400)
    return open_run(path)


class PlantedInputs:
    """Inputs whose codes are the planted ones and whose model is the run's."""

    def __init__(self, run, acts):
        from analysis.geometry.codes import Codes

        n = acts.shape[0]
        z = np.zeros(n, np.int32)
        tokens = np.arange(n, dtype=np.int64) % 300
        self.codes = Codes(acts, tokens, z, z, z.astype(np.int64), z)
        self.loaded, self.device = run.load_model(progress=False), "cpu"


def planted_sae_run(run):
    """The planted run with the 25-latent planted dictionary as its SAE."""
    from sae.config import SAEConfig
    from sae.model import SAE

    W, _ = planted(d=32)
    sae = SAE(SAEConfig(d_in=32, n_latents=25, k=3))
    with torch.no_grad():
        sae.W_dec.copy_(torch.from_numpy(W))
        sae.W_enc.copy_(torch.from_numpy(W.T))  # the probe's tokens fire whatever they align with
    return dataclasses.replace(run, sae=sae)


def test_batched_probe_codes_equal_one_text_at_a_time(planted_run):
    from analysis.probe import TextProbe

    run = planted_sae_run(planted_run)
    loaded = run.load_model(progress=False)
    pc = encode_probes(run, loaded, batch=7, progress=False)
    probe = TextProbe(run, loaded=loaded)
    texts = probe_texts()
    for p in (0, 5, 100, 250, len(texts) - 1):  # reference: TextProbe's code of one text
        name, item, text, end = texts[p]
        codes = probe.encode(text)
        pos = 1 + last_token_of(loaded.tokenizer, text, end)  # the run prepends BOS
        dense = np.zeros(25)
        dense[codes.idx[pos].numpy()] = codes.acts[pos].numpy()
        np.testing.assert_allclose(pc.acts[p].toarray()[0], dense, atol=1e-4)
        assert pc.token[p] == codes.token_ids[pos] and pc.set[p] == name and pc.item[p] == item


def test_multidim_on_a_run_is_deterministic_and_tables_line_up(planted_run, tmp_path):
    from analysis.geometry.results import read_summary, read_table, write_result

    _, acts = planted(d=32, n_tokens=1500)
    run = planted_sae_run(planted_run)
    inputs = PlantedInputs(run, acts)
    a = multidim(run, inputs, seed=0, progress=False)
    b = multidim(run, inputs, seed=0, progress=False)
    assert json.dumps(a.summary) == json.dumps(b.summary)
    for name, table in a.tables.items():
        for column, values in table.items():
            np.testing.assert_array_equal(values, b.tables[name][column])
    top = a.summary["top"][0]
    assert top["features"] == list(CIRCLE) and a.summary["n_clusters"] == 3
    assert set(a.summary["calendar"]) == {"weekday", "month", "year"}
    pcs = a.tables["pcs"]
    assert len(pcs["cluster"]) == len(pcs["pc1"]) == len(pcs["text"])
    assert (a.tables["clusters"]["cluster"][list(CIRCLE)] == top["cluster"]).all()
    assert "top_cluster" in a.figures
    write_result(tmp_path / "multidim", a)  # the orchestrator's writer takes every table
    assert read_summary(tmp_path / "multidim")["n_clusters"] == 3
    np.testing.assert_array_equal(read_table(tmp_path / "multidim", "pcs")["text"], pcs["text"])
    kw = dict(clustering="spectral", n_clusters=3, calendar=False, progress=False)
    s1, s2 = multidim(run, inputs, seed=1, **kw), multidim(run, inputs, seed=1, **kw)
    np.testing.assert_array_equal(
        s1.tables["clusters"]["cluster"], s2.tables["clusters"]["cluster"]
    )
    assert json.dumps(s1.summary) == json.dumps(s2.summary) and s1.summary["n_clusters"] >= 2


def test_too_few_features_and_bad_options_get_one_sentence(planted_run):
    few = np.zeros((200, 16), np.float32)
    few[:, :3] = 1.0  # 3 live latents
    with pytest.raises(UserError, match="too few active features"):
        multidim(planted_run, PlantedInputs(planted_run, sp.csr_matrix(few)), progress=False)
    live = sp.csr_matrix(np.ones((200, 16), np.float32))
    with pytest.raises(UserError, match="too few features to cluster; lower multidim.cutoff"):
        multidim(planted_run, PlantedInputs(planted_run, live), cutoff=0.999, progress=False)
    with pytest.raises(UserError, match="'graph' or 'spectral'"):
        multidim(planted_run, None, clustering="kmeans", progress=False)
