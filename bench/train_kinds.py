"""Training throughput of the dictionaries beyond TopK: each of our kinds against SAELens training
the same kind, and our TopK transcoder against sparsify's transcoder, on the same batches.

    /tmp/benchenv/bin/python bench/train_kinds.py [--kinds jumprelu,matryoshka,batchtopk,relu,
        transcoder] [--tokens 200000] [--latents 9216] [--k 32]

Run it with the bench venv's interpreter (sae-lens and eai-sparsify installed, this repository
on the path). Everything runs on 2 threads at d 576, batch 4096, one process per trainer:

  data      the planted-feature stream of bench/train_throughput.py (16,384 unit features in
            d 576, ~32 active per token), one cache on disk; for the transcoder a second site
            holds the same codes through a second set of features (sae.synthetic, transcode)
  ours      sae.train.Trainer.fit() with its defaults (schedule-free sign descent) for
            --architecture jumprelu | matryoshka | batchtopk | relu, and a TopK transcoder
  SAELens   JumpReLUTrainingSAE, MatryoshkaBatchTopKTrainingSAE (the same prefix sizes),
            BatchTopKTrainingSAE and StandardTrainingSAE, each with its defaults, driven by its
            own SAETrainer.step() (Adam, clipping, its coefficient schedules)
  sparsify  SparseCoder(transcode=True) with the per-step logic of its trainer (its first-batch
            bias init, FVU loss, schedule-free signSGD)

tokens/s counts the step (batch handed out to next batch asked for) after 3 warm-up steps.
FVU and L0 are measured afterwards on a held-out batch of 8,192 tokens, in the inference form
each tool saves: SAELens's BatchTopK and Matryoshka as the JumpReLU it exports (threshold = its
running average), ours likewise; SAELens's batch top-k form is reported beside it. Writes
bench/out/train_kinds.json.
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

import torch
from common import ROOT, fvu, rss_mib
from train_throughput import (
    DATA,
    SEED,
    SYNTH,
    TimedStream,
    steps_for,
    synthetic_data,
    wait_for_quiet,
)

sys.path.insert(0, str(ROOT))

SAELENS_KIND = {
    "jumprelu": "jumprelu",
    "matryoshka": "matryoshka_batchtopk",
    "batchtopk": "batchtopk",
    "relu": "standard",
}


def stream_for(spec: dict) -> TimedStream:
    """The batches our Trainer draws from the cache (same seed, buffer and order), with the
    transcoder's target site beside the input for the transcoder."""
    from sae.train import DataStream, TrainConfig, World

    target = "synthetic_out" if spec["kind"] == "transcoder" else None
    cfg = TrainConfig(cache=spec["cache"], sites=["synthetic"], target=target,
                      batch=spec["batch"], tokens=spec["tokens"])  # fmt: skip
    return TimedStream(DataStream(cfg, World()))


def _l0(acts: torch.Tensor) -> float:
    return float((acts > 0).sum(1).float().mean())


