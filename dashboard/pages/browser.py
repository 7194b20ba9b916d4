"""The feature browser: every latent of a run in a grid that the server pages, sorts and filters,
so a 32k-latent store never travels to the browser whole. Searching by text is a filter on the
'fires on' column (top examples) or the 'promotes' column (logit effects)."""

from __future__ import annotations

import dash_ag_grid as dag
from dash import Input, Output, State, dcc, html, no_update

from dashboard.components import command, feature_href, href, note
from dashboard.data import Workspace
from hooks.errors import UserError

PATH = "/features"
TITLE = "Features"
BLOCK = 100  # rows per server request
EMPTY = {"rowData": [], "rowCount": 0}
NUMERIC = {"feature", "density", "n_active", "mean_act", "max_act"}
SEARCH_MODES = {
    "id": "feature id",
    "top_tokens": "top examples contain",
    "top_logits": "promotes the token",
}

COLUMNS = [
    {
        "field": "feature",
        "headerName": "feature",
        "cellRenderer": "markdown",
        "maxWidth": 120,
        "filter": "agNumberColumnFilter",
    },
    {"field": "label", "headerName": "label", "filter": "agTextColumnFilter", "flex": 2},
    {
        "field": "density",
        "headerName": "density",
        "filter": "agNumberColumnFilter",
        "valueFormatter": {"function": "d3.format('.3~e')(params.value)"},
    },
    {
        "field": "max_act",
        "headerName": "max act",
        "filter": "agNumberColumnFilter",
        "valueFormatter": {"function": "d3.format('.3~g')(params.value)"},
    },
    {
        "field": "mean_act",
        "headerName": "mean act",
        "filter": "agNumberColumnFilter",
        "valueFormatter": {"function": "d3.format('.3~g')(params.value)"},
    },
    {
        "field": "top_tokens",
        "headerName": "fires on",
        "filter": "agTextColumnFilter",
        "sortable": False,
        "flex": 2,
    },
    {
        "field": "top_logits",
        "headerName": "promotes",
        "filter": "agTextColumnFilter",
        "sortable": False,
        "flex": 2,
    },
]
TEXT_FILTER = {"filterOptions": ["contains"], "maxNumConditions": 1}
for _col in COLUMNS:
    if _col["filter"] == "agTextColumnFilter":
        _col["filterParams"] = TEXT_FILTER


def layout(
    ws: Workspace, run: str | None = None, q: str | None = None, mode: str | None = None, **_query
) -> html.Div:
    if not run and len(ws.runs()) != 1:
        return html.Div([html.H2("Features"), pick_run(ws)], className="page")
    name = ws.name(run)
    store = ws.store(name)  # NotFound says which command builds it
    mode = mode if mode in SEARCH_MODES else "top_tokens"
    filters = search_filter(mode, q) if q else {}
    return html.Div(
        [
            html.H2(["Features of ", html.Span(name, id="browser-run")]),
            html.P(
                f"{store.n_latents:,} latents · {store.manifest['n_tokens']:,} held-out tokens · "
                f"{100 * store.manifest['dead_fraction']:.1f}% never fired",
                className="muted",
            ),
            html.Div(
                [
                    dcc.Input(
                        id="search-text",
                        type="text",
                        value=q or "",
                        debounce=True,
                        placeholder="Paris, or a feature id",
                    ),
                    dcc.RadioItems(
                        id="search-mode",
                        options=[{"label": v, "value": k} for k, v in SEARCH_MODES.items()],
                        value=mode,
                        inline=True,
                    ),
                    html.Button("Search", id="search-go", n_clicks=0),
                    html.Span(id="search-message"),
                ],
                className="search-row",
            ),
            html.Div(id="grid-message"),
            dcc.Store(id="browser-run-name", data=name),
            dag.AgGrid(
                id="feature-grid",
                rowModelType="infinite",
                columnDefs=COLUMNS,
                defaultColDef={
                    "sortable": True,
                    "resizable": True,
                    "floatingFilter": True,
                    "minWidth": 90,
                    "flex": 1,
                },
                dashGridOptions={
                    "cacheBlockSize": BLOCK,
                    "maxBlocksInCache": 20,
                    "rowHeight": 30,
                    "animateRows": False,
                },
                filterModel=filters,
                style={"height": "640px"},
                className="ag-theme-alpine",
            ),
        ],
        className="page",
    )


def search_filter(mode: str, text: str) -> dict:
    """The grid filter model that a search box entry stands for."""
    if mode == "id":
        return {"feature": {"filterType": "number", "type": "equals", "filter": text}}
    return {mode: {"filterType": "text", "type": "contains", "filter": text}}


