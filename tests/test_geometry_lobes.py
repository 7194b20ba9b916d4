"""Lobes on planted truth: block co-occurrence lobes that share a decoder subspace are recovered by
both clusterings, the affinities match a brute-force count, and the same seed repeats exactly."""

import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import adjusted_mutual_info_score

from analysis.geometry.codes import Codes
from analysis.geometry.common import angular_affinity, spectral_labels
from analysis.geometry.cooccurrence import AFFINITIES, block_matrix, cooccurrence_affinity
from analysis.geometry.lobes import ami_null, lobe_regression, lobe_tokens, lobes, split_indices
from analysis.geometry.results import read_table, write_result
from analysis.store.layout import FORMAT, VERSION
from hooks.errors import UserError

LOBES, PER, D, SUB = 4, 50, 64, 3


def planted(seed=0, n_blocks=240, block=16, k=3, lobes_=LOBES):
    """Codes where each block of `block` tokens draws its active latents (activation 1.5-3, plus
    sub-threshold noise anywhere) from one lobe, and decoder rows that lie near their lobe's own
    random SUB-dim subspace (non-negative combinations: a cone in it).
    Returns (Codes, W (n, D), truth (n,))."""
    rng = np.random.default_rng(seed)
    n = lobes_ * PER
    truth = np.repeat(np.arange(lobes_), PER)
    bases = rng.standard_normal((lobes_, SUB, D))
    W = np.einsum("ns,nsd->nd", np.abs(rng.standard_normal((n, SUB))), bases[truth])
    W += 0.1 * rng.standard_normal((n, D)) * np.linalg.norm(W, axis=1, keepdims=True) / np.sqrt(D)
    N = n_blocks * block
    lobe_of_block = rng.integers(0, lobes_, n_blocks)
    on = lobe_of_block.repeat(block)[:, None] * PER + rng.integers(0, PER, (N, k))  # (N, k)
    noise = rng.integers(0, n, (N, 1))  # one latent per token below the threshold
    cols = np.concatenate([on, noise], 1)
    vals = np.concatenate([rng.uniform(1.5, 3, (N, k)), rng.uniform(0.1, 0.9, (N, 1))], 1)
    acts = sp.csr_matrix((vals.ravel(), (np.arange(N).repeat(k + 1), cols.ravel())), shape=(N, n))
    acts.sum_duplicates()
    doc = (np.arange(N) // (4 * block)).astype(np.int32)  # 4 blocks per document
    pos = (np.arange(N) % (4 * block)).astype(np.int32)
    z = np.zeros(N, np.int64)
    codes = Codes(acts.astype(np.float32), z, doc, pos, z, pos)
    return codes, W.astype(np.float32), truth


def brute_affinity(name, B):
    """Each pair's 2x2 table counted over the blocks, and the textbook formula."""
    T, n = B.shape
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            a, b = B[:, i] > 0, B[:, j] > 0
            n11, n00 = np.sum(a & b), np.sum(~a & ~b)
            n10, n01 = np.sum(a & ~b), np.sum(~a & b)
            with np.errstate(divide="ignore", invalid="ignore"):
                value = dict(
                    phi=(n11 * n00 - n10 * n01)
                    / np.sqrt(float((n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00))),
                    jaccard=n11 / (n11 + n10 + n01),
                    dice=2 * n11 / (2 * n11 + n10 + n01),
                    overlap=n11 / min(n11 + n10, n11 + n01),
                    matching=(n11 + n00) / T,
                )[name]
            out[i, j] = (0.0 if not np.isfinite(value) else value) + (name == "phi")
    np.fill_diagonal(out, 0.0)
    return out


@pytest.mark.parametrize("name", sorted(AFFINITIES))
def test_affinities_match_brute_force_counts(name):
    rng = np.random.default_rng(1)
    B = (rng.random((30, 9)) < 0.3).astype(np.float32)
    B[:, 7] = 1  # always on: phi's denominator is 0
    B[:, 8] = 0  # never on: every ratio is 0/0
    ref = brute_affinity(name, B)
    A = cooccurrence_affinity(sp.csr_matrix(B), name).toarray()
    np.testing.assert_allclose(A, ref, rtol=1e-6, atol=1e-6)
    if name == "phi":
        assert A.min() >= 0 and A.max() <= 2


def test_block_matrix_counts_a_latent_once_per_block_above_the_threshold():
    acts = sp.csr_matrix(np.array([[2.0, 0.5, 0], [3.0, 0, 0], [0, 1.5, 0.9]], np.float32))
    B = block_matrix(acts, np.array([0, 0, 1]), threshold=1.0)
    np.testing.assert_array_equal(B.toarray(), [[1, 0, 0], [0, 1, 0]])


def test_sparse_path_keeps_each_latents_strongest_true_affinities():
    codes, _, _ = planted()
    B = block_matrix(codes.acts, codes.blocks(16), 1.0)
    dense = cooccurrence_affinity(B, "jaccard").toarray()
    A = cooccurrence_affinity(B, "jaccard", neighbours=10, dense_limit=0)
    assert A.nnz <= 2 * 10 * B.shape[1] and (A != A.T).nnz == 0 and A.diagonal().max() == 0
    r, c = A.nonzero()
    np.testing.assert_allclose(A.toarray()[r, c], dense[r, c], rtol=1e-6)  # true values
    for i in range(0, B.shape[1], 17):  # each row holds its own 10 strongest (ties aside)
        tenth = np.sort(dense[i])[-10]
        assert (A[i].toarray().ravel() >= tenth - 1e-6).sum() >= 10


@pytest.mark.parametrize("dense_limit", [4096, 0])
def test_planted_lobes_are_recovered_by_both_clusterings(dense_limit):
    codes, W, truth = planted()
    B = block_matrix(codes.acts, codes.blocks(16), 1.0)
    A = cooccurrence_affinity(B, "phi", neighbours=30, dense_limit=dense_limit)
    cooc = spectral_labels(A, LOBES, seed=0)
    geo = spectral_labels(angular_affinity(W / np.linalg.norm(W, axis=1, keepdims=True)), LOBES, 0)
    assert adjusted_mutual_info_score(truth, cooc) >= 0.9
    assert adjusted_mutual_info_score(truth, geo) >= 0.9
    ami, null = ami_null(geo, cooc, 100, seed=0)
    assert ami >= 0.9 and (ami - null.mean()) / null.std() > 10


def test_ami_null_equals_sklearn_on_the_same_permutations():
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 5, 300), rng.integers(0, 7, 300)
    b[:150] = a[:150]
    ami, null = ami_null(a, b, 5, seed=7)
    perms = np.random.default_rng(7)
    ref = [adjusted_mutual_info_score(a, perms.permutation(b)) for _ in range(5)]
    assert ami == pytest.approx(adjusted_mutual_info_score(a, b))
    np.testing.assert_allclose(null, ref, rtol=1e-9, atol=1e-12)


