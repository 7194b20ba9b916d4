"""`saewb train`: SAEs and transcoders of every kind from a live model or an activation cache (torchrun for several ranks).

Every default lives in sae.train.TrainConfig: a flag left out is None here and keeps it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hooks.errors import UserError
from saewb_cli.args import (
    add_selection_args,
    parse_count,
    selection_flags_given,
    selection_from_args,
)

OPTIMIZERS = "sf-signsgd (schedule-free sign descent, the default), adam or signum"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train SAEs or transcoders from a live model or a cache")
    p.add_argument(
        "--model", help="'smollm2-135m' (built in), a HF model name or a local directory"
    )
    p.add_argument("--device", help="cpu (default), cuda or cuda:N (torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--site", action="append", help="repeat to train several sites at once")
    p.add_argument("--latents", action="append", help="dictionary size; repeatable")
    p.add_argument("--k", action="append", type=int, help="active latents per token; repeatable")
    p.add_argument("--tokens", help="tokens to train on (2M)")
    p.add_argument("--cache", help="train from this activation cache")
    p.add_argument("--out", help="run directory (default checkpoints/<site>-n<N>-k<K>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--batch", type=int, help="tokens per step (4096)")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        help="bf16 runs the encoder's matmul and top-k in bf16, as autocast would; the decoder, "
        "losses, gradients and weights stay fp32. It pays only where bf16 runs in hardware "
        "(GPUs, CPUs with AMX or avx512_bf16)",
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--optimizer", help=OPTIMIZERS)
    p.add_argument("--lr", type=float, help="default: the 1/sqrt(latents) rule of the optimizer")
    p.add_argument(
        "--architecture",
        help="topk (default), batchtopk, matryoshka (BatchTopK with nested prefixes), jumprelu "
        "or relu (L1); for jumprelu and relu --k is the target L0",
    )
    p.add_argument(
        "--target",
        help="train a transcoder from --site to this site of the same forward pass "
        "(e.g. --site mlp_in.6 --target mlp_out.6)",
    )
    p.add_argument(
        "--skip", action="store_true", default=None, help="a transcoder's linear skip connection"
    )
    p.add_argument(
        "--prefixes",
        help="matryoshka prefix sizes, comma-separated and increasing (default n/16,n/8,n/4,n/2,n)",
    )
    p.add_argument("--bandwidth", type=float, help="jumprelu's straight-through width (0.05)")
    p.add_argument(
        "--pre-act-loss", type=float, help="jumprelu: pull dead latents to their threshold (0)"
    )
    p.add_argument(
        "--multi-topk", action="store_true", default=None, help="add FVU(4k)/8 to the loss"
    )
    p.add_argument("--no-auxk", action="store_true", help="switch off the AuxK loss")
    p.add_argument("--dead-tokens", help="tokens without firing = dead")
    p.add_argument("--checkpoint-every", help="tokens between checkpoints (500k)")
    p.add_argument("--log-every", type=int, help="steps between log lines (10)")
    p.add_argument("--buffer-tokens", help="mixing buffer size in tokens")
    p.add_argument("--model-batch", type=int, help="windows per model forward (8)")
    add_selection_args(p)
    p.set_defaults(handler=cmd_train)


def _count(value: str | None, flag: str) -> int | None:
    return None if value is None else parse_count(value, flag)


def _prefixes(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [parse_count(v.strip(), "--prefixes") for v in value.split(",") if v.strip()]
    except UserError:
        raise UserError(
            f"--prefixes takes increasing latent counts separated by commas, got '{value}'."
        ) from None


def train_config(args: argparse.Namespace):
    """The TrainConfig the flags ask for; a cache brings its own model, sites and selection."""
    from sae.train import TrainConfig

    given = {
        "model": args.model,
        "sites": args.site,
        "latents": [parse_count(v, "--latents") for v in args.latents] if args.latents else None,
        "ks": args.k,
        "architecture": args.architecture,
        "multi_topk": args.multi_topk,
        "target": args.target,
        "skip": args.skip,
        "prefixes": _prefixes(args.prefixes),
        "bandwidth": args.bandwidth,
        "pre_act_loss": args.pre_act_loss,
        "tokens": _count(args.tokens, "--tokens"),
        "batch": args.batch,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "encode_dtype": args.dtype,
        "seed": args.seed,
        "auxk": False if args.no_auxk else None,
        "dead_tokens": _count(args.dead_tokens, "--dead-tokens"),
        "log_every": args.log_every,
        "checkpoint_every": _count(args.checkpoint_every, "--checkpoint-every"),
        "cache": args.cache,
        "model_batch": args.model_batch,
        "buffer_tokens": _count(args.buffer_tokens, "--buffer-tokens"),
        "device": args.device,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if not args.cache:
        return TrainConfig(**given, selection=selection_from_args(args))
    from hooks.cache import ActivationCache

    cache = ActivationCache(Path(args.cache))
    flags = selection_flags_given(args)
    if flags:
        raise UserError(
            f"{flags[0]} chooses which tokens become data, but the cache {args.cache} was "
            f"harvested with its own selection already ({cache.manifest.get('selection')}); "
            "harvest a new "
            "cache with that flag, or leave it out."
        )
    if args.model is not None and args.model != cache.manifest["model"]:
        raise UserError(
            f"The cache {args.cache} holds activations of '{cache.manifest['model']}', "
            f"not '{args.model}'."
        )
    given.setdefault("sites", cache.sites[:1])
    return TrainConfig(**given)


def cmd_train(args: argparse.Namespace) -> list[Path]:
    from sae.train import Trainer, run_name

    cfg = train_config(args)
    specs = cfg.specs()
    single = (
        run_name(*specs[0], cfg.architecture, cfg.target)
        if len(specs) == 1
        else f"{cfg.model.replace('/', '_')}-multi"
    )
    out = Path(args.out or Path("checkpoints") / single)
    start = time.perf_counter()
    trainer = Trainer(cfg, out, resume=args.resume)
    runs = trainer.fit()
    if trainer.world.main:
        seconds = time.perf_counter() - start
        print(f"trained {len(runs)} SAE(s) on {trainer.tokens:,} tokens in {seconds:.0f} s")
        for run in runs:
            lines = (run / "train_log.jsonl").read_text().splitlines()
            last = json.loads(lines[-1]) if lines else {}
            print(
                f"  {run}: fvu {last.get('fvu', float('nan')):.3f}, l0 {last.get('l0', 0):.1f}, "
                f"dead {last.get('dead_frac', 0):.3f}"
            )
    return runs
