"""The geometry page, /geometry?run=NAME: one section per `saewb geometry` analysis, each drawn
from RUN/geometry/<name>/ as saved (nothing recomputed).

- galaxy: the decoder covariance spectrum log-log with its power-law fit over the fitted ranks,
  and the slope by layer where a multi-run `saewb geometry` wrote galaxy_by_layer.
- lobes: AMI and probe balanced accuracy against their permutation nulls, and the labelled lobes.
- crystals: word-pair differences before (PCA) and after LDA, coloured by relation.
- multidim: clusters ranked by irreducibility; `focus=C` shows cluster C's PCA scatter, `mode`
  picks the variant (multidim-cutoff0.3, ...). A cluster is drawn in 3-D when it carries a
  calendar circle: the summary's calendar finding for a set names this cluster and its circle
  fit passed the analysis's R^2 threshold (it saved a circle_<set> figure, or R^2 >= 0.5, the
  analysis's default). The axes are then the circle's two PCs and the first other PC, so the
  ring shows in its plane with the leading remaining direction as depth. A circle cluster with
  only two PCs, and every other cluster, is drawn 2-D (the circle's pair, else PC1-PC2).
Figures are plain dicts (see components.histogram_figure), one cluster's points at a time."""

from __future__ import annotations

from collections import Counter
from html import escape
from pathlib import Path

import numpy as np
from dash import dcc, html

from dashboard.components import command, feature_href, fmt, href, note, raw_html, table
from dashboard.data import Workspace
from hooks.errors import UserError

PATH = "/geometry"
TITLE = "Geometry"
EIG_FLOOR = 1e-10  # the galaxy analysis floors eigenvalues here before taking logs
CIRCLE_R2 = 0.5  # multidim's default circle threshold, for summaries saved without figures
MAX_POINTS = 3000  # one cluster's scatter at most (the analysis keeps <= 2000 samples each)
MAX_CLUSTERS = 40  # rows of the ranked-cluster table
MAX_MEMBERS = 60  # member feature links shown for the chosen cluster
MAX_LOBES = 200
ROW = "{:>5} {:>7} {:>5} {:>7} {:>8} {:>7} {:>16} {:>4}"  # the ranked-cluster columns
TOKEN_COLOURS = 16  # the most frequent tokens of a scatter get a colour each; the rest are grey
PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04",
           "#db2777", "#4f46e5", "#65a30d", "#0d9488", "#b91c1c", "#7c3aed", "#c2410c",
           "#0284c7", "#a16207", "#be185d", "#15803d", "#6d28d9", "#475569")  # fmt: skip
AXIS = {"gridcolor": "#e5e7eb", "zeroline": False}


def figure(data: list[dict], title: str, height: int = 380, **layout) -> dict:
    return {
        "data": data,
        "layout": {"title": {"text": title, "font": {"size": 14}, "x": 0.01, "xanchor": "left"},
                   "height": height, "margin": {"l": 50, "r": 10, "t": 40, "b": 45},
                   "plot_bgcolor": "white", "xaxis": AXIS, "yaxis": AXIS,
                   "legend": {"orientation": "h", "y": -0.3, "yanchor": "top"}, **layout},
    }  # fmt: skip


def axis(title: str, **extra) -> dict:
    return {**AXIS, "title": {"text": title}, **extra}


def _floats(values) -> np.ndarray:
    """A float array for a figure: Dash's orjson encoder writes numeric arrays whole (NaN as
    null, which plotly leaves out) where it walks a Python list element by element, ~50x slower."""
    return np.ascontiguousarray(values, dtype=np.float64)


def html_table(
    header: list[str], rows: list[list], id: str, cls: str = "grid small"
) -> dcc.Markdown:
    """A table as one block of escaped HTML: each Dash component costs ~30 us to build and
    serialise, and these tables would take hundreds. A cell is text, or (text, href, class) for
    a plain link (a full page load, which is fine for leaving the page)."""

    def cell(value) -> str:
        if isinstance(value, tuple):
            text, url, kind = value
            return f'<td><a href="{escape(url)}" class="{kind}">{escape(str(text))}</a></td>'
        return f"<td>{escape(str(value))}</td>"

    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return raw_html([f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
                     "</table>"], id=id)  # fmt: skip


