"""Crystals: planted parallelograms, a planted length distractor that LDA removes on held-out
pairs, planted decoder quadruples, the analogy-file parser, and determinism."""

import json

import numpy as np
import pytest

from analysis.geometry.crystals import (
    choose_pairs,
    crystals,
    find_quadruples,
    length_distractor,
    pair_quality,
    parallelogram_quality,
    parse_questions_words,
    split_pairs,
)
from hooks.errors import UserError


def planted_pairs(distractor: float, n_rel: int = 4, per: int = 40, d: int = 32, seed: int = 0):
    """Differences a - b of pairs b = a + r_rel + noise + length * v: the relation vectors r are
    the planted truth, `length` a per-pair integer riding on one fixed distractor direction v."""
    rng = np.random.default_rng(seed)
    r = rng.standard_normal((n_rel, d))
    r = 2 * r / np.linalg.norm(r, axis=1, keepdims=True)  # (R, d), each of length 2
    v = rng.standard_normal(d)
    v /= np.linalg.norm(v)
    labels = np.repeat(np.arange(n_rel), per)
    length = rng.integers(-3, 4, len(labels)).astype(float)
    a = rng.standard_normal((len(labels), d))
    b = a + r[labels] + 0.08 * rng.standard_normal(a.shape) + distractor * length[:, None] * v
    return a - b, labels, length


def test_planted_parallelograms_line_up_within_their_relation():
    diffs, labels, _ = planted_pairs(distractor=0.0)
    q = parallelogram_quality(diffs, labels)
    assert q["same_cos"] > 0.9  # every relation's differences point one way
    assert abs(q["cross_cos"]) < 0.4  # random relation vectors in 32 dims
    assert q["silhouette"] > 0.6 and q["spread_ratio"] < 0.1
    # a brute-force mean over distinct same-relation pairs of relation 0
    U = diffs[labels == 0] / np.linalg.norm(diffs[labels == 0], axis=1, keepdims=True)
    brute = np.mean([U[i] @ U[j] for i in range(len(U)) for j in range(len(U)) if i != j])
    assert q["per_relation"][0]["same_cos"] == pytest.approx(brute)


def test_lda_removes_a_planted_length_distractor_on_held_out_pairs():
    diffs, labels, length = planted_pairs(distractor=1.5)
    test = split_pairs(labels, 0.3, seed=0)
    assert 0.25 < test.mean() < 0.35 and all(test[labels == r].any() for r in range(4))
    q = pair_quality(diffs, labels, test, length, n_lda=3, shrinkage="auto")
    before, after = q["before"], q["after"]
    assert before["same_cos"] < 0.6  # the distractor swamps the relations
    assert after["same_cos"] > before["same_cos"] + 0.2
    assert after["silhouette"] > before["silhouette"] + 0.2
    assert after["spread_ratio"] < before["spread_ratio"]
    assert abs(q["length"]["r_pc0"]) > 0.9  # PC0 is the length direction, as the paper found
    assert abs(q["length_after"]["best_r"]) < abs(q["length"]["r_pc0"])
    clean, labels0, length0 = planted_pairs(distractor=0.0)
    assert abs(length_distractor(clean, length0)["r_pc0"]) < 0.5  # nothing planted, none found


