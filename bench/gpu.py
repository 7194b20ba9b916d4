"""GPU training throughput: our trainer vs EleutherAI sparsify against the bare encoder matmul.

    python3 bench/gpu.py [--out gpu.json] [--tokens 1000000] [--cpu-shape-tokens 200000]
    python3 bench/gpu.py --tiny          # a few seconds on the CPU: checks the script itself

Needs `sparsify` (eai-sparsify) importable for its rows; without it they are skipped. Both shapes
of issue 5, batch 4096 (--batch), one process:

  gpu  d=2048, n=65536, k=64     cpu  d=576, n=9216, k=32 (the CPU benchmark's shape)

For each shape:
  1. roofline   x @ W_enc (N=batch) into a preallocated output, CUDA-event timed, median of
                repeats: fp32 (strict), fp32 with TF32 matmuls ("high"), and bf16.
  2. data       planted-feature tokens from sae/synthetic.py (planted_features and
                firing_probabilities; sampled sparsely on the device, same distribution as
                synthetic.sample), held on the device; every trainer sees the same batches in the
                same order, and one held-out batch for FVU.
  3. ours       sae.train.Trainer.fit() itself (the real training step, logging included), fed
                those batches instead of its cache reader; --optimizers (default: Adam and
                sf-signsgd, the trainer's default), fp32 and dtype="bf16". The end-of-run
                checkpoint is skipped (it writes ~1 GiB at n=65536).
  4. sparsify   SparseCoder with its Triton decoder (on CUDA) and the per-step logic of its
                Trainer.fit() (b_dec from the first batch, unit-norm decoder, FVU loss, gradient
                projection, did_fire bookkeeping, its per-step float(fvu)), its default optimizer
                (schedule-free SignSGD) and Adam (torch's, as without bitsandbytes, with its
                1000-step warm-up). Its forward always autocasts to bf16 on CUDA: that is its
                "bf16" row; the "fp32" row calls the undecorated forward.

Timing: torch.cuda.synchronize() at each batch hand-out, so a step is the time from handing out
a batch until the next is asked for; median over the steps after the first 5 (Triton compiles in
the first). fp32 rows run with torch.set_float32_matmul_precision("high") (TF32), as sparsify's
Trainer.fit() sets it, and are compared with the TF32 matmul; "fp32 strict" rows use "highest".
FVU = sum ||x - x_hat||^2 / sum ||x - mean x||^2 on the held-out batch, fp32 weights, strict fp32
matmuls, for every trainer. Peak memory = torch.cuda.max_memory_allocated() during the run minus
what was allocated before it (the data). Writes JSON (--out; default $OUT/gpu.json, else
bench/out/gpu.json) and prints the tables last.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, when imported
from common import ROOT, SparsifyTrainer, fvu, stub_cache, train_config, unused  # noqa: E402

sys.path.insert(0, str(ROOT))

SITE = "synthetic"
SEED = 0
WARMUP_STEPS = 5
EVAL_TOKENS = 8192
# mean_active and zipf as bench/train_throughput.py; features: the CPU bench's 16384 at n=9216,
# twice the latents at n=65536 (more features than latents: superposition).
SHAPES = {
    "gpu": dict(d=2048, n=65536, k=64, n_features=131072),
    "cpu": dict(d=576, n=9216, k=32, n_features=16384),
    "tiny": dict(d=64, n=512, k=8, n_features=1024),
}
MEAN_ACTIVE, ZIPF = 32.0, 1.0


# -- measuring ----------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, warmup: int = 3, reps: int = 20) -> float:
    """Median time of fn() in ms: CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if device.type == "cuda":
        pairs = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(reps)
        ]
        for start, end in pairs:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in pairs]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


class Precision:
    """torch.set_float32_matmul_precision for a block, restored afterwards."""

    def __init__(self, mode: str):
        self.mode = mode

    def __enter__(self):
        self.saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.mode)

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.saved)


def memory_start(device: torch.device) -> int:
    gc.collect()
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def memory_peak_mib(device: torch.device, base: int) -> float | None:
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


