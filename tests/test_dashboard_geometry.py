"""The geometry and compare pages: builders as plain functions on planted geometry outputs (written
with the analyses' own write_result, so the format is the real one), then a real browser."""

from __future__ import annotations

import json
import shutil
from html import unescape

import numpy as np
import pytest
from conftest import (
    assert_no_console_errors,
    browser_only,
    component_json,
    screenshot,
    screenshot_path,
    serve_in_browser,
)

from analysis.geometry.galaxy import galaxy_by_layer, power_law_fit
from analysis.geometry.results import Result, write_result
from analysis.run import open_run
from analysis.store.build import analyze
from dashboard.app import route
from dashboard.data import Workspace
from dashboard.pages import compare, geometry

A, B, PARTIAL = "planted/run", "twin/run", "partial/run"
ALPHA, RANKS = 0.7, (5, 40)
RELATIONS = ("capital", "plural")
LOBE_LABELS = (" Paris | France", " Monday | Tuesday", " cat | dog")
RANK = {0: 3, 1: 0, 2: 4, 3: 1, 4: 2}  # cluster -> 0-based rank: 1, 3, 4, 0, 2 by rank
CLUSTER_OF = {1: 1, 2: 1, 3: 3, 4: 3, 5: 0, 6: 0, 7: 2, 8: 2, 9: 4, 10: 4}  # feature -> cluster
DAYS = (" Monday", " Tuesday", " Wednesday", " Thursday", " Friday", " Saturday", " Sunday")


def spectrum_result() -> Result:
    """An exact power law lambda = 2 rank^-ALPHA, fitted by the galaxy analysis's own fit."""
    rank = np.arange(1, 65)
    eig, base = 2.0 * rank**-ALPHA, np.full(64, 0.05) * rank**-0.1
    summary = dict(rank_min=RANKS[0], rank_max=RANKS[1], **power_law_fit(eig, *RANKS), logdet=-1.0,
                   negentropy=0.5, negentropy_ci=0.1,
                   baseline=dict(**power_law_fit(base, *RANKS), logdet=-2.0, negentropy=0.1,
                                 negentropy_ci=0.05))  # fmt: skip
    return Result(summary, {"spectrum": dict(rank=rank, eigenvalue=eig, baseline=base)})


def lobes_result() -> Result:
    summary = dict(ami=0.4, ami_null_mean=0.01, ami_null_std=0.005, ami_z=78.0,
                   balanced_accuracy=0.8, accuracy_null_mean=0.3, accuracy_null_std=0.02,
                   accuracy_z=25.0, chance=1 / 3, n_used=15, lobe_sizes=[4, 9, 2],
                   labels_note=None)  # fmt: skip
    lobes = dict(lobe=np.arange(3), size=np.array([4, 9, 2]), label=np.array(LOBE_LABELS))
    return Result(summary, {"lobes": lobes})


