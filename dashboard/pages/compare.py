"""The compare page, /compare?a=RUN&b=RUN: two runs' training curves and eval side by side (the
runs page's), and where `saewb compare A B` has run (it writes A/geometry/compare/), the decoder
match histogram, the code-similarity numbers (SVCCA, CKA, relative representations, Procrustes)
and the best-matched feature pairs, each linking both feature pages. `mode=best` ranks the pairs
by each feature of A's best match in B instead of the one-to-one (Hungarian) matching.

compare.py does not record which run B was, only both latent counts, so the page checks those
against B and says that this is all it could check."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from dash import Input, Output, dcc, html

from dashboard.components import command, feature_href, fmt, href, note, table
from dashboard.data import NotFound, Workspace, mtime
from dashboard.pages import runs
from dashboard.pages.geometry import axis, figure, html_table

PATH = "/compare"
TITLE = "Compare"
MODES = {"hungarian": "one-to-one (Hungarian)", "best": "best match of each A feature"}
MAX_PAIRS = 100
BIN = 0.02  # histogram bin width in cosine


def check_b(summary: dict, latents_a, latents_b, a: str, b: str) -> tuple[bool, str]:
    """(usable, sentence): whether the saved comparison can be against b, and what was checked."""
    recorded = summary.get("run_b")
    if recorded is not None:
        if Path(str(recorded)).parts[-len(Path(b).parts) :] == Path(b).parts:
            return True, f"Compared against {b}, as recorded."
        return False, f"{a}'s saved comparison is against {recorded}, not {b}."
    n = summary.get("n_latents") or [None, None]
    if latents_a is not None and n[0] != latents_a or latents_b is not None and n[1] != latents_b:
        return False, (
            f"{a}'s saved comparison was against a run with {fmt(n[1])} latents (A {fmt(n[0])}), "
            f"but {b} has {fmt(latents_b)}; it was made against another run."
        )
    return True, (
        f"saewb compare does not record which run B was; only the latent counts "
        f"({fmt(n[0])}, {fmt(n[1])}) were checked against {b}."
    )


def histogram_edges(*cosines: np.ndarray) -> np.ndarray:
    """Bins of width BIN from below the smallest cosine (0 at most) to 1."""
    finite = np.concatenate([c[np.isfinite(c)] for c in cosines]) if cosines else np.zeros(0)
    lo = min(0.0, float(np.floor(finite.min() / BIN) * BIN)) if len(finite) else 0.0
    return np.linspace(lo, 1.0, int(round((1.0 - lo) / BIN)) + 1)


def match_histogram(matches_a: dict) -> dict:
    """Counts of A's features by the cosine of their match: one-to-one and best match."""
    series = [("one-to-one (Hungarian)", "hungarian_cos", "#2563eb"),
              ("best match in B", "best_cos", "#9ca3af")]  # fmt: skip
    cos = {key: np.asarray(matches_a[key], dtype=float) for _, key, _ in series if key in matches_a}
    edges = histogram_edges(*cos.values())
    centres, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    data = []
    for name, key, colour in series:
        if key in cos:
            counts, _ = np.histogram(cos[key][np.isfinite(cos[key])], bins=edges)
            data.append({"type": "bar", "name": name, "x": centres, "y": counts, "width": widths,
                         "marker": {"color": colour}, "opacity": 0.75})  # fmt: skip
    return figure(data, "Decoder cosine of each A feature's match", 320, barmode="overlay",
                  bargap=0, xaxis=axis("cosine"), yaxis=axis("features of A"))  # fmt: skip


def similarity_figure(codes: dict) -> dict:
    """Each code similarity beside its chance level where the comparison measured one."""
    rel, pro = codes.get("relative") or {}, codes.get("procrustes") or {}
    names = ["SVCCA", "linear CKA", "relative repr. cos", "Procrustes alignment"]
    observed = [codes.get("svcca"), codes.get("cka"), rel.get("mean_cos"),
                pro.get("split_half_alignment")]  # fmt: skip
    chance = [codes.get("svcca_shuffled"), None, rel.get("shuffled_cos"), None]
    clean = lambda v: [None if x is None else float(x) for x in v]  # noqa: E731
    data = [{"type": "bar", "name": "A vs B", "x": names, "y": clean(observed),
             "marker": {"color": "#16a34a"}},
            {"type": "bar", "name": "tokens shuffled", "x": names, "y": clean(chance),
             "marker": {"color": "#9ca3af"}}]  # fmt: skip
    return figure(data, "Codes on shared tokens", 300, barmode="group",
                  yaxis=axis("similarity", range=[0, 1]))  # fmt: skip


