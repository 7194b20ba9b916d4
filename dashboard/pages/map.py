"""The feature map, /map?run=NAME[&focus=ID][&color=KEY][&q=TEXT]: every latent of
RUN/geometry/map as one WebGL scatter, coloured by lobe, density, multi-dimensional cluster or a
label search. The coordinates travel once, as base64 typed arrays; recolouring patches only the
marker, so a 65k-latent map stays smooth. Labels come on hover, one small request each, rather
than as 65k strings in the figure."""

from __future__ import annotations

import dash_ag_grid as dag
import numpy as np
from dash import Input, Output, Patch, State, dcc, html, no_update

from dashboard.components import command, feature_href, href, note
from dashboard.data import Workspace
from dashboard.map_data import (
    CATEGORIES,
    SEARCH,
    MapData,
    inside,
    labels,
    load_map,
    matches,
    point_feature,
    typed,
)
from hooks.errors import UserError

PATH = "/map"
TITLE = "Map"
MAX_ROWS = 500  # selected features listed at most
MAX_OVERLAY = 5000  # search matches drawn on top at most
NONE_COLOUR = "#d1d5db"
PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04",
           "#db2777", "#4f46e5", "#65a30d", "#0d9488", "#b91c1c", "#7c3aed", "#c2410c",
           "#15803d", "#1d4ed8", "#a21caf", "#854d0e", "#be123c", "#0369a1")  # fmt: skip
CYCLE = 1024  # cluster ids beyond this share colours (the colour scale stays small)

# -- the figure -----------------------------------------------------------------------------------


def _bands(colours: list[str]) -> list:
    """A stepped colour scale: value i of 0..len-1 (with cmin -0.5, cmax len-0.5) is colours[i]."""
    n = len(colours)
    scale = []
    for i, c in enumerate(colours):
        scale += [[i / n, c], [(i + 1) / n, c]]
    return scale


def colouring(data: MapData, key: str, text: str | None = None) -> tuple[dict, list, str]:
    """(the main trace's marker, the overlay's point indices, a caption) for a colour key."""
    size = float(np.clip(14 - 2.2 * np.log10(max(len(data.feature), 1)), 3, 10))  # 65k: 3.4
    base = {"size": round(size, 1), "opacity": 0.8}
    if key not in data.keys:
        raise UserError(
            f"Cannot colour this map by {str(key)[:40]!r}; choose one of {', '.join(data.keys)}."
        )
    if key in CATEGORIES:
        ids = data.clusters[key]
        shown = np.where(ids < 0, -1, ids % CYCLE)  # (N,)
        top = int(shown.max(initial=-1))
        colours = [NONE_COLOUR] + [PALETTE[i % len(PALETTE)] for i in range(top + 1)]
        n_clusters = len(np.unique(ids[ids >= 0]))
        marker = dict(base, color=typed(shown), colorscale=_bands(colours), cmin=-1.5,
                      cmax=top + 0.5, showscale=False)  # fmt: skip
        caption = f"{n_clusters} {CATEGORIES[key]}s; grey: in none"
        return marker, [], caption
    if key == "density":
        positive = data.density[data.density > 0]
        floor = float(positive.min()) if len(positive) else 1e-9
        log = np.log10(np.maximum(data.density, floor)).astype(np.float32)
        marker = dict(base, color=typed(log), colorscale="Viridis", showscale=True,
                      cmin=float(log.min(initial=0)), cmax=float(log.max(initial=0)),
                      colorbar={"title": {"text": "log10 density"}, "thickness": 12})  # fmt: skip
        return marker, [], "density: the fraction of held-out tokens a latent fires on"
    if key == SEARCH:
        if not (text or "").strip():
            marker = dict(base, color=NONE_COLOUR, showscale=False)
            return marker, [], "type a word in the search box to highlight its features"
        hit = matches(data.store, text)[data.feature]  # (N,) per point
        marker = dict(base, color=typed(hit.astype(np.uint8)), colorscale=_bands([NONE_COLOUR, "#dc2626"]),
                      cmin=-0.5, cmax=1.5, showscale=False)  # fmt: skip
        found = np.flatnonzero(hit)
        return (
            marker,
            found[:MAX_OVERLAY].tolist(),
            f"{len(found):,} features match {text.strip()[:60]!r}",
        )
    return dict(base, color="#2563eb"), [], ""


