"""Subcommands of feature geometry: `saewb geometry` and `saewb compare`."""

from __future__ import annotations

import argparse
import json

from saewb_cli.args import parse_count

NAMES = "map,lobes,galaxy,crystals,multidim"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "geometry", help="feature geometry: map, lobes, galaxy, crystals, multi-dim features"
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN", help="run directories (several: slope by layer)"
    )
    p.add_argument("--only", help=f"comma-separated subset of {NAMES} (all)")
    p.add_argument("--force", action="store_true", help="redo analyses that are already done")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--option",
        action="append",
        metavar="NAME.KEY=VALUE",
        help="an analysis option, e.g. lobes.n_clusters=32 or map.method=tsne; repeatable",
    )
    p.add_argument("--tokens", default="256k", help="held-out tokens to encode for lobes/multidim")
    p.add_argument("--device", default="cpu")
    p.set_defaults(handler=cmd_geometry)

    p = sub.add_parser("compare", help="compare two dictionaries (seeds, widths or layers)")
    p.add_argument("run_a", metavar="RUN_A", help="the result goes to RUN_A/geometry/compare/")
    p.add_argument("run_b", metavar="RUN_B")
    p.add_argument("--tokens", default="32k", help="shared tokens for SVCCA, CKA and Procrustes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(handler=cmd_compare)


def cmd_geometry(args: argparse.Namespace) -> None:
    from analysis.geometry.pipeline import run_geometry
    from hooks.models import parse_device

    parse_device(args.device)
    done = run_geometry(
        args.runs,
        only=args.only,
        force=args.force,
        seed=args.seed,
        options=args.option,
        n_tokens=parse_count(args.tokens),
        device=args.device,
    )
    for path, summaries in done.items():
        print(f"{path}/geometry: {', '.join(summaries)}")


def cmd_compare(args: argparse.Namespace) -> None:
    from analysis.geometry.codes import Inputs
    from analysis.geometry.compare import compare
    from analysis.geometry.results import write_result
    from analysis.run import open_run
    from hooks.models import parse_device

    parse_device(args.device)
    n_tokens = parse_count(args.tokens)
    run_a, run_b = open_run(args.run_a, args.device), open_run(args.run_b, args.device)
    inputs_a = Inputs(run_a, n_tokens, args.device)
    inputs_b = Inputs(run_b, n_tokens, args.device)
    if run_b.model == run_a.model and run_b.selection.model_dtype == run_a.selection.model_dtype:
        inputs_b.share_model(inputs_a)  # one copy of the model for both runs
    result = compare(run_a, run_b, inputs_a, inputs_b, n_tokens=n_tokens, seed=args.seed)
    folder = run_a.path / "geometry" / "compare"
    write_result(folder, result)
    print(json.dumps(result.summary, indent=1, default=str))
    print(f"wrote {folder}")
