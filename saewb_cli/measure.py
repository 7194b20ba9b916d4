"""Subcommands of the analysis layer: `saewb eval` and `saewb analyze`."""

from __future__ import annotations

import argparse
import json
import time

from saewb_cli.args import parse_count


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a run's SAE on held-out text (eval.json)")
    p.add_argument("run", help="run directory written by `saewb train`")
    # 20k is SAEBench's core-eval default (10 batches of 16 prompts of 128 tokens)
    p.add_argument("--tokens", default="20k", help="held-out tokens to evaluate on (20k)")
    p.add_argument("--batch", type=int, default=8, help="windows per model forward")
    p.add_argument("--device", default="cpu")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser(
        "analyze", help="build the feature store: examples, histograms, logits, neighbours"
    )
    p.add_argument("run", help="run directory with a trained SAE")
    p.add_argument("--tokens", default="1M", help="held-out tokens to stream (e.g. 500k, 2M)")
    p.add_argument("--top-k", type=int, default=20, help="top activating examples per latent")
    p.add_argument("--batch", type=int, default=16, help="windows per model forward")
    p.add_argument("--resume", action="store_true", help="continue a killed analyze exactly")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16"],
        help="the top-k search's dtype; bf16 pays only where it runs in hardware (GPUs, CPUs with "
        "AMX or avx512_bf16; elsewhere it is far slower), values stay fp32",
    )
    p.add_argument("--checkpoint-every", default="1M", help="tokens between checkpoints")
    p.set_defaults(handler=cmd_analyze)


def cmd_eval(args: argparse.Namespace) -> None:
    from analysis.evaluation import EVAL_FILE, evaluate, format_table
    from analysis.run import open_run
    from hooks.models import parse_device
    from hooks.paths import atomic_write_json

    n_tokens = parse_count(args.tokens)
    device = parse_device(args.device)
    run = open_run(args.run, device=str(device))
    record = evaluate(run, n_tokens, batch_windows=args.batch)
    atomic_write_json(run.path / EVAL_FILE, record)
    print(format_table(record))
    print(f"wrote {run.path / EVAL_FILE}")


def cmd_analyze(args: argparse.Namespace) -> None:
    import torch

    from analysis.run import open_run
    from analysis.store.build import analyze
    from hooks.models import parse_device

    n_tokens = parse_count(args.tokens)
    every = parse_count(args.checkpoint_every, "--checkpoint-every")
    run = open_run(args.run, device="cpu")
    parse_device(args.device)
    started = time.perf_counter()
    out = analyze(
        run,
        n_tokens,
        top_k=args.top_k,
        batch_windows=args.batch,
        resume=args.resume,
        device=args.device,
        checkpoint_tokens=every,
        encode_dtype=torch.bfloat16 if args.dtype == "bf16" else None,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"feature store  {out}")
    print(f"tokens         {manifest['n_tokens']:,} held-out ({manifest['n_windows']:,} windows)")
    print(f"latents        {manifest['n_latents']:,}, dead {manifest['dead_fraction']:.3f}")
    print(f"took           {time.perf_counter() - started:.1f} s")
