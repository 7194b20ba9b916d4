"""Feature-store benchmark: the analyze pass against the model forward, peak memory as tokens grow,
and how fast one feature's record loads from a 32k-latent store that `analyze` wrote.

    python bench/analyze.py [--site resid_post.3] [--latents 2304 32768] [--tokens 16384]
                            [--rss-tokens 8192 32768] [--store-latents 32768]
                            [--store-tokens 65536] [--store-k 32] [--loads 500]

  1. pass cost: on the same windows of the built-in corpus (16 x 128 tokens per forward), time
     (a) Capture with early exit alone, and (b) `analyze()` end to end (forward + SAE encode +
     streaming statistics), for a random TopK SAE of each size, with the top-k search in fp32
     and in bf16 (values recomputed in fp32); plus a breakdown of (b) into forward, encode and
     accumulator update from an instrumented copy of the loop, and for bf16 the share of
     (token, latent) entries whose selection differs from fp32;
  2. peak RSS of `analyze()` in a fresh process at two token counts (VmHWM);
  3. a store written by `analyze()` itself (its defaults: fp32) for a random SAE of
     --store-latents latents and k --store-k over --store-tokens tokens of the built-in corpus,
     with its top examples and interval samples: FeatureStore's open time through the dashboard's
     path (the sha256 check of the run's SAE weights included, timed on its own too), the first
     feature after opening, and p50/p95 of FeatureStore.feature(i) over random ids.
     The SAE's b_dec is the mean activation, so its latents fire on many tokens, as a trained
     one's do; the table says how full the examples are.
Prints a table and writes bench/out/analyze.json (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT, rss_mib  # a script in bench/: its folder is on the path

sys.path.insert(0, str(ROOT))


def make_run(
    folder: Path, site: str, n_latents: int, k: int, d: int = 576, b_dec: torch.Tensor | None = None
) -> Path:
    """A run directory with a random TopK SAE (the pass's cost does not depend on training)."""
    from hooks.selection import Selection
    from sae.config import SAEConfig
    from sae.formats import save_sae
    from sae.model import SAE

    sae = SAE(SAEConfig(d_in=d, n_latents=n_latents, k=k, model="smollm2-135m", site=site))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    if b_dec is not None:
        sae.b_dec.data.copy_(b_dec)
    save_sae(sae, folder)
    info = dict(model="smollm2-135m", site=site, selection=Selection().to_dict())
    (folder / "run.json").write_text(json.dumps(info))
    return folder


def corpus_windows(tokenizer, n_windows: int) -> list:
    """The first n windows of the built-in corpus (all of it: its held-out part is only ~36k
    tokens, too few for timing)."""
    import itertools

    from hooks.selection import Selection

    return list(itertools.islice(Selection().windows(tokenizer, "all"), n_windows))


def pass_cost(args, loaded, windows, n_latents: int, dtype: str, tmp: Path) -> dict:
    from analysis.run import open_run
    from analysis.store.accumulate import FeatureAccumulator, StoreConfig
    from analysis.store.build import analyze
    from analysis.store.encode import encode_codes
    from hooks.sites import Capture, special_token_ids, token_mask
    from hooks.windows import batched, stack

    run = open_run(make_run(tmp / f"run-{n_latents}-{dtype}", args.site, n_latents, args.k))
    encode_dtype = torch.bfloat16 if dtype == "bf16" else None
    W_T = run.sae.W_enc.detach().T.contiguous() if encode_dtype else None
    differ = entries = 0  # bf16 only: (token, latent) entries whose selection differs from fp32
    batches = [stack(b)[0] for b in batched(windows, args.batch)]
    special = special_token_ids(loaded.tokenizer)
    sae = run.sae
    times = dict(forward=0.0, encode=0.0, update=0.0)
    acc = FeatureAccumulator(n_latents, 128, StoreConfig())
    with Capture(loaded.model, [args.site]) as capture, torch.no_grad():
        capture(batches[0])  # warm-up
        for i, tokens in enumerate(batches):
            t0 = time.perf_counter()
            x = capture(tokens)[args.site]
            t1 = time.perf_counter()
            B, T = tokens.shape
            acts, idx = encode_codes(sae, x.reshape(B * T, -1), encode_dtype, W_T)
            t2 = time.perf_counter()
            keep = token_mask(tokens, special_ids=special, drop_first=True)
            acc.update(acts.view(B, T, -1), idx.view(B, T, -1), keep,
                       torch.arange(i * B, (i + 1) * B))  # fmt: skip
            t3 = time.perf_counter()
            if encode_dtype is not None:
                ref = sae.encode(x.reshape(B * T, -1)).top_idx.sort(1).values
                differ += int((idx.sort(1).values != ref).sum())
                entries += ref.numel()
            times["forward"] += t1 - t0
            times["encode"] += t2 - t1
            times["update"] += t3 - t2
    n_tokens = acc.n_tokens
    start = time.perf_counter()
    out = analyze(run, n_tokens, batch_windows=args.batch, loaded=loaded, windows=iter(windows),
                  progress=False, checkpoint_tokens=10**12, encode_dtype=encode_dtype)  # fmt: skip
    total = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    return dict(
        latents=n_latents,
        k=args.k,
        dtype=dtype,
        bf16_selection_differs=differ / entries if entries else 0.0,
        tokens=n_tokens,
        forward_s=times["forward"],
        encode_s=times["encode"],
        update_s=times["update"],
        instrumented_ratio=sum(times.values()) / times["forward"],
        analyze_stream_s=manifest["stream_seconds"],
        analyze_write_s=manifest["write_seconds"],
        analyze_total_s=total,
        ratio=manifest["stream_seconds"] / times["forward"],
        ratio_without_encode=(times["forward"] + times["update"]) / times["forward"],
    )


def rss_child(args) -> None:
    """Child process: one analyze at --_rss tokens; prints JSON with its peak RSS."""
    from analysis.run import open_run
    from analysis.store.build import analyze
    from hooks.models import load_model

    torch.set_num_threads(args.threads)
    tokens = args._rss
    loaded = load_model("smollm2-135m", progress=False)
    after_model = rss_mib("VmHWM")
    windows = corpus_windows(loaded.tokenizer, tokens // 127 + 2)
    with tempfile.TemporaryDirectory() as tmp:
        run = open_run(make_run(Path(tmp), args.site, args.rss_latents, args.k))
        analyze(run, tokens, batch_windows=args.batch, loaded=loaded, windows=iter(windows),
                progress=False, checkpoint_tokens=max(tokens // 2, 1))  # fmt: skip
    print(json.dumps(dict(tokens=tokens, after_model_mib=after_model, peak_mib=rss_mib("VmHWM"))))


def synthetic_store(folder: Path, n: int, K: int, intervals: bool) -> Path:
    """A store of n latents with K top examples each (and 10 x 5 interval samples if asked),
    written by the real writer from a filled-in accumulator state (bench/dashboard.py)."""
    from analysis.store.accumulate import FeatureAccumulator, StoreConfig
    from analysis.store.write import write_tables

    T, V = 128, 49152
    cfg = StoreConfig(top_k=K, per_interval=5 if intervals else 1)
    acc = FeatureAccumulator(n, T, cfg)
    g = torch.Generator().manual_seed(0)
    n_windows = 100_000
    acc.n_tokens, acc.n_windows, acc.cooc.n_blocks = n_windows * 127, n_windows, n_windows * 8
    acc.count[:] = torch.randint(1, 10_000, (n,), generator=g)
    acc.act_sum[:] = acc.count * 2.0
    acc.act_max[:] = 5.0
    acc.exp[:] = 3
    acc.hist[:] = torch.randint(0, 100, acc.hist.shape, generator=g)
    acc.top_val[:] = torch.rand(n, K, generator=g) * 5 + 0.1
    acc.top_win[:] = torch.randint(0, n_windows, (n, K), generator=g)
    acc.top_pos[:] = torch.randint(1, T, (n, K), generator=g, dtype=torch.int32)
    acc.top_ctx[:] = (torch.rand(acc.top_ctx.shape, generator=g) * 5).half()
    if intervals:
        acc.iv_key[:] = torch.randint(0, 2**31, acc.iv_key.shape, generator=g)
        acc.iv_val[:] = torch.rand(acc.iv_val.shape, generator=g) * 5
        acc.iv_win[:] = torch.randint(0, n_windows, acc.iv_win.shape, generator=g)
        acc.iv_pos[:] = torch.randint(1, T, acc.iv_pos.shape, generator=g, dtype=torch.int32)
        acc.iv_ctx[:] = (torch.rand(acc.iv_ctx.shape, generator=g) * 5).half()
    acc.cooc.cand[:] = torch.randint(0, n, acc.cooc.cand.shape, generator=g)
    acc.cooc.blk_count[:] = 1000
    acc.cooc.cand_count[:] = torch.randint(0, 1000, acc.cooc.cand.shape, generator=g)

    def read_windows(ids: np.ndarray) -> dict:
        rng = np.random.default_rng(ids)  # deterministic tokens per window
        m = len(ids)
        return dict(
            tokens=rng.integers(0, V, (m, T)).astype(np.int32),
            doc=np.repeat(ids[:, None], T, 1).astype(np.int32),
            pos=np.tile(np.arange(T, dtype=np.int32), (m, 1)),
            index=ids.astype(np.int32),
        )

    logits = dict(
        top_ids=torch.randint(0, V, (n, 10), generator=g),
        top_values=torch.rand(n, 10, generator=g),
        bottom_ids=torch.randint(0, V, (n, 10), generator=g),
        bottom_values=-torch.rand(n, 10, generator=g),
    )
    neighbours = torch.randint(0, n, (n, 10), generator=g), torch.rand(n, 10, generator=g)
    vocab = [f"tok{i}" for i in range(V)]
    write_tables(folder, acc, read_windows, logits, neighbours, vocab,
                 dict(sae_sha256="synthetic"))  # fmt: skip
    return folder


def analyzed_store(args, loaded, tmp: Path) -> tuple[Path, dict]:
    """RUN/features written by analyze() for a random SAE of --store-latents latents."""
    from analysis.run import open_run
    from analysis.store.build import analyze
    from hooks.sites import Capture
    from hooks.windows import stack

    windows = corpus_windows(loaded.tokenizer, args.store_tokens // 127 + 2)
    with Capture(loaded.model, [args.site]) as capture, torch.no_grad():
        x = capture(stack(windows[:16])[0])[args.site]  # (16, 128, d)
    mean = x[:, 1:].reshape(-1, x.shape[-1]).float().mean(0)  # position 0 is the attention sink
    sae_dir = make_run(tmp / "store-run", args.site, args.store_latents, args.store_k, b_dec=mean)
    run = open_run(sae_dir)
    start = time.perf_counter()
    out = analyze(run, args.store_tokens, batch_windows=args.batch, loaded=loaded,
                  windows=iter(windows), progress=False, checkpoint_tokens=10**12)  # fmt: skip
    return out, dict(analyze_s=time.perf_counter() - start)


def load_latency(folders: dict[str, Path], loads: int) -> dict[str, dict]:
    """Open each store as the dashboard does (FeatureStore(path): the sha256 check of the run's
    SAE weights included; a synthetic store has none to check), then time feature(i) over the
    same random ids, the stores taking turns so that they share the machine's load."""
    from analysis.store.read import FeatureStore
    from hooks.paths import sha256_file
    from sae.formats import weights_file

    stores, out = {}, {}
    for name, folder in folders.items():
        weights = weights_file(folder.parent)
        start = time.perf_counter()
        if weights is not None:
            sha256_file(weights)
        sha_s = time.perf_counter() - start
        start = time.perf_counter()
        stores[name] = FeatureStore(folder, None if weights else "synthetic")
        out[name] = dict(
            latents=stores[name].n_latents,
            tokens=stores[name].manifest["n_tokens"],
            dead_fraction=stores[name].manifest["dead_fraction"],
            open_s=time.perf_counter() - start,
            sha256_s=sha_s if weights else 0.0,
            sae_mib=weights.stat().st_size / 2**20 if weights else 0.0,
            store_mib=sum(f.stat().st_size for f in folder.iterdir()) / 2**20,
        )
    rng = np.random.default_rng(1)
    ids = rng.integers(0, min(s.n_latents for s in stores.values()), loads)
    times = {name: [] for name in stores}
    examples = {name: [] for name in stores}
    for name, store in stores.items():
        t = time.perf_counter()
        store.feature(int(ids[0]))  # the first call also reads the parquet footers
        out[name]["first_feature_ms"] = 1000 * (time.perf_counter() - t)
    for i in ids:
        for name, store in stores.items():
            t = time.perf_counter()
            record = store.feature(int(i))
            times[name].append(time.perf_counter() - t)
            n_samples = sum(len(iv["examples"]) for iv in record["intervals"])
            examples[name].append((len(record["top_examples"]), n_samples))
    for name in stores:
        top, samples = np.mean(examples[name], axis=0)
        out[name] |= dict(
            mean_top_examples=float(top),
            mean_interval_samples=float(samples),
            p50_ms=1000 * float(np.percentile(times[name], 50)),
            p95_ms=1000 * float(np.percentile(times[name], 95)),
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--site", default="resid_post.3")
    parser.add_argument("--latents", type=int, nargs="+", default=[2304, 32768])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per pass-cost run")
    parser.add_argument("--batch", type=int, default=16, help="windows per forward")
    parser.add_argument("--rss-tokens", type=int, nargs=2, default=[8192, 32768])
    parser.add_argument("--rss-latents", type=int, default=32768)
    parser.add_argument("--store-latents", type=int, default=32768)
    parser.add_argument("--store-tokens", type=int, default=65536, help="tokens the store covers")
    parser.add_argument("--store-k", type=int, default=32, help="the store SAE's k")
    parser.add_argument("--loads", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=["pass", "rss", "store"])
    parser.add_argument("--out", default="bench/out/analyze.json")
    parser.add_argument("--_rss", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._rss:
        return rss_child(args)

    from hooks.models import load_model

    torch.set_num_threads(args.threads)
    result = dict(site=args.site, threads=args.threads, torch=torch.__version__,
                  load_average=os.getloadavg())  # fmt: skip
    print(
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores, {args.threads} threads"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "pass" not in args.skip:
            loaded = load_model("smollm2-135m", progress=False)
            windows = corpus_windows(loaded.tokenizer, args.tokens // 127 + 1)
            result["pass"] = []
            print(f"\n1. analyze pass vs forward alone ({args.site}, k={args.k}, batch "
                  f"{args.batch} x 128)")  # fmt: skip
            print(f"{'latents':>8} {'dtype':>5} {'tokens':>7} {'fwd s':>7} {'enc s':>7} "
                  f"{'upd s':>7} {'analyze s':>9} {'ratio':>6} {'w/o enc':>7} {'write s':>8} "
                  f"{'sel diff':>8}")  # fmt: skip
            for n in args.latents:
                for dtype in args.dtypes:
                    r = pass_cost(args, loaded, windows, n, dtype, tmp)
                    result["pass"].append(r)
                    print(f"{n:>8} {dtype:>5} {r['tokens']:>7} {r['forward_s']:>7.2f} "
                          f"{r['encode_s']:>7.2f} {r['update_s']:>7.2f} "
                          f"{r['analyze_stream_s']:>9.2f} {r['ratio']:>6.2f} "
                          f"{r['ratio_without_encode']:>7.2f} {r['analyze_write_s']:>8.2f} "
                          f"{r['bf16_selection_differs']:>8.2%}")  # fmt: skip
            del loaded
        if "rss" not in args.skip:
            result["rss"] = []
            print(f"\n2. peak RSS of analyze ({args.rss_latents} latents), fresh process each")
            for tokens in args.rss_tokens:
                cmd = [sys.executable, __file__, "--_rss", str(tokens), "--site", args.site,
                       "--rss-latents", str(args.rss_latents), "--k", str(args.k),
                       "--threads", str(args.threads), "--batch", str(args.batch)]  # fmt: skip
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if done.returncode:
                    raise SystemExit(done.stderr[-3000:])
                r = json.loads(done.stdout.strip().splitlines()[-1])
                result["rss"].append(r)
                print(f"  {tokens:>8} tokens: peak {r['peak_mib']:.0f} MiB "
                      f"(model loaded: {r['after_model_mib']:.0f} MiB)")  # fmt: skip
        if "store" not in args.skip:
            loaded = load_model("smollm2-135m", progress=False)
            folder, built = analyzed_store(args, loaded, tmp)
            del loaded
            synthetic = synthetic_store(tmp / "synthetic", args.store_latents, 20, False)
            r = load_latency(dict(analyzed=folder, synthetic=synthetic), args.loads)
            r["analyzed"] |= built
            result["store"] = r
            print(f"\n3. one feature's full record ({args.loads} random ids, the stores taking "
                  f"turns)")  # fmt: skip
            a = r["analyzed"]
            print(f"  analyze wrote: {a['latents']} latents, k={args.store_k}, {a['tokens']:,} "
                  f"tokens (analyze {a['analyze_s']:.0f} s), "
                  f"dead {a['dead_fraction']:.3f}")  # fmt: skip
            print(f"{'store':>28} {'top ex':>6} {'samples':>7} {'MiB':>5} {'open s':>6} "
                  f"{'sha256 s':>8} {'first ms':>8} {'p50 ms':>6} {'p95 ms':>6}")  # fmt: skip
            for name, label in (("analyzed", "analyze (+ weight check)"),
                                ("synthetic", "synthetic, top only, no check")):  # fmt: skip
                x = r[name]
                print(f"{label:>28} {x['mean_top_examples']:>6.1f} "
                      f"{x['mean_interval_samples']:>7.1f} {x['store_mib']:>5.0f} "
                      f"{x['open_s']:>6.2f} {x['sha256_s']:>8.2f} {x['first_feature_ms']:>8.1f} "
                      f"{x['p50_ms']:>6.1f} {x['p95_ms']:>6.1f}")  # fmt: skip
            print(f"  p50 ratio analyzed / synthetic: "
                  f"{a['p50_ms'] / r['synthetic']['p50_ms']:.2f}x")  # fmt: skip
    out = ROOT / args.out
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
