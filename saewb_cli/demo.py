"""`saewb demo`: every stage on the built-in model and corpus, into one folder, resumable."""

from __future__ import annotations

import argparse
from pathlib import Path

from saewb_cli.args import parse_count


def add_parsers(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run every stage on the built-in model and corpus")
    demo.add_argument("--out", default="checkpoints/demo")
    demo.add_argument("--tokens", default="100k")
    demo.add_argument("--site", default="resid_post.3")
    demo.add_argument("--latents", type=int, default=2304)
    demo.add_argument("--k", type=int, default=16)
    demo.add_argument("--batch", type=int, default=2048)
    demo.add_argument("--eval-tokens", default="8k")
    demo.add_argument("--analyze-tokens", default="30k")
    demo.add_argument("--no-serve", action="store_true", help="do not start the dashboard")
    demo.add_argument("--host", default="127.0.0.1", help="dashboard address (this machine only)")
    demo.add_argument("--port", type=int, default=8050, help="dashboard port")
    demo.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> None:
    from saewb_cli import run as saewb

    out = Path(args.out)
    n_tokens = parse_count(args.tokens)
    cache, run = out / "cache", out / "run"
    print(f"== saewb demo: smollm2-135m at {args.site}, {n_tokens:,} tokens -> {out}")
    print("== 1/4 harvest activations into a cache (resumes if interrupted)")
    saewb(["harvest", "--site", args.site, "--tokens", str(n_tokens), "--cache", str(cache)])
    print(f"== 2/4 train a TopK SAE ({args.latents} latents, k={args.k}) from the cache")
    train = ["train", "--site", args.site, "--cache", str(cache), "--latents", str(args.latents),
             "--k", str(args.k), "--tokens", str(n_tokens), "--batch", str(args.batch),
             "--out", str(run)]  # fmt: skip
    if (run / "state" / "latest.json").exists():
        train.append("--resume")
    saewb(train)
    print("== 3/4 evaluate on held-out text (eval.json)")
    saewb(["eval", str(run), "--tokens", args.eval_tokens])
    print("== 4/4 build the feature store (features/)")
    analyze = ["analyze", str(run), "--tokens", args.analyze_tokens]
    if (run / "features" / "partial" / "state.safetensors").exists():
        analyze.append("--resume")
    saewb(analyze)
    print(f"== done: the run directory is {run}")
    if not args.no_serve:
        saewb(["dashboard", str(out), "--host", args.host, "--port", str(args.port)])
