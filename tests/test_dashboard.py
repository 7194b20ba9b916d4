"""The dashboard: data access, page builders and callbacks as plain functions, then a real headless
Chromium (Debian's chromium + chromium-driver) driving the app against a fixture folder of runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from html import escape
from pathlib import Path

import pytest
from conftest import (
    assert_no_console_errors,
    browser_only,
    component_json,
    screenshot,
    screenshot_path,
    serve_in_browser,
)
from dash import no_update

from analysis.evaluation import evaluate
from analysis.run import open_run
from analysis.store.build import analyze
from dashboard import app as dash_app
from dashboard.app import create_app, guard, is_loopback, route
from dashboard.components import opacity, poll_job
from dashboard.data import NotFound, Workspace
from dashboard.pages import browser, feature, prompt, runs
from hooks.errors import UserError

PLANTED = "planted/run"


def _train(tiny_dir, text: Path, out: Path, k: int) -> None:
    from conftest import tiny_train_argv

    from saewb_cli import main

    assert main(tiny_train_argv(tiny_dir, text, out, k=k)) == 0


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer, tiny_dir):
    """planted/run: known features, a store and eval.json but no training log;
    sweep/k4, sweep/k8: trained for real (logs), with no eval or store yet."""
    from conftest import build_planted_run

    root = tmp_path_factory.mktemp("served")
    (root / "planted").mkdir()
    path, ids = build_planted_run(root / "planted", tokenizer)
    run = open_run(path)
    analyze(run, 100_000, batch_windows=4, progress=False)
    (path / "eval.json").write_text(json.dumps(evaluate(run, 1000, progress=False)))
    text = root / "sweep.txt"
    text.write_text("\n\n".join(f"Story {i}: the cat sat on the mat in Paris." for i in range(300)))
    for k in (4, 8):
        _train(tiny_dir, text, root / "sweep" / f"k{k}", k)
    return root, ids


@pytest.fixture(scope="module")
def ws(folder):
    return Workspace(folder[0])


_json = component_json


# -- data access -----------------------------------------------------------------------------


def test_runs_are_found_by_name_and_nothing_else_is_reachable(ws, folder, tmp_path):
    assert sorted(ws.runs()) == [PLANTED, "sweep/k4", "sweep/k8"]
    assert ws.path(PLANTED) == folder[0] / PLANTED
    outside = tmp_path / "outside-run"
    shutil.copytree(folder[0] / PLANTED, outside)
    for bad in ("../outside-run", str(outside), "/etc", "planted", "planted/run/features", ""):
        with pytest.raises(NotFound):
            ws.path(bad)
    os.symlink(outside, folder[0] / "link")  # a link out of the served folder is not followed
    try:
        ws._scanned = -1e9
        assert "link" not in ws.runs()
    finally:
        (folder[0] / "link").unlink()


def test_a_single_run_folder_is_served_as_itself(folder):
    one = Workspace(folder[0] / PLANTED)
    assert list(one.runs()) == ["run"] and one.name(None) == "run"
    with pytest.raises(UserError, match="not a folder"):
        Workspace(folder[0] / "missing")


def test_summaries_say_what_each_run_has(ws):
    planted, k4 = ws.summary(PLANTED), ws.summary("sweep/k4")
    assert planted["has_store"] and planted["eval"] and not planted["log"]
    assert planted["latents"] == 16 and planted["site"] == "resid_pre.0"
    assert k4["log"] and not k4["eval"] and not k4["has_store"] and k4["k"] == 4
    assert k4["tokens"] == k4["log"][-1]["tokens"] >= 4096


def test_a_runs_kind_is_shown_with_its_site(ws, tmp_path):
    """The runs page and the eval table say which kind of SAE a run is, and a transcoder's target."""
    info = dict(model="tiny", site="mlp_in.1", target="mlp_out.1", architecture="jumprelu")
    (tmp_path / "tc").mkdir()
    (tmp_path / "tc" / "run.json").write_text(json.dumps(info | dict(n_latents=64, k=4)))
    record = info | dict(metrics={"fvu": 0.25, "l0": 3.5})
    (tmp_path / "tc" / "eval.json").write_text(json.dumps(record))
    mine = Workspace(tmp_path)
    summary = mine.summary("tc")
    assert summary["architecture"] == "jumprelu" and summary["target"] == "mlp_out.1"
    page = _json(runs.layout(mine))
    assert "mlp_in.1 → mlp_out.1" in page and "jumprelu transcoder" in page
    detail = _json(runs.compare(mine, ["tc"]))
    assert "jumprelu transcoder at mlp_in.1 → mlp_out.1" in detail and "0.25" in detail
    # the served folder's runs: SAEs (the planted run's kind comes from its cfg.json)
    page = _json(runs.layout(ws))
    assert page.count("topk SAE") == 3 and "transcoder" not in page
    assert ws.summary("sweep/k4")["target"] is None


