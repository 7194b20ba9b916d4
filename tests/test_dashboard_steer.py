"""The steering playground on the planted run (site resid_pre.0, the token embedding; latent 0
writes e_0, which the head turns into +' dog' and -' cat'): the job against the analysis called
directly and against plain HF generation, every bad input refused before the model loads,
cancellation, sweeps, saved outputs, and the page in a real browser."""

from __future__ import annotations

import shutil
import threading
import time

import pyarrow.parquet as pq
import pytest
import torch
from conftest import (
    assert_no_console_errors,
    browser_only,
    component_json,
    screenshot,
    serve_in_browser,
)
from dash import no_update

from analysis.run import open_run
from analysis.steering.frontier import frontier
from analysis.steering.interventions import Intervention
from analysis.steering.steer_prompt import neutral_ids, steer_prompt
from analysis.store.build import analyze
from dashboard.app import guard, route
from dashboard.data import Cancelled, Workspace
from dashboard.pages import steer
from dashboard.steering import check_request, steer_job
from dashboard.steering_views import lf_view, render, saved_view
from hooks.errors import UserError
from hooks.paths import atomic_write_json

PLANTED, BARE = "planted/run", "bare/run"
PROMPT = "The cat sat on the"
DOWN = dict(feature="0", value="-30", mode="add", units="raw")  # planted: pushes ' cat' up


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    """planted/run with its store, a CAA vector, a saved frontier, run and LF-Steering result;
    bare/run: the same SAE and model with nothing else."""
    from conftest import build_planted_run

    from analysis.steering.caa import caa_vector, save_vector
    from saewb_cli import main

    root = tmp_path_factory.mktemp("served-steer")
    (root / "planted").mkdir()
    path, ids = build_planted_run(root / "planted", tokenizer, docs=400)
    shutil.copytree(path, root / BARE)
    run = open_run(path)
    analyze(run, 3000, batch_windows=4, progress=False)
    model = run.load_model(progress=False).model
    pairs = [(" Paris", " Monday"), (" France", " Monday")]  # planted: differ along e_0
    vector = caa_vector(model, tokenizer, "resid_pre.0", pairs)
    save_vector(path, "paris", vector, dict(site="resid_pre.0", method="mean", n_pairs=2))
    common = ["steer", str(path), "--prompt", PROMPT, "--max-new", "3", "--feature", "0:-30"]
    assert main([*common, "--name", "one"]) == 0
    sweep = ["--sweep", "--target", " cat", "--vector", "paris:-20", "--strengths", "0,1"]
    assert main([*common, *sweep, "--name", "saved"]) == 0
    atomic_write_json(path / "steering" / "lf_steering.json", LF_RECORD)
    return root, ids


