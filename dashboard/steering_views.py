"""What the steering playground shows: a job's output (the two generations side by side with
their metrics, or the frontier of a sweep) and the run's saved steering outputs (frontiers, runs,
LF-Steering's before/after table). Figures are plain dicts."""

from __future__ import annotations

from dash import dcc, html

from dashboard.components import feature_href, fmt, table
from dashboard.data import Workspace

LF_METHODS = (("none", "unsteered"), ("lf", "LF-Steering"), ("caa", "CAA"), ("random", "random"))
LF_METRICS = (
    ("consistency", "consistency"),
    ("accuracy", "accuracy"),
    ("consistent_correct", "consistent and correct"),
)


def frontier_figure(curves: dict[str, dict], title: str) -> dict:
    """Target probability shift and share of generations with a target, each against the KL
    side effect, one trace per method: a plain figure dict."""
    data = []
    for i, (name, curve) in enumerate(curves.items()):
        color = f"hsl({(i * 137) % 360}, 60%, 45%)"
        hover = [f"{name}: strength {s:g}" for s in curve["strengths"]]
        for axis, key in (("", "target_shift"), ("2", "contains")):
            data.append(
                {
                    "type": "scatter",
                    "mode": "lines+markers",
                    "x": curve["kl"],
                    "y": curve[key],
                    "name": name,
                    "legendgroup": name,
                    "showlegend": axis == "",
                    "text": hover,
                    "xaxis": f"x{axis}",
                    "yaxis": f"y{axis}",
                    "marker": {"color": color},
                    "line": {"color": color},
                }
            )
    kl = {"title": {"text": "KL from the unsteered model on neutral text"}, "gridcolor": "#e5e7eb"}
    return {
        "data": data,
        "layout": {
            "title": {"text": title},
            "xaxis": {**kl, "domain": [0, 0.45]},
            "xaxis2": {**kl, "domain": [0.55, 1], "anchor": "y2"},
            "yaxis": {
                "title": {"text": "probability shift of the targets"},
                "gridcolor": "#e5e7eb",
            },
            "yaxis2": {
                "title": {"text": "share of generations with a target"},
                "anchor": "x2",
                "gridcolor": "#e5e7eb",
            },
            "height": 380,
            "margin": {"l": 60, "r": 20, "t": 50, "b": 50},
            "plot_bgcolor": "white",
        },
    }


def _matched_text(matched: dict | None) -> str:
    if not matched:
        return "Choose a saved vector as well to compare the features with CAA at matched KL."
    if not matched.get("kl"):
        return "The curves share no KL range; widen the strengths to compare them."
    means = ", ".join(f"{n} {v:+.4f}" for n, v in matched["mean_effect"].items())
    lo, hi = matched["kl"][0], matched["kl"][-1]
    return (
        f"At matched KL ({lo:.4f}..{hi:.4f}) the mean probability shift is {means}; larger: "
        f"{matched.get('better') or 'a tie'}."
    )


def _side_by_side(prompt: str, baseline: dict, steered: dict, prefix: str) -> html.Div:
    def column(name: str, part: dict) -> html.Div:
        return html.Div(
            [
                html.H4(name),
                html.Div(
                    [
                        html.Span(prompt, className="muted"),
                        html.Span(part["text"], id=f"{prefix}-{name}"),
                    ],
                    className="steer-text",
                ),
                html.Div(f"perplexity {fmt(part['perplexity'])}", className="muted"),
            ],
            className="steer-col",
        )

    return html.Div(
        [column("baseline", baseline), column("steered", steered)], className="steer-pair"
    )