def test_a_damaged_log_line_is_skipped(ws, folder):
    log = folder[0] / "sweep/k8/train_log.jsonl"
    saved = log.read_text()
    try:
        log.write_text(saved + '{"tokens": 99999, "fv')  # a line being written
        assert len(ws.summary("sweep/k8")["log"]) == len(saved.splitlines())
    finally:
        log.write_text(saved)


# -- pages as plain functions ------------------------------------------------------------------


def test_runs_page_lists_runs_and_names_the_missing_commands(ws):
    page = _json(runs.layout(ws))
    for name in (PLANTED, "sweep/k4", "sweep/k8"):
        assert name in page
    assert "saewb eval sweep/k4" in page and "saewb analyze sweep/k8" in page
    assert "no training log" in page  # the planted run was never trained


def test_comparing_runs_overlays_their_curves(ws):
    out = runs.compare(ws, ["sweep/k4", "sweep/k8"])
    graph = next(c for c in out if getattr(c, "id", None) == "runs-curves")
    traces = graph.figure.data
    assert {t.name for t in traces} == {"sweep/k4", "sweep/k8"}
    assert len(traces) == 8  # 4 curves each
    k4_fvu = [t for t in traces if t.name == "sweep/k4" and t.yaxis == "y2"][0]
    log = ws.summary("sweep/k4")["log"]
    assert list(k4_fvu.y) == [r["fvu"] for r in log]
    text = "".join(_json(c) for c in out)
    assert "saewb eval sweep/k4" in text  # no eval yet: the page says how to get one
    assert "CE loss recovered" in _json(runs.compare(ws, [PLANTED])[-1])
    assert "no-such-run" in _json(runs.compare(ws, ["no-such-run"])[0])


def test_grid_queries_sort_filter_and_page_on_the_server(ws):
    store = ws.store(PLANTED)
    density = store._scalars["density"]
    request = {"startRow": 0, "endRow": 5, "sortModel": [{"colId": "density", "sort": "desc"}]}
    response, message = browser.rows_for_grid(ws, PLANTED, request)
    assert response["rowCount"] == store.n_latents and message == ""
    got = [r["density"] for r in response["rowData"]]
    assert got == sorted(density, reverse=True)[:5]
    page2, _ = browser.rows_for_grid(ws, PLANTED, {**request, "startRow": 5, "endRow": 10})
    assert [r["density"] for r in page2["rowData"]] == sorted(density, reverse=True)[5:10]
    flt = {"density": {"filterType": "number", "type": "greaterThan", "filter": 0.001}}
    response, _ = browser.rows_for_grid(
        ws, PLANTED, {"startRow": 0, "endRow": 50, "filterModel": flt}
    )
    assert response["rowCount"] == int((density >= 0.001).sum()) == 3