# The shape `saewb lf-steer` writes (analysis/steering/lf.py), cut to what the page reads.
LF_RECORD = {
    "method": "lf-steering",
    "data": {"groups": 64, "source": "built-in"},
    "split": {"tune": list(range(32)), "eval": list(range(32))},
    "search": {"chosen": {"latents": 1, "strength": 0.5}},
    "latents": [{"id": 3, "score": 0.11}],
    "methods": {
        name: {
            "consistency": c, "consistency_ci": [c - 0.1, c + 0.05], "consistency_delta": c - 0.84375,
            "accuracy": 0.9375, "accuracy_ci": [0.9, 0.97], "accuracy_delta": 0.0,
            "consistent_correct": c, "consistent_correct_ci": [0.7, 0.9],
            "consistent_correct_delta": c - 0.84375,
            "locality": {"accuracy": 0.54, "kl": kl},
        }
        for name, c, kl in (("none", 0.84375, 0.0), ("lf", 0.90625, 8e-6), ("caa", 0.875, 0.0063))
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def ws(folder):
    return Workspace(folder[0])


_json = component_json


def _find(component, id: str):
    """The component with this id inside a page body."""
    if getattr(component, "id", None) == id:
        return component
    children = getattr(component, "children", None)
    for child in children if isinstance(children, list | tuple) else [children]:
        if hasattr(child, "to_plotly_json"):
            found = _find(child, id)
            if found is not None:
                return found
    return None


class Forwards:
    """Counts forwards of a model; `action(count)`, if set, runs before each one."""

    def __init__(self, model):
        self.n, self.action = 0, None
        self.handle = model.register_forward_pre_hook(self.hook)

    def hook(self, *_):
        self.n += 1
        if self.action is not None:
            self.action(self.n)


@pytest.fixture
def forwards(ws):
    counter = Forwards(ws.probe(PLANTED).loaded.model)
    yield counter
    counter.handle.remove()


@pytest.fixture
def browser_ws(folder):
    """A Workspace of its own for each browser test: dash_duo's teardown kills every thread
    started while it served, the Jobs pool's workers included."""
    return Workspace(folder[0])


# -- the job against the analysis --------------------------------------------------------------


def test_a_strong_add_changes_the_text_and_the_job_is_steer_prompt(ws, folder):
    request = check_request(ws, PLANTED, PROMPT, [DOWN], max_new=6, targets="cat")
    result = steer_job(ws, request, {}, threading.Event())
    probe = ws.probe(PLANTED)
    model, tok = probe.loaded.model, probe.loaded.tokenizer
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():  # the baseline is plain HF greedy decoding, no hook anywhere
        plain = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert result["baseline"]["text"] == tok.decode(plain[0, ids.shape[1] :])
    assert result["steered"]["text"] != result["baseline"]["text"]
    assert result["steered"]["text"].split() == ["cat"] * 6  # planted: -e_0 is ' cat'
    assert result["metrics"]["target_shift"] > 0.5 and result["metrics"]["kl"] > 0
    neutral, where = neutral_ids(open_run(folder[0] / PLANTED), tok)
    assert result["neutral"] == where == "4 held-out windows"
    direct = steer_prompt(model, tok, probe.sae, "resid_pre.0",
                          [Intervention("add", feature=0, value=-30.0)], PROMPT, neutral,
                          [" cat"], max_new=6)  # fmt: skip
    for part in ("baseline", "steered"):
        assert result[part]["text"] == direct[part]["text"]
        assert result[part]["perplexity"] == pytest.approx(direct[part]["perplexity"], rel=1e-5)
    for key in ("kl", "target_shift"):
        assert result["metrics"][key] == pytest.approx(direct["metrics"][key], rel=1e-5)
    shown = _json(render(result))
    assert result["steered"]["text"] in shown and "steer-baseline" in shown


def test_units_of_max_activation_use_the_store(ws, folder):
    top = pq.read_table(folder[0] / PLANTED / "features" / "features.parquet").column("max_act")
    sae = ws.probe(PLANTED).sae  # planted: unit decoder rows, input_scale 1
    expect = -0.5 * float(top[0].as_py()) * float(sae.W_dec[0].detach().norm() / sae.input_scale)
    row = dict(DOWN, value="-0.5", units="max")
    request = check_request(ws, PLANTED, PROMPT, [row], max_new=2)
    result = steer_job(ws, request, {}, None)
    assert result["methods"]["sae"][0]["raw_value"] == pytest.approx(expect)
    assert expect == pytest.approx(-5.0, rel=1e-3)  # planted: ' Paris' fires latent 0 at 10


def test_the_callbacks_run_it_in_the_background_and_report_progress(ws):
    rows = [DOWN] + [dict(feature="", value="", mode="add", units="raw")] * 3
    job, poll_off, _, run_off, cancel_off = steer.submit(ws, {"run": PLANTED}, PROMPT, rows,
                                                         None, None, "add", 5)  # fmt: skip
    assert poll_off is False and run_off is True and cancel_off is False
    seen, deadline = set(), time.monotonic() + 120
    while True:
        output, poll_off, status, run_off, cancel_off = steer.poll(ws, job)
        if output is not no_update or time.monotonic() > deadline:
            break
        seen.add(status)
        time.sleep(0.05)
    assert poll_off and not run_off and cancel_off
    assert " cat cat cat cat cat" in _json(output)
    assert all(isinstance(s, str) for s in seen)
    assert "Nothing is running" in steer.cancel(ws, job)  # finished: nothing to cancel


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(rows=[dict(DOWN, feature="16")]), "feature id of feature row 1 must be a whole number from 0 to 15"),
        (dict(rows=[dict(DOWN, feature="x")]), "whole number from 0 to 15, got 'x'"),
        (dict(rows=[dict(DOWN, feature="1.5")]), "got '1.5'"),
        (dict(rows=[dict(DOWN, value="nan")]), "strength of feature row 1 must be a finite number, got 'nan'"),
        (dict(rows=[dict(DOWN, value="inf")]), "finite number, got 'inf'"),
        (dict(rows=[dict(DOWN, value="")]), "finite number"),
        (dict(rows=[dict(DOWN, mode="boost")]), "Unknown mode of feature row 1 'boost'; use one of add, clamp"),
        (dict(rows=[dict(DOWN, units="km")]), "Unknown units of feature row 1 'km'"),
        (dict(rows=[]), "at least one feature id"),
        (dict(prompt="  "), "Type a prompt"),
        (dict(prompt="x" * 2001), "2,001 characters; the limit is 2,000"),
        (dict(max_new=201), "Max new tokens must be a whole number from 1 to 200"),
        (dict(max_new=0), "from 1 to 200, got '0'"),
        (dict(max_new=None), "Max new tokens must be"),
        (dict(decoding="beam"), "Unknown decoding 'beam'"),
        (dict(seed=-1), "The seed must be"),
        (dict(positions="middle"), "Unknown positions 'middle'"),
        (dict(vector="../../etc/passwd"), "no saved steering vector named '../../etc/passwd'"),
        (dict(vector="paris", vector_value="inf"), "vector's strength must be a finite number"),
        (dict(vector="paris", vector_mode="clamp"), "Unknown vector mode 'clamp'"),
        (dict(sweep=True), "A sweep needs target words"),
        (dict(sweep=True, targets="cat", strengths=",".join("1" * 13)), "at most 12 strengths, got 13"),
        (dict(sweep=True, targets="cat", strengths="0,x"), "Each sweep strength must be a finite number, got 'x'"),
        (dict(targets=",".join("abcdefghi")), "at most 8 target words"),
        (dict(run="../planted"), "There is no run named"),
        (dict(run=BARE, rows=[dict(DOWN, units="max")]), f"`saewb analyze {{root}}/{BARE}`"),
    ],
)  # fmt: skip
def test_bad_input_gets_one_sentence_before_the_model_loads(folder, change, needle):
    fresh = Workspace(folder[0])
    kwargs = dict(run=PLANTED, prompt=PROMPT, rows=[DOWN], max_new=5) | change
    with pytest.raises(UserError) as info:
        check_request(fresh, **kwargs)
    assert needle.format(root=folder[0]) in str(info.value)
    target, prompt, rows = {"run": kwargs.pop("run")}, kwargs.pop("prompt"), kwargs.pop("rows")
    submitted = guard(lambda: steer.submit(fresh, target, prompt, rows, **kwargs),
                      fallback=(no_update, True, None, False, True))()  # fmt: skip
    assert submitted[0] is no_update and needle.format(root=folder[0]) in _json(submitted[2])
    assert fresh._probes == {}  # no model was loaded for any of them