def section(ws: Workspace, run: str, name: str, build) -> html.Section:
    """One analysis's section: what `build(result)` draws, or a note naming the command."""
    try:
        body = build(ws.result(run, name))
    except UserError as exc:
        body = [note(str(exc), "error" if name in ws.analyses(run) else "info")]
    return html.Section([html.H3(name.split("-")[0]), *body], id=f"geometry-{name.split('-')[0]}")


# -- galaxy -------------------------------------------------------------------------------------


def spectrum_figure(spectrum: dict, s: dict) -> dict:
    """Eigenvalues against rank, log-log, with each power-law fit over its fitted ranks: the fit
    is log10 lambda = intercept - alpha log10 rank, so the line is 10^intercept rank^-alpha."""
    rank = np.asarray(spectrum["rank"], dtype=float)
    fit_ranks = np.arange(s["rank_min"], s["rank_max"] + 1, dtype=float)
    data = []
    for name, column, fit, colour, dash in (
        ("decoder", "eigenvalue", s, PALETTE[0], "solid"),
        ("Gaussian baseline", "baseline", s.get("baseline"), "#9ca3af", "dot"),
    ):
        if column not in spectrum:
            continue
        data.append({"type": "scatter", "mode": "lines", "name": name, "x": rank,
                     "y": np.maximum(_floats(spectrum[column]), EIG_FLOOR),
                     "line": {"color": colour, "dash": dash}})  # fmt: skip
        if fit and "alpha" in fit:
            data.append({
                "type": "scatter", "mode": "lines", "name": f"{name} fit α={fit['alpha']:.3f}",
                "x": fit_ranks, "y": 10 ** fit["intercept"] * fit_ranks ** -fit["alpha"],
                "line": {"color": "#111827" if name == "decoder" else colour, "dash": "dash",
                         "width": 2.5},
            })  # fmt: skip
    title = (f"Spectrum: α = {s['alpha']:.3f} ± {s['alpha_ci']:.3f} (95% CI, ranks "
             f"{s['rank_min']}–{s['rank_max']})")  # fmt: skip
    return figure(data, title, 440, xaxis=axis("rank", type="log"),
                  yaxis=axis("eigenvalue", type="log"))  # fmt: skip


def by_layer_figure(t: dict) -> dict:
    layer = _floats(t["layer"])
    data = [
        {"type": "scatter", "mode": "lines+markers", "name": "decoder α", "x": layer,
         "y": _floats(t["alpha"]), "error_y": {"type": "data", "array": _floats(t["alpha_ci"])},
         "text": np.asarray(t["name"]).astype(str), "line": {"color": PALETTE[0]}},
    ]  # fmt: skip
    if "baseline_alpha" in t:
        data.append({"type": "scatter", "mode": "lines", "name": "Gaussian α", "x": layer,
                     "y": _floats(t["baseline_alpha"]),
                     "line": {"color": "#9ca3af", "dash": "dot"}})  # fmt: skip
    return figure(data, "Power-law slope by layer (95% CIs)", 440, xaxis=axis("layer", tickvals=layer),
                  yaxis=axis("α"))  # fmt: skip


def by_layer_result(ws: Workspace, run: str):
    """The galaxy_by_layer result that covers this run: its own, else the one a multi-run
    `saewb geometry` wrote into the first run's folder and that lists this run."""
    if "galaxy_by_layer" in ws.analyses(run):
        return ws.result(run, "galaxy_by_layer")
    mine, tail = ws.path(run).resolve(), Path(run).parts
    for other in ws.runs():
        if other != run and "galaxy_by_layer" in ws.analyses(other):
            result = ws.result(other, "galaxy_by_layer")
            for listed in map(Path, result.summary.get("runs", [])):
                # the same folder, or (the served folder moved) one of the same name below it
                same = (ws.path(other) / listed).resolve() == mine
                if same or listed.parts[-len(tail) :] == tail:
                    return result
    return None


