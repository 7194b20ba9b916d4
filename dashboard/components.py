"""Building blocks the pages share: highlighted token strips, notes, links and figures."""

from __future__ import annotations

import math
from html import escape
from urllib.parse import urlencode

import plotly.graph_objects as go
from dash import dcc, html, no_update
from plotly.subplots import make_subplots

from hooks.errors import UserError

EMERALD = "52,211,153"
CURVES = (("loss", "loss"), ("fvu", "FVU"), ("l0", "L0"), ("dead_frac", "dead fraction"))


def href(path: str, run: str | None = None, **query) -> str:
    """A dashboard URL with the run (and anything else) in the query string."""
    params = {"run": run, **query} if run else query
    params = {k: v for k, v in params.items() if v is not None}
    return path + ("?" + urlencode(params) if params else "")


def feature_href(run: str, feature: int) -> str:
    return href(f"/feature/{feature}", run)


def note(text: str | list, kind: str = "info", id: str | None = None) -> html.Div:
    """A boxed message: 'info' for parts that are missing, 'error' for bad input."""
    extra = {"id": id} if id else {}
    return html.Div(text, className=f"note note-{kind}", **extra)


MAX_TEXT_CHARS = 4000  # the longest text a page sends to the model


def start_text_job(ws, run: str, text: str | None, empty: str, fn, *args) -> tuple:
    """Check a user's text and start fn(*args, text) in the background, as (job, poll
    disabled?, status, button disabled?); `empty` is the status when there is no text."""
    if not text or not text.strip():
        return no_update, True, empty, False
    if len(text) > MAX_TEXT_CHARS:
        return no_update, True, f"That text is too long; keep it under {MAX_TEXT_CHARS:,} characters.", False  # fmt: skip
    ws.path(run)  # an unknown run is refused before any work starts
    return ws.jobs.submit(fn, *args, text), False, "Running the model…", True


def poll_job(ws, job: str | None) -> tuple:
    """A polled background job (Workspace.jobs) as (output, poll disabled?, status, button
    disabled?): no_update while it runs, its result once done, a message if it failed."""
    if not job:
        return no_update, True, no_update, False
    try:
        done, result = ws.jobs.poll(job)
    except UserError as exc:
        return note(str(exc), "error"), True, "", False
    if not done:
        return no_update, False, no_update, True
    return result, True, "", False


def command(text: str) -> html.Code:
    return html.Code(text, className="command")


def not_found(message: str) -> html.Div:
    return html.Div(
        [
            html.H2("Not found"),
            note(message, "error", id="not-found"),
            dcc.Link("Back to the runs", href="/"),
        ],
        className="page",
    )


def display_token(token: str) -> str:
    """Token text as shown: newlines and tabs visible, nothing collapsed."""
    return token.replace("\n", "↵").replace("\t", "→").replace("\r", "")


def opacity(value: float, top: float) -> float:
    """Neuronpedia's ramp: faint for small activations, full at the list's maximum."""
    if value <= 0 or top <= 0:
        return 0.0
    r = min(value / top, 1.0)
    return 0.05 + 0.95 * math.log10(1 + 9 * r)


def token_html(tokens: list[str]) -> tuple[list[str], list[str]]:
    """(shown, quoted): each token escaped for HTML as displayed, and as repr() for hover
    titles. Computed once per vocabulary; pages index these lists by token id."""
    shown = [display_token(t) for t in tokens]
    return [escape(t) for t in shown], [escape(repr(t)) for t in shown]


def token_strip(
    shown: list[str],
    quoted: list[str],
    acts: list[float],
    top: float,
    mark: int | None = None,
    hover: list[str] | None = None,
) -> str:
    """One line of text as HTML, each active token shaded by its activation. `shown`/`quoted`
    are the tokens from token_html. Hovering a token shows its value (or escaped `hover[i]`);
    `mark` outlines the token the example is about. Runs of inactive tokens share one span.
    Plain strings, not Dash components: a feature page holds ~70 such lines, and building them
    as components costs ~10x more server time."""
    parts, plain = ['<div class="strip">'], []
    for i, value in enumerate(acts):
        if value <= 0 and i != mark and hover is None:
            plain.append(shown[i])
            continue
        if plain:
            parts.append(f"<span>{''.join(plain)}</span>")
            plain.clear()
        title = hover[i] if hover is not None else f"{quoted[i]}: {value:.3g}"
        cls = "tok tok-mark" if i == mark else ("tok tok-on" if value > 0 else "tok")
        shade = (
            f' style="background:rgba({EMERALD},{opacity(value, top):.3f})"' if value > 0 else ""
        )
        parts.append(f'<span class="{cls}" title="{title}"{shade}>{shown[i]}</span>')
    if plain:
        parts.append(f"<span>{''.join(plain)}</span>")
    parts.append("</div>")
    return "".join(parts)


def raw_html(fragments: list[str], id: str | None = None) -> dcc.Markdown:
    """Trusted HTML built by this module (all text escaped), shown as one block. Wrapped in a
    single <div> without blank lines, so Markdown leaves its contents alone."""
    extra = {"id": id} if id is not None else {}
    body = "<div>" + "".join(fragments).replace("\n", "&#10;") + "</div>"  # no blank lines
    return dcc.Markdown(body, dangerously_allow_html=True, className="raw", **extra)


def curves_figure(logs: dict[str, list[dict]]) -> go.Figure:
    """Loss, FVU, L0 and dead fraction against tokens, one colour per run."""
    fig = make_subplots(rows=2, cols=2, subplot_titles=[title for _, title in CURVES])
    palette = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"]
    for i, (run, records) in enumerate(logs.items()):
        color = palette[i % len(palette)]
        tokens = [r["tokens"] for r in records]
        for j, (key, _) in enumerate(CURVES):
            fig.add_trace(
                go.Scatter(
                    x=tokens,
                    y=[r.get(key) for r in records],
                    name=run,
                    legendgroup=run,
                    showlegend=j == 0,
                    mode="lines",
                    line={"color": color},
                ),
                row=j // 2 + 1,
                col=j % 2 + 1,
            )
    fig.update_xaxes(title_text="tokens")
    fig.update_layout(height=520, margin=dict(l=40, r=20, t=40, b=40), template="plotly_white")
    return fig


def histogram_figure(edges: list[float], counts: list[int], density: float) -> dict:
    """Non-zero activations of one latent (the store's bins). A plain figure dict: plotly's
    graph objects validate and deep-copy their template, ~20x the cost of this whole page."""
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    axis = {"gridcolor": "#e5e7eb", "zeroline": False}
    return {
        "data": [
            {"type": "bar", "x": centres, "y": counts, "width": widths, "name": "tokens",
             "marker": {"color": f"rgb({EMERALD})"}}
        ],
        "layout": {
            "title": {"text": f"Activation density {100 * density:.3g}%"},
            "xaxis": {**axis, "title": {"text": "activation"}},
            "yaxis": {**axis, "title": {"text": "tokens"}},
            "height": 260,
            "margin": {"l": 40, "r": 10, "t": 40, "b": 40},
            "plot_bgcolor": "white",
            "bargap": 0,
        },
    }  # fmt: skip


def table(header: list[str], rows: list[list], className: str = "grid") -> html.Table:
    return html.Table(
        [html.Thead(html.Tr([html.Th(h) for h in header])), html.Tbody([html.Tr(r) for r in rows])],
        className=className,
    )


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}g}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)
