"""`saewb dashboard`: serve the Dash app over a folder of runs."""

from __future__ import annotations

import argparse

from hooks.errors import UserError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="browse runs and features in the browser")
    p.add_argument(
        "path",
        nargs="?",
        default="checkpoints",
        help="a run directory, or a folder with runs below it (default: checkpoints)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8050)
    p.add_argument("--device", default="cpu", help="where 'try your own text' runs the model")
    p.set_defaults(handler=cmd_dashboard)


def cmd_dashboard(args: argparse.Namespace) -> None:
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}.")
    from dashboard.app import serve

    serve(args.path, args.host, args.port, args.device)