def crystals_result(rng) -> Result:
    n = 8
    t = dict(relation=np.repeat(RELATIONS, n // 2), a=np.array([f"a{i}" for i in range(n)]),
             b=np.array([f"b{i}" for i in range(n)]), held_out=np.arange(n) % 2 == 1)  # fmt: skip
    for kind in ("activation", "reconstruction"):
        for axes in ("pc0", "pc1", "lda0", "lda1"):
            t[f"{kind}_{axes}"] = rng.normal(size=n)
    stats = lambda v: dict(same_cos=v, cross_cos=0.0, spread_ratio=1.0, silhouette=v / 2)  # noqa: E731
    summary = dict(relations=list(RELATIONS), n_pairs=n, n_held_out=n // 2,
                   activation=dict(before=stats(0.1), after=stats(0.6)),
                   reconstruction=dict(before=stats(0.05), after=stats(0.4)))  # fmt: skip
    return Result(summary, {"pairs": t})


def multidim_result(rng, circle_r2: float) -> Result:
    """Clusters 0..4 ranked by RANK; cluster 1 carries the weekday circle in PCs 1-2 (with a third
    PC), cluster 3 has PCA points and no circle; the others have no points saved."""
    K = len(RANK)
    scores = dict(cluster=np.arange(K), size=np.full(K, 2), n_tokens=np.full(K, 50),
                  mixture=rng.uniform(size=K), separability=rng.uniform(size=K),
                  score=1.0 - np.array([RANK[c] for c in range(K)]) / 10,
                  rank=np.array([RANK[c] for c in range(K)]))  # fmt: skip
    scores |= {f"explained{j}": np.full(K, 0.2) for j in range(1, 6)}
    labels = np.array([CLUSTER_OF.get(f, -1) for f in range(16)])
    item = np.arange(14) % 7
    angle = 2 * np.pi * item / 7
    circle = dict(cluster=np.full(14, 1), source=np.full(14, "probe"), set=np.full(14, "weekday"),
                  item=item, token=item, text=np.array([DAYS[i] for i in item]),
                  pc1=np.cos(angle), pc2=np.sin(angle), pc3=0.1 * rng.normal(size=14),
                  pc4=np.full(14, np.nan), pc5=np.full(14, np.nan))  # fmt: skip
    plain = dict(cluster=np.full(20, 3), source=np.full(20, "sample"), set=np.full(20, ""),
                 item=np.full(20, -1), token=np.arange(20), text=np.array([" cat", " dog"] * 10),
                 pc1=rng.normal(size=20), pc2=rng.normal(size=20), pc3=rng.normal(size=20),
                 pc4=np.full(20, np.nan), pc5=np.full(20, np.nan))  # fmt: skip
    pcs = {k: np.concatenate([circle[k], plain[k]]) for k in circle}
    summary = dict(settings=dict(clustering="graph", cutoff=0.5), n_clusters=K, n_clustered=10,
                   n_scored=K, calendar=dict(weekday=dict(cluster=1, coverage=1.0, lift=9.0,
                                                          pcs=[1, 2], r2=circle_r2)))  # fmt: skip
    tables = dict(scores=scores, pcs=pcs, clusters=dict(feature=np.arange(16), cluster=labels))
    return Result(summary, tables)


def compare_result(rng, n_b: int = 16) -> tuple[Result, np.ndarray]:
    hungarian = rng.permutation(16)
    cos = rng.uniform(0.05, 0.99, size=16)
    best = hungarian.copy()
    best[:4] = (hungarian[:4] + 1) % 16  # four features' best match is not their Hungarian one
    matches_a = dict(feature=np.arange(16), best_match=best, best_cos=np.minimum(cos + 0.01, 1),
                     hungarian_match=hungarian, hungarian_cos=cos)  # fmt: skip
    back = np.argsort(hungarian)  # b's best match: its Hungarian partner
    matches_b = dict(feature=np.arange(16), best_match=back, best_cos=cos[back])
    codes = dict(svcca=0.7, svcca_shuffled=0.05, svcca_dims=[8, 8], cka=0.3,
                 relative=dict(mean_cos=0.8, shuffled_cos=0.1),
                 procrustes=dict(split_half=0.9, plugin=0.8, split_half_alignment=0.62))  # fmt: skip
    summary = dict(n_latents=[16, n_b], hungarian=dict(mean_cos=float(cos.mean())), codes=codes)
    return Result(summary, dict(matches_a=matches_a, matches_b=matches_b)), cos


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    """planted/run: a store and every analysis; twin/run: a copy of it with only the slope by
    layer (listing planted/run); partial/run: a copy with only the lobes."""
    from conftest import build_planted_run

    root = tmp_path_factory.mktemp("geometry")
    (root / "planted").mkdir()
    path, _ = build_planted_run(root / "planted", tokenizer, docs=400)
    analyze(open_run(path), 20_000, batch_windows=4, progress=False)
    for other in (B, PARTIAL):
        shutil.copytree(path, root / other)
    rng = np.random.default_rng(0)
    for i, name in enumerate((A, B)):
        log = [dict(tokens=1000 * (s + 1), loss=1 / (s + 1 + i), fvu=0.5 / (s + 1), l0=4.0,
                    dead_frac=0.0) for s in range(5)]  # fmt: skip
        (root / name / "train_log.jsonl").write_text("\n".join(map(json.dumps, log)))
        (root / name / "eval.json").write_text(json.dumps(dict(fvu=0.25 + i, l0=4.0)))
    geo = root / A / "geometry"
    write_result(geo / "galaxy", spectrum_result())
    write_result(geo / "lobes", lobes_result())
    write_result(geo / "crystals", crystals_result(rng))
    write_result(geo / "multidim", multidim_result(rng, circle_r2=0.9))
    write_result(geo / "multidim-cutoff0.3", multidim_result(rng, circle_r2=0.2))
    result, cos = compare_result(rng)
    write_result(geo / "compare", result)

    def layer(alpha: float) -> dict:
        return dict(alpha=alpha, alpha_ci=0.01, logdet=-1.0, negentropy=0.5, negentropy_ci=0.1,
                    baseline=dict(alpha=0.1, negentropy=0.1))  # fmt: skip

    by_layer = galaxy_by_layer([(str(root / B), 3, layer(0.9)), (str(root / A), 1, layer(ALPHA))])
    write_result(root / B / "geometry" / "galaxy_by_layer", by_layer)
    write_result(root / PARTIAL / "geometry" / "lobes", lobes_result())
    return root, cos


@pytest.fixture(scope="module")
def ws(served):
    return Workspace(served[0])


_json = component_json


def _find(component, id: str):
    """The component with this id anywhere below component."""
    if getattr(component, "id", None) == id:
        return component
    children = getattr(component, "children", None)
    for child in children if isinstance(children, list) else [children]:
        if child is not None and not isinstance(child, str):
            found = _find(child, id)
            if found is not None:
                return found
    return None


def _graph(component, id: str) -> dict:
    return _find(component, id).figure


def _raw(component, id: str) -> str:
    """The HTML of a raw_html block, as the browser renders it."""
    return _find(component, id).children


# -- geometry page --------------------------------------------------------------------------


def test_spectrum_draws_the_power_law_its_summary_fits(ws):
    page = geometry.layout(ws, A)
    fig = _graph(page, "galaxy-spectrum")
    decoder, fit = fig["data"][0], fig["data"][1]
    assert np.allclose(decoder["y"], 2.0 * np.arange(1, 65) ** -ALPHA)
    assert list(fit["x"]) == list(range(RANKS[0], RANKS[1] + 1))  # only the fitted ranks
    slope = np.polyfit(np.log10(fit["x"]), np.log10(fit["y"]), 1)[0]
    alpha = ws.result(A, "galaxy").summary["alpha"]
    assert slope == pytest.approx(-alpha) and alpha == pytest.approx(ALPHA)  # planted truth
    assert "α = 0.700 ±" in fig["layout"]["title"]["text"]


def test_slope_by_layer_is_found_in_the_first_runs_folder(ws):
    fig = _graph(geometry.layout(ws, A), "galaxy-by-layer")  # written into twin/run's folder
    assert list(fig["data"][0]["x"]) == [1, 3] and list(fig["data"][0]["y"]) == [ALPHA, 0.9]
    partial = _json(geometry.layout(ws, PARTIAL))
    assert (
        "galaxy-by-layer" not in partial and "saewb geometry partial/run --only galaxy" in partial
    )


def test_lobes_against_their_nulls_with_labels(ws):
    page = geometry.layout(ws, A)
    fig = _graph(page, "lobes-null")
    observed, null = fig["data"]
    assert observed["y"] == [0.4, 0.8] and null["y"] == [0.01, 0.3]
    assert null["error_y"]["array"] == [0.005, 0.02]
    text = unescape(_raw(page, "lobes-table"))
    for label in LOBE_LABELS:
        assert label in text
    assert text.index(LOBE_LABELS[1]) < text.index(LOBE_LABELS[0])  # largest lobe first


def test_crystals_before_and_after_per_relation(ws):
    t = ws.result(A, "crystals").table("pairs")
    page = geometry.layout(ws, A)
    for kind in ("activation", "reconstruction"):
        before = _graph(page, f"crystals-{kind}-before")["data"]
        after = _graph(page, f"crystals-{kind}-after")["data"]
        assert [tr["name"] for tr in before] == [tr["name"] for tr in after] == list(RELATIONS)
        for b, a, relation in zip(before, after, RELATIONS):
            m = t["relation"] == relation
            assert np.allclose(b["x"], t[f"{kind}_pc0"][m]) and np.allclose(
                b["y"], t[f"{kind}_pc1"][m]
            )
            held = m & t["held_out"]  # the LDA is shown on the pairs it was not fitted on
            assert np.allclose(a["x"], t[f"{kind}_lda0"][held])
            assert np.allclose(a["y"], t[f"{kind}_lda1"][held])


def test_clusters_are_listed_by_rank_and_the_top_one_with_points_is_drawn(ws):
    page = geometry.layout(ws, A)
    text = _json(page)
    order = [text.index(f'"cluster-{c}"') for c in range(5)]
    assert np.argsort(order).tolist() == [1, 3, 4, 0, 2]  # the planted ranks
    fig = _graph(page, "multidim-scatter")
    assert (
        fig["data"][0]["type"] == "scatter3d" and "weekday circle" in fig["layout"]["title"]["text"]
    )
    members = _raw(page, "multidim-members")  # cluster 1's members link to their pages
    assert "/feature/1?run=planted%2Frun" in members and "/feature/2?run=planted%2Frun" in members
    assert "/feature/3?run=planted%2Frun" not in members


def test_a_circle_cluster_is_3d_and_another_is_2d(ws):
    circle = _graph(geometry.layout(ws, A, focus="1"), "multidim-scatter")
    points = {k: np.concatenate([tr[k] for tr in circle["data"]]) for k in "xyz"}
    angle = np.arctan2(points["y"], points["x"])
    assert np.allclose(np.hypot(points["x"], points["y"]), 1.0)  # the planted ring, PC1-PC2
    assert len(np.unique(np.round(angle, 6))) == 7
    assert {tr["name"] for tr in circle["data"]} == {repr(d) for d in DAYS}  # coloured by token
    assert all(tr["marker"]["symbol"] == "diamond" for tr in circle["data"])  # probe tokens
    flat = _graph(geometry.layout(ws, A, focus="3"), "multidim-scatter")
    pcs = ws.result(A, "multidim").table("pcs")
    assert {tr["type"] for tr in flat["data"]} == {"scatter"} and "z" not in flat["data"][0]
    assert sorted(np.concatenate([tr["x"] for tr in flat["data"]])) == sorted(
        pcs["pc1"][pcs["cluster"] == 3]
    )
    assert {tr["name"] for tr in flat["data"]} == {"' cat'", "' dog'"}
    assert "' cat'" in str(flat["data"][0]["text"])  # hover shows the token text
    missing = _json(geometry.layout(ws, A, focus="0"))
    assert "No PCA points were saved for cluster 0" in missing


def test_the_variant_and_its_circle_rule(ws):
    below = geometry.layout(ws, A, mode="multidim-cutoff0.3", focus="1")
    fig = _graph(below, "multidim-scatter")  # circle R^2 0.2 < 0.5: not a circle, so 2-D
    assert fig["data"][0]["type"] == "scatter"
    assert "mode=multidim-cutoff0.3" in _json(below) and "variant-multidim" in _json(below)


def test_partial_runs_name_the_missing_commands(ws):
    text = _json(geometry.layout(ws, PARTIAL))
    for name in ("galaxy", "crystals", "multidim"):
        assert f"saewb geometry partial/run --only {name}" in text
    assert "lobes-null" in text and "note-error" not in text
    twin = _json(geometry.layout(ws, B))  # only galaxy_by_layer: every section is a note
    assert "saewb geometry twin/run --only lobes" in twin


@pytest.mark.parametrize(
    "search, expected",
    [
        ("?run=../etc", "There is no run named"),
        ("", "Choose a run"),
        ("?run=planted/run&mode=nope", "is not a multidim analysis of this run"),
        ("?run=planted/run&focus=x1", "is not a cluster id"),
        ("?run=planted/run&focus=99", "There is no cluster 99"),
    ],
)
def test_bad_geometry_input_gets_a_message(ws, search, expected):
    body, _ = route(ws, "/geometry", search)
    text = _json(body)
    assert expected in text
    if "mode" in search or "focus" in search:
        assert "galaxy-spectrum" in text  # the other sections still show


# -- compare page ---------------------------------------------------------------------------


def test_compare_histogram_counts_the_planted_cosines(ws, served):
    cos = served[1]
    page = compare.layout(ws, a=A, b=B)
    fig = _graph(page, "compare-histogram")
    hungarian = fig["data"][0]
    edges = np.linspace(0, 1, 51)  # all planted cosines are positive: bins of 0.02 from 0
    assert np.allclose(hungarian["x"], (edges[:-1] + edges[1:]) / 2)
    assert list(hungarian["y"]) == np.histogram(cos, bins=edges)[0].tolist()
    assert sum(hungarian["y"]) == 16
    sim = _graph(page, "compare-similarity")
    assert sim["data"][0]["y"] == [0.7, 0.3, 0.8, 0.62]


def test_compare_pairs_link_both_pages_best_first(ws, served):
    cos = served[1]
    matches = ws.result(A, "compare").table("matches_a")
    page = compare.layout(ws, a=A, b=B)
    text = _raw(page, "compare-pairs")
    order = np.argsort(-cos)
    first, last = order[0], order[-1]
    link_a = f'/feature/{first}?run=planted%2Frun" class="pair-a"'
    link_b = f'/feature/{matches["hungarian_match"][first]}?run=twin%2Frun" class="pair-b"'
    assert link_a in text and link_b in text
    assert text.index(link_a) < text.index(f'/feature/{last}?run=planted%2Frun" class="pair-a"')
    whole = _json(page)
    assert "runs-curves" in whole and "0.25" in whole and "1.25" in whole  # curves, both evals
    assert "only the latent counts" in whole  # compare.py records no identity of b
    best = _raw(compare.layout(ws, a=A, b=B, mode="best"), "compare-pairs")
    top = int(np.argmax(matches["best_cos"]))
    assert f'/feature/{matches["best_match"][top]}?run=twin%2Frun" class="pair-b"' in best


def test_compare_checks_b_and_names_the_command(ws):
    ok, sentence = compare.check_b({"n_latents": [16, 32]}, 16, 16, A, B)
    assert not ok and "32 latents" in sentence
    assert compare.check_b({"run_b": "/x/twin/run"}, 16, 16, A, B)[0]
    assert not compare.check_b({"run_b": "/x/other"}, 16, 16, A, B)[0]
    assert not compare.check_b({"run_b": "/x/mytwin/run"}, 16, 16, A, B)[0]
    missing = _json(compare.layout(ws, a=B, b=A))
    assert "saewb compare twin/run planted/run" in missing and "runs-curves" in missing


@pytest.mark.parametrize(
    "search, expected",
    [
        ("?a=planted/run&b=../../etc", "There is no run named '../../etc'"),
        ("?a=nope", "There is no run named 'nope'"),
        ("?a=planted/run", "Choose two runs"),
        ("?a=planted/run&b=twin/run&mode=zz", "is not a pair ranking"),
    ],
)
def test_bad_compare_input_gets_a_message(ws, search, expected):
    body, _ = route(ws, "/compare", search)
    assert expected in _json(body)


def test_the_runs_page_links_two_runs_to_compare(ws):
    from dashboard.pages import runs

    out = runs.compare(ws, [A, B])
    assert "/compare?a=planted%2Frun&b=twin%2Frun" in _json(out[0])


# -- a real browser -------------------------------------------------------------------------


@pytest.fixture
def duo(dash_duo, ws):
    return serve_in_browser(dash_duo, ws)


@browser_only
def test_browser_geometry_page_spectrum_and_a_clusters_scatter(duo):
    duo.driver.get(duo.server_url + "/geometry?run=planted/run")
    duo.wait_for_element("#galaxy-spectrum .main-svg")
    duo.wait_for_contains_text("#galaxy-spectrum", "α = 0.700")
    duo.wait_for_contains_text("#multidim-detail h4", "Cluster 1")
    duo.wait_for_element("#multidim-scatter .gl-container, #multidim-scatter .main-svg")
    screenshot(duo, "geometry")
    section = duo.find_element("#geometry-multidim")
    duo.driver.execute_script("arguments[0].scrollIntoView()", section)
    section.screenshot(str(screenshot_path("geometry-clusters")))
    duo.find_element("#cluster-3").click()
    duo.wait_for_contains_text("#multidim-detail h4", "Cluster 3")
    duo.wait_for_contains_text("#multidim-scatter", "PC2")
    assert duo.driver.current_url.endswith("focus=3")
    assert_no_console_errors(duo)


@browser_only
def test_browser_compare_follows_a_matched_pair(duo):
    duo.driver.get(duo.server_url + "/compare?a=planted/run&b=twin/run")
    duo.wait_for_element("#compare-histogram .main-svg")
    duo.driver.execute_script("arguments[0].scrollIntoView()", duo.find_element("#compare-checked"))
    screenshot(duo, "compare")
    link = duo.find_element("#compare-pairs a.pair-b")
    feature = link.text.lstrip("#")
    link.click()
    duo.wait_for_contains_text("h2", f"Feature {feature}")
    assert duo.driver.current_url.endswith(f"/feature/{feature}?run=twin%2Frun")
    assert_no_console_errors(duo)