def _overlay(data: MapData, points: list[int], kind: str) -> dict:
    """A small trace drawn over the map: search matches, or the focused feature."""
    points = np.asarray(points, dtype=np.int64)
    marker = (
        {"size": 7, "color": "#dc2626", "line": {"width": 1, "color": "white"}}
        if kind == "matches"
        else {"size": 20, "symbol": "circle-open", "color": "#111827", "line": {"width": 3}}
    )
    return {
        "type": "scattergl",
        "mode": "markers",
        "name": kind,
        "x": data.x[points].tolist(),
        "y": data.y[points].tolist(),
        "customdata": data.feature[points].tolist(),
        "hoverinfo": "none",
        "marker": marker,
        "showlegend": False,
    }


def map_figure(
    data: MapData, key: str, text: str | None = None, focus: int | None = None
) -> tuple[dict, str]:
    """(the whole figure as a plain dict: the points as typed arrays, the search overlay and
    the focus ring; the colouring's caption). Hover labels are not in it (see hover)."""
    marker, overlay, caption = colouring(data, key, text)
    main = {
        "type": "scattergl",
        "mode": "markers",
        "name": "features",
        "x": data.encoded["x"],
        "y": data.encoded["y"],
        "hoverinfo": "none",  # the tooltip is the page's, filled per hover (see hover)
        "marker": marker,
        "showlegend": False,
    }
    axis = {"showgrid": False, "zeroline": False, "showticklabels": False}
    layout = {
        "dragmode": "lasso",
        "hovermode": "closest",
        "height": 640,
        "margin": {"l": 10, "r": 10, "t": 10, "b": 10},
        "plot_bgcolor": "white",
        "xaxis": dict(axis),
        "yaxis": dict(axis),
        "uirevision": "map",  # recolouring keeps the user's zoom
    }
    focus_points = [] if focus is None else [data.index(focus)]
    if focus is not None and len(data.x):
        span = max(float(np.ptp(data.x)), float(np.ptp(data.y)), 1e-6) * 0.1
        i = focus_points[0]
        layout["xaxis"]["range"] = [float(data.x[i]) - span, float(data.x[i]) + span]
        layout["yaxis"]["range"] = [float(data.y[i]) - span, float(data.y[i]) + span]
    traces = [main, _overlay(data, overlay, "matches"), _overlay(data, focus_points, "focus")]
    return {"data": traces, "layout": layout}, caption


# -- selection and hover ------------------------------------------------------------------------


HINT = "Lasso or box-select features on the map to list them here."
GRID_COLUMNS = [
    {"field": "feature", "cellRenderer": "markdown", "maxWidth": 120},
    {"field": "label", "flex": 3},
    {"field": "density", "valueFormatter": {"function": "d3.format('.3~e')(params.value)"}},
]


def selection_rows(data: MapData, run: str, selection: dict | None) -> tuple[list[dict], str]:
    """(the grid's rows for the selected features, the first MAX_ROWS by id, with links; a
    sentence with their count)."""
    if selection is None:
        return [], HINT
    points = inside(data, selection)
    n = len(points)
    if not n:
        return [], "No features in the selection."
    points = points[np.argsort(data.feature[points], kind="stable")][:MAX_ROWS]  # by id
    features = data.feature[points]
    density = data.density[points].tolist() if data.density is not None else [None] * len(points)
    rows = [
        {"feature": f"[{f}]({feature_href(run, int(f))})", "label": label, "density": d}
        for f, label, d in zip(features.tolist(), labels(data, features), density)
    ]
    count = f"{n:,} features selected" + (f" (the first {MAX_ROWS} by id)" if n > MAX_ROWS else "")
    return rows, count


def hover(data: MapData, event: dict | None) -> tuple[bool, object, object]:
    """(show, bbox, children) of the tooltip for the point under the mouse."""
    feature = point_feature(data, event)
    if feature is None or data.index(feature) is None:
        return False, no_update, no_update
    [label] = labels(data, [feature])
    children = [html.B(f"#{feature}"), " ", html.Span(label, className="label")]
    return True, event["points"][0].get("bbox", no_update), children