class SyncedStream:
    """The same batches for every trainer, as views of one device tensor. Synchronizes at every
    hand-out, so step_s[i] is the device-complete time of step i (the trainer's own work)."""

    def __init__(self, x: torch.Tensor, batch: int, device: torch.device, source=None):
        self.x, self.batch, self.device = x, batch, device
        self.source = source  # the Trainer's own DataStream: d_in and the like come from it
        self.steps = x.shape[0] // batch
        self.step_s: list[float] = []

    def __getattr__(self, name):
        if name == "source" or self.source is None:
            raise AttributeError(name)
        return getattr(self.source, name)

    def __iter__(self):
        handed_out = None
        for i in range(self.steps):
            sync(self.device)
            now = time.perf_counter()
            if handed_out is not None:
                self.step_s.append(now - handed_out)
            rows = self.x[i * self.batch : (i + 1) * self.batch]
            handed_out = time.perf_counter()
            yield SimpleNamespace(acts={SITE: rows})
        sync(self.device)
        self.step_s.append(time.perf_counter() - handed_out)

    def report(self) -> dict:
        timed = self.step_s[WARMUP_STEPS:] or self.step_s
        median = statistics.median(timed)
        return {
            "steps": len(self.step_s),
            "step_ms_median": 1e3 * median,
            "tokens_per_s": self.batch / median,
            "tokens_per_s_mean": self.batch * len(timed) / sum(timed),
            "first_steps_ms": [round(1e3 * s, 2) for s in self.step_s[:WARMUP_STEPS]],
        }


# -- environment, roofline, data --------------------------------------------------------------


