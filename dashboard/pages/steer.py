"""The steering playground, /steer?run=NAME (&feature=ID presets a feature, &vector=NAME a saved
CAA vector; Run writes the whole form into the URL as q=PROMPT, features=ID:VALUE:MODE:UNITS,...,
vector, targets, strengths, max_new and mode=sweep, so a steering setup can be shared): a prompt generated with and without steering side by side, with KL and fluency; a
sweep that draws the steering frontier of the SAE features beside the CAA vector; and the run's
saved frontiers, steering runs and LF-Steering results. Every input is checked before the model
runs, and the work runs as a cancellable background job on the model the page loads once."""

from __future__ import annotations

import weakref
from collections import OrderedDict

from dash import Input, Output, State, dcc, html, no_update

from dashboard.components import command, fmt, note, table
from dashboard.data import Workspace
from dashboard.steering import (
    MAX_NEW,
    MAX_PROMPT_CHARS,
    MODES,
    POSITIONS,
    UNITS,
    VECTOR_MODES,
    check_request,
    steer_job,
    whole,
)
from dashboard.steering_views import render, saved_view
from hooks.errors import UserError

PATH = "/steer"
TITLE = "Steer"
POLL_MS = 300
ROWS = 4  # feature rows on the form
DEFAULT_PROMPT, DEFAULT_STRENGTHS = "The cat sat on the", "0,0.5,1,2,4"
# ws -> {job: its status dict}, which the job updates as it goes
STATUS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# -- the page ------------------------------------------------------------------------------------


def _row(i: int, feature, value: str, units: str, mode: str = "add") -> list:
    """The cells of feature row i (components.table wraps them in their <tr>)."""
    return [
        html.Td(
            dcc.Input(
                id=f"steer-feature-{i}",
                type="text",
                value=feature,
                placeholder="id",
                size="6",
                className="steer-short",
            )
        ),
        html.Td(
            dcc.Input(
                id=f"steer-value-{i}",
                type="text",
                value=value,
                placeholder="strength",
                size="8",
                className="steer-short",
            )
        ),
        html.Td(dcc.Dropdown(MODES, mode, id=f"steer-mode-{i}", clearable=False)),
        html.Td(dcc.Dropdown(UNITS, units, id=f"steer-units-{i}", clearable=False)),
    ]


def _saved(ws: Workspace, run: str, saved: dict) -> html.Div:
    parts = [html.H3("Saved steering outputs")]
    for kind, title, made_by in (
        (
            "frontiers",
            "Frontiers",
            f"saewb steer {run} --sweep --target ' word' --feature ID:VALUE",
        ),
        ("lf", "LF-Steering", f"saewb lf-steer {run}"),
        ("runs", "Steering runs", f"saewb steer {run} --prompt '...' --feature ID:VALUE"),
    ):
        names = saved[kind]
        parts.append(html.H4(title))
        if not names:
            parts.append(note(["None saved yet; make one with ", command(made_by), "."]))
            continue
        parts += [
            dcc.Dropdown(names, names[0], id=f"steer-saved-{kind}", clearable=False),
            html.Div(id=f"steer-saved-{kind}-view"),
        ]
    return html.Div(parts, className="steer-saved")


def parse_features(text: str | None) -> tuple[list[dict], list[str]]:
    """The URL's features=ID:VALUE:MODE:UNITS,... as form rows (mode and units optional), and a
    sentence for each part that is not one. The Run button checks the values themselves."""
    rows, bad = [], []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        fields = part.strip().split(":")
        mode = fields[2] if len(fields) > 2 else "add"
        units = fields[3] if len(fields) > 3 else None
        if len(fields) < 2 or len(fields) > 4 or mode not in MODES or units not in (None, *UNITS):
            bad.append(f"{part.strip()[:40]!r} in the URL is not ID:VALUE[:MODE[:UNITS]].")
            continue
        rows.append(dict(feature=fields[0], value=fields[1], mode=mode, units=units))
    return rows[:ROWS], bad


URL_JS = """function(_n, prompt, vector, targets, strengths, maxNew, sweep) {
    const rows = Array.from(arguments).slice(7);
    const params = new URLSearchParams(window.location.search);
    const features = [];
    for (let i = 0; i + 3 < rows.length; i += 4) {
        if (rows[i] && rows[i + 1]) { features.push(rows.slice(i, i + 4).join(':')); }
    }
    const set = (key, value) => value ? params.set(key, value) : params.delete(key);
    set('q', (prompt || '').slice(0, 200)); set('features', features.join(','));
    set('vector', vector); set('targets', targets); set('strengths', strengths);
    set('max_new', maxNew); set('mode', (sweep || []).length ? 'sweep' : '');
    params.delete('feature');
    window.history.replaceState(null, '', window.location.pathname + '?' + params.toString());
    return '';
}"""


