"""A bare training step of our Trainer, timed alone, next to the encoder matmul it contains.

    python bench/step.py [--rounds 5] [--steps 3] [--warmup 8] [--threads 2] [--clock wall|cpu]

Three shapes, the ones the training tables of BENCHMARKS.md use:

  synthetic  d=576, n=9216, k=32, batch 4096   (the planted-feature table)
  smollm2    d=576, n=2304, k=16, batch 4096   (the SmolLM2 cache table)
  live       d=576, n=2304, k=16, batch 1024   (the live SmolLM2 run)

Each shape runs as three configs: encode_dtype fp32, encode_dtype bf16, and fp32 without AuxK.
Every config is a real sae.train.Trainer with the TrainConfig of its table (tokens, so the
dead-latent horizon matches), whose step (Trainer._step) is fed planted-feature batches
(sae/synthetic.py, ~32 features active per token) directly: no data loading, no logging, no
checkpoints. After --warmup steps (enough for latents to count as dead, so AuxK runs), the
configs take turns for --rounds rounds of --steps steps each, and every round also times the
encoder matmul alone, (batch, d) @ (d, n) into a preallocated output (whole, or in 512-token
chunks, whichever is faster), in fp32 and bf16. Interleaving makes a busy spell on the shared
machine hit every config alike, so read the ratios first.

Prints median step ms per config, the matmul's share, bf16/fp32 and AuxK ratios, and the share of
the machine other processes used meanwhile; writes bench/out/step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from common import ROOT, clock, matmul_variants, stub_cache, train_config

sys.path.insert(0, str(ROOT))

SHAPES = {
    "synthetic": dict(d=576, n=9216, k=32, batch=4096, tokens=200_000),
    "smollm2": dict(d=576, n=2304, k=16, batch=4096, tokens=25 * 4096),
    "live": dict(d=576, n=2304, k=16, batch=1024, tokens=60_000),
}
CONFIGS = {"fp32": dict(encode_dtype="fp32"), "bf16": dict(encode_dtype="bf16")}
CONFIGS["fp32 no AuxK"] = dict(encode_dtype="fp32", auxk=False)


def cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def planted_batches(count: int, batch: int) -> list[torch.Tensor]:
    """count (batch, 576) batches of planted-feature tokens, as bench/train_throughput.py's."""
    from sae.synthetic import firing_probabilities, planted_features, sample

    features = planted_features(576, 16384, seed=0)
    probs = firing_probabilities(16384, 32.0, 1.0)
    g = torch.Generator().manual_seed(1)
    return [sample(features, probs, batch, g) for _ in range(count)]


def matmul_ms(x: torch.Tensor, W: torch.Tensor, now, reps: int = 3) -> float:
    """The faster of x @ W into one preallocated output and in 512-token chunks into one."""
    variants = matmul_variants(x, W)
    best = float("inf")
    for fn in (variants["out"], variants["chunk512"]):
        fn()
        for _ in range(reps):
            start = now()
            fn()
            best = min(best, 1e3 * (now() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps a config a round")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"), help="see common.clock")
    parser.add_argument("--only", default=",".join(SHAPES))
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help="e.g. 'fp32,fp32 no AuxK' on a CPU without bf16",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    now = clock(args.clock)

    from sae.train import Trainer

    shapes = {name: SHAPES[name] for name in args.only.split(",")}
    configs = {name: CONFIGS[name] for name in args.configs.split(",") if name}
    dtypes = ("fp32", "bf16") if "bf16" in configs else ("fp32",)
    data = planted_batches(2, max(s["batch"] for s in shapes.values()))
    trainers, feeds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = stub_cache(576, Path(tmp))
        for shape_name, shape in shapes.items():
            for config_name, config in configs.items():
                cfg = train_config(
                    cache=str(cache),
                    sites=["synthetic"],
                    latents=[shape["n"]],
                    ks=[shape["k"]],
                    tokens=shape["tokens"],
                    batch=shape["batch"],
                    checkpoint_every=1 << 62,
                    **config,
                )
                key = (shape_name, config_name)
                trainers[key] = trainer = Trainer(
                    cfg, Path(tmp) / f"run{len(trainers)}", progress=False
                )
                batches = [SimpleNamespace(acts={"synthetic": x[: shape["batch"]]}) for x in data]
                feeds[key] = feed = iter(batches * (args.warmup + args.rounds * args.steps))
                for _ in range(args.warmup):
                    trainer._step(next(feed))
        step_ms = {key: [] for key in trainers}
        mm_ms = {(s, dt): [] for s in shapes for dt in dtypes}
        g = torch.Generator().manual_seed(0)
        mm_inputs = {
            (s, dt): (
                torch.randn(shape["batch"], shape["d"], generator=g).to(dtype),
                torch.randn(shape["d"], shape["n"], generator=g).to(dtype),
            )
            for s, shape in shapes.items()
            for dt, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
            if dt in dtypes
        }
        busy0, total0 = cpu_busy()
        r0 = time.process_time()
        started = time.perf_counter()
        for round_ in range(args.rounds):
            for key, trainer in trainers.items():
                for _ in range(args.steps):
                    start = now()
                    trainer._step(next(feeds[key]))
                    step_ms[key].append(1e3 * (now() - start))
            for key, (x, W) in mm_inputs.items():
                mm_ms[key].append(matmul_ms(x, W, now))
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
        wall = time.perf_counter() - started
        busy1, total1 = cpu_busy()
        mine = (time.process_time() - r0) * os.sysconf("SC_CLK_TCK")  # in jiffies
        others = max(0.0, (busy1 - busy0 - mine) / max(total1 - total0, 1))
        dead = {
            key: int((t.members[0].since_fired >= t.dead_tokens).sum())
            for key, t in trainers.items()
        }

    report: dict = {"threads": args.threads, "clock": args.clock, "rounds": args.rounds}
    report["steps"] = args.steps
    report.update(torch=torch.__version__, wall_s=wall, other_load=others, shapes={})
    print(
        f"\n{args.threads} threads, {args.clock} clock, {args.rounds} interleaved rounds, "
        f"others used {others:.0%} of the machine"
    )
    print(
        f"{'shape':10s} {'config':14s} {'step ms':>8s} {'matmul ms':>9s} {'share':>6s} {'dead':>5s}"
    )
    for s, shape in shapes.items():
        sec = {"shape": shape, "configs": {}}
        for c in configs:
            mm = statistics.median(mm_ms[(s, "bf16" if c == "bf16" else "fp32")])
            ms = statistics.median(step_ms[(s, c)])
            sec["configs"][c] = {
                "step_ms_median": ms,
                "step_ms_all": [round(v, 1) for v in step_ms[(s, c)]],
                "matmul_ms": mm,
                "matmul_share": mm / ms,
                "dead_latents": dead[(s, c)],
            }
            print(f"{s:10s} {c:14s} {ms:8.1f} {mm:9.1f} {mm / ms:6.0%} {dead[(s, c)]:5d}")
        cfgs = {c: r["step_ms_median"] for c, r in sec["configs"].items()}
        if "bf16" in cfgs and "fp32" in cfgs:
            sec["fp32/bf16"] = cfgs["fp32"] / cfgs["bf16"]
            print(f"{s:10s} the bf16 step is {sec['fp32/bf16']:.2f}x as fast as fp32's")
        if "fp32 no AuxK" in cfgs and "fp32" in cfgs:
            sec["auxk_ms"] = cfgs["fp32"] - cfgs["fp32 no AuxK"]
            print(f"{s:10s} AuxK adds {sec['auxk_ms']:.1f} ms to the fp32 step")
        report["shapes"][s] = sec
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
