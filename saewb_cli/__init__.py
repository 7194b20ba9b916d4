"""The `saewb` command line, above all four layers (hooks, sae, analysis, dashboard).

Building the parser imports only this package; each subcommand imports its layer when it runs,
so `saewb train` never loads Dash and an ImportError in a layer is a real traceback. Every
subcommand turns bad input into one sentence on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hooks.errors import UserError
from saewb_cli.args import parse_count

# The modules that define subcommands, in the order `saewb --help` lists them.
MODULES = (
    "saewb_cli.demo",
    "saewb_cli.data",
    "saewb_cli.train",
    "saewb_cli.measure",
    "saewb_cli.geometry",
    "saewb_cli.steer",
    "saewb_cli.lf_steer",
    "saewb_cli.serve",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saewb", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in MODULES:
        importlib.import_module(name).add_parsers(sub)
    return parser


def run(argv: list[str]) -> object:
    """Parse and run one subcommand (UserErrors propagate); returns what the command returns."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except UserError as exc:
        print(f"saewb: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " with --resume" if args.command in ("train", "analyze") else ""
        print(f"saewb: interrupted; rerun the same command{hint} to continue.", file=sys.stderr)
        return 130
    return 0


__all__ = ["build_parser", "main", "parse_count", "run"]