def run_ours(spec: dict) -> dict:
    from safetensors.torch import load_file

    from sae.train import TrainConfig, Trainer

    held = load_file(spec["eval"])
    transcode = spec["kind"] == "transcoder"
    cfg = TrainConfig(
        cache=spec["cache"],
        sites=["synthetic"],
        target="synthetic_out" if transcode else None,
        architecture="topk" if transcode else spec["kind"],
        latents=[spec["n"]],
        ks=[spec["k"]],
        tokens=spec["tokens"],
        batch=spec["batch"],
        seed=SEED,
        checkpoint_every=10**12,
        log_every=10**9,
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run", progress=False)
        stream = trainer.data = TimedStream(trainer.data)
        trainer.fit()
        sae = trainer.members[0].sae.eval()
    with torch.no_grad():
        recon, acts, _ = sae.reconstruct(held["x"])
    target = held["y"] if transcode else held["x"]
    return {**stream.report(spec["batch"]), "fvu": fvu(target, recon), "l0": _l0(acts)}


def _saelens_sae(kind: str, d: int, n: int, k: int, prefixes: list[int]):
    import sae_lens as sl

    base = dict(d_in=d, d_sae=n, dtype="float32", device="cpu")
    if kind == "standard":
        return sl.StandardTrainingSAE(sl.StandardTrainingSAEConfig(**base))
    if kind == "batchtopk":
        return sl.BatchTopKTrainingSAE(sl.BatchTopKTrainingSAEConfig(**base, k=k))
    if kind == "matryoshka_batchtopk":
        cfg = sl.MatryoshkaBatchTopKTrainingSAEConfig(**base, k=k, matryoshka_widths=prefixes)
        return sl.MatryoshkaBatchTopKTrainingSAE(cfg)
    return sl.JumpReLUTrainingSAE(sl.JumpReLUTrainingSAEConfig(**base))


def run_saelens(spec: dict) -> dict:
    from sae_lens import SAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer
    from safetensors.torch import load_file

    from sae.config import default_prefixes

    held = load_file(spec["eval"])["x"]
    kind = SAELENS_KIND[spec["kind"]]
    steps = steps_for(spec)
    torch.manual_seed(SEED)
    sae = _saelens_sae(kind, spec["d"], spec["n"], spec["k"], default_prefixes(spec["n"]))
    cfg = SAETrainerConfig(
        total_training_samples=steps * spec["batch"],
        train_batch_size_samples=spec["batch"],
        device="cpu",
        lr_end=3e-4 / 10,  # what LanguageModelSAERunnerConfig fills in (unused: constant lr)
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg, sae, data_provider=None)
    stream = stream_for(spec)
    for step, rows in enumerate(stream):
        if step == steps:
            break
        trainer.maybe_reset_sparsity()
        trainer.step(rows.acts["synthetic"])
        trainer._checkpoint_if_needed()
        trainer.n_training_steps += 1
    out = {**stream.report(spec["batch"])}
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        if kind in ("batchtopk", "matryoshka_batchtopk"):
            acts = sae.encode(held)  # the batch top-k of the training form
            out |= {"fvu_batch_topk": fvu(held, sae.decode(acts)), "l0_batch_topk": _l0(acts)}
        sae.save_inference_model(tmp)
        inference = SAE.load_from_disk(tmp)
        acts = inference.encode(held)
        out |= {"fvu": fvu(held, inference.decode(acts)), "l0": _l0(acts)}
    return out


def run_sparsify(spec: dict) -> dict:
    """sparsify's SparseCoder(transcode=True) and its trainer's per-step logic (first-batch
    encoder bias and b_dec, FVU loss, no decoder renormalisation, schedule-free signSGD)."""
    from safetensors.torch import load_file
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    held = load_file(spec["eval"])
    torch.manual_seed(SEED)
    n, k = spec["n"], spec["k"]
    sae = SparseCoder(spec["d"], SparseCoderConfig(num_latents=n, k=k, transcode=True), "cpu")
    forward = type(sae).forward.__wrapped__.__get__(sae)  # without its CUDA autocast wrapper
    lr = 5e-3 / (n / 2**14) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
    opt.train()
    stream = stream_for(spec)
    for step, rows in enumerate(stream):
        if step == steps_for(spec):
            break
        x, y = rows.acts["synthetic"], rows.acts["synthetic_out"]
        if step == 0:
            sae.encoder.bias.data = -x.mean(0) @ sae.encoder.weight.data.T
            sae.b_dec.data = y.mean(0)
        variance = (y - y.mean(0)).pow(2).sum()
        out = forward(x=x, y=y, dead_mask=None, total_variance=variance)
        (out.fvu + out.multi_topk_fvu / 8).backward()
        opt.step()
        opt.zero_grad()
    opt.eval()
    with torch.no_grad():
        enc = sae.encode(held["x"])
        recon = sae.decode(enc.top_acts, enc.top_indices)
    return {
        **stream.report(spec["batch"]),
        "fvu": fvu(held["y"], recon),
        "l0": float((enc.top_acts > 0).sum(1).float().mean()),
    }


RUNNERS = {"ours": run_ours, "saelens": run_saelens, "sparsify": run_sparsify}


def pair_data(tokens: int) -> tuple[Path, Path]:
    """The transcoder's stream: codes through two feature sets, and a held-out pair."""
    from safetensors.torch import save_file

    from sae.synthetic import firing_probabilities, sample_codes, write_synthetic_cache

    s = SYNTH
    folder = DATA / f"pair-d{s['d']}-F{s['n_features']}-a{s['mean_active']:g}-t{tokens}"
    f_in, f_out = write_synthetic_cache(
        folder / "cache", d=s["d"], n_features=s["n_features"], tokens=tokens,
        mean_active=s["mean_active"], zipf=s["zipf"], seed=s["seed"], transcode=True,
        progress=True,
    )  # fmt: skip
    held_out = folder / "eval.safetensors"
    if not held_out.exists():
        probs = firing_probabilities(s["n_features"], s["mean_active"], s["zipf"])
        codes = sample_codes(probs, 8192, torch.Generator().manual_seed(123_456_789))
        save_file({"x": codes @ f_in, "y": codes @ f_out}, str(held_out))
    return folder / "cache", held_out


def child(spec: dict) -> None:
    torch.set_num_threads(2)
    result = RUNNERS[spec["trainer"]](spec)
    result["peak_rss_mib"] = rss_mib()
    print(json.dumps(result))


def run_child(spec: dict, max_wait: float) -> dict:
    wait_for_quiet(max_wait)
    print(f"  {spec['kind']:<11} {spec['trainer']:<9}", end="", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "SPARSIFY_DISABLE_TRITON": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, __file__, "--_child", json.dumps(spec)], capture_output=True, text=True,
        env=env,
    )  # fmt: skip
    if proc.returncode:
        print(f" FAILED\n{proc.stderr[-3000:]}")
        return {"error": proc.stderr[-3000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    print(
        f" {result['tokens_per_s']:>9,.0f} tok/s  fvu {result['fvu']:.3f}  l0 {result['l0']:.1f}",
        flush=True,
    )
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kinds", default="jumprelu,matryoshka,batchtopk,relu,transcoder")
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--latents", type=int, default=9216)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--max-wait", type=float, default=600)
    p.add_argument("--_child")
    args = p.parse_args()
    if args._child:
        return child(json.loads(args._child))
    kinds = args.kinds.split(",")
    spec = dict(d=SYNTH["d"], n=args.latents, k=args.k, batch=4096, tokens=args.tokens)
    results = {}
    for kind in kinds:
        if kind == "transcoder":
            cache, held = pair_data(args.tokens)
            peers = ("ours", "sparsify")
        else:
            cache, held, _ = synthetic_data(args.tokens)
            peers = ("ours", "saelens")
        for trainer in peers:
            run = dict(spec, kind=kind, trainer=trainer, cache=str(cache), eval=str(held))
            results.setdefault(kind, {})[trainer] = run_child(run, args.max_wait)
    print(f"\nd {spec['d']}, n {spec['n']}, k {spec['k']}, batch 4096, {args.tokens:,} tokens")
    print(f"{'kind':<11} {'peer':<9} {'speed-up':>9} {'fvu ours':>9} {'fvu peer':>9} "
          f"{'l0 ours':>8} {'l0 peer':>8}")  # fmt: skip
    for kind, runs in results.items():
        (peer, theirs), ours = [(k, v) for k, v in runs.items() if k != "ours"][0], runs["ours"]
        if "error" in ours or "error" in theirs:
            continue
        ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
        runs["speedup"] = ratio
        print(
            f"{kind:<11} {peer:<9} {ratio:>8.1f}x {ours['fvu']:>9.3f} {theirs['fvu']:>9.3f} "
            f"{ours['l0']:>8.1f} {theirs['l0']:>8.1f}"
        )
    out = Path(__file__).parent / "out" / "train_kinds.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"spec": spec, "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