def click(ws: Workspace, run: str, event: dict | None):
    """The feature page of a clicked point (a run gone since the page loaded: stay)."""
    try:
        feature = point_feature(load_map(ws, run), event)
    except UserError:
        return no_update
    return no_update if feature is None else feature_href(run, feature)


# -- the page -------------------------------------------------------------------------------------


def _header(name: str) -> html.H2:
    return html.H2(["Feature map of ", html.Span(name, id="map-run-name")])


def _focus(ws: Workspace, data: MapData, focus) -> tuple[int | None, list]:
    """(the focused latent, or None, and a message if the query's focus is unusable)."""
    if focus in (None, ""):
        return None, []
    try:
        feature = int(str(focus))
    except ValueError:
        return None, [f"{str(focus)[:40]!r} is not a feature id (a whole number)."]
    if data.index(feature) is None:
        store = data.store
        if store is not None and not 0 <= feature < store.n_latents:
            rule = f"this SAE has features 0..{store.n_latents - 1}"
        else:
            rule = "the map leaves out latents that never fired"
        return None, [f"Feature {feature} is not on this map; {rule}."]
    return feature, []


def layout(
    ws: Workspace,
    run: str | None = None,
    focus: str | None = None,
    color: str | None = None,
    q: str | None = None,
    **_query,
) -> html.Div:
    if not run and len(ws.runs()) != 1:
        return html.Div([html.H2("Feature map"), pick_run(ws)], className="page")
    name = ws.name(run)
    if "map" not in ws.analyses(name) or not ws.result(name, "map").has("coords"):
        return html.Div(
            [
                _header(name),
                note(
                    [
                        f"Run {name!r} has no map yet; run ",
                        command(f"saewb geometry {name} --only map"),
                        " to make it.",
                    ],
                    id="map-missing",
                ),  # fmt: skip
            ],
            className="page",
        )
    method = ws.result(name, "map").summary.get("method", "map")
    data = load_map(ws, name)  # last of the Workspace calls: it starts opening the store
    feature, problems = _focus(ws, data, focus)
    key = color or data.keys[0]
    if key not in data.keys:
        problems.append(
            f"Cannot colour this map by {str(key)[:40]!r}; choose one of {', '.join(data.keys)}."
        )
        key = data.keys[0]
    figure, caption = map_figure(data, key, q, feature)
    options = [{"label": CATEGORIES.get(k, k), "value": k} for k in data.keys]
    parts = [
        _header(name),
        html.P(
            f"{len(data.feature):,} features · {method} of the decoder directions · lasso or "
            "box-select to list features, click a point to open it, scroll to zoom",
            className="muted",
        ),
    ]
    parts += [note(p, "error", id="map-problem") for p in problems]
    if feature is not None:
        [label] = labels(data, [feature])
        parts.append(
            html.P(
                [
                    "Focused: ",
                    dcc.Link(f"feature {feature}", href=feature_href(name, feature)),
                    " ",
                    html.Span(label, className="label"),
                ],
                id="map-focus",
            )  # fmt: skip
        )
    parts += [
        html.Div(
            [
                html.Label("colour by"),
                dcc.Dropdown(
                    id="map-color",
                    options=options,
                    value=key,
                    clearable=False,
                    className="map-dropdown",
                ),  # fmt: skip
                dcc.Input(
                    id="map-search",
                    type="text",
                    value=q or "",
                    debounce=True,
                    disabled=not data.has_store,
                    placeholder="label or token, e.g. Paris"
                    if data.has_store
                    else "no feature store",
                ),
                html.Span(caption, id="map-caption", className="muted"),
            ],
            className="search-row map-controls",
        ),
        dcc.Store(id="map-run", data=name),
        dcc.Store(id="map-selection"),
        html.Span(id="map-url-sink", style={"display": "none"}),
        dcc.Graph(
            id="map-graph",
            figure=figure,
            config={"scrollZoom": True, "displaylogo": False},
            clear_on_unhover=True,
        ),
        dcc.Tooltip(id="map-tooltip", direction="right"),
        html.H3("Selected features"),
        html.P(HINT, id="map-selected-count", className="muted"),
        dag.AgGrid(
            id="map-selected-grid",
            rowData=[],
            columnDefs=GRID_COLUMNS,
            defaultColDef={"sortable": True, "resizable": True, "flex": 1},
            dashGridOptions={"rowHeight": 30, "animateRows": False},
            style={"height": "360px"},
            className="ag-theme-alpine",
        ),
    ]
    return html.Div(parts, className="page map-page")