def test_long_prompts_are_refused_by_tokens_before_any_forward(ws, forwards):
    long = " cat" * 300  # 1,200 characters, 300 tokens
    request = check_request(ws, PLANTED, long, [DOWN], max_new=5)
    with pytest.raises(UserError, match="300 tokens; the limit is 256"):
        steer_job(ws, request, {}, None)
    near = check_request(ws, PLANTED, " cat" * 200, [DOWN], max_new=100)
    with pytest.raises(UserError, match="pass this model's 256 positions"):
        steer_job(ws, near, {}, None)
    assert forwards.n == 0


# -- cancelling ----------------------------------------------------------------------------------


def test_cancel_stops_the_job_before_and_while_it_generates(ws, forwards):
    request = check_request(ws, PLANTED, PROMPT, [DOWN], max_new=200)
    event = threading.Event()
    event.set()
    with pytest.raises(Cancelled):
        steer_job(ws, request, {}, event)
    assert forwards.n == 0
    event = threading.Event()
    forwards.action = lambda n: event.set() if n == 3 else None  # mid-generation
    with pytest.raises(Cancelled, match="Cancelled"):
        steer_job(ws, request, {}, event)
    assert forwards.n == 3  # the next token's check stopped it
    sweep = check_request(ws, PLANTED, PROMPT, [DOWN], max_new=200, targets="cat", sweep=True,
                          strengths="0,1,2,4")  # fmt: skip
    forwards.n, event = 0, threading.Event()
    with pytest.raises(Cancelled):
        steer_job(ws, sweep, {}, event)
    assert forwards.n == 3
    forwards.action = None
    assert steer_job(ws, check_request(ws, PLANTED, PROMPT, [DOWN], max_new=2), {}, None)


