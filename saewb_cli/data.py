"""Subcommands of the hooks layer: text sources, hook sites, harvesting and inspecting caches."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from saewb_cli.args import (
    DTYPES,
    add_model_args,
    add_selection_args,
    parse_count,
    selection_from_args,
)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    corpus = sub.add_parser("corpus", help="inspect a text source")
    corpus_sub = corpus.add_subparsers(dest="corpus_command", required=True)
    info = corpus_sub.add_parser("info", help="documents, tokens and a sample")
    info.add_argument("--dataset", default="builtin")
    info.add_argument("--text-column", default="text")
    info.add_argument("--model", default="smollm2-135m", help="whose tokenizer counts tokens")
    info.set_defaults(handler=cmd_corpus_info)

    sites = sub.add_parser("sites", help="list a model's hook sites and their shapes")
    add_model_args(sites)
    sites.add_argument("--model-dtype", default="fp32", choices=DTYPES)
    sites.set_defaults(handler=cmd_sites)

    harvest = sub.add_parser("harvest", help="capture activations into an on-disk cache")
    add_model_args(harvest)
    harvest.add_argument("--site", action="append", required=True, help="repeat for several")
    harvest.add_argument("--tokens", required=True)
    harvest.add_argument("--cache", required=True, help="cache directory (resumed if partial)")
    harvest.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    harvest.add_argument("--dtype", default="fp32", choices=DTYPES, help="dtype stored on disk")
    harvest.add_argument("--shard-tokens", default="16k")
    add_selection_args(harvest)
    harvest.set_defaults(handler=cmd_harvest)

    cache = sub.add_parser("cache", help="inspect an activation cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    cache_info = cache_sub.add_parser("info", help="print the cache's summary")
    cache_info.add_argument("dir")
    cache_info.set_defaults(handler=cmd_cache_info)


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
    harvest(
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
    print(ActivationCache(Path(args.cache)).describe())
    print(f"took        {time.perf_counter() - start:.1f} s")


def cmd_cache_info(args: argparse.Namespace) -> None:
    from hooks.cache import ActivationCache

    print(ActivationCache(Path(args.dir)).describe())
