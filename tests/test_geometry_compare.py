"""Dictionary comparison: matching two noisy permuted copies of one planted dictionary, random
dictionaries, and SVCCA / CKA / relative representations / Procrustes against rotated copies,
independent noise, brute-force references and large-sample values."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import ortho_group

import analysis.geometry.compare as cmp
from analysis.geometry.codes import Inputs
from analysis.geometry.compare import (
    hungarian_match,
    linear_cka,
    procrustes_distance,
    relative_similarity,
    shared_codes,
    svcca,
    top_components,
    top_matches,
)
from hooks.errors import UserError
from sae.synthetic import planted_features


def unit(W):
    return (W / np.linalg.norm(W, axis=1, keepdims=True)).astype(np.float32)


def noisy_copy(W, noise: float, seed: int):
    """W's rows shuffled and jittered: what a second SAE on the same features learns (the stand-in
    for training a second SAE, which takes too long for a unit test on the busy CPU)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(W))
    return unit(W[perm] + noise * rng.standard_normal(W.shape) / np.sqrt(W.shape[1])), perm


@pytest.mark.parametrize("dense_limit", [cmp.DENSE_MATCH, 100])
def test_copies_of_one_planted_dictionary_match_and_random_ones_do_not(monkeypatch, dense_limit):
    monkeypatch.setattr(cmp, "DENSE_MATCH", dense_limit)  # 100: the sparse kNN-graph path
    W = planted_features(64, 256, seed=0).numpy()
    Wb, perm = noisy_copy(W, 0.2, seed=1)
    rows, cols, cos, method = hungarian_match(W, Wb, neighbours=4)
    assert method.startswith("dense" if dense_limit > 100 else "sparse")
    assert (cos > 0.9).mean() >= 0.9
    assert (perm[cols] == rows).mean() >= 0.95  # the planted permutation comes back
    # against the exact dense assignment: the same summed cosine
    from scipy.optimize import linear_sum_assignment

    C = W.astype(np.float64) @ Wb.T
    r, c = linear_sum_assignment(C, maximize=True)
    assert cos.sum() == pytest.approx(C[r, c].sum(), rel=1e-6)
    rand = unit(np.random.default_rng(2).standard_normal((256, 64)))
    assert (hungarian_match(W, rand, neighbours=4)[2] > 0.7).mean() < 0.01


def test_many_to_one_match_of_a_wider_dictionary():
    W = planted_features(64, 128, seed=0).numpy()
    extra = unit(np.random.default_rng(3).standard_normal((128, 64)))
    wide = np.concatenate([noisy_copy(W, 0.2, seed=1)[0], extra])  # (256, 64): half known
    idx, cos = top_matches(wide, W, k=3, chunk=50)
    ref = np.sort(wide @ W.T, axis=1)[:, ::-1][:, :3]  # brute force over the full matrix
    np.testing.assert_allclose(cos, ref, rtol=1e-6)
    cos = cos[:, 0]
    assert (cos[:128] > 0.9).mean() >= 0.95 and (cos[128:] > 0.7).mean() < 0.05
    rows, cols, hc, _ = hungarian_match(W, wide)  # the narrow side is matched in full
    assert len(rows) == 128 and len(set(cols)) == 128 and (cols < 128).mean() >= 0.95


def brute_cka(X, Y):
    """The N x N HSIC form: tr(K_x H K_y H) / sqrt(tr(K_x H K_x H) tr(K_y H K_y H))."""
    X, Y = np.asarray(X, float), np.asarray(Y, float)
    H = np.eye(len(X)) - 1 / len(X)
    Kx, Ky = H @ X @ X.T @ H, H @ Y @ Y.T @ H
    return np.sum(Kx * Ky) / np.sqrt(np.sum(Kx * Kx) * np.sum(Ky * Ky))


def gaussian(N, p, seed, scales=True):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, p)) * (np.linspace(3, 0.5, p) if scales else 1)


def test_cka_is_one_for_a_rotated_copy_zero_for_noise_and_matches_the_gram_form(monkeypatch):
    X = gaussian(400, 20, 0)
    R = ortho_group.rvs(20, random_state=1)
    assert linear_cka(X, 3 * X @ R) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(gaussian(4000, 20, 0), gaussian(4000, 20, 1)) < 0.03
    monkeypatch.setattr(cmp, "CHUNK_ENTRIES", 64)  # several column blocks
    A = sp.random(300, 50, density=0.1, random_state=2, format="csr")
    B = sp.random(300, 70, density=0.1, random_state=3, format="csr") + A @ sp.random(50, 70, density=0.2, random_state=4)  # fmt: skip
    assert linear_cka(A, B) == pytest.approx(brute_cka(A.toarray(), B.toarray()), rel=1e-9)


def test_svcca_is_one_for_an_invertible_copy_and_small_for_noise():
    X = gaussian(1000, 12, 0)
    M = ortho_group.rvs(12, random_state=1) * 2.5
    Ua, _, _ = top_components(X, 64, 0.99, seed=0)
    Ub, _, _ = top_components(X @ M, 64, 0.99, seed=1)
    assert svcca(Ua, Ub).mean() == pytest.approx(1.0, abs=1e-8)
    Un, _, _ = top_components(gaussian(1000, 12, 5), 64, 0.99, seed=2)
    assert svcca(Ua, Un).mean() < 0.15