def test_cancel_through_the_jobs_stops_a_slow_generation(ws, forwards):
    forwards.action = lambda n: time.sleep(0.05)  # 200 tokens: 10 s uncancelled
    request = check_request(ws, PLANTED, PROMPT, [DOWN], max_new=200)
    status = {}
    job = ws.jobs.submit(steer_job, ws, request, status, cancellable=True)
    deadline = time.monotonic() + 60
    while "token" not in status.get("text", "") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "baseline generation: token" in status["text"]
    assert ws.jobs.cancel(job)
    deadline = time.monotonic() + 30  # generous: it stops within a token
    with pytest.raises(Cancelled):
        while not ws.jobs.poll(job)[0] and time.monotonic() < deadline:
            time.sleep(0.02)
    assert forwards.n < 150  # stopped well before its 200 tokens


def test_the_jobs_limit_caps_concurrent_requests(ws, forwards):
    gate = threading.Event()
    forwards.action = lambda n: gate.wait(30)  # every job holds until the gate opens
    submit = guard(lambda: steer.submit(ws, {"run": PLANTED}, PROMPT, [DOWN], max_new=200),
                   fallback=(no_update, True, None, False, True))  # fmt: skip
    jobs = [submit()[0] for _ in range(4)]
    assert all(isinstance(job, str) for job in jobs)
    refused = submit()
    assert refused[0] is no_update and "busy with 4 requests (the limit is 4)" in _json(refused[2])
    for job in jobs:
        assert steer.cancel(ws, job) == "Cancelling…"
    gate.set()
    deadline = time.monotonic() + 60
    for job in jobs:
        with pytest.raises(Cancelled):
            while not ws.jobs.poll(job)[0] and time.monotonic() < deadline:
                time.sleep(0.02)


# -- sweeps and saved outputs --------------------------------------------------------------------


