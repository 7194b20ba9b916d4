"""The `saewb` command line (also `python -m sae`).

Every subcommand turns bad input into one sentence on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import time
from pathlib import Path

from hooks.errors import UserError

_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kKmMgG]?)\s*$")
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_count(text: str, what: str = "--tokens") -> int:
    """'2000000', '2_000_000', '2M', '500k' or '2e6' -> int; anything else is a UserError."""
    match = _COUNT.match(str(text).replace("_", ""))
    value = float(match.group(1)) * _SCALE[match.group(2).lower()] if match else None
    if value is None or value != int(value) or value <= 0:
        raise UserError(
            f"{what} must be a positive whole number such as 100000, 100k or 2M, got '{text}'."
        )
    return int(value)


def _add_text_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        default="builtin",
        help="'builtin', a .txt/.jsonl/.parquet file or folder, or a HF dataset name",
    )
    p.add_argument(
        "--text-column", default="text", help="column holding the text (jsonl/parquet/HF)"
    )
    p.add_argument("--context", type=int, default=128, help="tokens per window")
    p.add_argument("--bos", default="prepend", choices=["prepend", "none"])
    p.add_argument(
        "--keep-first",
        action="store_true",
        help="keep position 0 (excluded by default: it is an attention sink)",
    )
    p.add_argument("--keep-special", action="store_true", help="keep BOS/EOS/PAD tokens")
    p.add_argument(
        "--drop-outliers",
        type=float,
        default=None,
        metavar="M",
        help="drop tokens whose norm exceeds M x the median norm",
    )


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="'smollm2-135m' (built in), a HF model name or a local directory",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--model-dtype", default="fp32", choices=["fp32", "bf16", "fp16"])


def build_parser() -> argparse.ArgumentParser:
    from sae.optim import OPTIMIZERS

    parser = argparse.ArgumentParser(prog="saewb", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

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

    corpus = sub.add_parser("corpus", help="inspect a text source")
    corpus_sub = corpus.add_subparsers(dest="corpus_command", required=True)
    info = corpus_sub.add_parser("info", help="documents, tokens and a sample")
    info.add_argument("--dataset", default="builtin")
    info.add_argument("--text-column", default="text")
    info.add_argument("--model", default="smollm2-135m", help="whose tokenizer counts tokens")

    sites = sub.add_parser("sites", help="list a model's hook sites and their shapes")
    _add_model_args(sites)

    harvest = sub.add_parser("harvest", help="capture activations into an on-disk cache")
    _add_model_args(harvest)
    harvest.add_argument("--site", action="append", required=True, help="repeat for several")
    harvest.add_argument("--tokens", required=True)
    harvest.add_argument("--cache", required=True, help="cache directory (resumed if partial)")
    harvest.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    harvest.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    harvest.add_argument("--shard-tokens", default="16k")
    _add_text_args(harvest)

    train = sub.add_parser("train", help="train TopK SAEs from a live model or a cache")
    _add_model_args(train)
    train.add_argument("--site", action="append", help="repeat to train several sites at once")
    train.add_argument("--latents", action="append", help="dictionary size; repeatable")
    train.add_argument(
        "--k", action="append", type=int, help="active latents per token; repeatable"
    )
    train.add_argument("--tokens", default="2M")
    train.add_argument("--cache", default=None, help="train from this activation cache")
    train.add_argument(
        "--out", default=None, help="run directory (default checkpoints/<site>-n<N>-k<K>)"
    )
    train.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    train.add_argument("--batch", type=int, default=4096, help="tokens per step")
    train.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16 runs the encoder's matmul and top-k in bf16, as autocast would; the decoder, "
        "losses, gradients and weights stay fp32",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--optimizer",
        default=None,
        choices=OPTIMIZERS,
        help="default sf-signsgd (schedule-free sign descent); adam, signum",
    )
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--architecture", default="topk", choices=["topk", "batchtopk"])
    train.add_argument("--multi-topk", action="store_true", help="add FVU(4k)/8 to the loss")
    train.add_argument("--no-auxk", action="store_true", help="switch off the AuxK loss")
    train.add_argument("--dead-tokens", default=None, help="tokens without firing = dead")
    train.add_argument("--checkpoint-every", default="500k", help="tokens between checkpoints")
    train.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    train.add_argument("--buffer-tokens", default=None, help="mixing buffer size in tokens")
    train.add_argument("--model-batch", type=int, default=8, help="windows per model forward")
    _add_text_args(train)

    for name, (module, add_parser, _) in PLUGINS.items():
        try:
            getattr(importlib.import_module(module), add_parser)(sub)
        except ImportError as exc:  # a later layer that is not installed or not built yet
            sub.add_parser(name, help=f"(unavailable: {exc})")

    cache = sub.add_parser("cache", help="inspect an activation cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    cache_info = cache_sub.add_parser("info", help="print the cache's summary")
    cache_info.add_argument("dir")
    return parser


def cmd_corpus_info(args: argparse.Namespace) -> None:
    from hooks.models import load_tokenizer
    from hooks.text import iter_documents

    tokenizer = load_tokenizer(args.model)
    docs = tokens = chars = 0
    sample = ""
    for doc in iter_documents(args.dataset, text_column=args.text_column):
        docs += 1
        chars += len(doc.text)
        tokens += len(tokenizer(doc.text, add_special_tokens=False)["input_ids"])
        if not sample:
            sample = f"{doc.title}: {doc.text[:300]}" if doc.title else doc.text[:300]
    print(f"source     {args.dataset}")
    print(f"documents  {docs:,}")
    print(f"characters {chars:,} ({chars / 2**20:.2f} MiB)")
    print(f"tokens     {tokens:,} ({args.model} tokenizer)")
    print(f"sample     {sample.strip()} ...")


def cmd_sites(args: argparse.Namespace) -> None:
    import torch

    from hooks.models import load_model
    from hooks.sites import Capture, list_sites

    loaded = load_model(args.model, args.device, args.model_dtype)
    names = list_sites(loaded.model)
    ids = torch.tensor([[loaded.tokenizer.eos_token_id or 0] * 4])
    with Capture(loaded.model, names, early_exit=False) as capture:
        acts = capture(ids.to(args.device))
    print(f"{loaded.name}: {loaded.n_layers} blocks, d_model {loaded.d_model}")
    for name in names:
        print(f"  {name:16s} (batch, seq, {acts[name].shape[-1]})")


def selection_from_args(args: argparse.Namespace):
    """The token selection the text and model flags ask for."""
    from hooks.selection import Selection

    return Selection(
        dataset=str(args.dataset),
        text_column=args.text_column,
        context_size=args.context,
        bos=args.bos,
        drop_special=not args.keep_special,
        drop_first=not args.keep_first,
        outlier_factor=args.drop_outliers,
        model_dtype=args.model_dtype,
    )


def cmd_harvest(args: argparse.Namespace) -> None:
    from hooks.cache import ActivationCache, harvest
    from hooks.models import load_model, parse_dtype
    from hooks.sites import resolve_site

    n_tokens = parse_count(args.tokens)
    shard_tokens = parse_count(args.shard_tokens, "--shard-tokens")
    selection = selection_from_args(args)
    loaded = load_model(args.model, args.device, selection.model_dtype)
    for site in args.site:
        resolve_site(loaded.model, site)
    start = time.perf_counter()
    manifest = harvest(
        loaded,
        args.site,
        selection.windows(loaded.tokenizer),
        n_tokens,
        Path(args.cache),
        selection,
        batch_windows=args.batch,
        dtype=parse_dtype(args.dtype),
        shard_tokens=shard_tokens,
    )
    seconds = time.perf_counter() - start
    print(ActivationCache(Path(args.cache)).describe())
    print(f"took        {seconds:.1f} s")
    del manifest


def train_config(args: argparse.Namespace):
    from sae.train import TrainConfig

    defaults = TrainConfig()
    latents = [parse_count(v, "--latents") for v in args.latents] if args.latents else [9216]
    cfg = TrainConfig(
        model=args.model,
        sites=args.site or ["resid_post.9"],
        latents=latents,
        ks=args.k or [32],
        architecture=args.architecture,
        multi_topk=args.multi_topk,
        tokens=parse_count(args.tokens),
        batch=args.batch,
        optimizer=args.optimizer or defaults.optimizer,
        lr=args.lr,
        dtype=args.dtype,
        seed=args.seed,
        auxk=not args.no_auxk,
        dead_tokens=parse_count(args.dead_tokens, "--dead-tokens") if args.dead_tokens else None,
        log_every=args.log_every,
        checkpoint_every=parse_count(args.checkpoint_every, "--checkpoint-every"),
        cache=args.cache,
        selection=selection_from_args(args),
        model_batch=args.model_batch,
        buffer_tokens=parse_count(args.buffer_tokens, "--buffer-tokens")
        if args.buffer_tokens
        else None,
        device=args.device,
    )
    if args.cache:
        from hooks.cache import ActivationCache

        cache = ActivationCache(Path(args.cache))
        manifest = cache.manifest
        asked = [a for a in _SELECTION_FLAGS if getattr(args, a) != build_parser_defaults()[a]]
        if asked and cache.selection is not None:
            flag = asked[0]
            raise UserError(
                f"--{flag.replace('_', '-')} selects tokens when data is made, but --cache "
                f"{args.cache} was harvested already with {cache.selection.to_dict()}; "
                "harvest a new cache with it, or drop the flag."
            )
        cfg.sites = args.site or manifest["sites"][:1]
        if args.model != "smollm2-135m" and args.model != manifest["model"]:
            raise UserError(
                f"The cache {args.cache} holds activations of '{manifest['model']}', "
                f"not '{args.model}'."
            )
    return cfg


# Flags that choose which tokens become data: a cache has chosen already.
_SELECTION_FLAGS = (
    "dataset",
    "text_column",
    "context",
    "bos",
    "keep_first",
    "keep_special",
    "drop_outliers",
    "model_dtype",
)


def build_parser_defaults() -> dict:
    train = build_parser().parse_args(["train"])
    return vars(train)


def cmd_train(args: argparse.Namespace) -> list[Path]:
    from sae.train import Trainer, run_name

    cfg = train_config(args)
    specs = cfg.specs()
    out = Path(
        args.out
        or Path("checkpoints")
        / (run_name(*specs[0]) if len(specs) == 1 else f"{cfg.model.replace('/', '_')}-multi")
    )
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


def cmd_cache_info(args: argparse.Namespace) -> None:
    from hooks.cache import ActivationCache

    print(ActivationCache(Path(args.dir)).describe())


def cmd_demo(args: argparse.Namespace) -> None:
    """Every stage that exists, on the built-in model and corpus, into one folder."""
    out = Path(args.out)
    n_tokens = parse_count(args.tokens)
    cache, run = out / "cache", out / "run"
    print(f"== saewb demo: smollm2-135m at {args.site}, {n_tokens:,} tokens -> {out}")
    print("== 1/4 harvest activations into a cache (resumes if interrupted)")
    cmd_harvest(
        build_parser().parse_args(
            ["harvest", "--site", args.site, "--tokens", str(n_tokens), "--cache", str(cache)]
        )
    )
    print(f"== 2/4 train a TopK SAE ({args.latents} latents, k={args.k}) from the cache")
    train = [
        "train",
        "--site",
        args.site,
        "--cache",
        str(cache),
        "--latents",
        str(args.latents),
        "--k",
        str(args.k),
        "--tokens",
        str(n_tokens),
        "--batch",
        str(args.batch),
        "--out",
        str(run),
    ]
    if (run / "state" / "latest.json").exists():
        train.append("--resume")
    cmd_train(build_parser().parse_args(train))
    print("== 3/4 evaluate on held-out text (eval.json)")
    _command("eval")(build_parser().parse_args(["eval", str(run), "--tokens", args.eval_tokens]))
    print("== 4/4 build the feature store (features/)")
    analyze = ["analyze", str(run), "--tokens", args.analyze_tokens]
    if (run / "features" / "partial" / "state.safetensors").exists():
        analyze.append("--resume")
    _command("analyze")(build_parser().parse_args(analyze))
    print(f"== done: the run directory is {run}")
    if not args.no_serve:
        dashboard = ["dashboard", str(out), "--host", args.host, "--port", str(args.port)]
        _command("dashboard")(build_parser().parse_args(dashboard))


COMMANDS = {
    "demo": cmd_demo,
    "corpus": cmd_corpus_info,
    "sites": cmd_sites,
    "harvest": cmd_harvest,
    "cache": cmd_cache_info,
    "train": cmd_train,
}


# Subcommands owned by the layers above sae/ (analysis, dashboard). They are found by name at
# run time so that nothing in sae/ imports those layers: dependencies still point one way.
PLUGINS = {
    "eval": ("analysis.evaluate", "add_eval_parser", "cmd_eval"),
    "analyze": ("analysis.features", "add_analyze_parser", "cmd_analyze"),
    "dashboard": ("dashboard.app", "add_dashboard_parser", "cmd_dashboard"),
}


def _command(name: str):
    if name in PLUGINS:
        module, _, command = PLUGINS[name]
        return getattr(importlib.import_module(module), command)
    return COMMANDS[name]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _command(args.command)(args)
    except UserError as exc:
        print(f"saewb: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " with --resume" if args.command in ("train", "analyze") else ""
        print(f"saewb: interrupted; rerun the same command{hint} to continue.", file=sys.stderr)
        return 130
    return 0