def test_randomized_top_components_match_an_exact_svd_of_sparse_codes():
    rng = np.random.default_rng(0)
    low = rng.standard_normal((3000, 8)) * np.linspace(20, 5, 8) @ rng.standard_normal((8, 400))
    X = sp.csr_matrix(np.maximum(low, 0) * (rng.random((3000, 400)) < 0.3))  # sparse, uncentred
    U, S, share = top_components(X, 6, 0.999, seed=0)
    dense = X.toarray() - X.toarray().mean(0)
    ref = np.linalg.svd(dense, compute_uv=False)
    np.testing.assert_allclose(S, ref[:6], rtol=1e-3)
    assert share == pytest.approx((ref[:6] ** 2).sum() / (ref**2).sum(), rel=1e-3)
    assert np.abs(U.sum(0)).max() < 1e-8 and np.allclose(U.T @ U, np.eye(6), atol=1e-8)


def test_procrustes_is_zero_for_a_rotation_and_split_half_corrects_the_small_sample_bias():
    X = gaussian(300, 10, 0)
    d = procrustes_distance(X, 2 * X @ ortho_group.rvs(10, random_state=1), seed=0)
    assert d["plugin"] < 1e-6 and d["split_half"] < 1e-6
    # independent representations: the population distance is pi/2, as a large sample shows
    big = procrustes_distance(gaussian(100_000, 20, 1, False), gaussian(100_000, 20, 2, False))
    assert big["plugin"] == pytest.approx(np.pi / 2, abs=0.03)
    small = [
        procrustes_distance(gaussian(150, 40, s, False), gaussian(150, 40, s + 100, False), seed=s)
        for s in range(5)
    ]  # fmt: skip
    plug = np.mean([s["plugin"] for s in small])
    split = np.mean([s["split_half"] for s in small])
    assert plug < np.pi / 2 - 0.3  # the plug-in sees alignment in pure noise
    assert abs(split - np.pi / 2) < 0.1  # the split-half estimate does not
    # correlated: Y = X R + E has population alignment 1/sqrt(2) (distance pi/4), bracketed by
    # the plug-in (biased close) and the split-half (a noisier rotation, biased far)
    pairs = []
    for s in range(5):
        Xs = gaussian(120, 30, s, False)
        Ys = Xs @ ortho_group.rvs(30, random_state=s) + gaussian(120, 30, s + 50, False)
        pairs.append(procrustes_distance(Xs, Ys, seed=s))
    assert (
        np.mean([p["plugin"] for p in pairs])
        < np.pi / 4
        < np.mean([p["split_half"] for p in pairs])
    )
    Xl = gaussian(100_000, 30, 9, False)
    Yl = Xl @ ortho_group.rvs(30, random_state=9) + gaussian(100_000, 30, 10, False)
    assert procrustes_distance(Xl, Yl)["plugin"] == pytest.approx(np.pi / 4, abs=0.01)


def test_relative_representations_are_invariant_to_rotation_and_scale():
    X = gaussian(600, 16, 0)
    same = relative_similarity(X, 4 * X @ ortho_group.rvs(16, random_state=1), 50, seed=0)
    assert same["mean_cos"] == pytest.approx(1.0, abs=1e-9) and same["n_anchors"] == 50
    assert abs(same["shuffled_cos"]) < 0.2
    other = relative_similarity(X, gaussian(600, 16, 7), 50, seed=0)
    assert abs(other["mean_cos"]) < 0.2


def test_bad_input_gets_one_sentence():
    run = lambda d, name: SimpleNamespace(sae=SimpleNamespace(cfg=SimpleNamespace(d_in=d)), path=name)  # noqa: E731  # fmt: skip
    with pytest.raises(UserError, match="runA has d_in 32 and runB has d_in 64"):
        cmp.compare(run(32, "runA"), run(64, "runB"))
    codes = lambda t: SimpleNamespace(tokens=np.asarray(t), n_tokens=len(t))  # noqa: E731
    assert shared_codes(codes([1, 2, 3]), codes([1, 2, 3, 4]), ("a", "b")) == 3
    with pytest.raises(UserError, match="share no tokens.*position 1"):
        shared_codes(codes([1, 2, 3]), codes([1, 5, 3]), ("a", "b"))


def test_compare_a_run_with_itself_is_identical_and_seeded(tmp_path_factory, tokenizer):
    from conftest import build_planted_run

    from analysis.run import open_run

    path, _ = build_planted_run(tmp_path_factory.mktemp("compare"), tokenizer, docs=800)
    run = open_run(path)
    inputs = Inputs(run, 500, progress=False)  # one model load for both sides and both calls
    first = cmp.compare(run, run, inputs, inputs, n_tokens=500, anchors=20, progress=False)
    s = first.summary
    assert s["run_a"] == s["run_b"] == str(path)  # the dashboard's compare page checks them
    assert s["hungarian"]["above_0.9"] == 1.0 and s["many_to_one"]["above_0.9"] == 1.0
    assert s["codes"]["cka"] == pytest.approx(1.0) and s["codes"]["svcca"] == pytest.approx(1.0)
    assert s["codes"]["relative"]["mean_cos"] == pytest.approx(1.0)
    assert s["codes"]["procrustes"]["split_half"] < 1e-3 and s["codes"]["n_tokens"] == 500
    second = cmp.compare(run, run, inputs, inputs, n_tokens=500, anchors=20, progress=False)
    assert json.dumps(s, sort_keys=True) == json.dumps(second.summary, sort_keys=True)
    assert (first.tables["matches_a"]["hungarian_match"] == np.arange(16)).all()
