"""Training throughput: our trainer vs EleutherAI sparsify vs SAELens, on the same batches.

    /tmp/benchenv/bin/python bench/train_throughput.py [--tokens 200000] [--repeats 1]
        [--smollm2-tokens 100000] [--live] [--only synthetic,smollm2,live] [--no-saelens]
    /tmp/benchenv/bin/python bench/train_throughput.py --profile adam,fp32   # op table, ours only

Run it with an interpreter that has `sparsify` (eai-sparsify) and `sae_lens` installed and sees
this repository (the bench venv). Everything runs on 2 threads, batch 4096, side by side:

  1. synthetic planted features (d=576, n=9216, k=32): one activation cache on disk, and every
     trainer reads the same batches in the same order through our cache reader (DataStream):
       ours      sae.train.Trainer.fit(), adam, signum and sf-signsgd (schedule-free sign
                 descent, the default), fp32 and encode_dtype="bf16"
       sparsify  SparseCoder + the per-step logic of sparsify/trainer.py (b_dec from the first
                 batch, unit-norm decoder, FVU loss, gradient projection, its optimisers: the
                 default schedule-free SignSGD and Adam with its lr rule and 1000-step warm-up),
                 fp32 and under bf16 autocast (sparsify autocasts on CUDA only; on CPU we wrap
                 its forward in CPU autocast to get the same effect), eager embedding_bag decoder
       SAELens   TopKTrainingSAE driven by its own SAETrainer.step() (Adam, its defaults)
       roofline  a bare x @ W_enc on the same shapes, fp32 and bf16
  2. a SmolLM2 resid_post.3 cache (d=576, n=2304, k=16), harvested once; same comparison, fp32;
  3. --live: layer 3, n 2304, k 16, context 128, 1024 tokens a step, 60k tokens, from the live
     model: ours vs the forward-only bound (layers 0-3 with early exit) vs SAELens's own
     LanguageModelSAETrainingRunner on the same windows (HF model from our dense SmolLM2 copy).

Each trainer runs in its own process, so peak RSS (VmHWM) is its own. tokens/s counts only the
work between batch fetches (the step), after the first 3 warm-up steps; data loading is timed
apart. FVU is measured after training, the same way for all: on a held-out batch,
sum ||x - x_hat||^2 / sum ||x - mean x||^2, in fp32. Prints tables; writes
bench/out/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, SparsifyTrainer, fvu, matmul_variants, rss_mib, train_config, unused

sys.path.insert(0, str(ROOT))  # `import sae, hooks` from the bench venv too

WARMUP_STEPS = 3
BATCH = 4096
SEED = 0
# The planted-feature stream: more features than latents (superposition), ~30 active per token.
SYNTH = dict(d=576, n_features=16384, mean_active=32.0, zipf=1.0, seed=0)
OURS = ("adam", "signum", "sf-signsgd")  # our optimizers (sparsify's: signum = its schedule-free)
SHAPES = {"synthetic": dict(d=576, n=9216, k=32), "smollm2": dict(d=576, n=2304, k=16)}
LIVE = dict(site="resid_post.3", n=2304, k=16, context=128, batch=1024, tokens=60_000)
DATA = Path(os.environ.get("SAEWB_BENCH_DATA", "/tmp/saewb-bench"))  # reused between runs


# -- measuring ----------------------------------------------------------------------------------


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def busy_fraction(seconds: float = 2.0) -> float:
    b0, t0 = cpu_jiffies()
    time.sleep(seconds)
    b1, t1 = cpu_jiffies()
    return (b1 - b0) / max(t1 - t0, 1)


def wait_for_quiet(max_wait: float, limit: float = 0.3) -> float:
    """Other sessions share these 2 cores; torch's threads crawl while another process is busy.
    Wait (up to max_wait seconds) until the machine is mostly idle; return the last busy share."""
    waited = 0.0
    while (busy := busy_fraction()) > limit and waited < max_wait:
        print(f"  [machine {busy:.0%} busy; waiting 30 s]", flush=True)
        time.sleep(30)
        waited += 32
    return busy


class TimedStream:
    """Wraps a batch source. The time spent fetching a batch is `load_s`; the time from handing a
    batch out to being asked for the next one is the trainer's step, `step_s`."""

    def __init__(self, source, on_batch=None):
        self.source = source
        self.on_batch = on_batch  # e.g. a profiler's step()
        self.load_s: list[float] = []
        self.step_s: list[float] = []
        self.first_checksum: float | None = None

    def __getattr__(self, name):  # Trainer._checkpoint asks its data stream for .state() etc.
        return getattr(self.source, name)

    def __iter__(self):
        it, handed_out = iter(self.source), None
        while True:
            start = time.perf_counter()
            if handed_out is not None:
                self.step_s.append(start - handed_out)
            try:
                batch = next(it)
            except StopIteration:
                return
            if self.first_checksum is None:
                acts = next(iter(batch.acts.values()))
                self.first_checksum = float(acts[:, :16].double().sum())
            if self.on_batch is not None:
                self.on_batch()
            handed_out = time.perf_counter()
            self.load_s.append(handed_out - start)
            yield batch

    def report(self, batch: int) -> dict:
        timed = self.step_s[WARMUP_STEPS:] or self.step_s
        return {
            "steps": len(self.step_s),
            "tokens_per_s": batch * len(timed) / sum(timed),
            "tokens_per_s_median_step": batch / statistics.median(timed),
            "step_ms_median": 1e3 * statistics.median(timed),
            "step_ms_all": [round(1e3 * s, 1) for s in self.step_s],
            "load_s_total": sum(self.load_s),
            "first_batch_checksum": self.first_checksum,
        }