def test_a_sweep_is_the_frontier_of_features_beside_the_vector(ws, folder):
    from analysis.steering.caa import load_vector

    request = check_request(ws, PLANTED, PROMPT, [DOWN], vector="paris", vector_value="-20",
                            max_new=3, targets="cat", sweep=True, strengths="0,0.5,1")  # fmt: skip
    result = steer_job(ws, request, {}, None)
    assert set(result["curves"]) == {"sae", "caa:paris"} and result["matched"] is not None
    probe = ws.probe(PLANTED)
    vector, _ = load_vector(folder[0] / PLANTED, "paris")
    neutral, _ = neutral_ids(open_run(folder[0] / PLANTED), probe.loaded.tokenizer)
    for name, edit in (("sae", dict(feature=0, value=-30.0)), ("caa:paris", dict(vector=vector, value=-20.0))):  # fmt: skip
        direct = frontier(probe.loaded.model, probe.loaded.tokenizer, "resid_pre.0",
                          lambda s, e=edit: [Intervention("add", **{**e, "value": e["value"] * s})],
                          [0, 0.5, 1], [" cat"], [PROMPT], neutral, probe.sae, max_new=3)  # fmt: skip
        got = result["curves"][name]
        assert got["kl"] == pytest.approx(direct["kl"], rel=1e-5, abs=1e-7)
        assert got["target_shift"] == pytest.approx(direct["target_shift"], rel=1e-5, abs=1e-7)
        assert got["examples"] == direct["examples"]
    assert result["curves"]["sae"]["kl"][0] == 0.0 and result["curves"]["sae"]["kl"][2] > 0
    figure = render(result).children[0].figure
    assert [t["x"] for t in figure["data"][::2]] == [c["kl"] for c in result["curves"].values()]
    assert figure["data"][1]["yaxis"] == "y2"


def test_saved_frontiers_runs_and_lf_results_are_shown(ws, folder):
    saved = ws.steering(PLANTED)
    assert saved["frontiers"] == ["saved"] and saved["runs"] == ["one"] and saved["lf"]
    record = ws.steering_record(PLANTED, "frontiers", "saved")
    view = saved_view(ws, PLANTED, "frontiers", "saved")
    figure = view.children[1].figure
    assert [t["x"] for t in figure["data"][::2]] == [c["kl"] for c in record["curves"].values()]
    one = ws.steering_record(PLANTED, "runs", "one")
    text = _json(saved_view(ws, PLANTED, "runs", "one"))
    assert one["steered"]["text"] in text and "steer-saved-run-steered" in text
    assert "#0 add -30 raw" in text
    table = _json(lf_view(PLANTED, LF_RECORD))
    assert "0.906 [0.81, 0.96]" in table and "+0.062" in table and "LF-Steering" in table
    assert "/feature/3?run=planted%2Frun" in table  # the clamped latent links to its page
    with pytest.raises(UserError, match="no saved steering frontiers named"):
        saved_view(ws, PLANTED, "frontiers", "../runs/one")


# -- the page ------------------------------------------------------------------------------------


def test_the_url_presets_a_feature_and_a_vector(ws):
    body, title = route(ws, "/steer", "?run=planted/run&feature=3&vector=paris")
    text = _json(body)
    assert title.startswith("Steer") and "Steering playground" in text
    assert _find(body, "steer-feature-0").value == "3" and _find(body, "steer-value-0").value
    assert _find(body, "steer-units-0").value == "max"  # the run has a store
    assert _find(body, "steer-feature-1").value == ""
    assert _find(body, "steer-vector").value == "paris" and "No saved CAA vector" not in text
    bad = _json(route(ws, "/steer", "?run=planted/run&feature=99&vector=nope")[0])
    assert "The feature id in the URL must be a whole number from 0 to 15" in bad
    assert "no saved vector named 'nope'" in bad
    bare_body = route(ws, "/steer", "?run=bare/run")[0]
    assert _find(bare_body, "steer-units-0").value == "raw"
    bare = _json(bare_body)
    assert f"saewb analyze {BARE}" in bare and "saewb caa bare/run" in bare
    assert "saewb lf-steer bare/run" in bare  # the missing saved outputs name their commands
    assert "There is no run named" in _json(route(ws, "/steer", "?run=../x")[0])


# -- a real browser ------------------------------------------------------------------------------