def render(result: dict, prefix: str = "steer") -> html.Div:
    """A finished job's output (or a saved run's); `prefix` keeps element ids unique."""
    if result["kind"] == "sweep":
        rows = []
        for name, curve in result["curves"].items():
            for s, kl, dp, c, ex in zip(
                curve["strengths"],
                curve["kl"],
                curve["target_shift"],
                curve["contains"],
                curve["examples"],
            ):
                rows.append(
                    [
                        html.Td(name),
                        html.Td(f"{s:g}"),
                        html.Td(f"{kl:.4f}"),
                        html.Td(f"{dp:+.4f}"),
                        html.Td(f"{c:.2f}"),
                        html.Td(ex),
                    ]
                )
        title = f"Steering frontier: {', '.join(map(repr, result['targets']))} ({result['site']})"
        return html.Div(
            [
                dcc.Graph(
                    figure=frontier_figure(result["curves"], title),
                    id=f"{prefix}-frontier",
                    config={"displayModeBar": False},
                ),
                html.P(_matched_text(result["matched"]), id=f"{prefix}-matched"),
                table(
                    ["method", "strength", "KL", "p shift", "contains", "steered text"],
                    rows,
                    "grid small",
                ),
                html.P(f"KL on {result['neutral']}.", className="muted"),
            ]
        )
    metrics = result["metrics"]
    rows = [
        [html.Td("KL on neutral text"), html.Td(f"{metrics['kl']:.4f}")],
        [html.Td("perplexity, baseline"), html.Td(fmt(result["baseline"]["perplexity"]))],
        [html.Td("perplexity, steered"), html.Td(fmt(result["steered"]["perplexity"]))],
    ]
    if "target_shift" in metrics:
        words = ", ".join(map(repr, metrics["targets"]))
        rows.append(
            [html.Td(f"probability shift of {words}"), html.Td(f"{metrics['target_shift']:+.4f}")]
        )
    applied = [
        f"#{s['feature']} {s.get('mode', '')} {s['raw_value']:.4g} raw"
        for s in result["methods"].get("sae", [])
    ]
    applied += [f"{n} {s[0]['value']:.4g}" for n, s in result["methods"].items() if n != "sae"]
    return html.Div(
        [
            _side_by_side(result["prompt"], result["baseline"], result["steered"], prefix),
            table(["metric", "value"], rows, "grid small"),
            html.P(
                f"applied: {'; '.join(applied)} at {result['site']}; KL on {result['neutral']}; "
                "perplexity under the unsteered model (fluency).",
                className="muted",
            ),
        ],
        id=f"{prefix}-result",
    )


def _ci(row: dict, key: str) -> str:
    value, ci = row.get(key), row.get(f"{key}_ci") or [None, None]
    if value is None:
        return "–"
    return f"{value:.3f} [{fmt(ci[0], 2)}, {fmt(ci[1], 2)}]" if None not in ci else f"{value:.3f}"


def lf_view(run: str, record: dict) -> html.Div:
    """A saved LF-Steering result: each method before (unsteered) and after, on the eval split."""
    methods, rows = record.get("methods") or {}, []
    for key, label in LF_METHODS:
        row = methods.get(key)
        if not isinstance(row, dict):
            continue
        local = row.get("locality") or {}
        cells = [html.Td(label)]
        for metric, _ in LF_METRICS:
            delta = row.get(f"{metric}_delta")
            cells += [html.Td(_ci(row, metric)), html.Td("–" if delta is None else f"{delta:+.3f}")]
        cells += [html.Td(fmt(local.get("accuracy"))), html.Td(fmt(local.get("kl"), 2))]
        rows.append(cells)
    header = (
        ["method"] + [h for _, m in LF_METRICS for h in (m, "Δ")] + ["locality acc", "locality KL"]
    )
    search = record.get("search") or {}
    chosen, data = search.get("chosen") or {}, record.get("data") or {}
    latents = [
        dcc.Link(f"#{r['id']} ", href=feature_href(run, r["id"])) for r in record.get("latents", [])
    ]
    return html.Div(
        [
            html.P(
                f"{fmt(data.get('groups'))} paraphrase groups ({data.get('source', '?')}); "
                f"{len((record.get('split') or {}).get('eval', []))} eval groups; chosen on tune: "
                f"{fmt(chosen.get('latents'))} latents at strength {fmt(chosen.get('strength'))}.",
                className="muted",
            ),
            html.Div(["latents clamped: ", *latents] if latents else "no latents chosen"),
            table(header, rows, "grid small"),
            html.P(
                "Δ is the change from unsteered; brackets are bootstrap 95% intervals.",
                className="muted",
            ),
        ],
        id="steer-lf-table",
    )


def saved_view(ws: Workspace, run: str, kind: str, name: str | None):
    """One saved frontier, steering run or LF-Steering result, by its listed name."""
    if not name:
        return ""
    record = ws.steering_record(run, kind, name)
    if kind == "lf":
        return lf_view(run, record)
    if kind == "frontiers":
        targets = ", ".join(map(repr, record.get("targets", [])))
        return html.Div(
            [
                html.P(
                    f"prompt {record.get('prompt', '')!r}; KL on {record.get('neutral', '?')}",
                    className="muted",
                ),
                dcc.Graph(
                    figure=frontier_figure(record["curves"], f"Steering frontier: {targets}"),
                    id="steer-saved-frontier-figure",
                    config={"displayModeBar": False},
                ),
                html.P(_matched_text(record.get("matched"))),
            ]
        )
    settings = record.get("settings") or {}
    shown = {**record, "kind": "single", "methods": settings.get("methods") or {}}
    shown.setdefault("site", "?")
    shown.setdefault("neutral", "neutral text")
    sae = [{"mode": settings.get("mode", "add"), **e} for e in shown["methods"].get("sae", [])]
    shown["methods"] = {**shown["methods"], "sae": sae} if sae else shown["methods"]
    return render(shown, prefix="steer-saved-run")
