"""`saewb lf-steer`: LF-Steering for paraphrase consistency, against CAA and random latents."""

from __future__ import annotations

import argparse

from hooks.errors import UserError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lf-steer", help="steer SAE latents so that paraphrases get the same answer")
    p.add_argument("run", help="run directory with a trained SAE")
    p.add_argument("--data", help="paraphrase groups, jsonl (default: the built-in set)")
    p.add_argument("--locality", help="out-of-domain NLU prompts, jsonl (default: built in)")
    p.add_argument("--seed", type=int, default=0, help="the tune/eval split, random latents, CIs")
    p.add_argument("--strengths", default="0.5,1,2", help="the strength grid, comma-separated")
    p.add_argument("--counts", default="1,4,16", help="the grid of latent counts")
    p.add_argument("--caa-method", default="mean", choices=["mean", "pca"])
    p.add_argument("--batch", type=int, default=16, help="prompts a forward")
    p.add_argument("--max-new", type=int, default=6, help="tokens generated for NLG answers")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--device", default="cpu")
    p.set_defaults(handler=cmd_lf_steer)


def parse_grid(text: str, kind: type, what: str) -> tuple:
    """'0.5,1,2' -> (0.5, 1.0, 2.0): finite numbers, counts positive."""
    import math

    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    ok = values and all(math.isfinite(v) for v in values)
    if not ok or (kind is int and min(values) <= 0):
        sort = "positive whole numbers" if kind is int else "finite numbers"
        raise UserError(f"{what} must be comma-separated {sort}, such as 1,4,16; got '{text}'.")
    return values


def cmd_lf_steer(args: argparse.Namespace) -> dict:
    from analysis.run import open_run
    from analysis.steering.lf import lf_steer
    from analysis.steering.paraphrases import read_groups
    from hooks.models import parse_device

    strengths = parse_grid(args.strengths, float, "--strengths")
    counts = parse_grid(args.counts, int, "--counts")
    for flag, value in (
        ("--batch", args.batch),
        ("--max-new", args.max_new),
        ("--boot", args.boot),
    ):
        if value <= 0:
            raise UserError(f"{flag} must be a positive whole number, got {value}.")
    groups = read_groups(args.data) if args.data else None
    locality = read_groups(args.locality) if args.locality else None
    device = str(parse_device(args.device))
    run = open_run(args.run, device=device)
    result = lf_steer(
        run, groups, device, locality=locality, seed=args.seed, strengths=strengths,
        counts=counts, caa_method=args.caa_method, n_boot=args.boot, batch=args.batch,
        max_new=args.max_new,
    )  # fmt: skip
    chosen = result["search"]["chosen"]
    print(f"{result['data']['groups']} groups ({result['data']['source']}); eval on "
          f"{len(result['split']['eval'])}, chosen on {len(result['split']['tune'])}: "
          f"{chosen['latents']} latents at strength {chosen['strength']:g} "
          f"({', '.join(str(r['id']) for r in result['latents'])})")  # fmt: skip
    print(f"{'':8s} {'consistency':>22s} {'accuracy':>22s} {'consistent+correct':>22s}"
          f" {'locality acc':>12s} {'KL':>8s}")  # fmt: skip
    for name, row in result["methods"].items():
        cells = [f"{row[m]:.3f} [{row[m + '_ci'][0]:.2f}, {row[m + '_ci'][1]:.2f}]"
                 for m in ("consistency", "accuracy", "consistent_correct")]  # fmt: skip
        local = row["locality"]
        print(f"{name:8s} " + " ".join(f"{c:>22s}" for c in cells)
              + f" {local['accuracy']:12.3f} {local['kl']:8.4f}")  # fmt: skip
    print(f"wrote {run.path / 'steering' / 'lf_steering.json'} ({result['seconds']:.0f} s)")
    return result
