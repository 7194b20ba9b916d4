"""The feature store's pass: `saewb analyze RUN` streams held-out windows once through the model
(early exit at the SAE's site: a transcoder's input site, whose activations its examples are of)
and the SAE, folds the sparse codes into a FeatureAccumulator,
checkpoints it every `checkpoint_tokens` (one atomic safetensors file, plus the append-only window
log), and writes the store to RUN/features/ at the end (`saewb analyze`: saewb_cli/measure.py)."""

from __future__ import annotations

import itertools
import json
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import Tensor
from tqdm import tqdm

from analysis.run import Run
from analysis.store.accumulate import FeatureAccumulator, StoreConfig
from analysis.store.encode import encode_codes
from analysis.store.windows import WindowLog
from analysis.store.write import write_store
from hooks.errors import UserError
from hooks.paths import atomic_write_bytes, sha256_file
from hooks.sites import SITE_KINDS, Capture, resolve_site, special_token_ids
from hooks.windows import batched, stack
from sae.formats import weights_file

STATE_DIR = "partial"  # RUN/features/partial: the resumable streaming state
STATE_FILE = "state.safetensors"
WINDOWS_FILE = "windows.bin"


def _save_state(partial: Path, acc: FeatureAccumulator, log: WindowLog, extra: dict) -> None:
    tensors, meta = acc.state_dict()
    meta |= dict(extra, windows_written=log.sync())
    data = safetensors.torch.save(tensors, metadata={"meta": json.dumps(meta)})
    atomic_write_bytes(partial / STATE_FILE, data)


def _load_state(partial: Path) -> tuple[dict[str, Tensor], dict]:
    path = partial / STATE_FILE
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["meta"])
        return safetensors.torch.load_file(path), meta
    except Exception as e:  # unreadable or foreign: one sentence, not a traceback
        raise UserError(f"{path} is not a readable analyze checkpoint ({e}); delete it.") from None


