"""`saewb steer` and `saewb caa`: a run's model with and without steering, side by side, with
metrics, or swept over strength into a frontier; and CAA vectors built from contrastive pairs.

Everything is saved under RUN/steering/, atomically:
  vectors/NAME.safetensors (+ NAME.json)  a CAA vector and its provenance (analysis/steering/caa.py)
  runs/NAME.json       one `saewb steer`: {format "saewb-steering-run", version, run, model, site,
                       prompt, settings {mode, units, positions, max_new, sample, seed, methods
                       {"sae": [{feature, value, raw_value}], "caa:NAME": [{vector, value,
                       provenance}]}}, neutral, created, baseline {text, perplexity}, steered
                       {text, perplexity}, metrics {kl, [targets, target_ids, target_shift]}}
  frontiers/NAME.json  one `--sweep`: {format "saewb-steering-frontier", the same header, targets,
                       strengths, curves {method: frontier()'s dict}, matched:
                       matched_side_effect()'s dict or null}; NAME.html is its plotly figure
NAME is --name, else steer-/frontier-YYYYmmdd-HHMMSS."""

from __future__ import annotations

import argparse
import math
import re
import time

from hooks.errors import UserError

MODES = ("add", "clamp", "ablate", "cap", "replace")
RUN_FORMAT, FRONTIER_FORMAT, VERSION = "saewb-steering-run", "saewb-steering-frontier", 1
DEFAULT_STRENGTHS = "0,0.5,1,2,4,8"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("steer", help="generate with SAE features or a CAA vector turned up or down")
    p.add_argument("run", help="run directory with a trained SAE")
    p.add_argument("--prompt", required=True)
    p.add_argument(
        "--feature",
        action="append",
        default=[],
        metavar="ID:VALUE",
        help="a latent and its strength, e.g. 123:8; repeat for several",
    )
    p.add_argument(
        "--vector",
        action="append",
        default=[],
        metavar="NAME[:VALUE]",
        help="a saved vector (name under RUN/steering/vectors/ or a .safetensors path) and the "
        "length to add; without a value, its own norm",
    )
    p.add_argument("--mode", default="add", choices=MODES)
    p.add_argument(
        "--units",
        default="raw",
        choices=["raw", "max"],
        help="feature strengths raw, or in units of the feature's max activation (feature store)",
    )
    p.add_argument("--positions", default="all", choices=["all", "prompt", "generated"])
    p.add_argument("--max-new", type=int, default=40, help="tokens to generate")
    p.add_argument("--sample", action="store_true", help="sample (seeded) instead of greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="TEXT",
        help="a target word, e.g. ' cat' (repeat); reports its probability shift",
    )
    p.add_argument("--sweep", action="store_true", help="sweep the strength: the frontier")
    p.add_argument(
        "--strengths",
        default=DEFAULT_STRENGTHS,
        help=f"the sweep's multipliers of each given value (default {DEFAULT_STRENGTHS})",
    )
    p.add_argument(
        "--samples", type=int, default=8, help="generations a prompt and strength, with --sample"
    )
    p.add_argument("--neutral", default=None, help="neutral text for the KL (default held-out)")
    p.add_argument("--name", default=None, help="file name under RUN/steering/ (default a time)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(handler=cmd_steer)

    c = sub.add_parser("caa", help="build a CAA steering vector from contrastive prompt pairs")
    c.add_argument("run", help="run directory (its model and site)")
    c.add_argument("--pairs", required=True, help='jsonl: {"positive": "...", "negative": "..."}')
    c.add_argument("--method", default="mean", choices=["mean", "pca"])
    c.add_argument("--name", default=None, help="vector name (default: the pairs file's stem)")
    c.add_argument("--device", default="cpu")
    c.set_defaults(handler=cmd_caa)


def _finite(value: float, text: str) -> float:
    if not math.isfinite(value):
        raise UserError(f"The steering strength must be a finite number, got '{text}'.")
    return value


def parse_feature(text: str) -> tuple[int, float]:
    """'123:8' -> (123, 8.0); 'ablate' and the like need no value: '123' -> (123, 0.0)."""
    head, _, tail = text.partition(":")
    try:
        feature, value = int(head), float(tail) if tail else 0.0
    except ValueError:
        raise UserError(
            f"--feature must look like 123:8 (a latent id and a strength), got '{text}'."
        ) from None
    return feature, _finite(value, text)


def parse_vector(text: str) -> tuple[str, float | None]:
    """'caa:4' -> ('caa', 4.0); 'caa' -> ('caa', None): the vector's own norm."""
    head, sep, tail = text.rpartition(":")
    try:
        value = float(tail) if sep else None
    except ValueError:
        return text, None  # a path with a colon in it, and no value
    return (head, _finite(value, text)) if sep else (text, None)


def parse_strengths(text: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--strengths must be numbers separated by commas, got '{text}'.") from None
    if not values:
        raise UserError("--strengths is empty; give numbers such as 0,1,2,4.")
    return [_finite(v, text) for v in values]


def _target(folder, name: str | None, kind: str):
    """folder/NAME.json: the name given, else KIND-time (with -2, -3, ... if that is taken)."""
    if name is not None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
            raise UserError(f"--name '{name}' must be letters, digits, '_', '-' or '.'.")
        return folder / f"{name}.json"
    stem = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = folder / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.json"
    return path


def _methods(args, run) -> dict[str, tuple[list, list[dict]]]:
    """name -> (interventions at strength 1, their settings as recorded): "sae" for the
    features, "caa:NAME" for each vector."""
    from analysis.steering.interventions import feature_edits, vector_edit

    methods = {}
    if args.feature:
        given = [parse_feature(text) for text in args.feature]  # (feature, value) each
        specs = [(f, args.mode, v, args.units) for f, v in given]
        raw = feature_edits(run.path, run.sae, specs)
        settings = [dict(feature=f, value=v, raw_value=r.value) for (f, v), r in zip(given, raw)]
        methods["sae"] = (raw, settings)
    for text in args.vector:
        spec, value = parse_vector(text)
        edit, meta = vector_edit(run.path, spec, run.site, args.mode, value)
        settings = [dict(vector=spec, value=edit.value, provenance=meta)]
        methods[f"caa:{meta.get('name', spec)}"] = ([edit], settings)
    if not methods:
        raise UserError("Give at least one --feature ID:VALUE or --vector NAME[:VALUE].")
    return methods


def cmd_steer(args: argparse.Namespace) -> dict:
    from analysis.run import open_run
    from hooks.paths import atomic_write_json

    if args.max_new <= 0:
        raise UserError(f"--max-new must be a positive number of tokens, got {args.max_new}.")
    if args.sweep and not args.target:
        raise UserError("--sweep needs the target to move: give --target ' word' (repeatable).")
    strengths = parse_strengths(args.strengths) if args.sweep else None
    run = open_run(args.run, device=args.device)
    methods = _methods(args, run)
    loaded = run.load_model(args.device, progress=False)
    model, tokenizer, sae = loaded.model.eval(), loaded.tokenizer, run.sae.eval()
    from analysis.steering.interventions import Steering
    from analysis.steering.steer_prompt import neutral_ids

    neutral, neutral_from = neutral_ids(run, tokenizer, args.device, args.neutral)

    for raw, _ in methods.values():  # every method's bad input is refused before any work
        Steering(model, run.site, raw, sae)
    common = dict(
        run=str(run.path), model=run.model, site=run.site, prompt=args.prompt,
        settings=dict(mode=args.mode, units=args.units, positions=args.positions,
                      max_new=args.max_new, sample=args.sample, seed=args.seed,
                      methods={name: s for name, (_, s) in methods.items()}),
        neutral=neutral_from, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )  # fmt: skip
    if args.sweep:
        return _sweep(args, run, model, tokenizer, sae, methods, strengths, neutral, common)
    out = _single(args, model, tokenizer, sae, run.site, methods, neutral, neutral_from)
    record = dict(format=RUN_FORMAT, version=VERSION, **common, **out)
    path = _target(run.path / "steering" / "runs", args.name, "steer")
    atomic_write_json(path, record)
    print(f"saved     {path}")
    return record


def _single(args, model, tokenizer, sae, site, methods, neutral, neutral_from) -> dict:
    """Baseline and steered generation with every method's edits at once, and the metrics."""
    from analysis.steering.steer_prompt import steer_prompt

    edits = [edit for raw, _ in methods.values() for edit in raw]
    out = steer_prompt(
        model, tokenizer, sae, site, edits, args.prompt, neutral, args.target or None,
        positions=args.positions, max_new=args.max_new, sample=args.sample, seed=args.seed,
    )  # fmt: skip
    metrics = out["metrics"]
    print(f"prompt    {args.prompt}")
    for name in ("baseline", "steered"):
        print(f"{name:9s} {out[name]['text'].strip()}")
    print(f"perplexity (fluency, unsteered model): baseline {out['baseline']['perplexity']:.2f}, "
          f"steered {out['steered']['perplexity']:.2f}")  # fmt: skip
    print(f"KL on {neutral_from}: {metrics['kl']:.4f}")
    if args.target:
        print(f"target probability shift {metrics['target_shift']:+.4f}")
    return out


def _sweep(args, run, model, tokenizer, sae, methods, strengths, neutral, common) -> dict:
    """One frontier a method over the strengths, saved with its figure and the comparison at
    matched KL."""
    from dataclasses import replace

    from analysis.steering.frontier import figure, frontier, matched_side_effect
    from hooks.paths import atomic_write, atomic_write_json

    curves = {}
    for name, (raw, _) in methods.items():
        curves[name] = frontier(
            model, tokenizer, run.site,
            lambda s, raw=raw: [replace(e, value=e.value * s) for e in raw],
            strengths, args.target, [args.prompt], neutral, sae,
            positions=args.positions, max_new=args.max_new, sample=args.sample,
            samples=args.samples, seed=args.seed, progress=True,
        )  # fmt: skip
    compared = matched_side_effect(curves) if len(curves) > 1 else None
    record = dict(format=FRONTIER_FORMAT, version=VERSION, **common, targets=args.target,
                  strengths=strengths, curves=curves, matched=compared)  # fmt: skip
    path = _target(run.path / "steering" / "frontiers", args.name, "frontier")
    atomic_write_json(path, record)
    fig = figure(curves, f"Steering frontier: {', '.join(args.target)} ({run.site})")
    html = path.with_suffix(".html")
    atomic_write(html, lambda tmp: fig.write_html(tmp, include_plotlyjs=True))
    print(f"{'method':16s} {'strength':>9s} {'KL':>9s} {'p shift':>9s} {'contains':>9s}")
    for name, curve in curves.items():
        for s, kl, dp, c in zip(strengths, curve["kl"], curve["target_shift"], curve["contains"]):
            print(f"{name:16s} {s:9g} {kl:9.4f} {dp:+9.4f} {c:9.2f}")
    if compared is not None:
        if compared["kl"]:
            lo, hi = compared["kl"][0], compared["kl"][-1]
            print(f"at matched KL ({lo:.4f}..{hi:.4f}): mean probability shift "
                  + ", ".join(f"{n} {v:+.4f}" for n, v in compared["mean_effect"].items())
                  + f"; larger: {compared['better'] or 'a tie'} (measured points in that "
                  f"range: {', '.join(f'{n} {k}' for n, k in compared['measured'].items())})")  # fmt: skip
        else:
            print("the curves share no KL range; widen --strengths to compare them")
    print(f"saved     {path}\nfigure    {html}")
    return record


def cmd_caa(args: argparse.Namespace) -> dict:
    from pathlib import Path

    from analysis.run import open_run
    from analysis.steering.caa import caa_vector, read_pairs, save_vector
    from hooks.paths import sha256_file

    pairs = read_pairs(args.pairs)
    name = args.name if args.name is not None else Path(args.pairs).stem
    run = open_run(args.run, device=args.device)
    loaded = run.load_model(args.device, progress=False)
    vector = caa_vector(loaded.model.eval(), loaded.tokenizer, run.site, pairs, args.method)
    if not float(vector.norm()) > 0:
        raise UserError(
            f"The CAA vector of {args.pairs} is zero: each pair's two prompts have the same "
            f"state at {run.site} at their last tokens; make the prompts differ there."
        )
    provenance = dict(
        site=run.site,
        model=run.model,
        method=args.method,
        n_pairs=len(pairs),
        pairs_file=str(Path(args.pairs).resolve()),
        pairs_sha256=sha256_file(Path(args.pairs)),
    )
    path = save_vector(run.path, name, vector, provenance)
    print(f"CAA vector ({args.method} of {len(pairs)} pairs at {run.site}), norm "
          f"{float(vector.norm()):.4f}: {path}")  # fmt: skip
    print(f"apply it with: saewb steer {run.path} --prompt '...' --vector {name}:VALUE")
    return dict(path=str(path), norm=float(vector.norm()), **provenance)