# -- the trainers (each runs in a child process) --------------------------------------------------


def cache_stream(spec: dict):
    """The batches our Trainer draws from the cache: same seed, same mixing buffer, same order."""
    from sae.train import DataStream, TrainConfig, World

    cfg = TrainConfig(
        cache=spec["cache"], sites=[spec["site"]], batch=spec["batch"], tokens=spec["tokens"]
    )
    return TimedStream(DataStream(cfg, World()))


def steps_for(spec: dict) -> int:
    return math.ceil(spec["tokens"] / spec["batch"])


def run_roofline(spec: dict) -> dict:
    """The encoder matmul alone on the trainers' shapes: x @ W_enc into a preallocated output,
    whole batch or in 512-token chunks (the faster is the bound). A fresh (N, n) output per call
    ("alloc") also pays ~40 ms of page faults, so it is reported but is not the bound."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x = torch.randn(spec["batch"], spec["d"], generator=g).to(dtype)
        W = torch.randn(spec["d"], spec["n"], generator=g).to(dtype)
        variants = matmul_variants(x, W)
        ms = {}
        for _ in range(2):  # interleaved, twice
            for variant, fn in variants.items():
                fn()
                times = []
                for _ in range(spec.get("reps", 6)):
                    start = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - start)
                ms.setdefault(variant, []).extend(times)
        ms = {v: 1e3 * statistics.median(t) for v, t in ms.items()}
        bound = min(ms["out"], ms["chunk512"])
        out[name] = {
            "matmul_ms": bound,
            "tokens_per_s": spec["batch"] / bound * 1e3,
            "variants_ms": ms,
        }
    return out


def run_ours(spec: dict, x_eval: torch.Tensor) -> dict:
    from sae.train import Trainer

    cfg = train_config(
        spec["encode_dtype"],
        cache=spec["cache"],
        sites=[spec["site"]],
        latents=[spec["n"]],
        ks=[spec["k"]],
        tokens=spec["tokens"],
        batch=spec["batch"],
        optimizer=spec["optimizer"],
        lr=spec.get("lr"),
        seed=SEED,
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run", progress=False)
        stream = trainer.data = TimedStream(trainer.data)
        rss_setup = rss_mib("VmRSS")
        profiler = _maybe_profiler(spec, stream)
        trainer.fit()
        if profiler is not None:
            profiler.__exit__(None, None, None)
        m = trainer.members[0]
        sae = m.sae
        with torch.no_grad():
            enc = sae.encode(x_eval)
            recon = sae.decode(enc.top_acts, enc.top_idx)
        log = [
            json.loads(line) for line in (trainer.out / "train_log.jsonl").read_text().splitlines()
        ]
        dead = float((m.since_fired >= trainer.dead_tokens).float().mean())
    return {
        **stream.report(spec["batch"]),
        "fvu": fvu(x_eval, recon),
        "unused_latents": unused(enc.top_idx[enc.top_acts > 0], spec["n"]),
        "train_fvu_last": log[-1]["fvu"],
        "dead_frac": dead,
        "dead_tokens": trainer.dead_tokens,
        "lr": m.lr,
        "rss_setup_mib": rss_setup,
    }


def _maybe_profiler(spec: dict, stream: TimedStream):
    """--profile: torch.profiler over steps 4-7 of our trainer; prints the op table at the end."""
    if not spec.get("profile"):
        return None
    from torch.profiler import ProfilerActivity, profile, schedule

    def report(prof):
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr
        )

    prof = profile(
        activities=[ProfilerActivity.CPU],
        schedule=schedule(wait=WARMUP_STEPS, warmup=1, active=4, repeat=1),
        on_trace_ready=report,
    )
    prof.__enter__()
    stream.on_batch = prof.step
    return prof


def run_sparsify(spec: dict, x_eval: torch.Tensor) -> dict:
    """sparsify's SparseCoder and the per-step logic of its Trainer.fit() (bench/common.py),
    fed from our cache instead of a model hook."""
    torch.set_float32_matmul_precision("high")  # as in Trainer.fit()
    steps = steps_for(spec)
    trainer = SparsifyTrainer(
        spec["d"], spec["n"], spec["k"], "cpu", spec["optimizer"], spec["encode_dtype"], steps, SEED
    )
    stream = cache_stream(spec)
    rss_setup = rss_mib("VmRSS")
    for step, rows in enumerate(stream):
        if step == steps:
            break
        trainer.step(rows.acts[spec["site"]].to(torch.float32))
    return {**stream.report(spec["batch"]), **trainer.evaluate(x_eval), "rss_setup_mib": rss_setup}


def run_saelens(spec: dict, x_eval: torch.Tensor) -> dict:
    """SAELens TopKTrainingSAE, trained by its SAETrainer.step() as SAETrainer.fit() calls it."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    steps = steps_for(spec)
    torch.manual_seed(SEED)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(d_in=spec["d"], d_sae=spec["n"], k=spec["k"], dtype="float32")
    )
    cfg = SAETrainerConfig(
        total_training_samples=steps * spec["batch"],
        train_batch_size_samples=spec["batch"],
        device="cpu",
        lr_end=3e-4
        / 10,  # what LanguageModelSAERunnerConfig fills in (lr / 10; unused: constant lr)
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg, sae, data_provider=None)
    stream = cache_stream(spec)
    rss_setup = rss_mib("VmRSS")
    for step, rows in enumerate(stream):
        if step == steps:
            break
        trainer.maybe_reset_sparsity()
        out = trainer.step(rows.acts[spec["site"]])
        trainer._checkpoint_if_needed()
        trainer.n_training_steps += 1
    sae.eval()
    with torch.no_grad():
        recon = sae(x_eval)
        fired = (sae.encode(x_eval) > 0).any(0).nonzero().squeeze(1)
        last = fvu(out.sae_in, out.sae_out)
    return {
        **stream.report(spec["batch"]),
        "fvu": fvu(x_eval, recon),
        "unused_latents": unused(fired, spec["n"]),
        "train_fvu_last": last,
        "lr": cfg.lr,
        "rss_setup_mib": rss_setup,
    }