def test_text_search_finds_the_planted_features(ws, folder):
    paris = browser.search_filter("top_tokens", "Paris")
    response, _ = browser.rows_for_grid(
        ws, PLANTED, {"startRow": 0, "endRow": 10, "filterModel": paris}
    )
    assert response["rowCount"] == 1 and response["rowData"][0]["feature"].startswith("[0]")
    assert "Paris" in response["rowData"][0]["top_tokens"]
    promotes = browser.search_filter("top_logits", "dog")
    response, _ = browser.rows_for_grid(
        ws, PLANTED, {"startRow": 0, "endRow": 10, "filterModel": promotes}
    )
    assert response["rowData"][0]["feature"].startswith("[0]")  # latent 0 promotes ' dog'
    both = {**paris, **promotes}  # fires on Paris and promotes ' dog': latent 0 alone
    response, _ = browser.rows_for_grid(
        ws, PLANTED, {"startRow": 0, "endRow": 10, "filterModel": both}
    )
    assert response["rowCount"] == 1 and response["rowData"][0]["feature"].startswith("[0]")
    monday = browser.search_filter("top_tokens", "Monday")
    response, _ = browser.rows_for_grid(
        ws, PLANTED, {"startRow": 0, "endRow": 10, "filterModel": {**monday, **promotes}}
    )
    assert response["rowCount"] == 0  # no Monday latent has ' dog' among its top logits
    assert browser.search(ws, PLANTED, "id", "3")[2] == "/feature/3?run=planted%2Frun"
    for bad in ("x3", "99"):
        filters, message, url = browser.search(ws, PLANTED, "id", bad)
        assert filters is no_update and url is no_update and "feature" in _json(message).lower()


def test_bad_grid_filters_get_a_message_not_a_500(ws):
    wrapped = guard(lambda r: browser.rows_for_grid(ws, PLANTED, r), fallback=(browser.EMPTY, None))
    flt = {"density": {"filterType": "number", "type": "blank"}}
    response, message = wrapped({"startRow": 0, "endRow": 5, "filterModel": flt})
    assert response == browser.EMPTY and "not supported" in _json(message)


def test_feature_page_shows_the_store(ws, folder):
    ids = folder[1]
    store = ws.store(PLANTED)
    view = feature.feature_view(ws, PLANTED, 0)
    text = _json(view)
    record = store.feature(0)
    assert record["top_examples"][0]["act"] == pytest.approx(10.0)
    top = record["top_examples"][0]
    assert top["tokens"][top["index"]] == " Paris"
    assert "tok-mark" in text and escape("' Paris': 10") in text  # marked token, hover value
    assert "/feature/1?run=planted%2Frun" in text  # next
    assert "Activation density" in text and "Promotes" in text
    one = _json(feature.feature_view(ws, PLANTED, 1))
    assert "/feature/3?run=planted%2Frun" in one  # the planted nearest neighbour
    assert "/feature/0?run=planted%2Frun" in one  # previous
    assert ids["paris"] != ids["france"]


@pytest.mark.parametrize(
    "path, search, expected",
    [
        ("/feature/abc", "?run=planted/run", "is not a feature id"),
        ("/feature/-1", "?run=planted/run", "ids start at 0"),
        ("/feature/16", "?run=planted/run", "out of range"),
        ("/feature/1", "?run=../../etc", "There is no run named"),
        ("/feature/1", "", "Choose a run"),
        ("/features", "?run=sweep/k4", "no feature store yet"),
        ("/no/such/page", "", "There is no page"),
        ("/feature/1/extra", "", "There is no page"),
    ],
)
def test_bad_urls_get_a_friendly_page(ws, path, search, expected):
    body, title = route(ws, path, search)
    assert expected in _json(body)
    assert "saewb" in title


def test_callbacks_never_leak_a_traceback():
    def broken(_):
        raise RuntimeError("secret internals")

    message = guard(broken)(1)
    assert "went wrong" in _json(message) and "secret" not in _json(message)
    two = guard(broken, fallback=("kept", None))(1)
    assert two[0] == "kept" and "went wrong" in _json(two[1])