def galaxy_section(ws: Workspace, run: str, result) -> list:
    s = result.summary
    b = s.get("baseline") or {}
    rows = [
        ["power-law slope α", f"{fmt(s.get('alpha'))} ± {fmt(s.get('alpha_ci'))}",
         f"{fmt(b.get('alpha'))} ± {fmt(b.get('alpha_ci'))}"],
        ["fit R²", fmt(s.get("r2")), fmt(b.get("r2"))],
        ["log-determinant", fmt(s.get("logdet"), 5), fmt(b.get("logdet"), 5)],
        ["clustering negentropy", f"{fmt(s.get('negentropy'))} ± {fmt(s.get('negentropy_ci'))}",
         f"{fmt(b.get('negentropy'))} ± {fmt(b.get('negentropy_ci'))}"],
    ]  # fmt: skip
    graphs = [dcc.Graph(id="galaxy-spectrum", className="half",
                        figure=spectrum_figure(result.table("spectrum"), s))]  # fmt: skip
    numbers = table(["", "decoder", "Gaussian"], [[html.Td(c) for c in r] for r in rows],
                    "grid small")  # fmt: skip
    layers = by_layer_result(ws, run)
    if layers is None:
        return [html.Div(graphs, className="pair-row"), numbers, note([
            "Slope by layer: run ", command("saewb geometry RUN_A RUN_B … --only galaxy"),
            " on several layers' runs of one model."])]  # fmt: skip
    graphs.append(dcc.Graph(id="galaxy-by-layer", className="half",
                            figure=by_layer_figure(layers.table("by_layer"))))  # fmt: skip
    return [html.Div(graphs, className="pair-row"), numbers]


# -- lobes --------------------------------------------------------------------------------------


def null_figure(s: dict) -> dict:
    """Each statistic beside its permutation null (mean, error bar one std)."""
    names = ["AMI (decoder vs co-occurrence lobes)", "probe balanced accuracy"]
    observed = [s.get("ami"), s.get("balanced_accuracy")]
    null = [s.get("ami_null_mean"), s.get("accuracy_null_mean")]
    std = [s.get("ami_null_std"), s.get("accuracy_null_std")]
    clean = lambda v: [None if x is None else float(x) for x in v]  # noqa: E731
    data = [
        {"type": "bar", "name": "observed", "x": names, "y": clean(observed),
         "marker": {"color": PALETTE[2]}},
        {"type": "bar", "name": "null (mean ± std)", "x": names, "y": clean(null),
         "error_y": {"type": "data", "array": clean(std)}, "marker": {"color": "#9ca3af"}},
    ]  # fmt: skip
    return figure(data, "Lobes against their nulls", 300, barmode="group")


def lobes_section(ws: Workspace, run: str, result) -> list:
    s = result.summary
    numbers = [
        ["AMI", fmt(s.get("ami")), f"{fmt(s.get('ami_null_mean'))} ± {fmt(s.get('ami_null_std'))}",
         fmt(s.get("ami_z"))],
        ["balanced accuracy", fmt(s.get("balanced_accuracy")),
         f"{fmt(s.get('accuracy_null_mean'))} ± {fmt(s.get('accuracy_null_std'))}",
         fmt(s.get("accuracy_z"))],
    ]  # fmt: skip
    out = [
        dcc.Graph(id="lobes-null", figure=null_figure(s)),
        table(["", "observed", "null", "z"], [[html.Td(c) for c in r] for r in numbers]),
        html.P(f"chance {fmt(s.get('chance'))}; {fmt(s.get('n_used'))} latents in "
               f"{len(s.get('lobe_sizes') or [])} lobes", className="muted"),
    ]  # fmt: skip
    if s.get("labels_note"):
        out.append(note(f"No labels: {s['labels_note']}"))
    t = result.table("lobes")
    order = np.argsort(-np.asarray(t["size"]), kind="stable")[:MAX_LOBES]
    rows = [[int(t["lobe"][i]), int(t["size"][i]), str(t["label"][i]) or "–"] for i in order]
    out.append(html.Div(html_table(["lobe", "latents", "top tokens"], rows, "lobes-table"),
                        className="scroll"))  # fmt: skip
    return out


# -- crystals -----------------------------------------------------------------------------------


def pairs_figure(t: dict, kind: str, stage: str) -> dict:
    """One scatter of the word-pair differences: 'before' on PCs 0-1 of every pair, 'after' on
    LDA axes 0-1 of the held-out pairs (the LDA was fitted on the others), one trace per relation."""
    relation = np.asarray(t["relation"]).astype(str)
    axes = "pc" if stage == "before" else "lda"
    x, y = np.asarray(t[f"{kind}_{axes}0"]), np.asarray(t[f"{kind}_{axes}1"])
    keep = np.ones(len(relation), bool) if stage == "before" else np.asarray(t["held_out"], bool)
    data = []
    for r, name in enumerate(dict.fromkeys(relation.tolist())):
        m = keep & (relation == name)
        data.append({
            "type": "scatter", "mode": "markers", "name": name, "legendgroup": name,
            "showlegend": stage == "before", "x": _floats(x[m]), "y": _floats(y[m]),
            "text": np.char.add(np.char.add(t["a"][m].astype(str), " − "), t["b"][m].astype(str)),
            "hovertemplate": "%{text}<extra>" + name + "</extra>",
            "marker": {"color": PALETTE[r % len(PALETTE)], "size": 6},
        })  # fmt: skip
    title = f"{kind}: " + ("before (PCA, all pairs)" if stage == "before" else "after LDA (held-out pairs)")  # fmt: skip
    names = [axis(f"{axes.upper()} {j}") for j in (1, 2)]
    return figure(data, title, 420, xaxis=names[0], yaxis=names[1])