# -- live SmolLM2 -----------------------------------------------------------------------------


def train_windows(tokenizer, context: int):
    """The windows our live trainer reads: built-in corpus, train split, in order."""
    from hooks.selection import Selection

    return Selection(context_size=context).windows(tokenizer, "train")


def run_forward_bound(spec: dict) -> dict:
    """Layers 0-3 only (early exit), 8 windows a forward: the ceiling for any live trainer."""
    from hooks.models import load_model
    from hooks.sites import Capture, special_token_ids, token_mask
    from hooks.windows import batched, stack

    loaded = load_model("smollm2-135m", progress=False)
    special = special_token_ids(loaded.tokenizer)
    batches = batched(train_windows(loaded.tokenizer, spec["context"]), 8)
    rows = seconds = 0.0
    with Capture(loaded.model, [spec["site"]]) as capture:
        for i, batch in enumerate(batches):
            ids = stack(batch)[0]
            start = time.perf_counter()
            capture(ids)
            if i >= 2:  # warm-up
                seconds += time.perf_counter() - start
                rows += int(token_mask(ids, special_ids=special).sum())
            if rows >= spec["bound_tokens"]:
                break
    return {"tokens_per_s": rows / seconds, "rows": rows}


def run_ours_live(spec: dict, x_eval: torch.Tensor) -> dict:
    from hooks.selection import Selection
    from sae.train import TrainConfig, Trainer

    cfg = TrainConfig(
        model="smollm2-135m",
        sites=[spec["site"]],
        latents=[spec["n"]],
        ks=[spec["k"]],
        batch=spec["batch"],
        tokens=spec["tokens"],
        selection=Selection(context_size=spec["context"]),
        optimizer=spec["optimizer"],
        seed=SEED,
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        trainer = Trainer(cfg, Path(tmp) / "run", progress=False)
        load_s = time.perf_counter() - start
        stream = trainer.data = TimedStream(trainer.data)
        start = time.perf_counter()
        trainer.fit()
        fit_s = time.perf_counter() - start
        sae = trainer.members[0].sae
        with torch.no_grad():
            enc = sae.encode(x_eval)
            recon = sae.decode(enc.top_acts, enc.top_idx)
        log = [
            json.loads(line) for line in (trainer.out / "train_log.jsonl").read_text().splitlines()
        ]
        model_tokens = trainer.data.buffer.cursor * spec["context"]
        pieces = live_pieces(trainer, spec, model_tokens // spec["context"], len(stream.step_s))
    return {
        **pieces,
        "tokens_per_s": trainer.tokens / fit_s,  # end to end: model forwards, buffer and steps
        "fit_s": fit_s,
        "model_load_s": load_s,
        "data_s": sum(stream.load_s),  # model forwards + mixing buffer
        "step_s": sum(stream.step_s),
        "tokens": trainer.tokens,
        "unused_latents": unused(enc.top_idx[enc.top_acts > 0], spec["n"]),
        # windows the model ran on: the mixing buffer fills before the first step
        "model_tokens": model_tokens,
        "fvu": fvu(x_eval, recon),
        "train_fvu_last": log[-1]["fvu"],
    }


def live_pieces(trainer, spec: dict, windows: int, steps: int) -> dict:
    """Two pieces of a live run timed alone after it, in the same process: tokenizing the
    windows the model ran on, and the SAE's encoder matmul (batch, d) @ (d, n) once per step."""
    from itertools import islice

    start = time.perf_counter()
    for _ in islice(train_windows(trainer.data.loaded.tokenizer, spec["context"]), windows):
        pass
    tokenize_s = time.perf_counter() - start
    W = trainer.members[0].sae.W_enc.detach()
    x = torch.randn(spec["batch"], W.shape[0])
    out = x.new_empty(spec["batch"], W.shape[1])
    torch.mm(x, W, out=out)
    times = []
    for _ in range(20):
        start = time.perf_counter()
        torch.mm(x, W, out=out)
        times.append(time.perf_counter() - start)
    matmul_s = statistics.median(times)
    return {"tokenize_s": tokenize_s, "enc_matmul_s": steps * matmul_s, "windows": windows}


def run_saelens_live(spec: dict, x_eval: torch.Tensor) -> dict:
    """SAELens's own LanguageModelSAETrainingRunner, offline: the HF model from our dense SmolLM2
    directory (its AutoModelForCausalLM path stops after layer 3), our train windows as a
    pre-tokenised dataset."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from datasets import Dataset
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import LoggingConfig

    from hooks.models import load_tokenizer, smollm2_dir

    tokenizer = load_tokenizer(progress=False)
    windows = [w.tokens.tolist() for w in train_windows(tokenizer, spec["context"])]
    dataset = Dataset.from_dict({"input_ids": windows})
    layer = int(spec["site"].split(".")[1])
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=576, d_sae=spec["n"], k=spec["k"], dtype="float32"),
        model_name=str(smollm2_dir(progress=False)),
        model_class_name="AutoModelForCausalLM",
        hook_name=f"model.layers.{layer}",
        dataset_path="local",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=spec["context"],
        prepend_bos=False,  # our windows already start with BOS
        training_tokens=spec["tokens"],
        train_batch_size_tokens=spec["batch"],
        device="cpu",
        seed=SEED,
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None,
        output_path=None,
    )
    start = time.perf_counter()
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    sae = runner.run()
    fit_s = time.perf_counter() - start
    sae.eval()
    with torch.no_grad():
        recon = sae(x_eval)
        fired = (sae.encode(x_eval) > 0).any(0).nonzero().squeeze(1)
    return {
        "tokens_per_s": spec["tokens"] / fit_s,
        "fit_s": fit_s,
        "model_load_s": load_s,
        "fvu": fvu(x_eval, recon),
        "unused_latents": unused(fired, spec["n"]),
    }


RUNNERS = {
    "roofline": run_roofline,
    "ours": run_ours,
    "sparsify": run_sparsify,
    "saelens": run_saelens,
    "forward_bound": run_forward_bound,
    "ours_live": run_ours_live,
    "saelens_live": run_saelens_live,
}


def child(spec: dict) -> None:
    torch.set_num_threads(2)
    runner = RUNNERS[spec["trainer"]]
    if "eval" in spec:
        from safetensors.torch import load_file

        result = runner(spec, load_file(spec["eval"])["x"].float())
    else:
        result = runner(spec)
    result["peak_rss_mib"] = rss_mib()
    print(json.dumps(result))


def run_child(spec: dict, max_wait: float) -> dict:
    """Run one trainer in a fresh process; note how busy the rest of the machine was meanwhile."""
    busy_before = wait_for_quiet(max_wait)
    label = spec["label"]
    print(f"  {label} ...", end="", flush=True)
    b0, t0 = cpu_jiffies()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--_child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "SPARSIFY_DISABLE_TRITON": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    wall = time.perf_counter() - start
    b1, t1 = cpu_jiffies()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    tick = os.sysconf("SC_CLK_TCK")
    mine = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) * tick
    other = max(0.0, (b1 - b0 - mine) / max(t1 - t0, 1))  # share of all cores used by others
    if spec.get("profile"):
        print(proc.stderr[-12000:])
    if proc.returncode:
        print(f" FAILED\n{proc.stderr[-3000:]}")
        return {"error": proc.stderr[-3000:], "label": label}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(label=label, wall_s=wall, other_load=other, busy_before=busy_before)
    rate = result.get("tokens_per_s")
    print(
        f" {rate:,.0f} tok/s" if isinstance(rate, float) else " done",
        f"(others used {other:.0%} of the CPUs)",
        flush=True,
    )
    return result


# -- data ------------------------------------------------------------------------------------


def synthetic_data(tokens: int) -> tuple[Path, Path, dict]:
    """The planted-feature cache (written once, reused) and a held-out batch from the same
    features with an unrelated seed."""
    from safetensors.torch import save_file

    from sae.synthetic import firing_probabilities, sample, write_synthetic_cache

    s = SYNTH
    folder = DATA / f"synthetic-d{s['d']}-F{s['n_features']}-a{s['mean_active']:g}-t{tokens}"
    features = write_synthetic_cache(
        folder / "cache",
        d=s["d"],
        n_features=s["n_features"],
        tokens=tokens,
        mean_active=s["mean_active"],
        zipf=s["zipf"],
        seed=s["seed"],
        progress=True,
    )
    probs = firing_probabilities(s["n_features"], s["mean_active"], s["zipf"])
    held_out = folder / "eval.safetensors"
    if not held_out.exists():
        x = sample(features, probs, 8192, torch.Generator().manual_seed(123_456_789))
        save_file({"x": x}, str(held_out))
    return folder / "cache", held_out, {**s, "mean_active_actual": float(probs.sum())}


def smollm2_data(tokens: int, site: str) -> tuple[Path, Path]:
    """A resid_post cache of the built-in corpus's train windows, plus held-out rows from its
    eval split, harvested once with our early-exit capture."""
    from safetensors.torch import save_file

    from hooks.cache import ActivationCache, harvest
    from hooks.models import load_model
    from hooks.selection import Selection

    folder = DATA / f"smollm2-{site}-t{tokens}"
    cache, held_out = folder / "cache", folder / "eval.safetensors"
    done = (cache / "manifest.json").exists() and ActivationCache(cache).manifest.get("complete")
    if done and held_out.exists():
        return cache, held_out
    loaded = load_model("smollm2-135m", progress=False)

    sel = Selection(context_size=128)
    harvest(loaded, [site], sel.windows(loaded.tokenizer, "train"), tokens, cache, sel)
    with tempfile.TemporaryDirectory() as tmp:
        held = sel.windows(loaded.tokenizer, "eval")
        harvest(loaded, [site], held, 8192, Path(tmp) / "eval", sel, progress=False)
        rows = [ActivationCache(Path(tmp) / "eval").read_shard(i) for i in range(1)]
        x = torch.cat([r.acts[site] for r in rows]).float()
    save_file({"x": x.contiguous()}, str(held_out))
    return cache, held_out


# -- reporting ---------------------------------------------------------------------------------


def median_runs(runs: list[dict]) -> dict:
    """Median over repeats of every numeric field (first run's values for the rest)."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    out = dict(good[0])
    for key, value in good[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in good)
    out["repeats"] = len(good)
    out["tokens_per_s_all"] = [r.get("tokens_per_s") for r in good]
    out["tokens_per_s_best"] = max(r.get("tokens_per_s", 0.0) for r in good)
    out["other_load_all"] = [round(r.get("other_load", 0.0), 3) for r in good]
    return out


def print_table(title: str, results: dict, roof: dict) -> None:
    """Median over repeats; `best` is the least disturbed repeat (others share the 2 cores)."""
    print(f"\n{title}")
    print(
        f"{'trainer':22s} {'tokens/s':>8s} {'best':>7s} {'step':>7s} {'%fp32mm':>7s} "
        f"{'%bf16mm':>7s} {'best%32':>7s} {'RSS MiB':>7s} {'FVU':>6s} {'unused':>6s} "
        f"{'data':>5s} {'others':>6s}"
    )
    fp32, bf16 = roof["fp32"]["tokens_per_s"], roof["bf16"]["tokens_per_s"]
    for name, r in results.items():
        if "error" in r:
            print(f"{name:22s} failed: {r['error'].strip().splitlines()[-1][:80]}")
            continue
        rate, best = r["tokens_per_s"], r.get("tokens_per_s_best", r["tokens_per_s"])
        data_ms = 1e3 * r["load_s_total"] / max(r["steps"], 1)
        print(
            f"{name:22s} {rate:8,.0f} {best:7,.0f} {r['step_ms_median']:5.0f}ms "
            f"{rate / fp32:7.0%} {rate / bf16:7.0%} {best / fp32:7.0%} {r['peak_rss_mib']:7.0f} "
            f"{r['fvu']:6.3f} {r.get('unused_latents', float('nan')):6.1%} {data_ms:3.0f}ms "
            f"{max(r.get('other_load_all', [r['other_load']])):6.0%}"
        )
    print(
        f"{'roofline x @ W_enc':22s} {fp32:8,.0f} fp32 ({roof['fp32']['matmul_ms']:.0f} ms); "
        f"{bf16:,.0f} bf16 ({roof['bf16']['matmul_ms']:.0f} ms)"
    )


def ratio_lines(results: dict, roof: dict, default_opt: str) -> dict:
    """The ratios issue 5 sets targets for."""

    def rate(name, key="tokens_per_s"):
        r = results.get(name, {})
        return r.get(key, float("nan")) if "error" not in r else float("nan")

    def best(name):
        return rate(name, "tokens_per_s_best")

    def fvu_of(name):
        r = results.get(name, {})
        return r.get("fvu", float("nan")) if "error" not in r else float("nan")

    ours = f"ours {default_opt} fp32"
    roof32 = roof["fp32"]["tokens_per_s"]
    pairs = {  # name: (numerator, denominator or None for the roofline, target)
        f"ours {default_opt}/sparsify signum (the defaults)": (ours, "sparsify signum fp32", 1.8),
        f"ours {default_opt}/SAELens": (ours, "SAELens fp32", 5.0),
        f"ours {default_opt} share of the fp32 matmul bound": (ours, None, 0.8),
        f"ours {default_opt} bf16/fp32": (f"ours {default_opt} bf16", ours, 1.5),
    }
    counterpart = {"adam": "adam", "signum": "signum", "sf-signsgd": "signum"}  # sparsify's
    for opt, theirs in counterpart.items():
        for dt in ("fp32", "bf16"):
            ratio = (f"ours {opt} {dt}", f"sparsify {theirs} {dt}", None)
            pairs[f"ours {opt}/sparsify {theirs} {dt}"] = ratio
        pairs.setdefault(f"ours {opt} bf16/fp32", (f"ours {opt} bf16", f"ours {opt} fp32", None))
    checks = {}
    for name, (num, den, target) in pairs.items():
        med = rate(num) / (rate(den) if den else roof32)
        checks[name] = (med, best(num) / (best(den) if den else roof32), target)
    best_sparsify = min(fvu_of("sparsify signum fp32"), fvu_of("sparsify adam fp32"))
    out = {}
    print()
    print(f"  {'ratio':52s} {'median':>7s} {'best':>6s}")
    for name, (value, top, target) in checks.items():
        if math.isnan(value):
            continue  # a trainer this section does not run
        verdict = (
            "" if target is None or math.isnan(value) else ("MET" if value >= target else "MISSED")
        )
        goal = f"(target >= {target:g})" if target else ""
        print(f"  {name:52s} {value:6.2f}x {top:5.2f}x {goal:16s} {verdict}")
        out[name] = {
            "value": value,
            "best": top,
            "target": target,
            "met": verdict == "MET" if target else None,
        }
    for opt in OURS:
        value = fvu_of(f"ours {opt} fp32")
        if math.isnan(value):
            continue
        verdict = "MET" if value <= best_sparsify + 0.01 else "MISSED"
        print(
            f"  FVU ours {opt} fp32 {value:.3f} vs the better sparsify {best_sparsify:.3f} + 0.01"
            f"{'':8s} {verdict}"
        )
        out[f"fvu ours {opt}"] = {
            "value": value,
            "target": best_sparsify + 0.01,
            "met": verdict == "MET",
        }
    return out


def compare(
    section: str,
    shape: dict,
    cache: Path,
    held_out: Path,
    tokens: int,
    site: str,
    trainers: list[dict],
    args,
) -> dict:
    """Roofline plus every trainer, interleaved over repeats."""
    base = dict(shape, cache=str(cache), eval=str(held_out), tokens=tokens, batch=BATCH, site=site)
    runs: dict[str, list[dict]] = {t["label"]: [] for t in trainers}
    roofs = []
    for rep in range(args.repeats):
        print(f"\n[{section}] round {rep + 1}/{args.repeats}")
        roof_spec = dict(shape, trainer="roofline", label="roofline", batch=BATCH)
        roofs.append(run_child(roof_spec, args.max_wait))
        for t in trainers:
            runs[t["label"]].append(run_child({**base, **t}, args.max_wait))
    roof = {
        dtype: {
            "matmul_ms": statistics.median(r[dtype]["matmul_ms"] for r in roofs),
            "tokens_per_s": statistics.median(r[dtype]["tokens_per_s"] for r in roofs),
            "variants_ms": {
                v: statistics.median(r[dtype]["variants_ms"][v] for r in roofs)
                for v in roofs[0][dtype]["variants_ms"]
            },
        }
        for dtype in ("fp32", "bf16")
    }
    results = {label: median_runs(r) for label, r in runs.items()}
    for label, r in results.items():
        r["runs"] = runs[label]  # every repeat, as measured
    checksums = {r.get("first_batch_checksum") for r in results.values() if "error" not in r}
    same = len(checksums) == 1
    return {"roofline": roof, "trainers": results, "same_first_batch": same, "tokens": tokens}


def trainer_list(dtypes: list[str], with_saelens: bool = True, adam_lrs=()) -> list[dict]:
    # --adam-lrs: does a higher Adam lr help these short runs?
    out = [
        dict(
            trainer="ours",
            optimizer="adam",
            encode_dtype="fp32",
            lr=lr,
            label=f"ours adam lr={lr:g} fp32",
        )
        for lr in adam_lrs
    ]
    for dtype in dtypes:
        for opt in OURS:
            out.append(
                dict(trainer="ours", optimizer=opt, encode_dtype=dtype, label=f"ours {opt} {dtype}")
            )
        for opt in ("signum", "adam"):
            out.append(
                dict(
                    trainer="sparsify",
                    optimizer=opt,
                    encode_dtype=dtype,
                    label=f"sparsify {opt} {dtype}",
                )
            )
    if with_saelens:
        out.append(dict(trainer="saelens", encode_dtype="fp32", label="SAELens fp32"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=200_000, help="synthetic training tokens")
    parser.add_argument("--smollm2-tokens", type=int, default=100_000, help="0 skips the cache")
    parser.add_argument("--live", action="store_true", help="also the live SmolLM2 comparison")
    parser.add_argument("--only", default="synthetic,smollm2,live")
    parser.add_argument("--repeats", type=int, default=1, help="rounds; medians are reported")
    parser.add_argument("--no-saelens", action="store_true", help="skip the (slow) SAELens runs")
    parser.add_argument("--no-bf16", action="store_true", help="synthetic: fp32 runs only")
    parser.add_argument("--adam-lrs", default="", help="also our Adam at these lrs, e.g. 1e-3,4e-3")
    parser.add_argument(
        "--profile",
        default=None,
        metavar="OPT,DTYPE",
        help="only profile our trainer on the synthetic data (e.g. adam,fp32): op table of 4 steps",
    )
    parser.add_argument("--max-wait", type=float, default=300, help="s to wait for a quiet CPU")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        return child(json.loads(args._child))

    from sae.train import TrainConfig

    default_opt = TrainConfig().optimizer
    sections = set(args.only.split(","))
    report: dict = {
        "batch": BATCH,
        "threads": 2,
        "warmup_steps": WARMUP_STEPS,
        "torch": torch.__version__,
        "default_optimizer": default_opt,
    }
    with_saelens = not args.no_saelens
    adam_lrs = [float(v) for v in args.adam_lrs.split(",") if v]

    if args.profile:
        cache, held_out, _ = synthetic_data(args.tokens)
        opt, dtype = args.profile.split(",")
        spec = dict(
            SHAPES["synthetic"],
            cache=str(cache),
            eval=str(held_out),
            tokens=args.tokens,
            batch=BATCH,
            site="synthetic",
            trainer="ours",
            optimizer=opt,
            encode_dtype=dtype,
            label=f"ours {opt} {dtype} (profiled)",
            profile=True,
        )
        run_child(spec, args.max_wait)
        return

    if "synthetic" in sections:
        cache, held_out, planted = synthetic_data(args.tokens)
        shape = SHAPES["synthetic"]
        dtypes = ["fp32"] if args.no_bf16 else ["fp32", "bf16"]
        trainers = trainer_list(dtypes, with_saelens, adam_lrs)
        res = compare("synthetic", shape, cache, held_out, args.tokens, "synthetic", trainers, args)
        res["planted"] = planted
        n_steps = math.ceil(args.tokens / BATCH)
        print_table(
            f"Synthetic planted features (F={planted['n_features']}, ~{planted['mean_active_actual']:.0f}"
            f" active, Zipf {planted['zipf']}), d={shape['d']} n={shape['n']} k={shape['k']}, "
            f"{n_steps} steps x {BATCH} tokens; same batches: {res['same_first_batch']}",
            res["trainers"],
            res["roofline"],
        )
        res["checks"] = ratio_lines(res["trainers"], res["roofline"], default_opt)
        report["synthetic"] = res

    if "smollm2" in sections and args.smollm2_tokens:
        site = LIVE["site"]
        cache, held_out = smollm2_data(args.smollm2_tokens, site)
        shape = SHAPES["smollm2"]
        trainers = trainer_list(["fp32"], with_saelens, adam_lrs)
        res = compare("smollm2", shape, cache, held_out, args.smollm2_tokens, site, trainers, args)
        print_table(
            f"SmolLM2 {site} cache, d={shape['d']} n={shape['n']} k={shape['k']}, "
            f"{math.ceil(args.smollm2_tokens / BATCH)} steps x {BATCH} tokens; "
            f"same batches: {res['same_first_batch']}",
            res["trainers"],
            res["roofline"],
        )
        res["checks"] = ratio_lines(res["trainers"], res["roofline"], default_opt)
        report["smollm2"] = res

    if args.live and "live" in sections:
        report["live"] = live(args)

    out = Path(__file__).parent / "out" / "train_throughput.json"
    out.parent.mkdir(exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    for section in ("synthetic", "smollm2", "live"):
        if section in report:
            report[section]["measured_at"] = stamp
        elif out.exists():  # a partial run keeps the sections it did not measure
            report.setdefault(section, json.loads(out.read_text()).get(section))
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


def live(args) -> dict:
    _, held_out = smollm2_data(max(args.smollm2_tokens, 16384), LIVE["site"])
    spec = dict(LIVE, eval=str(held_out), optimizer="sf-signsgd")
    children = {
        "forward bound (layers 0-3)": dict(
            LIVE, trainer="forward_bound", label="forward bound", bound_tokens=30_000
        )
    }
    for opt in ("sf-signsgd", "adam"):
        children[f"ours {opt}"] = dict(
            spec, trainer="ours_live", optimizer=opt, label=f"ours live {opt}"
        )
    if not args.no_saelens:
        children["SAELens runner"] = dict(spec, trainer="saelens_live", label="SAELens live runner")
    runs = {name: [] for name in children}
    for rep in range(args.repeats):  # interleaved rounds: the machine's speed drifts between them
        print(f"\n[live] round {rep + 1}/{args.repeats}")
        for name, child in children.items():
            runs[name].append(run_child(child, args.max_wait))
    results = {name: median_runs(r) for name, r in runs.items()}
    bound = results["forward bound (layers 0-3)"].get("tokens_per_s", float("nan"))
    print(
        f"\nLive SmolLM2 {LIVE['site']}, n={LIVE['n']} k={LIVE['k']}, context {LIVE['context']}, "
        f"{LIVE['batch']} tokens/step, {LIVE['tokens']:,} tokens"
    )
    print(
        f"{'trainer':30s} {'tokens/s':>9s} {'% bound':>8s} {'peak RSS':>9s} {'FVU':>7s} "
        f"{'unused':>7s} {'others':>7s}"
    )
    for name, r in results.items():
        if "error" in r:
            print(f"{name:30s} failed: {r['error'].strip().splitlines()[-1][:90]}")
            continue
        print(
            f"{name:30s} {r['tokens_per_s']:9,.0f} {r['tokens_per_s'] / bound:8.0%} "
            f"{r['peak_rss_mib']:6.0f}MiB {r.get('fvu', float('nan')):7.3f} "
            f"{r.get('unused_latents', float('nan')):7.1%} {r['other_load']:7.0%}"
        )
    for opt in ("sf-signsgd", "adam"):
        r = results[f"ours {opt}"]
        if "error" not in r:
            print(
                f"  ours {opt}: >= 4,000 tokens/s {'MET' if r['tokens_per_s'] >= 4000 else 'MISSED'}; "
                f"FVU <= 0.21 {'MET' if r['fvu'] <= 0.21 else 'MISSED'}; "
                f"fit {r['fit_s']:.1f} s: model forwards + buffer + tokenizing "
                f"{r['data_s']:.1f} s for {r['model_tokens']:,} model tokens, SAE steps "
                f"{r['step_s']:.1f} s; alone: tokenizing {r['tokenize_s']:.2f} s, the encoder "
                f"matmul {r['enc_matmul_s']:.2f} s"
            )
    ratios = {}
    for other, target in (("forward bound (layers 0-3)", 0.9), ("SAELens runner", 1.3)):
        if other not in runs:
            continue
        per_round = [
            a["tokens_per_s"] / b["tokens_per_s"]
            for a, b in zip(runs["ours sf-signsgd"], runs[other], strict=True)
            if "error" not in a and "error" not in b
        ]
        if per_round:
            ratios[other] = median = statistics.median(per_round)
            rounds = ", ".join(f"{r:.2f}" for r in per_round)
            verdict = "MET" if median >= target else "MISSED"
            print(
                f"  ours sf-signsgd / {other}, per round: {rounds}; median {median:.2f} "
                f"(target >= {target}) {verdict}"
            )
    return {"trainers": results, "forward_bound_tokens_per_s": bound, "ratios": ratios}


if __name__ == "__main__":
    main()