def test_try_your_own_text_runs_in_the_background(ws):
    job, poll_disabled, status, button_disabled = feature.submit(
        ws, {"run": PLANTED, "feature": 0}, "I saw Paris and France."
    )
    assert isinstance(job, str) and poll_disabled is False and button_disabled is True
    deadline = time.monotonic() + 120
    while True:
        output, poll_disabled, _, _ = poll_job(ws, job)
        if output is not no_update or time.monotonic() > deadline:
            break
        assert poll_disabled is False
        time.sleep(0.1)
    text = _json(output)
    assert poll_disabled is True and "probe-tokens" in text
    assert escape("' Paris': feature 0 = 10") in text
    assert escape("' France': feature 0 = 6") in text
    assert "top features: #0 10" in text  # hover lists the token's top features
    codes = ws.probe(PLANTED).encode("It is Monday")
    assert ws.probe(PLANTED) is ws.probe(PLANTED)  # loaded once
    assert codes.activation(1)[-1] == pytest.approx(4.0) and codes.activation(0)[-1] == 0.0
    empty = feature.submit(ws, {"run": PLANTED, "feature": 0}, "   ")
    assert empty[0] is no_update and "Type some text" in empty[2]
    expired = poll_job(ws, "job-does-not-exist")
    assert "expired" in _json(expired[0])


def test_opacity_ramp():
    assert opacity(0, 5) == 0 and opacity(5, 5) == pytest.approx(1.0)
    assert 0.05 < opacity(0.5, 5) < opacity(2.5, 5) < 1


def test_binds_to_loopback_unless_told(folder, monkeypatch):
    from saewb_cli import build_parser, main

    args = build_parser().parse_args(["dashboard", str(folder[0])])
    assert args.host == "127.0.0.1" and args.port == 8050
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    import waitress

    served = {}

    def development_server(self, **kw):
        raise AssertionError("served by Flask's development server")

    monkeypatch.setattr(dash_app.Dash, "run", development_server)
    monkeypatch.setattr(waitress, "serve", lambda app, **kw: served.update(app=app, **kw))
    assert main(["dashboard", str(folder[0]), "--port", "8123"]) == 0
    assert type(served.pop("app")).__name__ == "Flask"  # the Dash app's WSGI server, in waitress
    assert served == {"host": "127.0.0.1", "port": 8123, "threads": 8}
    assert main(["dashboard", str(folder[0] / "nope")]) == 2


def test_http_layer_answers_without_errors(ws):
    client = create_app(ws).server.test_client()
    for url in ("/", "/feature/0?run=planted/run", "/feature/%00", "/_dash-layout"):
        assert client.get(url).status_code == 200
    assert client.get("/assets/../data.py").status_code == 404


# -- a real browser ----------------------------------------------------------------------------


@pytest.fixture
def duo(dash_duo, folder):
    """A Workspace of its own per browser test: dash_duo's teardown kills every thread started
    while it served, the Jobs pool's workers included, which would leave later jobs queued."""
    return serve_in_browser(dash_duo, Workspace(folder[0]))


@browser_only
def test_browser_runs_page(duo):
    duo.wait_for_text_to_equal("h2", "Runs")
    duo.wait_for_element("#runs-curves")
    assert "saewb eval sweep/k4" in duo.find_element("table").text
    duo.wait_for_contains_text("#runs-curves", "sweep/k4")  # the first run with a log
    boxes = duo.driver.find_elements("css selector", "#runs-compare input")
    boxes[2].click()  # overlay sweep/k8
    duo.wait_for_contains_text("#runs-curves", "sweep/k8")
    assert "sweep/k4" in duo.find_element("#runs-curves").text
    screenshot(duo, "runs")
    assert_no_console_errors(duo)


@browser_only
def test_browser_search_open_feature_and_follow_a_neighbour(duo):
    duo.driver.get(duo.server_url + "/features?run=planted/run")
    duo.wait_for_element(".ag-row")
    search = duo.find_element("#search-text")
    search.send_keys("Paris")
    duo.find_element("#search-go").click()
    duo.wait_for_contains_text(".ag-center-cols-container", "France · Paris")
    rows = duo.driver.find_elements("css selector", ".ag-center-cols-container .ag-row")
    assert len(rows) == 1
    screenshot(duo, "browser")
    rows[0].find_element("css selector", "a").click()
    duo.wait_for_contains_text("h2", "Feature 0")
    marked = duo.driver.find_elements("css selector", "#top-examples .tok-mark")
    assert marked and marked[0].text == " Paris"
    assert marked[0].get_attribute("title") == "' Paris': 10"
    assert "rgb(52, 211, 153)" in marked[0].get_attribute("style")
    screenshot(duo, "feature")
    duo.find_element("#feature-next").click()
    duo.wait_for_contains_text("h2", "Feature 1")
    duo.find_element("#neighbours a").click()  # latent 1's nearest neighbour is latent 3
    duo.wait_for_contains_text("h2", "Feature 3")
    assert duo.driver.current_url.endswith("/feature/3?run=planted%2Frun")
    assert_no_console_errors(duo)


