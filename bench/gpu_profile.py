"""Where a training step's time goes at the GPU shape: profiler, host syncs, and the pieces.

    python3 bench/gpu_profile.py [--optimizers adam,sf-signsgd] [--dtypes fp32,bf16] [--out DIR]
    python3 bench/gpu_profile.py --sae-from DIR --no-components   # profile another copy of sae/
    python3 bench/gpu_profile.py --tiny                            # seconds on the CPU

For each (optimizer, dtype) it builds the real Trainer at d=2048, n=65536, k=64, batch 4096
(bench/gpu.py's shape, data and cache helpers; the same TrainConfig as its rows, so the lr
schedule and the dead-latent horizon match), runs --warmup steps (30: past the 25 steps after
which a latent that never fired counts as dead), then:

  a. step time: --steps steps, each synchronized (bench/gpu.py's definition), and the same steps
     back to back (the pipelined rate, where host work can hide behind the GPU's);
  b. host syncs: one step under torch.cuda.set_sync_debug_mode("warn"), the warnings counted by
     source line;
  c. torch.profiler (CPU and CUDA) over --steps steps: key_averages() sorted by CUDA time.

Then, once (--no-components skips it), the candidate pieces alone, CUDA-event timed (median of
20): the encoder matmul, top-k variants (torch.topk and the grouped two-stage form), the encoder
and decoder backward pieces (transposes, Triton gather-sums against embedding_bag, cuSPARSE
products, with their agreement), the optimizer steps (fused Adam,
the schedulefree wrapper against the fused schedule-free sign step, gradient clipping), and the
decoder renorm and gradient projection. Indices and activations come from the trained SAE, so
the latents' skew is real. fp32 rows use TF32 matmuls ("high"), as bench/gpu.py's do.

Full tables go to DIR/profile-<tag>.txt and a JSON summary to DIR/profile-<tag>.json (DIR: --out,
else $OUT, else bench/out); a compact summary is printed last.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent


def _early_sae_path() -> None:
    """--sae-from DIR: import `sae` from DIR (e.g. a copy of an older commit's sae/) before the
    repository's own copy can be found; hooks and the rest still come from the repository."""
    if "--sae-from" in sys.argv:
        folder = sys.argv[sys.argv.index("--sae-from") + 1]
        sys.path.insert(0, str(Path(folder).resolve()))
        import sae  # noqa: F401  (cached: every later `import sae.x` comes from DIR)


_early_sae_path()

import torch  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
G = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(G)  # bench/gpu.py's helpers (it puts the repository on sys.path)

SITE = G.SITE


def train_step(trainer, rows) -> None:
    batch = SimpleNamespace(acts={SITE: rows})
    if hasattr(trainer, "_step"):
        trainer._step(batch)
        return
    # older sae/ (before Trainer._step): fit()'s loop body
    x_by_site, dropped = trainer._finite_rows(batch)
    if not trainer.initialised:
        trainer._first_batch(x_by_site)
    global_rows = int(trainer.world.sum(torch.tensor(len(next(iter(x_by_site.values()))))))
    for m in trainer.members:
        trainer._train_member(m, x_by_site[m.site], global_rows)
    trainer.step += 1
    trainer.tokens += global_rows + dropped


def build_trainer(shape, batch, device, optimizer, dtype, cache, folder, tokens):
    from sae.train import Trainer

    cfg = G.train_config(
        dtype,
        cache=str(cache),
        sites=[SITE],
        latents=[shape["n"]],
        ks=[shape["k"]],
        tokens=tokens,
        batch=batch,
        optimizer=optimizer,
        seed=G.SEED,
        device=str(device),
        checkpoint_every=1 << 62,
    )
    trainer = Trainer(cfg, folder, progress=False)
    trainer._write_run_files()
    return trainer


def profiler_table(prof, sort: str, rows: int) -> str:
    for key in (sort, sort.replace("cuda", "device")):
        try:
            return prof.key_averages().table(sort_by=key, row_limit=rows)
        except Exception:  # the name changed between torch versions
            continue
    return prof.key_averages().table(row_limit=rows)


def device_us(evt, self_only: bool) -> float:
    names = ("self_device_time_total", "self_cuda_time_total") if self_only else ()
    names += ("device_time_total", "cuda_time_total") if not self_only else ()
    for name in names:
        value = getattr(evt, name, None)
        if value is not None:
            return float(value)
    return 0.0


def sync_warnings(trainer, rows) -> list[tuple[str, int]]:
    """One step with CUDA sync debugging on: (source line, count) of every synchronizing op."""
    if rows.device.type != "cuda":
        return []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(trainer, rows)
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where = Counter(
        f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}"
        for w in caught
        if "synchroniz" in str(w.message)
    )
    return where.most_common()