def top_pairs(matches_a: dict, matches_b: dict | None, mode: str) -> list[dict]:
    """The MAX_PAIRS best matched pairs (a, b, cos, mutual) by cosine, best first."""
    feature = np.asarray(matches_a["feature"])
    if mode == "hungarian":
        other, cos = (
            np.asarray(matches_a["hungarian_match"]),
            np.asarray(matches_a["hungarian_cos"]),
        )
    else:
        other, cos = np.asarray(matches_a["best_match"]), np.asarray(matches_a["best_cos"])
    ok = np.flatnonzero((other >= 0) & np.isfinite(cos))
    top = ok[np.argsort(-cos[ok], kind="stable")[:MAX_PAIRS]]
    back = np.asarray(matches_b["best_match"]) if matches_b is not None else None
    best = np.asarray(matches_a["best_match"])
    return [
        dict(a=int(feature[i]), b=int(other[i]), cos=float(cos[i]),
             mutual=bool(back is not None and best[i] == other[i] and back[other[i]] == feature[i]))
        for i in top
    ]  # fmt: skip


def shares_table(s: dict) -> html.Table:
    rows = []
    for key, label in (("hungarian", "one-to-one (Hungarian)"), ("best_match_a", "best match A→B"),
                       ("best_match_b", "best match B→A"), ("many_to_one", "many-to-one")):  # fmt: skip
        part = s.get(key) or {}
        rows.append([html.Td(label), html.Td(fmt(part.get("mean_cos"))),
                     html.Td(fmt(part.get("above_0.7"))), html.Td(fmt(part.get("above_0.9")))])  # fmt: skip
    codes = s.get("codes") or {}
    rel, pro = codes.get("relative") or {}, codes.get("procrustes") or {}
    numbers = [
        ("SVCCA", f"{fmt(codes.get('svcca'))} (shuffled {fmt(codes.get('svcca_shuffled'))}, dims "
                  f"{codes.get('svcca_dims')})"),
        ("linear CKA", fmt(codes.get("cka"))),
        ("relative representations", f"{fmt(rel.get('mean_cos'))} (shuffled "
                                     f"{fmt(rel.get('shuffled_cos'))})"),
        ("Procrustes distance", f"{fmt(pro.get('split_half'))} split-half, "
                                f"{fmt(pro.get('plugin'))} plug-in (radians)"),
        ("shared tokens", fmt(codes.get("n_tokens"))),
    ]  # fmt: skip
    return html.Div([
        table(["matching", "mean cos", "share > 0.7", "share > 0.9"], rows, "grid small"),
        table(["codes", ""], [[html.Td(k), html.Td(v)] for k, v in numbers], "grid small"),
    ], className="columns")  # fmt: skip


def matches_part(ws: Workspace, a: str, b: str, mode: str) -> list:
    try:
        result = ws.result(a, "compare")
    except NotFound:
        other = " (B has one against another run.)" if "compare" in ws.analyses(b) else ""
        return [note([f"{a} has no comparison saved yet; run ",
                      command(f"saewb compare {a} {b}"), f".{other}"], id="compare-missing")]  # fmt: skip
    s = result.summary
    usable, checked = check_b(s, ws.summary(a)["latents"], ws.summary(b)["latents"], a, b)
    if not usable:
        return [note([checked, " Run ", command(f"saewb compare {a} {b}"), "."], "error",
                     id="compare-mismatch")]  # fmt: skip
    matches_a = result.table("matches_a")
    matches_b = result.table("matches_b") if result.has("matches_b") else None
    pairs = top_pairs(matches_a, matches_b, mode)
    rows = [[i + 1, (f"#{p['a']}", feature_href(a, p["a"]), "pair-a"),
             (f"#{p['b']}", feature_href(b, p["b"]), "pair-b"), f"{p['cos']:.3f}",
             "yes" if p["mutual"] else ""] for i, p in enumerate(pairs)]  # fmt: skip
    modes = [dcc.Link(text, href=href(PATH, None, a=a, b=b, mode=m), id=f"compare-mode-{m}",
                      className="variant active" if m == mode else "variant")
             for m, text in MODES.items()]  # fmt: skip
    return [
        note(checked, id="compare-checked"),
        html.Div(
            [
                dcc.Graph(
                    id="compare-histogram", figure=match_histogram(matches_a), className="half"
                ),
                dcc.Graph(
                    id="compare-similarity",
                    figure=similarity_figure(s.get("codes") or {}),
                    className="half",
                ),
            ],
            className="pair-row",
        ),  # fmt: skip
        shares_table(s),
        html.H4(f"Top {len(pairs)} matched pairs by cosine"),
        html.Div(["ranked by: ", *modes], className="variants"),
        html_table(
            ["#", f"feature of {a}", f"feature of {b}", "cosine", "mutual best"],
            rows,
            "compare-pairs",
        ),  # fmt: skip
    ]


