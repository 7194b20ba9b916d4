"""The Dash app: a shell with a router, the pages, and `saewb dashboard`.

A page is a module in dashboard/pages with PATH (or PATH_TEMPLATE, e.g. "/feature/<feature_id>"),
TITLE, `layout(ws, **path_and_query)` and `register(app, ws, guard)` for its callbacks; add it to
PAGES. Routing is one callback on the URL rather than Dash's page registry, which is global to the
process: each app made by create_app serves its own folder (tests make several)."""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs

from dash import Dash, Input, Output, dcc, html

from dashboard.components import href, not_found, note
from dashboard.data import NotFound, Workspace
from dashboard.pages import browser, compare, feature, geometry, prompt, runs, steer
from dashboard.pages import map as map_page  # not the builtin
from hooks.errors import UserError

log = logging.getLogger("saewb.dashboard")

PAGES = [runs, browser, feature, map_page, geometry, prompt, compare, steer]
NAV = (("/map", "Map"), ("/geometry", "Geometry"), ("/prompt", "Prompt"), ("/steer", "Steer"))
# The only query parameters pages receive (each page takes the ones it knows as keywords).
QUERY_KEYS = (
    "run",
    "q",
    "mode",
    "focus",
    "color",
    "a",
    "b",
    "feature",
    "vector",
    "features",
    "targets",
    "strengths",
    "max_new",
)
ASSETS = Path(__file__).parent / "assets"


def guard(fn: Callable, fallback: tuple | None = None) -> Callable:
    """Bad input becomes a message on the page, never a 500 or a traceback. With several
    outputs, `fallback` gives their values on error; its None marks where the message goes."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            message = note(str(exc), "error")
        except Exception:  # a bug: logged with its traceback on the server only
            log.exception("callback %s failed", getattr(fn, "__name__", fn))
            message = note("Something went wrong on the server; its log has the details.", "error")
        if fallback is None:
            return message
        return tuple(message if value is None else value for value in fallback)

    return wrapped


def _pattern(page) -> re.Pattern:
    template = getattr(page, "PATH_TEMPLATE", None) or page.PATH  # e.g. /feature/<feature_id>
    regex = re.sub(r"<(\w+)>", r"(?P<\1>[^/]+)", template)
    return re.compile(f"^{regex}/?$" if template != "/" else "^/$")


ROUTES = [(_pattern(page), page) for page in PAGES]


def route(ws: Workspace, pathname: str | None, search: str | None):
    """(page body, document title) for a URL."""
    pathname = pathname or "/"
    query = {}
    for key, values in parse_qs((search or "").lstrip("?")).items():
        if key in QUERY_KEYS and values:
            query[key] = values[0][:200]
    for pattern, page in ROUTES:
        match = pattern.match(pathname)
        if match:
            values = match.groupdict()
            body = guard(page.layout)(ws, **values, **query)
            title = page.TITLE
            if values.get("feature_id"):
                title = f"{title} {values['feature_id'][:20]}"
            return body, f"{title} · saewb"
    return not_found(f"There is no page at {pathname[:100]}."), "Not found · saewb"


def shell() -> html.Div:
    return html.Div(
        [
            dcc.Location(id="url", refresh="callback-nav"),
            html.Header(
                [
                    dcc.Link("saewb", href="/", className="brand"),
                    dcc.Link("Runs", href="/", id="nav-runs"),
                    html.Span(id="nav-run"),
                ],
                className="topbar",
            ),
            html.Main(id="page"),
            html.Div(id="title-sink", style={"display": "none"}),
        ]
    )


def navigation(search: str | None) -> list:
    """Links for the run in the URL, if any."""
    run = parse_qs((search or "").lstrip("?")).get("run", [None])[0]
    if not run:
        return []
    run = run[:200]
    links = [dcc.Link(f"Features of {run[:80]}", href=href(browser.PATH, run), id="nav-features")]
    for path, text in NAV:
        links.append(dcc.Link(text, href=href(path, run), id=f"nav{path.replace('/', '-')}"))
    return links


def create_app(ws: Workspace | Path | str) -> Dash:
    """The dashboard for one served folder (a run, or a folder with runs below it)."""
    ws = ws if isinstance(ws, Workspace) else Workspace(ws)
    app = Dash(
        __name__,
        title="saewb",
        assets_folder=str(ASSETS),
        suppress_callback_exceptions=True,  # page callbacks target components of other pages
        update_title=None,
    )
    app.layout = shell()
    app.callback(
        Output("page", "children"),
        Output("title-sink", "children"),
        Input("url", "pathname"),
        Input("url", "search"),
    )(lambda pathname, search: route(ws, pathname, search))
    app.callback(Output("nav-run", "children"), Input("url", "search"))(navigation)
    app.clientside_callback(
        "function(title) { if (title) { document.title = title; } return ''; }",
        Output("title-sink", "title"),
        Input("title-sink", "children"),
    )
    for page in PAGES:
        page.register(app, ws, guard)
    app.server.config["SAEWB_WORKSPACE"] = ws
    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(path: Path | str, host: str = "127.0.0.1", port: int = 8050, device: str = "cpu") -> None:
    ws = Workspace(path, device=device)
    found = ws.runs()
    app = create_app(ws)
    if not is_loopback(host):
        print(
            f"[saewb] warning: serving on {host}, reachable from other machines.", file=sys.stderr
        )
    print(f"[saewb] {len(found)} run(s) under {ws.root}")
    print(
        f"[saewb] dashboard at http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/ "
        "(Ctrl-C to stop)"
    )
    # waitress, a production WSGI server, rather than Flask's development server; its threads
    # serve requests while 'try your own text' and steering jobs run in their own threads.
    from waitress import serve as serve_wsgi

    try:
        serve_wsgi(app.server, host=host, port=port, threads=8)
    except KeyboardInterrupt:  # Ctrl-C is how a served dashboard ends, not an interruption
        print("[saewb] dashboard stopped.", file=sys.stderr)


__all__ = ["NotFound", "create_app", "serve", "route", "guard"]
