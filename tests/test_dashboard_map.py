"""The feature map page on a planted map: two well-separated blobs with known lobe ids, the
planted run's store (latent 0 is the Paris latent), a run with a map but no store, and a run
with no map. Plain-function tests of the figure and callbacks, then a real headless Chromium."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import (
    assert_no_console_errors,
    browser_only,
    component_json,
    screenshot,
    serve_in_browser,
)

from analysis.geometry.pipeline import join_features
from analysis.geometry.results import Result, write_result
from analysis.run import open_run
from analysis.store.build import analyze
from dashboard import map_data
from dashboard.app import route
from dashboard.data import Workspace
from dashboard.pages import map as map_page
from hooks.errors import UserError

PLANTED, NOSTORE, BARE = "planted/run", "nostore/run", "bare/run"
A, B = list(range(0, 7)), list(range(7, 15))  # the two blobs; latent 15 is left off the map
CENTRES = {0: (-5.0, 0.0), 1: (5.0, 0.0)}  # blob -> centre, blob id = cooc lobe id


def planted_coords() -> dict:
    rng = np.random.default_rng(0)
    feature = np.array(A + B)
    lobe = np.array([0] * len(A) + [1] * len(B))
    centre = np.array([CENTRES[i] for i in lobe])
    xy = (centre + rng.uniform(-1, 1, (len(feature), 2))).astype(np.float32)
    return dict(feature=feature, x=xy[:, 0], y=xy[:, 1], alive=np.ones(len(feature), bool),
                density=np.linspace(1e-4, 1e-1, len(feature)), lobe=lobe)  # fmt: skip


def plant_map(run_dir) -> dict:
    coords = planted_coords()
    table = {k: v for k, v in coords.items() if k != "lobe"}
    write_result(run_dir / "geometry" / "map", Result({"method": "umap"}, {"coords": table}))
    return coords


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    from conftest import build_planted_run

    root = tmp_path_factory.mktemp("served")
    (root / "planted").mkdir()
    path, _ = build_planted_run(root / "planted", tokenizer)
    run = open_run(path)
    analyze(run, 100_000, batch_windows=4, progress=False)
    for name in ("nostore", "bare"):  # the same SAE, without the store
        shutil.copytree(path, root / name / "run", ignore=shutil.ignore_patterns("features"))
    coords = plant_map(path)
    plant_map(root / NOSTORE)
    feature = np.arange(16)
    cooc = np.where(feature < 7, 0, 1)
    geometric = feature % 3
    write_result(path / "geometry" / "lobes", Result({}, {"labels": dict(
        feature=feature[:15].astype(np.int32), cooc_lobe=cooc[:15], geometric_lobe=geometric[:15])}))  # fmt: skip
    cluster = np.full(16, -1)
    cluster[[1, 2]] = 4  # the Monday pair is one multi-dimensional cluster
    write_result(path / "geometry" / "multidim",
                 Result({}, {"clusters": dict(feature=feature, cluster=cluster)}))  # fmt: skip
    join_features(run)
    return root, coords


@pytest.fixture(scope="module")
def ws(folder):
    return Workspace(folder[0])


_json = component_json


def _colours(figure: dict) -> np.ndarray:
    return map_data.decode(figure["data"][0]["marker"]["color"])


# -- figure and callbacks as plain functions -----------------------------------------------------


def test_the_figure_carries_exactly_the_planted_coordinates(ws, folder):
    coords = folder[1]
    data = map_data.load_map(ws, PLANTED)
    figure, _ = map_page.map_figure(data, "cooc_lobe")
    main = figure["data"][0]
    assert main["type"] == "scattergl" and main["x"]["dtype"] == "f4"
    np.testing.assert_array_equal(map_data.decode(main["x"]), coords["x"])
    np.testing.assert_array_equal(map_data.decode(main["y"]), coords["y"])
    np.testing.assert_array_equal(data.feature, coords["feature"])  # point i is latent feature[i]
    json.dumps(figure)  # a plain dict, no graph objects
    assert data.keys == ["cooc_lobe", "geometric_lobe", "multidim_cluster", "density", "search"]


def test_each_planted_lobe_gets_its_own_colour(ws, folder):
    coords = folder[1]
    data = map_data.load_map(ws, PLANTED)
    colours = _colours(map_page.map_figure(data, "cooc_lobe")[0])
    for lobe in (0, 1):
        assert len(set(colours[coords["lobe"] == lobe])) == 1
    assert colours[coords["lobe"] == 0][0] != colours[coords["lobe"] == 1][0]
    multidim = _colours(map_page.map_figure(data, "multidim_cluster")[0])
    in_cluster = np.isin(coords["feature"], [1, 2])
    assert len(set(multidim[in_cluster])) == 1 and set(multidim[~in_cluster]) == {-1}
    geometric = _colours(map_page.map_figure(data, "geometric_lobe")[0])
    assert len({(g, f % 3) for g, f in zip(geometric, coords["feature"])}) == 3


def test_density_colour_is_the_log_of_the_planted_density(ws, folder):
    figure, _ = map_page.map_figure(map_data.load_map(ws, PLANTED), "density")
    expected = np.log10(folder[1]["density"]).astype(np.float32)
    np.testing.assert_allclose(_colours(figure), expected, rtol=1e-6)


def test_label_search_marks_exactly_the_matching_features(ws, folder):
    data = map_data.load_map(ws, PLANTED)
    store = ws.store(PLANTED)
    labels = store.features.column("label").to_pylist()
    expected = {i for i, s in enumerate(labels) if "paris" in s.lower()}
    expected |= {r["feature"] for r in store.search_tokens("Paris", 16)}
    assert expected == {0}  # the planted Paris latent
    figure, caption = map_page.map_figure(data, "search", "Paris")
    marked = set(folder[1]["feature"][_colours(figure) == 1].tolist())
    assert marked == expected and caption.startswith("1 features match")
    assert figure["data"][1]["customdata"] == [0]  # drawn on top too
    patch, _ = map_page.recolour(ws, PLANTED, "search", "Paris")
    ops = patch.to_plotly_json()["operations"]
    assert {tuple(op["location"]) for op in ops} == {("data", 0, "marker"), ("data", 1)}
    with pytest.raises(UserError, match="Cannot colour"):
        map_page.recolour(ws, NOSTORE, "search", "Paris")  # no store: no search


def test_box_and_lasso_select_exactly_the_planted_blob(ws, folder):
    data = map_data.load_map(ws, PLANTED)
    box = {"range": {"x": [1.0, 9.0], "y": [-3.0, 3.0]}}
    assert sorted(data.feature[map_data.inside(data, box)]) == B
    lasso = {"lassoPoints": {"x": [-9, -1, -1, -5, -9], "y": [-2, -2, 2, 3, 2]}}
    assert sorted(data.feature[map_data.inside(data, lasso)]) == A
    rows, count = map_page.selection_rows(data, PLANTED, lasso)
    assert count == "7 features selected"
    assert [r["feature"] for r in rows] == [f"[{f}](/feature/{f}?run=planted%2Frun)" for f in A]
    assert rows[0]["label"] == ws.store(PLANTED).feature(0)["label"]
    assert map_page.selection_rows(data, PLANTED, {"range": {"x": [20, 30], "y": [20, 30]}})[
        1
    ].startswith("No features")
    with pytest.raises(UserError, match="not a box or a lasso"):
        map_data.inside(data, {"range": {"x": ["a", "b"], "y": [0, 1]}})


def test_lasso_agrees_with_a_brute_force_convex_test():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(-2, 2, (2, 5000)).astype(np.float32)
    data = map_data.MapData(np.arange(5000), x, y, None, {}, None)
    data.y_order = np.argsort(y, kind="stable")
    angle = np.linspace(0, 2 * np.pi, 7)[:-1] + 0.3  # a hexagon, anticlockwise
    px, py = 1.5 * np.cos(angle), 1.2 * np.sin(angle)
    edges = zip(px, py, np.roll(px, -1), np.roll(py, -1))
    left = [(bx - ax) * (y - ay) - (by - ay) * (x - ax) > 0 for ax, ay, bx, by in edges]
    expected = np.flatnonzero(np.logical_and.reduce(left))  # left of every edge
    got = map_data.inside(data, {"lassoPoints": {"x": px.tolist(), "y": py.tolist()}})
    assert 1000 < len(expected) and np.array_equal(got, expected)


def test_hover_shows_the_id_and_label(ws):
    data = map_data.load_map(ws, PLANTED)
    label = ws.store(PLANTED).feature(0)["label"]
    event = {"points": [{"curveNumber": 0, "pointNumber": 0, "bbox": {"x0": 1}}]}
    show, bbox, children = map_page.hover(data, event)
    assert show and bbox == {"x0": 1} and label and label in str(children)
    assert map_page.hover(data, None)[0] is False
    i = list(data.feature).index(9)
    assert map_page.click(ws, PLANTED, {"points": [{"curveNumber": 0, "pointNumber": i}]}) == (
        "/feature/9?run=planted%2Frun"
    )
    ring = {"points": [{"curveNumber": 2, "pointNumber": 0, "customdata": 12}]}  # an overlay
    assert map_page.click(ws, PLANTED, ring) == "/feature/12?run=planted%2Frun"


def test_focus_zooms_on_the_feature_and_rings_it(ws, folder):
    coords = folder[1]
    body, _ = route(ws, "/map", "?run=planted/run&focus=9&color=density")
    text = _json(body)
    assert 'id": "map-focus"' in text and "/feature/9?run=planted%2Frun" in text
    figure = next(c for c in _walk(body) if getattr(c, "id", None) == "map-graph").figure
    i = list(coords["feature"]).index(9)
    ring = figure["data"][2]
    assert ring["customdata"] == [9] and ring["x"] == [float(coords["x"][i])]
    x0, x1 = figure["layout"]["xaxis"]["range"]
    assert x0 < coords["x"][i] < x1 and x1 - x0 < 5  # zoomed in on one blob
    assert figure["data"][0]["marker"]["colorbar"]  # the colour from the URL


def _walk(component):
    yield component
    children = getattr(component, "children", None)
    for child in children if isinstance(children, list) else [children]:
        if hasattr(child, "to_plotly_json"):
            yield from _walk(child)


def test_missing_map_and_bad_input_get_messages(ws):
    text = _json(route(ws, "/map", "?run=bare/run")[0])
    assert "saewb geometry bare/run --only map" in text and "map-missing" in text
    text = _json(route(ws, "/map", "?run=no/such")[0])
    assert "There is no run named" in text
    for search, message in (
        ("&focus=abc", "is not a feature id"),
        ("&focus=15", "Feature 15 is not on this map"),
        ("&focus=99", "features 0..15"),
        ("&color=rainbow", "Cannot colour this map by 'rainbow'"),
    ):
        text = _json(route(ws, "/map", "?run=planted/run" + search)[0])
        assert message in text and "map-graph" in text, search  # a message, and still the map
    text = _json(route(ws, "/map", "?run=nostore/run&color=search")[0])
    assert "Cannot colour" in text and "map-graph" in text  # no store: no labels, still a map
    assert "bare/run" not in _json(route(ws, "/map", "")[0])  # the run list: runs with a map


# -- a real browser ------------------------------------------------------------------------------


@pytest.fixture
def duo(dash_duo, ws):
    return serve_in_browser(dash_duo, ws)


def _open_map(duo, search: str = ""):
    duo.driver.get(duo.server_url + "/map?run=planted/run" + search)
    duo.wait_for_element("#map-graph .nsewdrag")
    duo.wait_for_element("#map-graph canvas")


def _pixel(duo, x: float, y: float) -> tuple[float, float]:
    """Page pixels of data coordinates on the map, from plotly's own axes."""
    return duo.driver.execute_script(
        """const gd = document.querySelector('#map-graph .js-plotly-plot');
        const r = gd.getBoundingClientRect(), xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
        return [r.left + xa._offset + xa.d2p(arguments[0]), r.top + ya._offset + ya.d2p(arguments[1])];""",
        x,
        y,
    )


