"""Harvest benchmark: early exit vs a full forward, and cache reads vs harvesting.

    python bench/harvest.py [--site resid_post.14] [--batches 4] [--cache-tokens 32768]

Side by side in one run, on the same batches of built-in-corpus windows (8 x 128 tokens):
  1. full forward of the base model with output_hidden_states (what sparsify does) vs
     the full CausalLM forward vs our Capture with early exit at the site;
  2. `saewb harvest` throughput into a fresh cache vs reading that cache back through the
     shuffle buffer in training-sized batches (a separate process, so its peak RSS is its own).
Prints a table and writes bench/out/harvest.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import rss_mib


def read_phase(cache_dir: str, batch: int) -> None:
    """Child process: stream the whole cache once in training batches; print JSON."""
    from hooks.cache import ActivationCache

    cache = ActivationCache(Path(cache_dir))
    start = time.perf_counter()
    rows = 0
    for b in cache.batches(batch_size=batch, seed=0, buffer_tokens=8 * batch):
        rows += len(b)
        b.acts[cache.sites[0]].sum()  # touch the data
    seconds = time.perf_counter() - start
    print(json.dumps({"rows": rows, "seconds": seconds, "peak_rss_mib": rss_mib()}))


def sink_ratio(model, batches, special: frozenset[int], site: str = "resid_post.3") -> float:
    """Median residual norm at position 0 over the median at the other non-special positions:
    why position 0 is dropped from the data by default."""
    from hooks.sites import Capture

    with Capture(model, [site]) as capture:
        norms = torch.cat([capture(ids)[site].norm(dim=-1) for ids in batches])  # (B, T)
    ids = torch.cat(batches)
    rest = norms[:, 1:][~torch.isin(ids[:, 1:], torch.tensor(sorted(special)))]
    return float(norms[:, 0].median() / rest.median())


def timed(fn, batches) -> float:
    start = time.perf_counter()
    for ids in batches:
        fn(ids)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--site", default="resid_post.14")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--cache-tokens", type=int, default=32768)
    parser.add_argument("--read-batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--_read", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args._read:
        return read_phase(args._read, args.read_batch)

    from hooks.cache import harvest
    from hooks.models import load_model
    from hooks.selection import Selection
    from hooks.sites import Capture, base_model, special_token_ids
    from hooks.windows import stack

    start = time.perf_counter()
    loaded = load_model("smollm2-135m", progress=False)
    load_s = time.perf_counter() - start  # from the dense copy in the cache, after the first run
    model = loaded.model
    selection = Selection(context_size=128)
    stream = selection.windows(loaded.tokenizer, "train")
    batches = [stack([next(stream) for _ in range(8)])[0] for _ in range(args.batches)]
    tokens = sum(b.numel() for b in batches)

    with torch.no_grad():
        base = base_model(model)
        variants = {
            "full base model, output_hidden_states": lambda ids: base(
                ids, output_hidden_states=True, use_cache=False
            ),
            "full CausalLM (with LM head)": lambda ids: model(
                ids, output_hidden_states=True, use_cache=False
            ),
        }
        with Capture(model, [args.site]) as capture:
            variants[f"early exit at {args.site}"] = capture
            # Check the values before timing anything: early exit must change nothing.
            layer = int(args.site.split(".")[1])
            ref = base(batches[0], output_hidden_states=True).hidden_states[layer + 1]
            assert torch.equal(capture(batches[0])[args.site], ref)
            for fn in variants.values():  # warm-up
                fn(batches[0][:1])
            # Interleave repeats so machine noise hits every variant alike.
            seconds = {name: 0.0 for name in variants}
            for _ in range(2):
                for name, fn in variants.items():
                    seconds[name] += timed(fn, batches)
        sink = sink_ratio(model, batches, special_token_ids(loaded.tokenizer))
    rates = {name: 2 * tokens / s for name, s in seconds.items()}
    full = rates["full base model, output_hidden_states"]

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        harvest(
            loaded,
            [args.site],
            selection.windows(loaded.tokenizer, "train"),
            args.cache_tokens,
            Path(tmp) / "cache",
            selection,
            batch_windows=8,
            progress=False,
        )
        harvest_rate = args.cache_tokens / (time.perf_counter() - start)
        harvest_rss = rss_mib()
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--_read",
                str(Path(tmp) / "cache"),
                "--read-batch",
                str(args.read_batch),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        read = json.loads(child.stdout.strip().splitlines()[-1])
    read_rate = read["rows"] / read["seconds"]

    print(
        f"\nSmolLM2-135M fp32, {args.threads} threads, {args.batches} batches of 8 x 128 tokens, 2 repeats\n"
    )
    print(f"{'variant':42s} {'tokens/s':>10s} {'vs full':>8s}")
    for name, rate in rates.items():
        print(f"{name:42s} {rate:10,.0f} {rate / full:7.2f}x")
    print(f"\n{'cache':42s} {'tokens/s':>10s} {'peak RSS':>10s}")
    print(
        f"{'harvest (early exit, writing shards)':42s} {harvest_rate:10,.0f} {harvest_rss:8.0f} MiB"
    )
    print(
        f"{'read back (shuffle buffer, batch ' + str(args.read_batch) + ')':42s} "
        f"{read_rate:10,.0f} {read['peak_rss_mib']:8.0f} MiB"
    )
    print(
        f"\nearly exit / full forward: {rates[f'early exit at {args.site}'] / full:.2f}x "
        f"(target >= 1.8x);  cache read / harvest: {read_rate / harvest_rate:.0f}x (target >= 10x)"
    )
    print(
        f"model load {load_s:.2f} s; resid_post.3 norm at position 0 / the rest (median): "
        f"{sink:.1f}x"
    )
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "harvest.json").write_text(
        json.dumps(
            {
                "site": args.site,
                "tokens_per_variant": 2 * tokens,
                "forward_tokens_per_s": rates,
                "harvest_tokens_per_s": harvest_rate,
                "read_tokens_per_s": read_rate,
                "harvest_peak_rss_mib": harvest_rss,
                "read_peak_rss_mib": read["peak_rss_mib"],
                "cache_tokens": args.cache_tokens,
                "model_load_s": load_s,
                "position0_norm_ratio_resid_post.3": sink,
                "torch": torch.__version__,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