def environment(device: torch.device) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "float32_matmul_precision_default": torch.get_float32_matmul_precision(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        from importlib.metadata import version

        env["eai-sparsify"] = version("eai-sparsify")
    except Exception:
        env["eai-sparsify"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
        )
    else:
        env["gpu"] = None
        env["threads"] = torch.get_num_threads()
    return env


def roofline(shape: dict, batch: int, device: torch.device) -> dict:
    """The encoder matmul alone: (batch, d) @ (d, n) into a preallocated (batch, n)."""
    g = torch.Generator().manual_seed(0)
    d, n = shape["d"], shape["n"]
    out = {}
    variants = (
        ("fp32", torch.float32, "highest"),
        ("tf32", torch.float32, "high"),
        ("bf16", torch.bfloat16, "highest"),
    )
    for name, dtype, precision in variants:
        x = torch.randn(batch, d, generator=g).to(device, dtype)
        W = (torch.randn(d, n, generator=g) / d**0.5).to(device, dtype)
        y = torch.empty(batch, n, device=device, dtype=dtype)
        with Precision(precision):
            ms = median_ms(
                lambda x=x, W=W, y=y: torch.mm(x, W, out=y),
                device,
                reps=50 if device.type == "cuda" else 5,
            )
        out[name] = {
            "ms": ms,
            "tokens_per_s": batch / ms * 1e3,
            "tflops": 2 * batch * d * n / ms / 1e9,
        }
        del x, W, y
    return out


def planted_tokens(
    shape: dict,
    count: int,
    device: torch.device,
    seed: int,
    features: torch.Tensor,
    probs: torch.Tensor,
) -> torch.Tensor:
    """(count, d) tokens with synthetic.sample's distribution (feature i fires with probs[i],
    magnitude U[0.5, 1.5]), drawn on the device and summed sparsely: a dense (count, F) @ (F, d)
    would cost more than the training it feeds at F=131072."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(count, shape["d"], device=device)
    chunk = max(1, min(count, (1 << 29) // len(probs)))
    for start in range(0, count, chunk):
        rows = min(chunk, count - start)
        fire = torch.rand(rows, len(probs), device=device, generator=g) < probs
        tok, feat = fire.nonzero(as_tuple=True)  # row-major: sorted by token
        del fire
        mag = 0.5 + torch.rand(len(feat), device=device, generator=g)
        offsets = torch.searchsorted(tok, torch.arange(rows, device=device))
        out[start : start + rows] = F.embedding_bag(
            feat, features, offsets, mode="sum", per_sample_weights=mag
        )
    return out


def make_data(
    shape: dict, tokens: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    from sae.synthetic import firing_probabilities, planted_features

    features = planted_features(shape["d"], shape["n_features"], seed=SEED).to(device)
    probs = firing_probabilities(shape["n_features"], MEAN_ACTIVE, ZIPF).to(device)
    x = planted_tokens(shape, tokens, device, 1, features, probs)
    x_eval = planted_tokens(shape, EVAL_TOKENS, device, 123_456_789, features, probs)
    info = {
        "n_features": shape["n_features"],
        "mean_active": float(probs.sum()),
        "zipf": ZIPF,
        "tokens": tokens,
        "eval_tokens": EVAL_TOKENS,
    }
    return x, x_eval, info


# -- the trainers ---------------------------------------------------------------------------------


def run_ours(shape, x, x_eval, batch, device, optimizer, dtype, cache, precision="high") -> dict:
    from sae.train import Trainer

    cfg = train_config(
        dtype,
        cache=str(cache),
        sites=[SITE],
        latents=[shape["n"]],
        ks=[shape["k"]],
        tokens=x.shape[0],
        batch=batch,
        optimizer=optimizer,
        seed=SEED,
        device=str(device),
        checkpoint_every=1 << 62,
    )
    base = memory_start(device)
    with tempfile.TemporaryDirectory() as tmp, Precision(precision):
        trainer = Trainer(cfg, Path(tmp) / "run", progress=False)
        trainer._checkpoint = lambda: None  # the final checkpoint is I/O, not training
        stream = trainer.data = SyncedStream(x, batch, device, trainer.data)
        start = time.perf_counter()
        trainer.fit()
        sync(device)
        wall = time.perf_counter() - start
        peak = memory_peak_mib(device, base)
        m = trainer.members[0]
        log = [
            json.loads(line) for line in (trainer.out / "train_log.jsonl").read_text().splitlines()
        ]
        dead_frac = float((m.since_fired >= trainer.dead_tokens).float().mean())
        lr = m.lr
    sae = m.sae
    try:  # a schedule-free optimiser's weights to evaluate are its average
        from sae.optim import eval_weights
    except ImportError:
        eval_weights = None
    weights = eval_weights(m.optimizer) if eval_weights else contextlib.nullcontext()
    with torch.no_grad(), Precision("highest"), weights:
        enc = sae.encode(x_eval)
        recon = sae.decode(enc.top_acts, enc.top_idx)
    result = {
        **stream.report(),
        "wall_s": wall,
        "peak_mib": peak,
        "fvu": fvu(x_eval, recon),
        "unused_latents": unused(enc.top_idx[enc.top_acts > 0], shape["n"]),
        "train_fvu_last": log[-1]["fvu"],
        "dead_frac": dead_frac,
        "lr": lr,
        "precision": precision,
    }
    del trainer, m, sae, enc, recon
    return result


def import_sparsify():
    """sparsify imports `datasets` at import time, for its Trainer only. Where datasets does not
    import (it is carried as a wheel to the GPU machine, and may not fit its pyarrow), a stub
    stands in: SparseCoder does not use it."""
    try:
        import datasets  # noqa: F401
    except Exception as exc:  # ImportError, or a version check inside datasets
        for name in [m for m in sys.modules if m.split(".")[0] == "datasets"]:
            del sys.modules[name]
        stub = types.ModuleType("datasets")
        stub.Dataset = stub.DatasetDict = type("DatasetUnavailable", (), {})
        sys.modules["datasets"] = stub
        print(f"  [datasets does not import ({exc!r:.80}); a stub stands in]", flush=True)
    import sparsify  # noqa: F401
    import sparsify.utils

    return sparsify


def run_sparsify(shape, x, x_eval, batch, device, optimizer, dtype, precision="high") -> dict:
    sparsify = import_sparsify()

    steps = x.shape[0] // batch
    base = memory_start(device)
    trainer = SparsifyTrainer(shape["d"], shape["n"], shape["k"], device, optimizer, dtype, steps)
    stream = SyncedStream(x, batch, device)
    start = time.perf_counter()
    with Precision(precision):
        for rows in stream:
            trainer.step(rows.acts[SITE])
    sync(device)
    wall = time.perf_counter() - start
    peak = memory_peak_mib(device, base)
    with Precision("highest"):
        evaluated = trainer.evaluate(x_eval)
    result = {
        **stream.report(),
        "wall_s": wall,
        "peak_mib": peak,
        **evaluated,
        "precision": precision,
        "decoder": sparsify.utils.decoder_impl.__name__,
    }
    del trainer
    return result


# -- the run ----------------------------------------------------------------------------------


def runs_for(with_sparsify: bool, optimizers: list[str]) -> list[dict]:
    """(trainer, optimizer, dtype, matmul precision) rows, defaults first."""
    rows = [
        dict(trainer="ours", optimizer="adam", dtype="fp32", precision="high"),
        dict(trainer="ours", optimizer="adam", dtype="fp32", precision="highest"),
    ]
    rows = [r for r in rows if r["optimizer"] in optimizers]
    rows += [
        dict(trainer="ours", optimizer=o, dtype="fp32", precision="high")
        for o in optimizers
        if o != "adam"
    ]
    rows += [dict(trainer="ours", optimizer=o, dtype="bf16", precision="high") for o in optimizers]
    if with_sparsify:
        rows += [
            dict(trainer="sparsify", optimizer="signum", dtype="fp32", precision="high"),
            dict(trainer="sparsify", optimizer="adam", dtype="fp32", precision="high"),
            dict(trainer="sparsify", optimizer="signum", dtype="bf16", precision="high"),
            dict(trainer="sparsify", optimizer="adam", dtype="bf16", precision="high"),
        ]
    return rows


def label(r: dict) -> str:
    dtype = (
        "fp32 strict"
        if r["dtype"] == "fp32" and r["precision"] == "highest"
        else ("fp32 tf32" if r["dtype"] == "fp32" else "bf16")
    )
    opt = {"signum": "signSGD-sf" if r["trainer"] == "sparsify" else "signum"}.get(
        r["optimizer"], r["optimizer"]
    )
    return f"{r['trainer']} {opt} {dtype}"


def bound_for(r: dict, roof: dict) -> dict:
    if r["dtype"] == "bf16":
        return roof["bf16"]
    return roof["fp32"] if r["precision"] == "highest" else roof["tf32"]


def bench_shape(name, shape, tokens, batch, device, with_sparsify, folder, optimizers):
    steps = max(WARMUP_STEPS + 3, math.ceil(tokens / batch))
    print(
        f"\n[{name}] d={shape['d']} n={shape['n']} k={shape['k']}, batch {batch}, {steps} steps",
        flush=True,
    )
    roof = roofline(shape, batch, device)
    for v, r in roof.items():
        print(
            f"  roofline {v}: {r['ms']:.3f} ms, {r['tokens_per_s']:,.0f} tok/s, "
            f"{r['tflops']:.1f} TFLOP/s",
            flush=True,
        )
    start = time.perf_counter()
    x, x_eval, data = make_data(shape, steps * batch, device)
    sync(device)
    data["seconds"] = time.perf_counter() - start
    print(
        f"  data: {steps * batch:,} + {EVAL_TOKENS} tokens in {data['seconds']:.1f} s "
        f"(~{data['mean_active']:.0f} active features per token)",
        flush=True,
    )
    cache = stub_cache(shape["d"], folder)
    results = {}
    for r in runs_for(with_sparsify, optimizers):
        key = label(r)
        try:
            fn = run_ours if r["trainer"] == "ours" else run_sparsify
            args = (shape, x, x_eval, batch, device, r["optimizer"], r["dtype"])
            res = (
                fn(*args, cache, r["precision"])
                if r["trainer"] == "ours"
                else fn(*args, r["precision"])
            )
            res.update(r)
            res["share_of_bound"] = res["tokens_per_s"] / bound_for(r, roof)["tokens_per_s"]
            peak = f"{res['peak_mib']:,.0f} MiB" if res["peak_mib"] is not None else "-"
            print(
                f"  {key:28s} {res['tokens_per_s']:12,.0f} tok/s  step "
                f"{res['step_ms_median']:8.2f} ms  {res['share_of_bound']:6.1%} of bound  "
                f"FVU {res['fvu']:.3f}  peak {peak}  wall {res['wall_s']:.1f} s",
                flush=True,
            )
        except Exception as exc:  # one failing trainer must not lose the others' figures
            import traceback

            traceback.print_exc()
            res = {**r, "error": f"{type(exc).__name__}: {exc}"}
        results[key] = res
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del x, x_eval
    return {
        "shape": shape,
        "batch": batch,
        "steps": steps,
        "roofline": roof,
        "data": data,
        "trainers": results,
    }


def ratios(sec: dict) -> dict:
    t = sec["trainers"]

    def rate(key):
        r = t.get(key, {})
        return r.get("tokens_per_s", float("nan"))

    pairs = {
        "ours sf-signsgd / sparsify signSGD-sf (defaults), fp32 tf32": (
            "ours sf-signsgd fp32 tf32",
            "sparsify signSGD-sf fp32 tf32",
        ),
        "ours sf-signsgd bf16 / sparsify default (bf16 autocast)": (
            "ours sf-signsgd bf16",
            "sparsify signSGD-sf bf16",
        ),
        "ours sf-signsgd fp32 tf32 / sparsify default (bf16 autocast)": (
            "ours sf-signsgd fp32 tf32",
            "sparsify signSGD-sf bf16",
        ),
        "ours adam / sparsify signSGD-sf, fp32 tf32": (
            "ours adam fp32 tf32",
            "sparsify signSGD-sf fp32 tf32",
        ),
        "ours adam / sparsify signSGD-sf, bf16": (
            "ours adam bf16",
            "sparsify signSGD-sf bf16",
        ),
        "ours adam / sparsify adam, fp32 tf32": ("ours adam fp32 tf32", "sparsify adam fp32 tf32"),
        "ours adam / sparsify adam, bf16": ("ours adam bf16", "sparsify adam bf16"),
        "ours adam bf16 / ours adam fp32 tf32": ("ours adam bf16", "ours adam fp32 tf32"),
        "ours adam bf16 / sparsify default (bf16 autocast)": (
            "ours adam bf16",
            "sparsify signSGD-sf bf16",
        ),
    }
    return {name: rate(a) / rate(b) for name, (a, b) in pairs.items()}


def print_tables(report: dict) -> None:
    env = report["environment"]
    print(
        f"\n==== {env.get('gpu') or 'CPU'} | torch {env['torch']} | triton {env['triton']} | "
        f"sparsify {env['eai-sparsify']} ===="
    )
    for name, sec in report["shapes"].items():
        s, roof = sec["shape"], sec["roofline"]
        print(
            f"\n{name}: d={s['d']} n={s['n']} k={s['k']}, batch {sec['batch']}, "
            f"{sec['steps']} steps = {sec['steps'] * sec['batch']:,} tokens"
        )
        print(
            f"  bound x@W_enc: fp32 {roof['fp32']['tokens_per_s']:,.0f} | tf32 "
            f"{roof['tf32']['tokens_per_s']:,.0f} | bf16 {roof['bf16']['tokens_per_s']:,.0f} "
            f"tok/s ({roof['fp32']['tflops']:.0f}/{roof['tf32']['tflops']:.0f}/"
            f"{roof['bf16']['tflops']:.0f} TFLOP/s)"
        )
        print(
            f"  {'trainer':28s} {'tok/s':>11s} {'step ms':>8s} {'%bound':>7s} {'FVU':>6s} "
            f"{'unused':>6s} {'peak MiB':>9s}"
        )
        for key, r in sec["trainers"].items():
            if "error" in r:
                print(f"  {key:28s} failed: {r['error'][:80]}")
                continue
            peak = f"{r['peak_mib']:9,.0f}" if r["peak_mib"] is not None else f"{'-':>9s}"
            print(
                f"  {key:28s} {r['tokens_per_s']:11,.0f} {r['step_ms_median']:8.2f} "
                f"{r['share_of_bound']:7.1%} {r['fvu']:6.3f} {r['unused_latents']:6.1%} {peak}"
            )
        for rname, value in sec["ratios"].items():
            if not math.isnan(value):
                print(f"  {rname:58s} {value:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="JSON path (default $OUT/gpu.json)")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="gpu-shape training tokens")
    parser.add_argument("--cpu-shape-tokens", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--only", default="gpu,cpu", help="shapes: gpu, cpu")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no-sparsify", action="store_true")
    parser.add_argument("--optimizers", default="adam,sf-signsgd", help="ours: any of sae.optim's")
    parser.add_argument("--tiny", action="store_true", help="tiny shape on the CPU, seconds")
    args = parser.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.tiny:
        device = torch.device(args.device or "cpu")
    if device.type != "cuda":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs CUDA
    env = environment(device)
    print("environment: " + json.dumps(env), flush=True)

    with_sparsify = not args.no_sparsify
    if with_sparsify:
        try:
            import_sparsify()
        except Exception as exc:
            print(f"  [sparsify unavailable, its rows are skipped: {exc!r:.120}]", flush=True)
            with_sparsify = False

    if args.tiny:
        plan = {"tiny": (SHAPES["tiny"], 20 * 256, 256)}
    else:
        plan = {}
        for name in args.only.split(","):
            tokens = args.tokens if name == "gpu" else args.cpu_shape_tokens
            plan[name] = (SHAPES[name], tokens, args.batch)

    report = {
        "environment": env,
        "warmup_steps": WARMUP_STEPS,
        "shapes": {},
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, (shape, tokens, batch) in plan.items():
            sec = bench_shape(
                name,
                shape,
                tokens,
                batch,
                device,
                with_sparsify,
                Path(tmp),
                args.optimizers.split(","),
            )
            sec["ratios"] = ratios(sec)
            report["shapes"][name] = sec
    report["total_s"] = time.perf_counter() - started

    if args.out:
        out = Path(args.out)
    elif os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "gpu.json"
    else:
        out = ROOT / "bench" / "out" / ("gpu-tiny.json" if args.tiny else "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out} ({report['total_s']:.0f} s)")
    print_tables(report)


if __name__ == "__main__":
    main()