_SIDE: OrderedDict = OrderedDict()  # (folder, log stamp, eval stamp) per run -> components
_SIDE_LOCK = threading.Lock()


def side_by_side(ws: Workspace, a: str, b: str) -> list:
    """The runs page's curves and eval table for a and b, built once per state of their logs
    and evals: curves_figure makes plotly graph objects (~0.3 s to build and serialise at 30
    log records), so the figure is kept as a plain dict."""
    names = list(dict.fromkeys([a, b]))
    key = tuple((str(ws.path(n)), mtime(ws.path(n) / "train_log.jsonl"),
                 mtime(ws.path(n) / "eval.json")) for n in names)  # fmt: skip
    out = _SIDE.get(key)
    if out is None:
        out = [c for c in runs.compare(ws, names) if getattr(c, "id", None) != "runs-to-compare"]
        for c in out:  # this page is where that link goes
            if isinstance(c, dcc.Graph) and hasattr(c.figure, "to_plotly_json"):
                c.figure = c.figure.to_plotly_json()
        with _SIDE_LOCK:  # requests come from several threads
            _SIDE[key] = out
            while len(_SIDE) > 16:
                _SIDE.popitem(last=False)
    return out


def picker(ws: Workspace, a, b) -> html.Div:
    options = [{"label": n, "value": n} for n in ws.runs()]
    return html.Div([
        html.Label("A"), dcc.Dropdown(id="compare-a", options=options, value=a, clearable=False,
                                      style={"width": "340px"}),
        html.Label("B"), dcc.Dropdown(id="compare-b", options=options, value=b, clearable=False,
                                      style={"width": "340px"}),
        dcc.Link("Compare", id="compare-go", href=go_href(a, b)),
    ], className="search-row")  # fmt: skip


def go_href(a, b) -> str:
    return href(
        PATH, None, a=a if isinstance(a, str) else None, b=b if isinstance(b, str) else None
    )


def layout(ws: Workspace, a=None, b=None, mode=None, **_query) -> html.Div:
    head = [html.H2("Compare two runs")]
    names = ws.runs()
    bad = [f"There is no run named {str(x)[:80]!r} in {ws.root}." for x in (a, b)
           if x not in (None, "") and x not in names]  # fmt: skip
    if mode not in (None, "") and mode not in MODES:
        bad.append(f"mode {str(mode)[:40]!r} is not a pair ranking; use one of {', '.join(MODES)}.")
    a, b = (x if x in names else None for x in (a, b))
    head.append(picker(ws, a, b))
    if bad:
        return html.Div(head + [note(m, "error") for m in bad], className="page")
    if a is None or b is None:
        return html.Div(head + [note("Choose two runs, A and B.")], className="page")
    body = [html.H3("Training and evaluation"), *side_by_side(ws, a, b)]
    body += [
        html.H3(f"Dictionaries: {a} against {b}"),
        *matches_part(ws, a, b, mode or "hungarian"),
    ]
    return html.Div(head + body, className="page")


def register(app, ws: Workspace, guard) -> None:
    app.callback(Output("compare-go", "href"), Input("compare-a", "value"),
                 Input("compare-b", "value"))(guard(go_href))  # fmt: skip