def test_regression_beats_random_directions_and_splits_are_as_asked():
    _, W, truth = planted()
    acc, null = lobe_regression(W, truth, draws=10, seed=0)
    assert acc > 0.9 and null.mean() < 0.45 and (acc - null.mean()) / null.std() > 5
    train, test = split_indices(200, 0.2, "index", 0)
    assert (train == np.arange(160)).all() and (test == np.arange(160, 200)).all()
    train, test = split_indices(200, 0.2, "shuffled", 0)
    assert len(test) == 40 and not (test == np.arange(160, 200)).all()
    assert len(np.union1d(train, test)) == 200
    with pytest.raises(UserError, match="split"):
        split_indices(200, 0.2, "random", 0)


def test_lobe_tokens_count_each_latent_once():
    top = [[5, 5, 5, 9], [9, 2], [9], [7]]
    assert lobe_tokens(top, np.array([0, 0, 0, 1]), 2, top=2) == [[(9, 3), (2, 1)], [(7, 1)]]


def _fake_run(tmp_path, W, top_tokens=None):
    """A run folder holding only what lobes reads: the decoder and, optionally, a feature store."""
    if top_tokens is not None:
        store = tmp_path / "features"
        store.mkdir()
        n = len(top_tokens)
        cols = dict(feature=np.arange(n), density=np.ones(n), n_active=np.ones(n, np.int64),
                    mean_act=np.ones(n), max_act=np.ones(n), label=[""] * n)  # fmt: skip
        table = pa.table(cols | dict(top_tokens=pa.array(top_tokens, pa.list_(pa.int32()))))
        pq.write_table(table, store / "features.parquet")
        pq.write_table(pa.table(dict(token=[f"t{i}" for i in range(20)])), store / "vocab.parquet")
        pq.write_table(pa.table(dict(feature=[0])), store / "examples.parquet")
        meta = dict(format=FORMAT, version=VERSION, n_latents=n)
        (store / "manifest.json").write_text(json.dumps(meta))
    return SimpleNamespace(path=tmp_path, sae=SimpleNamespace(W_dec=torch.from_numpy(W)))