def _set(duo, selector: str, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = duo.find_element(selector)  # a React input: .clear() leaves its state as it was
    box.send_keys(Keys.END + Keys.BACKSPACE * len(box.get_attribute("value") or "") + text)


@browser_only
def test_browser_steer_from_the_feature_page(dash_duo, browser_ws):
    duo = serve_in_browser(dash_duo, browser_ws)
    duo.driver.get(duo.server_url + "/feature/0?run=planted/run")
    duo.wait_for_element("#feature-steer").click()
    duo.wait_for_text_to_equal("h2", "Steering playground")
    duo.wait_for_element("#steer-saved-frontiers-view .js-plotly-plot")  # callbacks are live
    assert duo.find_element("#steer-feature-0").get_attribute("value") == "0"
    _set(duo, "#steer-value-0", "-1")  # units of max activation: -10 along e_0
    _set(duo, "#steer-max-new", "8")
    _set(duo, "#steer-targets", "cat")
    duo.find_element("#steer-run").click()
    duo.wait_for_element("#steer-steered", timeout=60)
    baseline = duo.find_element("#steer-baseline").text
    steered = duo.find_element("#steer-steered").text
    assert steered != baseline and steered.split() == ["cat"] * 8
    assert "probability shift of ' cat'" in duo.find_element("#steer-result").text
    url = duo.driver.current_url  # Run wrote the form into the URL, which reopens it
    assert "features=0%3A-1%3Aadd%3Amax" in url and "targets=cat" in url and "max_new=8" in url
    duo.driver.execute_script("window.scrollTo(0, 0)")
    screenshot(duo, "steer")
    duo.driver.get(url)
    duo.wait_for_text_to_equal("h2", "Steering playground")
    assert duo.find_element("#steer-value-0").get_attribute("value") == "-1"
    assert duo.find_element("#steer-targets").get_attribute("value") == "cat"
    assert_no_console_errors(duo)


@browser_only
def test_browser_cancel_a_running_generation(dash_duo, browser_ws):
    forwards = Forwards(browser_ws.probe(PLANTED).loaded.model)
    forwards.action = lambda n: time.sleep(0.1)  # 200 tokens: 20 s uncancelled
    duo = serve_in_browser(dash_duo, browser_ws)
    duo.driver.get(duo.server_url + "/steer?run=planted/run&feature=0")
    duo.wait_for_element("#steer-saved-frontiers-view .js-plotly-plot")  # callbacks are live
    _set(duo, "#steer-max-new", "200")
    duo.find_element("#steer-run").click()
    duo.wait_for_contains_text("#steer-status", "token", timeout=30)
    duo.find_element("#steer-cancel").click()
    duo.wait_for_contains_text("#steer-error", "Cancelled", timeout=10)
    assert forwards.n < 150
    assert duo.find_element("#steer-run").is_enabled()
    assert_no_console_errors(duo)


def test_the_url_presets_the_whole_form(ws):
    search = ("?run=planted/run&q=Hello there&features=0:-1:add:max,3:2.5:clamp:raw"
              "&targets=cat&strengths=0,1&max_new=12&mode=sweep&vector=paris")  # fmt: skip
    body = route(ws, "/steer", search)[0]
    assert _find(body, "steer-prompt").value == "Hello there"
    assert [_find(body, f"steer-feature-{i}").value for i in range(3)] == ["0", "3", ""]
    assert [_find(body, f"steer-value-{i}").value for i in range(2)] == ["-1", "2.5"]
    assert (
        _find(body, "steer-mode-1").value == "clamp" and _find(body, "steer-units-1").value == "raw"
    )
    assert (
        _find(body, "steer-targets").value == "cat"
        and _find(body, "steer-strengths").value == "0,1"
    )
    assert _find(body, "steer-max-new").value == 12 and _find(body, "steer-sweep").value == [
        "sweep"
    ]
    assert _find(body, "steer-vector").value == "paris"
    bad = route(ws, "/steer", "?run=planted/run&features=0:1:explode,7")[0]
    text = _json(bad)
    assert "'0:1:explode' in the URL is not ID:VALUE" in text and "'7' in the URL" in text
    assert _find(bad, "steer-feature-0").value == ""  # nothing half-parsed reaches the form