def layout(
    ws: Workspace,
    run: str | None = None,
    feature=None,
    vector=None,
    q=None,
    features=None,
    targets=None,
    strengths=None,
    max_new=None,
    mode=None,
    **_query,
) -> html.Div:
    run = ws.name(run)
    summary, saved = ws.summary(run), ws.steering(run)
    notes = []
    if not summary["has_sae"]:
        return html.Div(
            [html.H2("Steering playground"), note(f"Run {run!r} has no SAE yet.", "error")],
            className="page",
        )
    if feature is not None:
        try:
            whole(feature, "The feature id in the URL", 0, int(summary["latents"] or 0) - 1)
        except UserError as exc:
            notes.append(note(str(exc), "error", id="steer-preset-error"))
            feature = None
    if vector is not None and vector not in saved["vectors"]:
        notes.append(note(f"Run {run!r} has no saved vector named {vector[:80]!r}.", "error"))
        vector = None
    units = "max" if summary["has_store"] else "raw"
    given, bad = parse_features(features)
    notes += [note(text, "error", id=f"steer-url-error-{i}") for i, text in enumerate(bad)]
    if not summary["has_store"]:
        notes.append(
            note(
                [
                    "Strengths in units of max activation need the feature store: ",
                    command(f"saewb analyze {run}"),
                    ".",
                ]
            )
        )
    if feature is not None and not given:
        given = [dict(feature=str(feature), value="1" if units == "max" else "10", mode="add")]
    given += [dict(feature="", value="", mode="add")] * (ROWS - len(given))
    rows = [
        _row(i, g["feature"], g["value"], g.get("units") or units, g["mode"])
        for i, g in enumerate(given)
    ]
    none = not saved["vectors"]  # the inputs stay on the page: the Run callback reads them
    vectors = [
        html.Td(
            dcc.Dropdown(
                saved["vectors"],
                vector,
                id="steer-vector",
                disabled=none,
                placeholder="none saved" if none else "none",
            )
        ),
        html.Td(
            dcc.Input(
                id="steer-vector-value",
                type="text",
                placeholder="its norm",
                size="8",
                className="steer-short",
            )
        ),
        html.Td(dcc.Dropdown(VECTOR_MODES, "add", id="steer-vector-mode", clearable=False)),
    ]
    if none:
        notes.append(
            note(
                [
                    "No saved CAA vector; make one with ",
                    command(f"saewb caa {run} --pairs PAIRS.jsonl"),
                    ".",
                ]
            )
        )
    form = html.Div(
        [
            html.Label("Prompt"),
            dcc.Textarea(
                id="steer-prompt",
                value=q or DEFAULT_PROMPT,
                maxLength=MAX_PROMPT_CHARS,
                style={"width": "100%", "height": "60px"},
            ),
            table(["feature", "strength", "mode", "units"], rows, "grid small steer-rows"),
            table(["CAA vector", "strength", "mode"], [vectors], "grid small"),
            html.Div(
                [
                    html.Label(
                        [
                            "max new tokens ",
                            dcc.Input(
                                id="steer-max-new",
                                type="number",
                                value=_number(max_new, 30),
                                min=1,
                                max=MAX_NEW,
                                size="5",
                            ),
                        ]
                    ),
                    dcc.RadioItems(
                        ["greedy", "sampled"], "greedy", id="steer-decoding", inline=True
                    ),
                    html.Label(
                        [
                            "seed ",
                            dcc.Input(id="steer-seed", type="number", value=0, min=0, size="5"),
                        ]
                    ),
                    html.Label(
                        [
                            "positions ",
                            dcc.Dropdown(POSITIONS, "all", id="steer-positions", clearable=False),
                        ]
                    ),
                ],
                className="steer-options",
            ),
            html.Label(
                [
                    "target words ",
                    dcc.Input(
                        id="steer-targets",
                        type="text",
                        value=targets or "",
                        placeholder="dog, cat",
                        className="steer-mid",
                    ),
                    html.Span(
                        " comma-separated; each gets a leading space unless quoted: 'dog'",
                        className="muted",
                    ),
                ]
            ),
            html.Div(
                [
                    dcc.Checklist(
                        [{"label": " sweep the strength (frontier)", "value": "sweep"}],
                        ["sweep"] if mode == "sweep" else [],
                        id="steer-sweep",
                        inline=True,
                    ),
                    dcc.Input(
                        id="steer-strengths",
                        type="text",
                        value=strengths or DEFAULT_STRENGTHS,
                        className="steer-mid",
                    ),
                    html.Span("multipliers of each strength", className="muted"),
                ],
                className="steer-options",
            ),
            html.Div(
                [
                    html.Button("Run", id="steer-run", n_clicks=0),
                    html.Button("Cancel", id="steer-cancel", n_clicks=0, disabled=True),
                    html.Span(id="steer-status", className="muted"),
                ]
            ),
            dcc.Store(id="steer-target", data={"run": run}),
            html.Div(id="steer-url-sink", style={"display": "none"}),
            dcc.Store(id="steer-job"),
            dcc.Interval(id="steer-poll", interval=POLL_MS, disabled=True),
        ],
        className="probe steer-form",
    )
    return html.Div(
        [
            html.H2("Steering playground"),
            html.Div(
                f"run {run} · {summary['site']} · {fmt(summary['latents'])} latents · "
                f"at most {MAX_NEW} new tokens",
                className="muted",
            ),
            *notes,
            html.Div(
                [
                    html.Div(form, className="main-col"),
                    html.Div(id="steer-output", className="side-col"),
                ],
                className="columns",
            ),
            _saved(ws, run, saved),
        ],
        className="page",
    )