def crystals_section(ws: Workspace, run: str, result) -> list:
    s, t = result.summary, result.table("pairs")
    kinds = [k for k in ("activation", "reconstruction") if f"{k}_pc0" in t and k in s]
    keys = ("same_cos", "cross_cos", "spread_ratio", "silhouette")
    rows = [
        [html.Td(f"{k} {stage}")] + [html.Td(fmt((s[k].get(stage) or {}).get(key))) for key in keys]
        for k in kinds
        for stage in ("before", "after")
    ]
    out = [
        html.P(f"{fmt(s.get('n_pairs'))} word pairs in {len(s.get('relations') or [])} relations, "
               f"{fmt(s.get('n_held_out'))} held out", className="muted"),
        table(["", "same-relation cos", "cross-relation cos", "spread ratio", "silhouette"], rows),
    ]  # fmt: skip
    for k in kinds:
        graphs = []
        for stage in ("before", "after"):
            fig = result.memo((k, stage), lambda k=k, stage=stage: pairs_figure(t, k, stage))
            graphs.append(dcc.Graph(id=f"crystals-{k}-{stage}", figure=fig, className="half"))
        out.append(html.Div(graphs, className="pair-row"))
    return out


# -- multidim -----------------------------------------------------------------------------------


def circle_axes(result, cluster: int, n_pcs: int) -> tuple[str, tuple[int, ...]] | None:
    """(calendar set, 0-based PC axes) if the cluster carries a calendar circle, else None."""
    for name, found in (result.summary.get("calendar") or {}).items():
        if not isinstance(found, dict) or found.get("cluster") != cluster or not found.get("pcs"):
            continue
        if not (result.has(f"circle_{name}") or (found.get("r2") or 0) >= CIRCLE_R2):
            continue
        pair = tuple(int(p) - 1 for p in found["pcs"][:2])
        depth = [j for j in range(n_pcs) if j not in pair][:1]
        return name, pair + tuple(depth)
    return None


def cluster_figure(result, cluster: int) -> dict | None:
    """One cluster's saved PCA points coloured by token (the most frequent TOKEN_COLOURS each a
    colour, the rest grey), probe tokens as diamonds; 3-D where a circle shows (module doc)."""
    pcs = result.table("pcs")
    rows = np.flatnonzero(np.asarray(pcs["cluster"]) == cluster)
    if len(rows) == 0:
        return None
    probe = np.asarray(pcs["source"])[rows] == "probe"
    rows = np.concatenate([rows[probe], rows[~probe]])[:MAX_POINTS]  # probe points first
    cols = [f"pc{j}" for j in range(1, 6) if f"pc{j}" in pcs]
    n_pcs = sum(1 for c in cols if np.isfinite(np.asarray(pcs[c])[rows]).any())
    circle = circle_axes(result, cluster, n_pcs)
    dims = circle[1] if circle else tuple(range(min(2, n_pcs)))
    if len(dims) < 2:
        return None
    three = len(dims) == 3
    text = np.asarray(pcs["text"])[rows].astype(str)
    source = np.asarray(pcs["source"])[rows].astype(str)
    sets = np.asarray(pcs["set"])[rows].astype(str) if "set" in pcs else np.full(len(rows), "")
    hover = np.array([repr(t) + (f" ({s} probe)" if src == "probe" else "")
                      for t, s, src in zip(text, sets, source)])  # fmt: skip
    common = [t for t, _ in Counter(text.tolist()).most_common(TOKEN_COLOURS)]
    groups = [(repr(t), text == t, PALETTE[i]) for i, t in enumerate(common)]
    rest = ~np.isin(text, common)
    if rest.any():
        groups.append(("other tokens", rest, "#9ca3af"))
    coords = [np.asarray(pcs[f"pc{d + 1}"])[rows] for d in dims]
    data = []
    for name, m, colour in groups:
        for is_probe in (False, True):
            on = m & ((source == "probe") == is_probe)
            if not on.any():
                continue
            trace = {
                "type": "scatter3d" if three else "scatter", "mode": "markers",
                "name": name, "legendgroup": name, "showlegend": not is_probe or not (m & ~on).any(),
                "text": hover[on], "hovertemplate": "%{text}<extra></extra>",
                "marker": {"color": colour, "size": (5 if three else 8) if is_probe else
                           (3 if three else 5), "symbol": "diamond" if is_probe else "circle"},
            }  # fmt: skip
            for key, values in zip("xyz", coords):
                trace[key] = _floats(values[on])
            data.append(trace)
    labels = [f"PC{d + 1}" for d in dims]
    title = f"Cluster {cluster}" + (f": the {circle[0]} circle" if circle else "")
    if three:
        scene = {f"{k}axis": {"title": {"text": lab}} for k, lab in zip("xyz", labels)}
        return figure(data, title, 460, scene=scene, margin={"l": 0, "r": 0, "t": 40, "b": 0})
    return figure(data, title, 460, xaxis=axis(labels[0]), yaxis=axis(labels[1]))


