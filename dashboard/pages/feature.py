"""The feature page, /feature/<id>?run=NAME: everything the store holds about one latent, and a
box to run the model and SAE on your own text."""

from __future__ import annotations

from html import escape

from dash import Input, Output, State, dcc, html, no_update

from dashboard.components import (
    feature_href,
    fmt,
    histogram_figure,
    href,
    not_found,
    note,
    poll_job,
    raw_html,
    start_text_job,
    table,
    token_html,
    token_strip,
)
from dashboard.data import NotFound, Workspace

PATH_TEMPLATE = "/feature/<feature_id>"
TITLE = "Feature"
POLL_MS = 300


def parse_feature_id(feature_id) -> int:
    try:
        value = int(str(feature_id))
    except ValueError:
        raise NotFound(f"{str(feature_id)[:40]!r} is not a feature id (a whole number).") from None
    if value < 0:
        raise NotFound(f"Feature {value} does not exist; ids start at 0.")
    return value


def _examples(examples: list[dict], top: float, id: str, vocab: tuple) -> dcc.Markdown:
    """Example lines: the example token's activation, then its highlighted context."""
    shown, quoted = vocab
    lines = []
    for ex in examples:
        ids = ex["token_ids"]
        strip = token_strip([shown[t] for t in ids], [quoted[t] for t in ids], ex["acts"], top,
                            mark=ex["index"])  # fmt: skip
        lines.append(
            f'<div class="example"><span class="ex-act">{ex["act"]:.3g}</span>{strip}</div>'
        )
    return raw_html(lines, id=id)


def _feature_links(run: str, items: list[dict], value_key: str, value_name: str) -> list:
    if not items:
        return [html.Div("none", className="muted")]
    return [
        html.Div(
            [
                dcc.Link(
                    f"#{it['feature']}",
                    href=feature_href(run, it["feature"]),
                    className="feature-link",
                ),
                html.Span(f" {it['label'] or ''} ", className="label"),
                html.Span(f"{value_name} {it[value_key]:.2f}", className="muted"),
            ]
        )
        for it in items
    ]


def _logit_table(tokens: list[dict], title: str) -> html.Div:
    rows = [[html.Td(repr(t["token"])), html.Td(f"{t['value']:+.3f}")] for t in tokens]
    return html.Div([html.H4(title), table(["token", "effect"], rows, "grid small")])


def feature_view(ws: Workspace, run: str, feature: int) -> html.Div:
    """The page body; every number comes from the store, nothing is recomputed here."""
    store = ws.store(run)
    if feature >= store.n_latents:
        raise NotFound(
            f"Feature {feature} is out of range; this SAE has features 0..{store.n_latents - 1}."
        )
    f = store.feature(feature)
    top = f["max_act"]
    vocab = ws.token_html(run)
    nav = html.Div(
        [
            dcc.Link("← previous", href=feature_href(run, feature - 1), id="feature-prev")
            if feature > 0
            else html.Span(""),
            dcc.Link("all features", href=href("/features", run)),
            dcc.Link("next →", href=feature_href(run, feature + 1), id="feature-next")
            if feature + 1 < store.n_latents
            else html.Span(""),
            dcc.Link("on the map", href=href("/map", run, focus=feature), id="feature-on-map"),
            dcc.Link(
                "steer with this feature",
                href=href("/steer", run, feature=feature),
                id="feature-steer",
            ),  # fmt: skip
        ],
        className="feature-nav",
    )
    stats = html.P(
        f"density {100 * f['density']:.4g}% ({f['n_active']:,} of "
        f"{store.manifest['n_tokens']:,} held-out tokens) · max {fmt(f['max_act'])} · "
        f"mean {fmt(f['mean_act'])}",
        className="muted",
    )
    if f["n_active"] == 0:
        body = [note("This latent never fired on the held-out text: it has no examples.")]
    else:
        intervals = []
        for i, b in enumerate(f["intervals"]):
            if not b["examples"]:
                continue  # an empty bin between the latent's typical and top values
            intervals.append(
                html.Div(
                    [
                        html.H4(
                            f"interval {b['lo']:.3g}–{b['hi']:.3g}: "
                            f"{100 * b['frac_active']:.3g}% of active tokens "
                            f"({100 * b['frac_all']:.3g}% of all)"
                        ),
                        _examples(b["examples"], top, f"interval-{i}", vocab),
                    ]
                )
            )
        body = [
            html.H3("Top activations"),
            _examples(f["top_examples"], top, "top-examples", vocab),
            html.H3("Interval samples"),
            html.Div(intervals, id="intervals"),
        ]
    logits = f["logits"]
    side = [
        dcc.Graph(
            figure=histogram_figure(
                f["histogram"]["edges"], f["histogram"]["counts"], f["density"]
            ),
            config={"displayModeBar": False},
        ),
        html.Div(
            [_logit_table(logits["top"], "Promotes"), _logit_table(logits["bottom"], "Suppresses")]
            if logits["top"]
            else [note("No logit effects: this site is not in the residual stream's basis.")],
            className="logits",
        ),
        html.H4("Nearest features (decoder cosine)"),
        html.Div(_feature_links(run, f["neighbors"], "cos", "cos"), id="neighbours"),
        html.H4("Co-occurring features"),
        html.Div(_feature_links(run, f["cooccurring"], "jaccard", "Jaccard"), id="cooccurring"),
    ]
    return html.Div(
        [
            nav,
            html.H2([f"Feature {feature} ", html.Span(f["label"], className="label")]),
            html.Div(f"run {run}", className="muted"),
            stats,
            html.Div(
                [
                    html.Div([try_text(run, feature)] + body, className="main-col"),
                    html.Div(side, className="side-col"),
                ],
                className="columns",
            ),
        ],
        className="page",
    )