def _mouse(duo):
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    return ActionBuilder(duo.driver)


@browser_only
def test_browser_hover_and_click_a_point_opens_its_feature(duo, ws, folder):
    coords = folder[1]
    _open_map(duo)
    i = list(coords["feature"]).index(3)
    px, py = _pixel(duo, float(coords["x"][i]), float(coords["y"][i]))
    actions = _mouse(duo)
    actions.pointer_action.move_to_location(int(px), int(py))
    actions.perform()
    label = ws.store(PLANTED).feature(3)["label"]
    duo.wait_for_contains_text("#map-tooltip", f"#3 {label}".strip())  # hover: id and label
    actions = _mouse(duo)
    actions.pointer_action.click()
    actions.perform()
    duo.wait_for_contains_text("h2", "Feature 3")
    assert "/feature/3?run=planted%2Frun" in duo.driver.current_url
    assert_no_console_errors(duo)


@browser_only
def test_browser_lasso_lists_the_selected_blob(duo, folder):
    _open_map(duo)
    duo.wait_for_contains_text("#map-selected-count", "Lasso or box-select")
    duo.driver.execute_script("document.querySelector('#map-graph').scrollIntoView()")
    (_, x1), (y0, y1) = duo.driver.execute_script(
        "const l = document.querySelector('#map-graph .js-plotly-plot')._fullLayout;"
        "return [l.xaxis.range, l.yaxis.range];"
    )
    x1, y0, y1 = x1 - 0.02 * x1, y0 + 0.02 * (y1 - y0), y1 - 0.02 * (y1 - y0)
    corners = [(1.0, y0), (x1, y0), (x1, y1), (1.0, y1), (1.0, y0 + 0.01)]  # right of x = 1
    pixels = [_pixel(duo, x, y) for x, y in corners]
    actions = _mouse(duo)
    actions.pointer_action.move_to_location(int(pixels[0][0]), int(pixels[0][1])).pointer_down()
    for (ax, ay), (bx, by) in zip(pixels, pixels[1:]):
        for t in np.linspace(0.2, 1, 5):  # plotly's lasso follows the moves
            actions.pointer_action.move_to_location(
                int(ax + t * (bx - ax)), int(ay + t * (by - ay))
            )
    actions.pointer_action.pointer_up()
    actions.perform()
    duo.wait_for_contains_text("#map-selected-count", f"{len(B)} features selected")
    duo.wait_for_element("#map-selected-grid .ag-row a")
    links = [a.text for a in duo.driver.find_elements("css selector", "#map-selected-grid a")]
    assert sorted(map(int, links)) == B
    duo.driver.execute_script("window.scrollTo(0, 0)")
    screenshot(duo, "map")
    assert_no_console_errors(duo)


def test_a_malformed_click_gets_no_500(ws):
    from dashboard.app import create_app

    app = create_app(ws)
    client = app.server.test_client()
    (output,) = [k for k, v in app.callback_map.items()
                 if {"id": "map-graph", "property": "clickData"} in v["inputs"]]  # fmt: skip
    payload = {
        "output": output,
        "outputs": [{"id": "url", "property": "href@" + output.split("@")[1].rstrip(".")}],
        "inputs": [{"id": "map-graph", "property": "clickData", "value": {"points": 7}}],
        "changedPropIds": ["map-graph.clickData"],
        "state": [{"id": "map-run", "property": "data", "value": PLANTED}],
    }
    response = client.post("/_dash-update-component", json=payload)
    assert response.status_code in (200, 204), response.data[:300]