def multidim_variant(ws: Workspace, run: str, mode: str | None) -> tuple[str, list[str]]:
    variants = [n for n in ws.analyses(run) if n == "multidim" or n.startswith("multidim-")]
    if mode in (None, ""):
        return ("multidim" if "multidim" in variants else (variants or ["multidim"])[0]), variants
    if mode not in variants:
        raise UserError(
            f"mode {str(mode)[:40]!r} is not a multidim analysis of this run; use one of "
            f"{', '.join(variants) or '(none yet: run saewb geometry RUN --only multidim)'}."
        )
    return mode, variants


def parse_cluster(focus, scores: dict) -> int | None:
    if focus in (None, ""):
        return None
    try:
        c = int(str(focus))
    except ValueError:
        raise UserError(f"focus {str(focus)[:40]!r} is not a cluster id (a whole number).") from None  # fmt: skip
    if c not in set(np.asarray(scores["cluster"]).tolist()):
        raise UserError(
            f"There is no cluster {c} in this multidim analysis; ids run from 0 to "
            f"{len(scores['cluster']) - 1}."
        )
    return c


def multidim_section(ws, run: str, variant: str, variants: list[str], focus, result) -> list:
    s, scores = result.summary, result.table("scores")
    pcs_clusters = set(np.unique(np.asarray(result.table("pcs")["cluster"])).tolist())
    order = np.argsort(np.asarray(scores["rank"]), kind="stable")  # rank 0: most irreducible
    cluster_ids = np.asarray(scores["cluster"])
    chosen = parse_cluster(focus, scores)
    if chosen is None:
        drawn = [int(cluster_ids[i]) for i in order if int(cluster_ids[i]) in pcs_clusters]
        chosen = drawn[0] if drawn else (int(cluster_ids[order[0]]) if len(order) else None)
    link = lambda c: href(PATH, run, mode=variant, focus=c)  # noqa: E731
    out = []
    if len(variants) > 1:
        out.append(html.Div(["variant: "] + [
            dcc.Link(v, href=href(PATH, run, mode=v), id=f"variant-{v}",
                     className="variant active" if v == variant else "variant") for v in variants
        ], className="variants"))  # fmt: skip
    settings = s.get("settings") or {}
    out.append(html.P(f"{variant}: {fmt(s.get('n_clusters'))} clusters of "
                      f"{fmt(s.get('n_clustered'))} latents ({settings.get('clustering', '?')}, "
                      f"cutoff {fmt(settings.get('cutoff'))}), {fmt(s.get('n_scored'))} scored; "
                      f"score {settings.get('score', 'S (1 - M)')}", className="muted"))  # fmt: skip
    shown = list(order[:MAX_CLUSTERS])
    if chosen is not None and chosen not in cluster_ids[shown]:
        shown.append(int(np.flatnonzero(cluster_ids == chosen)[0]))
    # One link per row, its columns as fixed-width text: the whole row selects the cluster
    # without a page load, at one component a row.
    lines = [html.Div(ROW.format("rank", "cluster", "size", "score", "separab.", "mixture",
                                 "explained 1/2/3", "plot"), className="cluster-row head")]  # fmt: skip
    for i in shown:
        c = int(cluster_ids[i])
        explained = "/".join(fmt(float(scores[f"explained{j}"][i]), 2) for j in (1, 2, 3)
                             if f"explained{j}" in scores)  # fmt: skip
        text = ROW.format(int(scores["rank"][i]) + 1, c, int(scores["size"][i]),
                          fmt(float(scores["score"][i])), fmt(float(scores["separability"][i])),
                          fmt(float(scores["mixture"][i])), explained,
                          "yes" if c in pcs_clusters else "")  # fmt: skip
        lines.append(dcc.Link(text, href=link(c), id=f"cluster-{c}",
                              className="cluster-row selected" if c == chosen else "cluster-row"))  # fmt: skip
    grid = html.Div(lines, id="multidim-table")
    out.append(html.Div([html.Div(grid, className="main-col scroll"),
                         html.Div(cluster_detail(ws, run, result, chosen), className="side-col",
                                  id="multidim-detail")], className="columns"))  # fmt: skip
    calendar = calendar_rows(result, link)
    if calendar:
        out.append(html.H4("Calendar probe"))
        out.append(table(["set", "cluster", "coverage", "lift", "circle R²", "PCs"], calendar,
                         "grid small"))  # fmt: skip
    return out