def try_text(run: str, feature: int) -> html.Div:
    return html.Div(
        [
            html.H3("Try your own text"),
            dcc.Textarea(
                id="probe-text",
                placeholder="Type a sentence…",
                style={"width": "100%", "height": "70px"},
            ),
            html.Button("Run", id="probe-run", n_clicks=0),
            html.Span(id="probe-status", className="muted"),
            dcc.Store(id="probe-target", data={"run": run, "feature": feature}),
            dcc.Store(id="probe-job"),
            dcc.Interval(id="probe-poll", interval=POLL_MS, disabled=True),
            html.Div(id="probe-output"),
        ],
        className="probe",
    )


def layout(ws: Workspace, feature_id=None, run: str | None = None, **_query) -> html.Div:
    try:
        return feature_view(ws, ws.name(run), parse_feature_id(feature_id))
    except NotFound as exc:
        return not_found(str(exc))


def probe_result(ws: Workspace, run: str, feature: int, text: str) -> html.Div:
    """Highlight this feature on the user's tokens; hovering a token lists its top features."""
    codes = ws.probe(run).encode(text)
    acts = codes.activation(feature)
    hover = []
    for i, token in enumerate(codes.tokens):
        top = codes.top_features(i)
        listed = ", ".join(f"#{j} {v:.2f}" for j, v in top) or "none"
        shown = f"{token!r}: feature {feature} = {acts[i]:.3g}"
        hover.append(
            escape(shown + (f"\ntop features: {listed}" if codes.kept[i] else " (not encoded)"))
        )
    try:  # shade on the store's scale when there is one, so pages and live text agree
        store_max = ws.store(run).feature(feature)["max_act"]
    except NotFound:
        store_max = 0.0
    scale = max(store_max, max(acts), 1e-9)
    peak = max(range(len(acts)), key=lambda i: acts[i])
    summary = (
        f"feature {feature} fires on {sum(a > 0 for a in acts)} of {sum(codes.kept)} tokens"
        + (f", most on {codes.tokens[peak]!r} ({acts[peak]:.3g})" if acts[peak] > 0 else "")
    )
    top_rows = []
    for i in range(len(codes.tokens)):
        if codes.kept[i]:
            links = [
                dcc.Link(f"#{j} ({v:.2f}) ", href=feature_href(run, j))
                for j, v in codes.top_features(i, 3)
            ]
            top_rows.append([html.Td(repr(codes.tokens[i])), html.Td(links)])
    return html.Div(
        [
            html.P(summary, id="probe-summary"),
            raw_html(
                [token_strip(*token_html(codes.tokens), acts, scale, hover=hover)],
                id="probe-tokens",
            ),  # fmt: skip
            html.Details(
                [html.Summary("top features on each token"), table(["token", "top"], top_rows)]
            ),
        ]
    )


def submit(ws: Workspace, target: dict, text: str | None):
    """Start the model run in the background: (job, poll disabled?, status, button disabled?)."""
    run, feature = target["run"], int(target["feature"])
    return start_text_job(ws, run, text, "Type some text first.", probe_result, ws, run, feature)


def register(app, ws: Workspace, guard) -> None:
    app.callback(
        Output("probe-job", "data"),
        Output("probe-poll", "disabled", allow_duplicate=True),
        Output("probe-status", "children"),
        Output("probe-run", "disabled", allow_duplicate=True),
        Input("probe-run", "n_clicks"),
        State("probe-target", "data"),
        State("probe-text", "value"),
        prevent_initial_call=True,
    )(
        guard(
            lambda _n, target, text: submit(ws, target, text),
            fallback=(no_update, True, None, False),
        )
    )
    app.callback(
        Output("probe-output", "children"),
        Output("probe-poll", "disabled"),
        Output("probe-status", "children", allow_duplicate=True),
        Output("probe-run", "disabled"),
        Input("probe-poll", "n_intervals"),
        State("probe-job", "data"),
        prevent_initial_call=True,
    )(guard(lambda _n, job: poll_job(ws, job), fallback=(None, True, "", False)))