@browser_only
def test_browser_try_your_own_text(duo):
    duo.driver.get(duo.server_url + "/feature/0?run=planted/run")
    duo.wait_for_element("#probe-text").send_keys("We flew to Paris, then France.")
    duo.find_element("#probe-run").click()
    duo.wait_for_contains_text("#probe-summary", "feature 0 fires on 2", timeout=60)
    lit = [
        s
        for s in duo.driver.find_elements("css selector", "#probe-tokens span")
        if "rgb(52, 211, 153)" in (s.get_attribute("style") or "")
    ]
    assert [s.text for s in lit] == [" Paris"]
    assert "top features: #0 10" in lit[0].get_attribute("title")
    duo.find_element(".probe").screenshot(str(screenshot_path("try-text")))
    assert_no_console_errors(duo)


@browser_only
def test_browser_bad_url_is_a_friendly_page(duo):
    duo.driver.get(duo.server_url + "/feature/not-a-number?run=planted/run")
    duo.wait_for_contains_text("#not-found", "is not a feature id")
    duo.driver.get(duo.server_url + "/runs/../../etc/passwd")
    duo.wait_for_element("#not-found")
    assert_no_console_errors(duo)


def test_a_saelens_folders_site_is_read_from_its_metadata():
    from dashboard.data import _saelens_site

    assert _saelens_site({"metadata": {"hook_name": "blocks.2.hook_resid_post"}}) == "resid_post.2"
    ours = {"metadata": {"hook_name": "model.layers.2", "saewb_site": "resid_post.2"}}
    assert _saelens_site(ours) == "resid_post.2"
    assert _saelens_site({"hook_name": "model.layers.1"}) == "model.layers.1"
    assert _saelens_site({}) is None


# -- the prompt view ---------------------------------------------------------------------------


def _finish(ws, job):
    deadline = time.monotonic() + 120
    while True:
        done, result = ws.jobs.poll(job)
        if done:
            return result
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_prompt_view_ranks_the_features_that_fire_by_their_max(ws):
    job, poll_disabled, _, button_disabled = prompt.submit(
        ws, PLANTED, "We saw Paris, France, Monday"
    )
    assert poll_disabled is False and button_disabled is True
    output, codes = _finish(ws, job)
    text = _json(output)
    # planted: latent 0 fires 10 on ' Paris' and 6 on ' France', latents 1 and 2 fire 4 on ' Monday'
    order = [int(m) for m in re.findall(r'"children": "#(\d+)"', text)]
    assert order[:3] in ([0, 1, 2], [0, 2, 1]) and 3 not in order[:3]
    assert "/feature/0?run=planted%2Frun" in text and escape("' Paris': 10") in text
    paris = codes["tokens"].index(" Paris")
    assert codes["features"][paris][0] == [0, pytest.approx(10.0)]
    clicked = _json(prompt.token_features(codes, paris))
    assert "Features on token" in clicked and "/feature/0?run=planted%2Frun" in clicked
    comma = codes["tokens"].index(",")
    assert "No feature fires" in _json(prompt.token_features(codes, comma))
    assert prompt.token_features(codes, 10_000) is no_update


def test_prompt_view_refuses_bad_input_before_running(ws):
    assert "Paste some text" in prompt.submit(ws, PLANTED, "  ")[2]
    assert "too long" in prompt.submit(ws, PLANTED, "x" * 5000)[2]
    with pytest.raises(NotFound):
        prompt.submit(ws, "no-such-run", "Paris")
    body, _ = route(ws, "/prompt", "?run=../../etc")
    assert "There is no run named" in _json(body)


