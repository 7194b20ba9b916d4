"""The prompt view, /prompt?run=NAME: paste text, see every feature that fires on it ranked by its
max activation, each with the tokens it fires on shaded; click a token to list its features.
sae_vis's prompt-centric view. The model and SAE run in a background job, as on the feature page."""

from __future__ import annotations

from dash import ALL, Input, Output, State, ctx, dcc, html, no_update

from dashboard.components import (
    display_token,
    feature_href,
    fmt,
    note,
    poll_job,
    raw_html,
    start_text_job,
    table,
    token_html,
    token_strip,
)
from dashboard.data import NotFound, Workspace

PATH = "/prompt"
TITLE = "Prompt"
POLL_MS = 300
MAX_LISTED = 100  # features listed on the page; the count says how many fired in all


def layout(ws: Workspace, run: str | None = None, q: str | None = None, **_query) -> html.Div:
    name = ws.name(run)
    return html.Div(
        [
            html.H2(["Prompt view of ", html.Span(name, id="prompt-run-name")]),
            html.P(
                "Every feature that fires on your text, strongest first. Click a token to list "
                "its features.",
                className="muted",
            ),
            dcc.Textarea(
                id="prompt-text",
                value=q or "",
                placeholder="Paste some text…",
                style={"width": "100%", "height": "90px"},
            ),
            html.Button("Run", id="prompt-go", n_clicks=0),
            html.Span(id="prompt-status", className="muted"),
            dcc.Store(id="prompt-target", data=name),
            dcc.Store(id="prompt-job"),
            dcc.Store(id="prompt-codes"),
            dcc.Interval(id="prompt-poll", interval=POLL_MS, disabled=True),
            html.Div(id="prompt-output"),
        ],
        className="page",
    )


def _labels(ws: Workspace, run: str, features: list[int]) -> dict[int, str]:
    try:
        store = ws.store(run)
    except NotFound:
        return {}
    shown = [f for f in features if f < store.n_latents]
    return dict(zip(shown, store.labels(shown)))


def prompt_result(ws: Workspace, run: str, text: str) -> tuple[html.Div, dict]:
    """(the page's output, the per-token codes the token clicks read): every latent active on
    some token, ranked by its max over the text."""
    codes = ws.probe(run).encode(text)
    shown, quoted = token_html(codes.tokens)
    per_token = [codes.top_features(i, codes.acts.shape[1]) for i in range(len(codes.tokens))]
    peak: dict[int, float] = {}
    for features in per_token:
        for f, value in features:
            peak[f] = max(peak.get(f, 0.0), value)
    ranked = sorted(peak, key=lambda f: -peak[f])
    labels = _labels(ws, run, ranked[:MAX_LISTED])
    clickable = html.Div(
        [
            html.Span(
                shown_text,
                id={"type": "prompt-token", "index": i},
                n_clicks=0,
                className="tok tok-click" + ("" if codes.kept[i] else " tok-skipped"),
                title=codes.tokens[i] if codes.kept[i] else "not encoded (the SAE skips it)",
            )
            for i, shown_text in enumerate(display_token(t) for t in codes.tokens)
        ],
        className="strip",
        id="prompt-tokens",
    )
    rows = []
    for f in ranked[:MAX_LISTED]:
        acts = codes.activation(f)
        fires = sum(a > 0 for a in acts)
        rows.append(
            [
                html.Td(dcc.Link(f"#{f}", href=feature_href(run, f), className="feature-link")),
                html.Td(labels.get(f, ""), className="label"),
                html.Td(fmt(peak[f])),
                html.Td(str(fires)),
                html.Td(raw_html([token_strip(shown, quoted, acts, peak[f])])),
            ]
        )
    summary = f"{len(ranked)} features fire on {sum(codes.kept)} encoded tokens" + (
        f"; the top {MAX_LISTED} are listed." if len(ranked) > MAX_LISTED else "."
    )
    output = html.Div(
        [
            html.P(summary, id="prompt-summary"),
            html.H3("Tokens"),
            clickable,
            html.Div(id="prompt-token-features"),
            html.H3("Features, by max activation"),
            table(["feature", "label", "max", "tokens", "where it fires"], rows),
        ]
    )
    data = dict(run=run, tokens=codes.tokens, features=[[[f, v] for f, v in t] for t in per_token])
    return output, data


def token_features(data: dict | None, index) -> html.Div:
    """The features of one clicked token, strongest first, each linking to its page."""
    if not data or not isinstance(index, int) or not 0 <= index < len(data["tokens"]):
        return no_update
    token, features = data["tokens"][index], data["features"][index]
    if not features:
        return note(f"No feature fires on token {index} ({token!r}).")
    links = [
        html.Div(
            [
                dcc.Link(f"#{f}", href=feature_href(data["run"], f), className="feature-link"),
                html.Span(f" {v:.3g}", className="muted"),
            ]
        )
        for f, v in features
    ]
    return html.Div(
        [html.H4(f"Features on token {index} ({token!r})"), *links],
        className="token-features",
    )


def submit(ws: Workspace, run: str, text: str | None):
    """(job, poll disabled?, status, button disabled?): start the model run in the background."""
    return start_text_job(ws, run, text, "Paste some text first.", prompt_result, ws, run)


def register(app, ws: Workspace, guard) -> None:
    app.callback(
        Output("prompt-job", "data"),
        Output("prompt-poll", "disabled", allow_duplicate=True),
        Output("prompt-status", "children"),
        Output("prompt-go", "disabled", allow_duplicate=True),
        Input("prompt-go", "n_clicks"),
        State("prompt-target", "data"),
        State("prompt-text", "value"),
        prevent_initial_call=True,
    )(guard(lambda _n, run, text: submit(ws, run, text), fallback=(no_update, True, None, False)))

    def on_poll(_n, job):
        output, disabled, status, button = poll_job(ws, job)
        if isinstance(output, tuple):  # the finished job: the page part and the token codes
            return output[0], output[1], disabled, status, button
        return output, no_update, disabled, status, button

    app.callback(
        Output("prompt-output", "children"),
        Output("prompt-codes", "data"),
        Output("prompt-poll", "disabled"),
        Output("prompt-status", "children", allow_duplicate=True),
        Output("prompt-go", "disabled"),
        Input("prompt-poll", "n_intervals"),
        State("prompt-job", "data"),
        prevent_initial_call=True,
    )(guard(on_poll, fallback=(None, no_update, True, "", False)))

    def on_token(clicks, data):
        if not ctx.triggered_id or not any(clicks or []):
            return no_update
        return token_features(data, ctx.triggered_id.get("index"))

    app.callback(
        Output("prompt-token-features", "children"),
        Input({"type": "prompt-token", "index": ALL}, "n_clicks"),
        State("prompt-codes", "data"),
        prevent_initial_call=True,
    )(guard(on_token))