def _bounds(f: dict) -> tuple[float | None, float | None]:
    """(lo, hi) of an ag-grid number filter; exclusive bounds are as good as inclusive here."""
    kind, value, to = f.get("type"), f.get("filter"), f.get("filterTo")
    value = None if value is None else float(value)
    if kind == "equals":
        return value, value
    if kind in ("greaterThan", "greaterThanOrEqual"):
        return value, None
    if kind in ("lessThan", "lessThanOrEqual"):
        return None, value
    if kind == "inRange":
        return value, None if to is None else float(to)
    raise UserError(f"The filter '{kind}' is not supported here; use =, >, < or a range.")


def store_query(store, request: dict) -> dict:
    """One block of rows for the grid's request (startRow, endRow, sortModel, filterModel)."""
    start = max(int(request.get("startRow") or 0), 0)
    end = max(int(request.get("endRow") or start + BLOCK), start)
    filters: dict = {}
    ids = None
    for column, f in (request.get("filterModel") or {}).items():
        if not isinstance(f, dict):
            continue
        if column in NUMERIC:
            filters[column] = _bounds(f)
        elif column == "label":
            filters["label"] = str(f.get("filter") or "")
        elif column in ("top_tokens", "top_logits"):
            search = store.search_tokens if column == "top_tokens" else store.search_logits
            found = [r["feature"] for r in search(str(f.get("filter") or ""), store.n_latents)]
            if ids is not None:  # both text filters: latents that pass both
                earlier = set(ids)
                found = [i for i in found if i in earlier]
            ids = found
        else:
            raise UserError(f"Cannot filter on the column {column!r}.")
    if ids is not None:
        filters["ids"] = ids
    sort_model = request.get("sortModel") or []
    if sort_model:
        first = sort_model[0]
        sort = ("-" if first.get("sort") == "desc" else "") + str(first.get("colId"))
    else:
        sort = None if ids is not None else "feature"  # search results: best match first
    page = store.table(start, min(end - start, 1000), sort, filters)
    return page


def rows_for_grid(ws: Workspace, run: str, request: dict | None):
    """(the grid's block of rows, a message for bad filters)."""
    if not request:
        return no_update, no_update
    page = store_query(ws.store(run), request)
    rows = []
    for r in page["rows"]:
        link = f"[{r['feature']}]({feature_href(run, r['feature'])})"
        rows.append(
            {
                **r,
                "feature": link,
                "top_tokens": " · ".join(t.strip() or repr(t) for t in r["top_tokens"]),
                "top_logits": " · ".join(t.strip() or repr(t) for t in r["top_logits"]),
            }
        )
    return {"rowData": rows, "rowCount": page["total"]}, ""


def search(ws: Workspace, run: str, mode: str, text: str | None):
    """Search box → grid filter (or, for an id, straight to that feature's page)."""
    text = (text or "").strip()
    if not text:
        return {}, "", no_update
    if mode == "id":
        try:
            feature = int(text)
        except ValueError:
            return (
                no_update,
                note(f"{text[:40]!r} is not a feature id (a whole number).", "error"),
                no_update,
            )
        store = ws.store(run)
        if not 0 <= feature < store.n_latents:
            return (
                no_update,
                note(
                    f"Feature {feature} is out of range; this SAE has 0..{store.n_latents - 1}.",
                    "error",
                ),
                no_update,
            )
        return no_update, "", feature_href(run, feature)
    return search_filter(mode, text), "", no_update


def register(app, ws: Workspace, guard) -> None:
    app.callback(
        Output("feature-grid", "getRowsResponse"),
        Output("grid-message", "children"),
        Input("feature-grid", "getRowsRequest"),
        State("browser-run-name", "data"),
    )(guard(lambda request, run: rows_for_grid(ws, run, request), fallback=(EMPTY, None)))

    def on_search(_clicks, _submit, mode, text, run):
        return search(ws, run, mode, text)

    app.callback(
        Output("feature-grid", "filterModel"),
        Output("search-message", "children"),
        Output("url", "href", allow_duplicate=True),
        Input("search-go", "n_clicks"),
        Input("search-text", "n_submit"),
        State("search-mode", "value"),
        State("search-text", "value"),
        State("browser-run-name", "data"),
        prevent_initial_call=True,
    )(guard(on_search, fallback=(no_update, None, no_update)))


def pick_run(ws: Workspace) -> html.Div:
    """The browser without a run in the URL, when the folder has several."""
    names = [n for n in ws.runs() if ws.summary(n)["has_store"]]
    if not names:
        return note(
            ["No run here has a feature store yet; run ", command("saewb analyze RUN"), "."]
        )
    return html.Div(
        [html.P("Choose a run:")] + [html.Div(dcc.Link(n, href=href(PATH, n))) for n in names]
    )