def calendar_rows(result, link) -> list:
    rows = []
    for name, f in (result.summary.get("calendar") or {}).items():
        if not isinstance(f, dict):
            continue
        c = f.get("cluster", -1)
        where = dcc.Link(f"cluster {c}", href=link(c)) if isinstance(c, int) and c >= 0 else "none"
        r2 = f.get("r2", f.get("spearman"))
        rows.append([html.Td(x) for x in (name, where, fmt(f.get("coverage")), fmt(f.get("lift")),
                                          fmt(r2) if "r2" in f else "–",
                                          ", ".join(map(str, f.get("pcs") or [])) or "–")])  # fmt: skip
    return rows


def cluster_detail(ws, run: str, result, cluster: int | None) -> list:
    if cluster is None:
        return [note("This analysis found no clusters.")]
    labels = np.asarray(result.table("clusters")["cluster"])
    features = np.asarray(result.table("clusters")["feature"])[labels == cluster]
    links = [f'<a href="{escape(feature_href(run, int(f)))}" class="member">#{int(f)}</a>'
             for f in features[:MAX_MEMBERS]]  # fmt: skip
    more = f" and {len(features) - MAX_MEMBERS} more" if len(features) > MAX_MEMBERS else ""
    members = raw_html(["members: ", " ".join(links), more], id="multidim-members")
    fig = result.memo(("cluster", cluster), lambda: cluster_figure(result, cluster))
    plot = (dcc.Graph(id="multidim-scatter", figure=fig) if fig is not None else note(
        f"No PCA points were saved for cluster {cluster}: the analysis keeps them for its top "
        "clusters and the calendar clusters only.", id="multidim-scatter-missing"))  # fmt: skip
    return [html.H4(f"Cluster {cluster}"), members, plot]


# -- the page -----------------------------------------------------------------------------------


def layout(ws: Workspace, run: str | None = None, mode=None, focus=None, **_query) -> html.Div:
    name = ws.name(run)
    present = ws.analyses(name)
    sections = [
        section(ws, name, "galaxy", lambda r: galaxy_section(ws, name, r)),
        section(ws, name, "lobes", lambda r: lobes_section(ws, name, r)),
        section(ws, name, "crystals", lambda r: crystals_section(ws, name, r)),
    ]
    try:
        variant, variants = multidim_variant(ws, name, mode)
    except UserError as exc:  # a bad mode spoils this section only
        sections.append(html.Section([html.H3("multidim"), note(str(exc), "error")],
                                     id="geometry-multidim"))  # fmt: skip
    else:
        sections.append(section(ws, name, variant,
                                lambda r: multidim_section(ws, name, variant, variants, focus, r)))  # fmt: skip
    listed = ", ".join(present) if present else "none yet"
    return html.Div(
        [
            html.H2(f"Geometry of {name}"),
            html.P(
                ["analyses: ", listed, ". Make them with ", command(f"saewb geometry {name}"), "."],
                className="muted",
            ),  # fmt: skip
            *sections,
        ],
        className="page geometry",
    )


def register(app, ws: Workspace, guard) -> None:
    """No callbacks: every state (run, variant, cluster) is a link to a URL."""
