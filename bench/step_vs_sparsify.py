"""One training step of our TopK trainer against sparsify's, interleaved in one process on the
same in-memory batches: the harness that times what each tool's run pays per batch besides the
model's forward.

    /tmp/benchenv/bin/python bench/step_vs_sparsify.py [--rounds 12] [--steps-per-round 4]
        [--latents 9216] [--k 32] [--threads 2]

At d 576, batch 4096, fp32, default optimisers (ours: schedule-free sign descent; sparsify's:
schedule-free SignSGD), on the planted-feature stream of bench/train_throughput.py:

  ours          sae.train.Trainer._step on a batch, the whole step that fit() runs: the finite
                check and dead count (one host sync), AuxK when latents are dead, the optimiser,
                the unit-norm constraint and the firing bookkeeping
  ours-noauxk   the same with auxk=False, what sparsify's default (auxk_alpha 0) computes
  sparsify      bench/common.py's SparsifyTrainer.step (the per-step logic of sparsify's
                Trainer.fit) after what its forward hook does to each batch: the clone of the
                outputs it keeps for splicing and the boolean-mask copy of the kept tokens
  matmul        the bare x @ W_enc of the step, into a preallocated output

Every round runs each of them `--steps-per-round` times in turn, so load from other processes
falls on all alike; the first round is a warm-up. Reports each one's median step, our speed-up
per round (the median of those is the figure), and the matmul's share of each step. Writes
bench/out/step_vs_sparsify.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from common import ROOT, SparsifyTrainer, stub_cache, train_config

sys.path.insert(0, str(ROOT))

from train_throughput import SYNTH  # noqa: E402

D, BATCH, SITE = 576, 4096, "synthetic"


def batches(count: int) -> list[torch.Tensor]:
    """`count` (BATCH, D) batches of the planted-feature stream, in memory."""
    from sae.synthetic import firing_probabilities, planted_features, sample

    g = torch.Generator().manual_seed(SYNTH["seed"] + 1)
    features = planted_features(D, SYNTH["n_features"], seed=SYNTH["seed"])
    probs = firing_probabilities(SYNTH["n_features"], SYNTH["mean_active"], SYNTH["zipf"])
    return [sample(features, probs, BATCH, g) for _ in range(count)]


def ours(n: int, k: int, steps: int, folder: Path, auxk: bool):
    from sae.train import Trainer

    cfg = train_config(
        cache=str(stub_cache(D, folder)), sites=[SITE], latents=[n], ks=[k],
        tokens=steps * BATCH, batch=BATCH, seed=0, auxk=auxk,
    )  # fmt: skip
    trainer = Trainer(cfg, folder / f"run-auxk{int(auxk)}", progress=False)
    return lambda x: trainer._step(SimpleNamespace(acts={SITE: x}))


def sparsify(n: int, k: int, steps: int):
    trainer = SparsifyTrainer(D, n, k, "cpu", "signum", "fp32", steps, seed=0)
    mask = torch.ones(BATCH, dtype=torch.bool)

    def step(x: torch.Tensor) -> None:
        kept_for_splice = x.detach().clone()  # noqa: F841  (its hook's all_outputs)
        trainer.step(x[mask])  # its hook's outputs[mask]; inputs is the same tensor

    return step


def with_chunk(chunk: int, step):
    """`step` with the CPU encoder's chunk (sae.kernels.encode.DEFAULT_CHUNK_SIZE) at `chunk`."""
    import sae.kernels.encode as encode

    def stepped(x: torch.Tensor) -> None:
        default, encode.DEFAULT_CHUNK_SIZE = encode.DEFAULT_CHUNK_SIZE, chunk
        try:
            step(x)
        finally:
            encode.DEFAULT_CHUNK_SIZE = default

    return stepped


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps-per-round", type=int, default=4)
    p.add_argument("--latents", type=int, default=9216)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--chunks", default="", help="also ours with these CPU encoder chunk sizes, e.g. 1024,4096"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")  # as sparsify's fit() sets it
    n, k, per = args.latents, args.k, args.steps_per_round
    steps = args.rounds * per
    data = batches(16)
    W = torch.randn(D, n)
    out = torch.empty(BATCH, n)
    with tempfile.TemporaryDirectory() as tmp:
        steppers = {
            "ours": ours(n, k, steps, Path(tmp), auxk=True),
            "ours-noauxk": ours(n, k, steps, Path(tmp), auxk=False),
            "sparsify": sparsify(n, k, steps),
            "matmul": lambda x: torch.matmul(x, W, out=out),
        }
        for chunk in filter(None, args.chunks.split(",")):
            steppers[f"ours-chunk{chunk}"] = with_chunk(
                int(chunk), ours(n, k, steps, Path(tmp) / chunk, auxk=True)
            )
        times: dict[str, list[list[float]]] = {name: [] for name in steppers}
        for r in range(args.rounds):
            for name, step in steppers.items():
                round_times = []
                for i in range(per):
                    x = data[(r * per + i) % len(data)]
                    start = time.perf_counter()
                    step(x)
                    round_times.append(time.perf_counter() - start)
                times[name].append(round_times)
            line = {name: f"{1e3 * statistics.median(t[-1]):.0f}" for name, t in times.items()}
            print(f"round {r}: step ms {line}", flush=True)
    timed = {name: [s for rnd in t[1:] for s in rnd] for name, t in times.items()}
    median = {name: statistics.median(t) for name, t in timed.items()}

    def per_round(a: str, b: str) -> list[float]:
        return [
            statistics.median(tb) / statistics.median(ta)
            for ta, tb in zip(times[a][1:], times[b][1:])
        ]

    result = {
        "shape": dict(d=D, n=n, k=k, batch=BATCH, threads=args.threads, rounds=args.rounds),
        "step_ms": {name: 1e3 * v for name, v in median.items()},
        "speedup": statistics.median(per_round("ours", "sparsify")),
        "speedup_rounds": per_round("ours", "sparsify"),
        "speedup_noauxk": statistics.median(per_round("ours-noauxk", "sparsify")),
        **{
            f"speedup_{name}": statistics.median(per_round(name, "sparsify"))
            for name in steppers
            if name.startswith("ours-chunk")
        },
        "matmul_share": {
            name: median["matmul"] / v for name, v in median.items() if name != "matmul"
        },
    }
    print(json.dumps(result, indent=1))
    out_dir = Path(__file__).parent / "out"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "step_vs_sparsify.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