@browser_only
def test_browser_prompt_view_click_a_token_and_follow_a_feature(duo):
    duo.driver.get(duo.server_url + "/prompt?run=planted/run")
    duo.wait_for_element("#prompt-text").send_keys("We flew to Paris on Monday.")
    duo.find_element("#prompt-go").click()
    duo.wait_for_contains_text("#prompt-summary", "features fire", timeout=60)
    tokens = duo.driver.find_elements("css selector", "#prompt-tokens .tok-click")
    next(t for t in tokens if t.text == " Paris").click()
    duo.wait_for_contains_text("#prompt-token-features", "' Paris'")
    screenshot(duo, "prompt")
    duo.find_element("#prompt-token-features a").click()
    duo.wait_for_contains_text("h2", "Feature 0")
    assert_no_console_errors(duo)


def test_opening_a_store_does_not_hold_up_other_requests(folder, monkeypatch):
    """Opening a big store takes seconds; meanwhile other requests (the run list) still answer."""
    import threading

    from dashboard import data

    ws = Workspace(folder[0])
    opened, release = threading.Event(), threading.Event()
    real = data.FeatureStore

    def slow_store(path):
        opened.set()
        release.wait(10)
        return real(path)

    monkeypatch.setattr(data, "FeatureStore", slow_store)
    opener = threading.Thread(target=ws.store, args=(PLANTED,))
    opener.start()
    assert opened.wait(10)
    answered = threading.Event()
    other = threading.Thread(target=lambda: (ws._scan(), ws.runs(), answered.set()))
    ws._scanned = -1e9
    other.start()
    try:
        assert answered.wait(5), "the run list waited for a store to open"
    finally:
        release.set()
        opener.join()
        other.join()
    assert ws.store(PLANTED) is ws.store(PLANTED)


def test_runs_that_share_a_model_share_its_lock(folder):
    """Steering hooks the shared model: every run on it must take the one lock its live text
    takes, or a steering job on one run would steer another run's live text."""
    ws = Workspace(folder[0])
    k4, k8, planted = ws.probe("sweep/k4"), ws.probe("sweep/k8"), ws.probe(PLANTED)
    assert k4.loaded is k8.loaded and k4.lock is k8.lock
    assert planted.lock is not k4.lock


def test_cancelling_a_queued_job_means_it_never_starts():
    import threading

    from dashboard.data import Cancelled, Jobs

    jobs, gate, ran = Jobs(workers=1), threading.Event(), []
    first = jobs.submit(gate.wait, 10)
    queued = jobs.submit(lambda cancel: ran.append(1), cancellable=True)
    assert jobs.cancel(queued)
    gate.set()
    with pytest.raises(Cancelled, match="before it started"):
        jobs.poll(queued)
    deadline = time.monotonic() + 10
    while not jobs.poll(first)[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ran == [] and jobs.poll(first) == (True, True)


def test_a_runs_summary_is_read_again_only_when_its_files_change(folder, monkeypatch):
    from dashboard import data

    ws, reads = Workspace(folder[0]), []
    real = data.read_train_log
    monkeypatch.setattr(data, "read_train_log", lambda path: reads.append(path) or real(path))
    first = ws.summary("sweep/k4")
    assert ws.summary("sweep/k4") is first and len(reads) == 1  # pages ask for it per request
    log = folder[0] / "sweep/k4/train_log.jsonl"
    saved = log.read_text()
    try:
        log.write_text(saved + json.dumps({"tokens": 99_999}) + "\n")  # training goes on
        assert ws.summary("sweep/k4")["tokens"] == 99_999 and len(reads) == 2
    finally:
        log.write_text(saved)


def test_an_analysis_name_is_a_folder_name_not_a_path(ws):
    for bad in ("../../planted", "/etc", ".hidden", "galaxy/../lobes"):
        with pytest.raises(NotFound, match="has no"):
            ws.result(PLANTED, bad)