def planted_quadruples(n: int = 300, d: int = 32, planted: int = 5, seed: int = 0):
    """Random unit rows, with `planted` parallelograms: rows j = i + r and m = k + r."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, d))
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    ids = rng.permutation(n)[: 4 * planted].reshape(planted, 4)  # (i, j, k, m) each
    for i, j, k, m in ids:
        r = 0.5 * rng.standard_normal(d) / np.sqrt(d)
        W[j] = W[i] + r + 0.005 * rng.standard_normal(d)
        W[m] = W[k] + r + 0.005 * rng.standard_normal(d)
    return W.astype(np.float32), ids


@pytest.mark.parametrize("kind", ["parallelogram", "trapezoid"])
def test_the_feature_search_finds_planted_quadruples_and_none_in_random_rows(kind):
    W, ids = planted_quadruples()
    threshold = 0.7 if kind == "parallelogram" else 0.9
    table, info = find_quadruples(W, kind, min_quality=threshold, seed=0)
    found = [set(q) for q in zip(table["i"], table["j"], table["k"], table["l"])]
    for quad in ids:
        assert set(quad.tolist()) in found
    assert len(found) <= len(ids) + 2  # next to nothing beyond the plant
    assert (table["quality"] >= threshold).all() and (np.diff(table["quality"]) <= 0).all()
    # each found quadruple really is one: w_j - w_i against w_l - w_k, recomputed here
    for i, j, k, m, q in zip(table["i"], table["j"], table["k"], table["l"], table["quality"]):
        d1, d2 = W[j] - W[i], W[m] - W[k]
        if kind == "parallelogram":
            ref = 1 - np.linalg.norm(d1 - d2) / ((np.linalg.norm(d1) + np.linalg.norm(d2)) / 2)
        else:
            ref = d1 @ d2 / np.linalg.norm(d1) / np.linalg.norm(d2)
        assert q == pytest.approx(ref, abs=1e-5)
    random_rows, _ = planted_quadruples(planted=0, seed=1)
    assert len(find_quadruples(random_rows, kind, min_quality=threshold)[0]["i"]) <= 1
    again, _ = find_quadruples(W, kind, min_quality=threshold, seed=0)
    assert all((again[c] == table[c]).all() for c in table)


def test_the_parser_reads_sections_into_unique_pairs(tmp_path):
    path = tmp_path / "q.txt"
    path.write_text(
        ": capital-common-countries\nAthens Greece Baghdad Iraq\nAthens Greece Bern Switzerland\n"
        ": family\nboy girl brother sister\nbrother sister boy girl\n\n"
    )
    relations = parse_questions_words(path)
    assert relations == {
        "capital-common-countries": [("Athens", "Greece"), ("Baghdad", "Iraq"), ("Bern", "Switzerland")],
        "family": [("boy", "girl"), ("brother", "sister")],
    }  # fmt: skip
    pairs, labels, names = choose_pairs(relations, "family", 50, seed=0)
    assert names == ["family"] and sorted(pairs) == [("boy", "girl"), ("brother", "sister")]
    with pytest.raises(UserError, match="Unknown relation 'nope'.*capital-common-countries"):
        choose_pairs(relations, "nope", 50, seed=0)
    path.write_text(": family\nboy girl brother\n")
    with pytest.raises(UserError, match="Line 2 of"):
        parse_questions_words(path)
    with pytest.raises(UserError, match="does not exist"):
        parse_questions_words(tmp_path / "missing.txt")


def test_crystals_on_a_tiny_run_is_seeded(tmp_path_factory, tokenizer):
    from conftest import build_planted_run

    from analysis.run import open_run

    path, _ = build_planted_run(tmp_path_factory.mktemp("crystals"), tokenizer, docs=40)
    run = open_run(path)
    options = dict(
        relations="family,gram8-plural,capital-world", max_pairs=12, n_lda=2, progress=False
    )
    first, second = crystals(run, **options), crystals(run, **options)
    assert json.dumps(first.summary, sort_keys=True) == json.dumps(second.summary, sort_keys=True)
    pairs = first.tables["pairs"]
    assert len(pairs["a"]) == 36 and set(pairs["relation"]) == {
        "family", "gram8-plural", "capital-world"
    }  # fmt: skip
    assert np.array_equal(pairs["activation_lda0"], second.tables["pairs"]["activation_lda0"])
    for kind in ("activation", "reconstruction"):
        assert set(first.summary[kind]) >= {"before", "after", "length", "length_chars"}
    assert {"parallelograms", "trapezoids", "pairs"} == set(first.tables)
    assert "pairs" in first.figures