OPTIONS = dict(block=16, n_clusters=LOBES, null_draws=30, regression_draws=3, progress=False)


def test_lobes_end_to_end_names_lobes_and_repeats_exactly(tmp_path):
    codes, W, truth = planted()
    codes.acts.data[codes.acts.indices == 7] = 0.0  # latent 7 is never on: it is dropped
    run = _fake_run(tmp_path, W, [[10 + t, 19] for t in truth])  # lobe t fires on token 10+t
    inputs = SimpleNamespace(codes=codes)
    res = lobes(run, inputs, **OPTIONS)
    s = res.summary
    assert s["n_used"] == LOBES * PER - 1 and s["n_dropped"] == 1 and s["labels_note"] is None
    assert 7 not in res.tables["labels"]["feature"]
    assert s["ami"] >= 0.9 and s["ami_z"] > 10 and s["balanced_accuracy"] > 0.9
    kept = res.tables["labels"]["feature"]
    assert adjusted_mutual_info_score(truth[kept], res.tables["labels"]["cooc_lobe"]) >= 0.9
    for lobe, names in enumerate(s["lobe_labels"]):  # each lobe is named by its planted token
        members = truth[kept][res.tables["labels"]["cooc_lobe"] == lobe]
        assert names[0] == f"t{10 + np.bincount(members).argmax()}"
    assert sum(s["lobe_sizes"]) == s["n_used"]
    write_result(tmp_path / "geometry" / "lobes", res)
    assert list(read_table(tmp_path / "geometry" / "lobes", "lobes")["size"]) == s["lobe_sizes"]
    again = lobes(run, inputs, **OPTIONS)
    assert again.summary == s
    for name, cols in res.tables.items():
        for key, value in cols.items():
            np.testing.assert_array_equal(again.tables[name][key], value)


def test_lobes_without_a_store_still_clusters_and_says_how_to_name_them(tmp_path):
    codes, W, _ = planted()
    res = lobes(_fake_run(tmp_path, W), SimpleNamespace(codes=codes), **OPTIONS)
    assert res.summary["lobe_labels"] is None and "saewb analyze" in res.summary["labels_note"]


def test_too_few_active_latents_get_the_sentence(tmp_path):
    codes, W, _ = planted()
    codes.acts.data[codes.acts.indices >= 5] = 0.5  # only latents 0..4 are ever above 1
    with pytest.raises(UserError, match="Only 5 latents active above 1.0"):
        lobes(_fake_run(tmp_path, W), SimpleNamespace(codes=codes), **OPTIONS)
    with pytest.raises(UserError, match="affinity"):
        lobes(_fake_run(tmp_path, W), SimpleNamespace(codes=codes), affinity="cosine")


@pytest.mark.parametrize("name", ["phi", "matching"])
def test_dense_and_sparse_block_products_agree_exactly(name):
    codes, _, _ = planted(seed=2)
    B = block_matrix(codes.acts, codes.blocks(16), 1.0)
    a = cooccurrence_affinity(B, name, neighbours=12, dense_limit=0, dense_blocks=True)
    b = cooccurrence_affinity(B, name, neighbours=12, dense_limit=0, dense_blocks=False)
    assert a.nnz > 0 and (a != b).nnz == 0