def recolour(ws: Workspace, run: str, key: str, text: str | None):
    """(a Patch of the figure that replaces only the main trace's marker and the overlay, the
    caption): the coordinates stay in the browser."""
    data = load_map(ws, run)
    marker, overlay, caption = colouring(data, key, text)
    patch = Patch()
    patch["data"][0]["marker"] = marker
    patch["data"][1] = _overlay(data, overlay, "matches")
    return patch, caption


# Only the selection's shape goes to the server, not its (up to 65k) points.
SELECTION_JS = """function(sel) {
    if (!sel) { return null; }
    var out = {};
    if (sel.range && sel.range.x) { out.range = {x: sel.range.x, y: sel.range.y}; }
    if (sel.lassoPoints && sel.lassoPoints.x) {
        out.lassoPoints = {x: sel.lassoPoints.x, y: sel.lassoPoints.y};
    }
    return out;
}"""
# The colouring lives in the query string without reloading the page (which would resend
# the coordinates): replaceState leaves dcc.Location, and so the router, alone.
URL_JS = """function(key, text) {
    var params = new URLSearchParams(window.location.search);
    params.set('color', key);
    if (text && text.trim()) { params.set('q', text.trim()); } else { params.delete('q'); }
    window.history.replaceState(null, '', window.location.pathname + '?' + params.toString());
    return '';
}"""
SEARCH_JS = """function(text, key) {
    return (text && text.trim() && key !== 'search') ? 'search' : window.dash_clientside.no_update;
}"""


def register(app, ws: Workspace, guard) -> None:
    app.callback(
        Output("map-graph", "figure"),
        Output("map-caption", "children"),
        Input("map-color", "value"),
        Input("map-search", "value"),
        State("map-run", "data"),
        prevent_initial_call=True,
    )(guard(lambda key, text, run: recolour(ws, run, key, text), fallback=(no_update, None)))
    app.callback(
        Output("map-selected-grid", "rowData"),
        Output("map-selected-count", "children"),
        Input("map-selection", "data"),
        State("map-run", "data"),
        prevent_initial_call=True,
    )(guard(lambda selection, run: selection_rows(load_map(ws, run), run, selection),
            fallback=([], None)))  # fmt: skip
    app.callback(
        Output("map-tooltip", "show"),
        Output("map-tooltip", "bbox"),
        Output("map-tooltip", "children"),
        Input("map-graph", "hoverData"),
        State("map-run", "data"),
        prevent_initial_call=True,
    )(guard(lambda hover_data, run: hover(load_map(ws, run), hover_data),
            fallback=(False, no_update, None)))  # fmt: skip
    app.clientside_callback(
        SELECTION_JS,
        Output("map-selection", "data"),
        Input("map-graph", "selectedData"),
        prevent_initial_call=True,
    )
    app.callback(
        [Output("url", "href", allow_duplicate=True)],  # a list: guard's fallback is a tuple
        Input("map-graph", "clickData"),
        State("map-run", "data"),
        prevent_initial_call=True,
    )(guard(lambda event, run: (click(ws, run, event),), fallback=(no_update,)))
    app.clientside_callback(
        URL_JS,
        Output("map-url-sink", "children"),
        Input("map-color", "value"),
        Input("map-search", "value"),
        prevent_initial_call=True,
    )
    app.clientside_callback(
        SEARCH_JS,
        Output("map-color", "value"),
        Input("map-search", "value"),
        State("map-color", "value"),
        prevent_initial_call=True,
    )


def pick_run(ws: Workspace) -> html.Div:
    """The map without a run in the URL, when the folder has several."""
    names = [n for n in ws.runs() if "map" in ws.analyses(n)]
    if not names:
        return note(
            ["No run here has a map yet; run ", command("saewb geometry RUN --only map"), "."]
        )
    return html.Div(
        [html.P("Choose a run:")] + [html.Div(dcc.Link(n, href=href(PATH, n))) for n in names]
    )
