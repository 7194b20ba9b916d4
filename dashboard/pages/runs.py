"""The runs page: every run under the served folder, its training curves and its eval table."""

from __future__ import annotations

from dash import Input, Output, dcc, html

from dashboard.components import command, curves_figure, fmt, href, note, table
from dashboard.data import NotFound, Workspace

PATH = "/"
TITLE = "Runs"
EVAL_ROWS = (
    ("fvu", "FVU"),
    ("explained_variance", "explained variance"),
    ("l0", "L0"),
    ("dead_fraction", "dead fraction"),
    ("ce_loss_recovered", "CE loss recovered"),
    ("ce_loss_clean", "CE clean"),
    ("ce_loss_spliced", "CE with the SAE"),
    ("ce_loss_ablated", "CE with the site zeroed"),
    ("kl_div_spliced", "KL with the SAE"),
    ("n_tokens", "tokens evaluated"),
)


def _eval_value(evaluation: dict | None, key: str):
    """eval.json keeps metrics flat or in sections; find the key either way."""
    if not evaluation:
        return None
    if key in evaluation and not isinstance(evaluation[key], dict):
        return evaluation[key]
    for section in evaluation.values():
        if isinstance(section, dict) and key in section:
            return section[key]
    return None


def kind(s: dict) -> str:
    """What the run trained: 'jumprelu SAE', 'topk transcoder' ('–' where the files do not say)."""
    if not s.get("architecture"):
        return "transcoder" if s.get("target") else "–"
    return f"{s['architecture']} {'transcoder' if s.get('target') else 'SAE'}"


def where(s: dict) -> str:
    """The run's site, and for a transcoder the site it predicts: 'mlp_in.3 → mlp_out.3'."""
    return f"{s['site']} → {s['target']}" if s.get("target") else s["site"]


def _parts(s: dict) -> list:
    """What each missing part needs, in place of the part."""
    path = s["name"]
    missing = []
    if not s["has_sae"]:
        missing.append(html.Div(["no SAE yet: ", command("saewb train … --out RUN")]))
    if not s["log"]:
        missing.append(html.Div("no training log (train_log.jsonl)"))
    if not s["eval"]:
        missing.append(html.Div(["no eval: ", command(f"saewb eval {path}")]))
    if not s["has_store"]:
        missing.append(html.Div(["no feature store: ", command(f"saewb analyze {path}")]))
    return missing


def runs_table(summaries: list[dict]) -> html.Table:
    rows = []
    for s in summaries:
        name = s["name"]
        features = (
            dcc.Link("features", href=href("/features", name), className="run-features")
            if s["has_store"]
            else "–"
        )
        rows.append(
            [
                html.Td(html.B(name)),
                html.Td(s["model"]),
                html.Td(where(s), className="run-site"),
                html.Td(kind(s), className="run-kind"),
                html.Td(fmt(s["latents"])),
                html.Td(fmt(s["k"])),
                html.Td(fmt(s["tokens"])),
                html.Td(fmt(_eval_value(s["eval"], "fvu"))),
                html.Td(fmt(_eval_value(s["eval"], "ce_loss_recovered"))),
                html.Td(features),
                html.Td(_parts(s) or "complete", className="parts"),
            ]
        )
    header = ["run", "model", "site", "kind", "latents", "k", "tokens", "FVU", "CE rec.", "",
              "status"]  # fmt: skip
    return table(header, rows)


def layout(ws: Workspace, run: str | None = None, **_query) -> html.Div:
    names = list(ws.runs())
    if not names:
        return html.Div(
            [
                html.H2("Runs"),
                note(
                    [
                        f"No runs under {ws.root}. Train one with ",
                        command("saewb train --out checkpoints/RUN"),
                        " or run ",
                        command("saewb demo"),
                        ".",
                    ]
                ),
            ],
            className="page",
        )
    summaries = [ws.summary(name) for name in names]
    trained = [s["name"] for s in summaries if s["log"]]
    chosen = [run] if run in names else (trained or names)[:1]
    return html.Div(
        [
            html.H2("Runs"),
            html.P(f"{len(names)} under {ws.root}", className="muted"),
            runs_table(summaries),
            html.H3("Training curves and evaluation"),
            html.Label("Compare runs:"),
            dcc.Checklist(
                id="runs-compare",
                options=[{"label": n, "value": n} for n in names],
                value=chosen,
                inline=True,
            ),
            html.Div(id="runs-detail"),
        ],
        className="page",
    )


def compare(ws: Workspace, selected: list[str] | None) -> list:
    """Curves of the selected runs overlaid, and their eval tables side by side."""
    selected = [s for s in (selected or []) if isinstance(s, str)]
    if not selected:
        return [note("Tick one or more runs above to see their curves.")]
    summaries = []
    for name in selected:
        try:
            summaries.append(ws.summary(name))
        except NotFound as exc:
            return [note(str(exc), "error")]
    out = []
    if len(selected) == 2:
        link = href("/compare", None, a=selected[0], b=selected[1])
        out.append(
            dcc.Link("Compare these two runs' dictionaries", href=link, id="runs-to-compare")
        )
    logs = {s["name"]: s["log"] for s in summaries if s["log"]}
    if logs:
        out.append(dcc.Graph(id="runs-curves", figure=curves_figure(logs)))
    for s in summaries:
        if not s["log"]:
            out.append(note(f"{s['name']}: no train_log.jsonl; curves come from `saewb train`."))
    evaluated = [s for s in summaries if s["eval"]]
    if evaluated:
        rows = [[html.Td("kind")] + [html.Td(f"{kind(s)} at {where(s)}") for s in evaluated]]
        rows += [
            [html.Td(label)] + [html.Td(fmt(_eval_value(s["eval"], key))) for s in evaluated]
            for key, label in EVAL_ROWS
        ]
        out.append(table(["metric"] + [s["name"] for s in evaluated], rows))
    for s in summaries:
        if not s["eval"]:
            out.append(
                note(
                    [
                        f"{s['name']}: not evaluated yet; run ",
                        command(f"saewb eval {s['name']}"),
                        ".",
                    ]
                )
            )
    return out


def register(app, ws: Workspace, guard) -> None:
    app.callback(Output("runs-detail", "children"), Input("runs-compare", "value"))(
        guard(lambda selected: compare(ws, selected))
    )