def _number(value, default: int) -> int:
    """A whole number from the URL for a number box, else the default (Run checks the range)."""
    try:
        return int(str(value))
    except ValueError:
        return default


# -- callbacks -----------------------------------------------------------------------------------


def submit(ws: Workspace, target: dict, prompt, rows, *options, **named):
    """Check the input and start the job: (job, poll disabled?, status, run disabled?, cancel
    disabled?). Bad input raises UserError, which the guard shows as a message."""
    request = check_request(ws, target["run"], prompt, rows, *options, **named)
    status = {"text": "queued…"}
    job = ws.jobs.submit(steer_job, ws, request, status, cancellable=True)
    jobs = STATUS.setdefault(ws, OrderedDict())
    jobs[job] = status
    while len(jobs) > 64:
        jobs.popitem(last=False)
    return job, False, "Starting…", True, False


def poll(ws: Workspace, job: str | None):
    """(output, poll disabled?, status, run disabled?, cancel disabled?)."""
    if not job:
        return no_update, True, no_update, False, True
    try:
        done, result = ws.jobs.poll(job)
    except UserError as exc:
        return note(str(exc), "error", id="steer-error"), True, "", False, True
    if not done:
        status = STATUS.get(ws, {}).get(job, {})
        return no_update, False, status.get("text", "running…"), True, False
    return render(result), True, "", False, True


def cancel(ws: Workspace, job: str | None) -> str:
    if job and ws.jobs.cancel(job):
        return "Cancelling…"
    return "Nothing is running."


def register(app, ws: Workspace, guard) -> None:
    row_states = [
        State(f"steer-{part}-{i}", "value")
        for i in range(ROWS)
        for part in ("feature", "value", "mode", "units")
    ]
    option_ids = (
        "vector",
        "vector-value",
        "vector-mode",
        "max-new",
        "decoding",
        "seed",
        "positions",
        "targets",
        "sweep",
        "strengths",
    )

    def on_run(_n, target, prompt, *values):
        flat, options = values[: 4 * ROWS], dict(zip(option_ids, values[4 * ROWS :]))
        rows = [
            dict(zip(("feature", "value", "mode", "units"), flat[4 * i : 4 * i + 4]))
            for i in range(ROWS)
        ]
        options["sweep"] = "sweep" in (options["sweep"] or [])
        return submit(ws, target, prompt, rows, *options.values())

    app.callback(
        Output("steer-job", "data"),
        Output("steer-poll", "disabled", allow_duplicate=True),
        Output("steer-status", "children", allow_duplicate=True),
        Output("steer-run", "disabled", allow_duplicate=True),
        Output("steer-cancel", "disabled", allow_duplicate=True),
        Input("steer-run", "n_clicks"),
        State("steer-target", "data"),
        State("steer-prompt", "value"),
        *row_states,
        *[State(f"steer-{key}", "value") for key in option_ids],
        prevent_initial_call=True,
    )(guard(on_run, fallback=(no_update, True, None, False, True)))
    app.callback(
        Output("steer-output", "children"),
        Output("steer-poll", "disabled"),
        Output("steer-status", "children"),
        Output("steer-run", "disabled"),
        Output("steer-cancel", "disabled"),
        Input("steer-poll", "n_intervals"),
        State("steer-job", "data"),
        prevent_initial_call=True,
    )(guard(lambda _n, job: poll(ws, job), fallback=(None, True, "", False, True)))
    app.callback(
        Output("steer-status", "children", allow_duplicate=True),
        Input("steer-cancel", "n_clicks"),
        State("steer-job", "data"),
        prevent_initial_call=True,
    )(guard(lambda _n, job: cancel(ws, job)))
    app.clientside_callback(  # the form into the URL, without reloading the page
        URL_JS,
        Output("steer-url-sink", "children"),
        Input("steer-run", "n_clicks"),
        State("steer-prompt", "value"),
        *[State(f"steer-{key}", "value") for key in ("vector", "targets", "strengths", "max-new")],
        State("steer-sweep", "value"),
        *row_states,
        prevent_initial_call=True,
    )
    for kind in ("frontiers", "lf", "runs"):
        app.callback(
            Output(f"steer-saved-{kind}-view", "children"),
            Input(f"steer-saved-{kind}", "value"),
            State("steer-target", "data"),
        )(guard(lambda name, target, kind=kind: saved_view(ws, target["run"], kind, name)))