def profile_config(args, shape, x, device, optimizer, dtype, cache, tag, log) -> tuple:
    W, T = args.warmup, args.steps
    batch = args.batch
    batches = [x[i * batch : (i + 1) * batch] for i in range(x.shape[0] // batch)]
    need = W + 2 * T + 1 + T
    assert len(batches) >= need, (len(batches), need)
    res: dict = {"optimizer": optimizer, "dtype": dtype}
    with tempfile.TemporaryDirectory() as tmp, G.Precision("high"):
        trainer = build_trainer(
            shape, batch, device, optimizer, dtype, cache, Path(tmp) / "run", args.tokens
        )
        it = iter(batches)
        t0 = time.perf_counter()
        for _ in range(W):
            train_step(trainer, next(it))
        G.sync(device)
        res["warmup_s"] = time.perf_counter() - t0
        m = trainer.members[0]
        res["dead"] = int((m.since_fired >= trainer.dead_tokens).sum())

        synced = []
        for _ in range(T):
            G.sync(device)
            t0 = time.perf_counter()
            train_step(trainer, next(it))
            G.sync(device)
            synced.append(1e3 * (time.perf_counter() - t0))
        G.sync(device)
        t0 = time.perf_counter()
        for _ in range(T):
            train_step(trainer, next(it))
        G.sync(device)
        res["step_ms_synced"] = statistics.median(synced)
        res["step_ms_pipelined"] = 1e3 * (time.perf_counter() - t0) / T
        res["tokens_per_s"] = batch / res["step_ms_synced"] * 1e3

        res["syncs"] = sync_warnings(trainer, next(it))

        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            for _ in range(T):
                train_step(trainer, next(it))
            G.sync(device)
        table = profiler_table(prof, "cuda_time_total", 30)
        self_table = profiler_table(prof, "self_cuda_time_total", 30)
        events = prof.key_averages()
        kernels = sorted(
            ((e.key, device_us(e, True) / T / 1e3, e.count // T) for e in events),
            key=lambda r: -r[1],
        )
        res["self_device_ms_per_step"] = sum(ms for _, ms, _ in kernels)
        res["top_self_device_ms"] = [(k, round(ms, 3), c) for k, ms, c in kernels[:25] if ms > 0]
        log.write(f"\n===== {tag} {optimizer} {dtype}: sorted by cuda_time_total =====\n{table}\n")
        log.write(f"\n===== {tag} {optimizer} {dtype}: sorted by self cuda time =====\n")
        log.write(f"{self_table}\n")
        log.write(f"syncs in one step: {res['syncs']}\n")
        log.flush()
        state = None
        if args.components:
            with torch.no_grad():
                enc = m.sae.encode(batches[-1])
            state = (m.sae, enc, batches[-1])
        del trainer
    return res, state


# -- the pieces ----------------------------------------------------------------------------------


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def components(sae_model, enc, xb, device) -> dict:
    """Each candidate piece alone at the trained SAE's shape and indices."""
    from sae import kernels as K
    from sae.optim import ScheduleFreeSign, Signum

    cuda = device.type == "cuda"
    reps = 20 if cuda else 3

    def t(fn):
        return round(G.median_ms(fn, device, warmup=2, reps=reps), 4)

    out: dict = {}
    d, n = sae_model.W_enc.shape
    k = enc.top_idx.shape[1]
    W_enc = sae_model.W_enc.detach().clone()
    W_dec = sae_model.W_dec.detach().clone()
    b_enc = sae_model.b_enc.detach().clone()
    xs = (xb * sae_model.input_scale - sae_model.b_dec).detach()
    idx, acts = enc.top_idx, enc.top_acts.detach()
    g = torch.randn_like(acts) * (acts > 0)  # (N, k) a gradient at the selected latents
    counts = torch.bincount(idx.reshape(-1), minlength=n)
    out["entries_per_latent"] = {
        "mean": float(counts.float().mean()),
        "max": int(counts.max()),
        "dead_in_batch": int((counts == 0).sum()),
    }

    with G.Precision("high"):
        out["enc_matmul_tf32"] = t(lambda: torch.addmm(b_enc, xs, W_enc))
        pre = torch.addmm(b_enc, xs, W_enc)
        out["topk_torch_fp32"] = t(lambda: pre.topk(k, dim=1, sorted=False))
        for G_ in (8, 16, 32, 64):
            if n % G_ == 0 and n >= 8 * k * G_:
                out[f"topk_grouped{G_}_fp32"] = t(lambda G_=G_: K._grouped_topk(pre, k, G_))
                v1 = pre.topk(k, dim=1).values.sort(1).values
                v2 = K._grouped_topk(pre, k, G_)[0].sort(1).values
                out[f"topk_grouped{G_}_exact"] = bool(torch.equal(v1, v2))
        out["relu_after_topk_like_copy"] = t(lambda: pre.clone())  # one (N, n) pass
        if cuda:
            xs16, W16, b16 = xs.bfloat16(), W_enc.bfloat16(), b_enc.bfloat16()
            out["enc_matmul_bf16"] = t(lambda: torch.addmm(b16, xs16, W16))
            pre16 = torch.addmm(b16, xs16, W16)
            out["topk_torch_bf16"] = t(lambda: pre16.topk(k, dim=1, sorted=False))
            out["topk_grouped16_bf16"] = t(lambda: K._grouped_topk(pre16, k, 16))
            out["W_enc_to_bf16"] = t(lambda: W_enc.to(torch.bfloat16))
            del pre16, xs16, W16, b16

    # encoder backward
    out["latent_order"] = t(lambda: K._latent_order(idx, n))
    out["W_enc_transpose"] = t(lambda: K._transposed(W_enc))  # Triton on CUDA
    W_T = K._transposed(W_enc)
    out["dx_embedding_bag"] = t(
        lambda: torch.nn.functional.embedding_bag(idx, W_T, per_sample_weights=g, mode="sum")
    )
    dx_ref = torch.nn.functional.embedding_bag(idx, W_T, per_sample_weights=g, mode="sum")
    out["dW_enc_cusparse"] = t(lambda: K._by_latent(idx, g, n) @ xs)
    out["W_enc_transpose_torch"] = t(lambda: W_enc.t().contiguous())
    out["db_enc_index_add"] = t(
        lambda: g.new_zeros(n).index_add_(0, idx.reshape(-1), g.reshape(-1))
    )
    if cuda and K.triton is not None:
        out["dx_triton"] = t(lambda: K._gather_sum(g, idx, W_T, torch.float32))
        out["dx_triton_relerr"] = rel(K._gather_sum(g, idx, W_T, torch.float32), dx_ref)
        out["transpose_triton_exact"] = bool(torch.equal(W_T, W_enc.t()))

    # decoder
    grad_out = torch.randn_like(xs)
    if cuda and K.triton is not None:
        from sae.kernels import _block_k, _decode_dacts_kernel
        from sae.kernels.sparse import _by_token

        out["dec_fwd_triton"] = t(lambda: K._gather_sum(acts, idx, W_dec, torch.float32))
        N = idx.shape[0]

        def dacts():
            r = torch.empty_like(acts)
            grid = (N, K.triton.cdiv(k, _block_k(k)))
            _decode_dacts_kernel[grid](grad_out, idx, W_dec, r, k, d, _block_k(k), 64)
            return r

        out["dec_dacts_triton"] = t(dacts)
        sorted_idx, perm = idx.sort(dim=1)
        pattern = _by_token(sorted_idx, grad_out.new_ones(idx.numel()), n)
        out["dec_dacts_sampled_addmm"] = t(
            lambda: torch.sparse.sampled_addmm(pattern, grad_out, W_dec.t(), beta=0.0)
        )
    out["dec_dW_cusparse"] = t(lambda: K._by_latent(idx, acts, n) @ grad_out)

    # decoder constraints
    gW = torch.randn_like(W_dec) * 1e-3

    def project_legacy():
        gg = gW.clone()
        parallel = (gg * W_dec).sum(dim=1, keepdim=True)
        gg -= parallel * W_dec
        return gg

    def project_new():
        gg = gW.clone()
        K.project_out_rows_(gg, W_dec)
        return gg

    out["clone_W_dec"] = t(lambda: gW.clone())  # subtract from the two below
    out["project_legacy"] = t(project_legacy)
    out["project_new"] = t(project_new)
    out["project_relerr"] = rel(project_new(), project_legacy())
    Wn = W_dec * 1.5

    def renorm_legacy():
        w = Wn.clone()
        w /= w.norm(dim=1, keepdim=True).clamp_min(1e-8)
        return w

    def renorm_new():
        w = Wn.clone()
        K.normalize_rows_(w)
        return w

    out["renorm_legacy"] = t(renorm_legacy)
    out["renorm_new"] = t(renorm_new)
    out["renorm_relerr"] = rel(renorm_new(), renorm_legacy())

    # optimizers over SAE-sized parameters
    from schedulefree import ScheduleFreeWrapper

    def params():
        ps = [torch.nn.Parameter(t_.detach().clone()) for t_ in (W_enc, b_enc, W_dec, xs[0])]
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-4
        return ps

    ps = params()
    adam = torch.optim.Adam(ps, lr=1e-4, eps=6.25e-10, fused=True)
    out["adam_fused_step"] = t(adam.step)
    out["clip_grad_norm"] = t(lambda ps=ps: torch.nn.utils.clip_grad_norm_(ps, 1.0))
    results = []
    for cls in (ScheduleFreeWrapper, ScheduleFreeSign):
        ps = params()
        torch.manual_seed(0)
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-4
        opt = cls(Signum([{"params": ps}], lr=1e-3, momentum=0.0), momentum=0.95)
        opt.train()
        for _ in range(3):
            opt.step()
        results.append([p.detach().clone() for p in ps])
        name = "sf_wrapper_step" if cls is ScheduleFreeWrapper else "sf_fused_step"
        out[name] = t(opt.step)
        del opt, ps
    out["sf_fused_relerr_after_3"] = max(rel(a, b) for a, b in zip(*results, strict=True))
    del results
    return out


# -- the run ------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizers", default="adam,sf-signsgd")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=245 * 4096, help="the TrainConfig's run length")
    p.add_argument("--sae-from", default=None, help="import sae from this folder")
    p.add_argument("--tag", default=None, help="names the output files (default: new / from)")
    p.add_argument("--no-components", dest="components", action="store_false")
    p.add_argument("--out", default=None)
    p.add_argument("--tiny", action="store_true", help="tiny shape on the CPU, seconds")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    shape = G.SHAPES["tiny" if args.tiny else "gpu"]
    if args.tiny:
        args.batch, args.warmup, args.steps, args.tokens = 256, 3, 2, 64 * 256
    tag = args.tag or ("before" if args.sae_from else "after")
    folder = Path(args.out or os.environ.get("OUT") or ROOT / "bench" / "out")
    folder.mkdir(parents=True, exist_ok=True)
    import sae

    env = G.environment(device)
    env["sae_from"] = str(Path(sae.__file__).parent)
    print(f"[{tag}] {json.dumps(env)}", flush=True)

    steps_needed = args.warmup + 3 * args.steps + 2
    t0 = time.perf_counter()
    x, _, _ = G.make_data(shape, steps_needed * args.batch, device)
    G.sync(device)
    print(f"[{tag}] data: {x.shape[0]:,} tokens in {time.perf_counter() - t0:.1f} s", flush=True)

    summary = {"environment": env, "shape": shape, "batch": args.batch, "configs": {}}
    state = None
    with (
        tempfile.TemporaryDirectory() as tmp,
        open(folder / f"profile-{tag}.txt", "w") as log,
    ):
        cache = G.stub_cache(shape["d"], Path(tmp))
        for optimizer in args.optimizers.split(","):
            for dtype in args.dtypes.split(","):
                key = f"{optimizer} {dtype}"
                t0 = time.perf_counter()
                try:
                    res, st = profile_config(
                        args, shape, x, device, optimizer, dtype, cache, tag, log
                    )
                    state = state or st
                except Exception as exc:
                    import traceback

                    traceback.print_exc()
                    res = {"error": f"{type(exc).__name__}: {exc}"}
                res["config_s"] = time.perf_counter() - t0
                summary["configs"][key] = res
                if "error" not in res:
                    print(
                        f"[{tag}] {key}: {res['step_ms_synced']:.2f} ms synced, "
                        f"{res['step_ms_pipelined']:.2f} ms pipelined, "
                        f"{res['self_device_ms_per_step']:.2f} ms of device time/step, "
                        f"{sum(c for _, c in res['syncs'])} syncs, {res['dead']} dead "
                        f"({res['config_s']:.0f} s)",
                        flush=True,
                    )
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        del x
        if args.components and state is not None:
            t0 = time.perf_counter()
            try:
                summary["components"] = components(*state, device)
            except Exception as exc:
                import traceback

                traceback.print_exc()
                summary["components"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"[{tag}] components in {time.perf_counter() - t0:.0f} s", flush=True)
    (folder / f"profile-{tag}.json").write_text(json.dumps(summary, indent=1, default=str))

    # the compact summary, last
    print(f"\n==== profile [{tag}] d={shape['d']} n={shape['n']} k={shape['k']} ====")
    for key, res in summary["configs"].items():
        if "error" in res:
            print(f"{key}: failed: {res['error'][:200]}")
            continue
        print(
            f"{key}: step {res['step_ms_synced']:.2f} ms synced / {res['step_ms_pipelined']:.2f} "
            f"pipelined, {res['tokens_per_s']:,.0f} tok/s, device {res['self_device_ms_per_step']:.2f}"
            f" ms/step, dead {res['dead']}"
        )
        print("  syncs: " + ", ".join(f"{w} x{c}" for w, c in res["syncs"][:6]))
        for name, ms, count in res["top_self_device_ms"][:12]:
            print(f"  {ms:7.3f} ms  x{count:<3d} {name[:90]}")
    comp = summary.get("components")
    if comp:
        print("components (ms; relerr = new vs legacy):")
        items = [f"{k}={v}" for k, v in comp.items()]
        line = ""
        for item in items:
            if len(line) + len(item) > 110:
                print("  " + line)
                line = ""
            line += item + "  "
        if line:
            print("  " + line)


if __name__ == "__main__":
    main()