def analyze(
    run: Run,
    n_tokens: int,
    top_k: int = 20,
    batch_windows: int = 16,
    resume: bool = False,
    loaded=None,
    windows: Iterable | None = None,
    device: str = "cpu",
    checkpoint_tokens: int = 1_000_000,
    config: StoreConfig | None = None,
    encode_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Path:
    """Stream `n_tokens` held-out tokens through the model and the run's SAE, and write the store
    to RUN/features/. `loaded` reuses a LoadedModel; `windows` replaces the held-out windows
    (benchmarks); a killed pass continues with resume=True and gives the same store.
    encode_dtype=torch.bfloat16 searches the top-k in bf16 (see encode.encode_codes)."""
    if n_tokens <= 0:
        raise UserError(f"--tokens must be a positive number of tokens, got {n_tokens}.")
    if batch_windows < 1:
        raise UserError(f"--batch must be at least 1 window, got {batch_windows}.")
    cfg = config or StoreConfig(top_k=top_k)
    out = run.path / "features"
    partial = out / STATE_DIR
    weights = weights_file(run.path)
    if weights is None:
        raise UserError(
            f"{run.path} holds no SAE weights (sae.safetensors); run `saewb train` first."
        )
    sha = sha256_file(weights)
    dtype_name = str(encode_dtype or torch.float32).removeprefix("torch.")
    saved = None
    if resume:
        if not (partial / STATE_FILE).exists():
            raise UserError(f"{out} holds no partial analysis to resume; run without --resume.")
        tensors, meta = _load_state(partial)
        if meta.get("sae_sha256") != sha:
            raise UserError(
                f"The partial analysis in {partial} was made for another SAE (weights sha256 "
                f"{str(meta.get('sae_sha256'))[:12]}, now {sha[:12]}); delete it and run again."
            )
        if meta["config"] != asdict(cfg):
            raise UserError(
                f"The partial analysis in {partial} used other settings ({meta['config']}); "
                "resume with the same --top-k, or delete it and run again."
            )
        if meta.get("encode_dtype") != dtype_name:
            raise UserError(
                f"The partial analysis in {partial} encoded in {meta.get('encode_dtype')}, not "
                f"{dtype_name}; resume with the same --dtype."
            )
        saved = tensors, meta
    elif (partial / STATE_FILE).exists():
        raise UserError(
            f"{out} holds a partial analysis; pass --resume to continue it, or delete {partial} "
            "to start over."
        )
    elif partial.exists():
        shutil.rmtree(partial)  # a pass killed before its first checkpoint

    sae = run.sae.to(device).eval()
    loaded = loaded or run.load_model(device, progress=progress)
    model = loaded.model
    site = resolve_site(model, run.site).name
    d_model = int(getattr(model.config, "hidden_size", sae.cfg.d_in))
    if site.partition(".")[0] in SITE_KINDS and d_model != sae.cfg.d_in:  # a named site
        raise UserError(
            f"The SAE takes {sae.cfg.d_in}-dim inputs, but {loaded.name} has width {d_model} at "
            f"{run.site}; the run's model and SAE do not match."
        )
    special = special_token_ids(loaded.tokenizer)
    W_T = sae.W_enc.detach().T.contiguous() if encode_dtype not in (None, torch.float32) else None
    T = run.selection.context_size
    acc = FeatureAccumulator(sae.cfg.n_latents, T, cfg, device)
    log = WindowLog(partial / WINDOWS_FILE, T)
    if saved is not None:
        acc.load_state_dict(*saved)
        log.truncate(saved[1]["windows_written"])
    extra = dict(sae_sha256=sha, site=run.site, model=run.model, encode_dtype=dtype_name)

    stream = windows if windows is not None else run.heldout_windows(loaded.tokenizer)
    stream = itertools.islice(stream, acc.n_windows, None)  # skip what the checkpoint holds
    next_checkpoint = (acc.n_tokens // checkpoint_tokens + 1) * checkpoint_tokens
    started, tokens_at_start = time.perf_counter(), acc.n_tokens
    bar = tqdm(
        total=n_tokens,
        initial=min(acc.n_tokens, n_tokens),
        unit="tok",
        unit_scale=True,
        disable=not progress,
        desc="analyze",
        dynamic_ncols=True,
    )
    try:
        with bar, Capture(model, [site]) as capture, torch.no_grad():
            batches = batched(stream, batch_windows) if acc.n_tokens < n_tokens else []
            for batch in batches:
                tokens, doc, pos = stack(batch)  # (B, T)
                if tokens.shape[1] != T:
                    raise UserError(f"Windows of {tokens.shape[1]} tokens, but the run uses {T}.")
                x = capture(tokens.to(device))[site]  # (B, T, d)
                B = x.shape[0]
                keep = run.selection.capture.keep(tokens, special, [x]).to(device)  # (B, T)
                acts, idx = encode_codes(sae, x.reshape(B * T, -1).float(), encode_dtype, W_T)
                ids = torch.arange(acc.n_windows, acc.n_windows + B)
                before = acc.n_tokens
                acc.update(acts.view(B, T, -1), idx.view(B, T, -1), keep, ids)
                log.append(tokens, doc, pos, [w.index for w in batch])
                bar.update(min(acc.n_tokens, n_tokens) - min(before, n_tokens))
                if acc.n_tokens >= n_tokens:
                    break
                if acc.n_tokens >= next_checkpoint:
                    _save_state(partial, acc, log, extra)
                    next_checkpoint += checkpoint_tokens
        if acc.n_tokens == 0:
            raise UserError(
                f"The held-out text of {run.path} ({run.selection.dataset}) gave no windows of {T} tokens; "
                "use a run trained on more text."
            )
        seconds = time.perf_counter() - started
        if acc.n_tokens < n_tokens:
            print(
                f"[saewb] the held-out text ran out after {acc.n_tokens:,} of the {n_tokens:,} "
                "tokens asked for; the store covers those.",
                file=sys.stderr,
            )
        if acc.n_tokens > tokens_at_start:  # a kill while writing the store resumes from here
            _save_state(partial, acc, log, extra)
        manifest = dict(
            extra,
            sae_file=weights.name,
            selection=run.selection.to_dict(),
            stream_seconds=seconds,
            stream_tokens_per_s=(acc.n_tokens - tokens_at_start) / max(seconds, 1e-9),
        )
        write_store(out, acc, log, sae, model, loaded.tokenizer, manifest, progress=progress)
    finally:
        log.close()
    shutil.rmtree(partial, ignore_errors=True)
    return out
