"""Writing the feature store (layout.py) from a finished pass: the per-latent table, the examples
sorted by latent, the vocabulary, the manifest last, and RUN/sparsity.safetensors."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.torch
import torch

from analysis.store.encode import decoder_neighbours, logit_effects, token_strings
from analysis.store.layout import FEATURES_PER_GROUP, FORMAT, INTERVAL, TOP, VERSION
from analysis.store.ops import EMPTY_KEY
from hooks.paths import atomic_write, atomic_write_bytes, atomic_write_json
from sae.formats import log10_density


def _lists(values: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """A list column from a (rows, width) array, keeping only `valid` entries of each row."""
    rows, width = values.shape
    if valid is None:
        # width * arange, not arange(..., step=width): a store with no logit effects has width 0
        offsets = (width * np.arange(rows + 1)).astype(np.int32)
        flat = values.reshape(-1)
    else:
        offsets = np.zeros(rows + 1, dtype=np.int32)
        np.cumsum(valid.sum(1), out=offsets[1:])
        flat = values[valid]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def _label(tokens: np.ndarray, vocab: list[str], most: int = 3) -> str:
    """The most common example tokens, e.g. 'Paris · London'."""
    words = [vocab[t].strip() for t in tokens.tolist()]
    common = [w for w, _ in Counter(w for w in words if w).most_common(most)]
    return " · ".join(common)


def write_tables(
    out: Path,
    acc,
    read_windows: Callable[[np.ndarray], dict[str, np.ndarray]],
    logits: dict | None,
    neighbours: tuple[torch.Tensor, torch.Tensor],
    vocab: list[str],
    manifest: dict,
    progress: bool = False,
) -> dict:
    """Write features.parquet, examples.parquet, vocab.parquet and (last) manifest.json from a
    FeatureAccumulator's state. `read_windows(numbers)` gives the windows' tokens, doc, pos
    (m, T) and stream index (m,). Returns the manifest."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # the old store is invalid from here on
    cfg, n, C, T = acc.cfg, acc.n, acc.C, acc.T
    K = cfg.top_k

    count = acc.count.cpu().numpy()
    max_act = acc.act_max.cpu().numpy()
    mean_act = (acc.act_sum.cpu() / acc.count.cpu().clamp(min=1)).float().numpy()
    density = count / max(acc.n_tokens, 1)
    hist_max = np.ldexp(1.0, acc.exp.cpu().numpy())  # 2^exp; 0 for EMPTY_EXP (dead latents)
    cooc_ids, cooc_jac, cooc_shared, cooc_exact = (x.numpy() for x in acc.cooc.partners())
    top_val, top_win = acc.top_val.cpu().numpy(), acc.top_win.cpu().numpy()
    top_pos, top_ctx = acc.top_pos.cpu().numpy(), acc.top_ctx.cpu()
    iv_key, iv_val = acc.iv_key.cpu().numpy(), acc.iv_val.cpu().numpy()
    iv_win, iv_pos, iv_ctx = acc.iv_win.cpu().numpy(), acc.iv_pos.cpu().numpy(), acc.iv_ctx.cpu()
    ex_group = np.full(n, -1, np.int32)
    ex_start = np.zeros(n, np.int32)
    n_top = (top_win >= 0).sum(1).astype(np.int16)
    n_interval = (iv_key != EMPTY_KEY).reshape(n, -1).sum(1).astype(np.int16)
    labels = [""] * n
    fire_tokens = np.full((n, K), -1, np.int64)  # each top example's token, for token search

    schema = pa.schema(
        [
            ("feature", pa.int32()),
            ("kind", pa.int8()),
            ("bin", pa.int8()),
            ("rank", pa.int16()),
            ("act", pa.float32()),
            ("window", pa.int32()),
            ("doc", pa.int32()),
            ("doc_pos", pa.int32()),
            ("index", pa.int16()),
            ("tokens", pa.list_(pa.int32())),
            ("acts", pa.list_(pa.float32())),
        ]
    )
    examples_path = out / "examples.parquet"
    groups = range(0, n, FEATURES_PER_GROUP)

    def write_examples(tmp: Path) -> None:
        written = 0
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for lo in tqdm(groups, desc="write store", disable=not progress, leave=False):
                hi = min(lo + FEATURES_PER_GROUP, n)
                # Top examples: the state keeps them unsorted; strongest first (then by window).
                by_act = np.lexsort((top_win[lo:hi], -top_val[lo:hi]), axis=-1)
                f_t, r_t = np.nonzero(np.take_along_axis(top_win[lo:hi], by_act, 1) >= 0)
                s_t = by_act[f_t, r_t]  # slot in the state
                # Interval samples: within a bin, strongest first.
                vals = np.where(iv_key[lo:hi] != EMPTY_KEY, iv_val[lo:hi], -np.inf)
                order = np.argsort(-vals, axis=2, kind="stable")
                f_i, b_i, r_i = np.nonzero(np.take_along_axis(vals, order, 2) > -np.inf)
                s_i = order[f_i, b_i, r_i]  # slot in the reservoir
                if len(f_t) + len(f_i) == 0:
                    continue
                feature = np.concatenate([f_t, f_i]) + lo
                kind = np.concatenate([np.full(len(f_t), TOP), np.full(len(f_i), INTERVAL)])
                bins = np.concatenate([np.full(len(f_t), -1), b_i])
                rank = np.concatenate([r_t, r_i])
                act = np.concatenate([top_val[f_t + lo, s_t], iv_val[f_i + lo, b_i, s_i]])
                win = np.concatenate([top_win[f_t + lo, s_t], iv_win[f_i + lo, b_i, s_i]])
                pos = np.concatenate([top_pos[f_t + lo, s_t], iv_pos[f_i + lo, b_i, s_i]])
                ctx = torch.cat([top_ctx[f_t + lo, s_t], iv_ctx[f_i + lo, b_i, s_i]]).float()
                # One latent's rows together: top examples by rank, then samples by bin and rank.
                order = np.lexsort((rank, bins, kind, feature))
                feature, kind, bins, rank = feature[order], kind[order], bins[order], rank[order]
                act, win, pos, ctx = act[order], win[order], pos[order], ctx[order].numpy()
                uniq, inverse = np.unique(win, return_inverse=True)
                w = read_windows(uniq)  # each window's tokens, doc ids and offsets, (m, T)
                start = np.clip(pos.astype(np.int64) - cfg.ctx_before, 0, T - C)
                cols = start[:, None] + np.arange(C)
                rows = inverse[:, None]
                tokens = w["tokens"][rows, cols]  # (R, C)
                where = inverse, pos.astype(np.int64)
                is_top = kind == TOP
                fire_tokens[feature[is_top], rank[is_top]] = w["tokens"][where][is_top]
                table = pa.table(
                    {
                        "feature": feature.astype(np.int32),
                        "kind": kind.astype(np.int8),
                        "bin": bins.astype(np.int8),
                        "rank": rank.astype(np.int16),
                        "act": act.astype(np.float32),
                        "window": w["index"][inverse].astype(np.int32),
                        "doc": w["doc"][where].astype(np.int32),
                        "doc_pos": w["pos"][where].astype(np.int32),
                        "index": (pos - start).astype(np.int16),
                        "tokens": _lists(tokens.astype(np.int32)),
                        "acts": _lists(ctx.astype(np.float32)),
                    },
                    schema=schema,
                )
                writer.write_table(table, row_group_size=len(table) + 1)
                first = np.searchsorted(feature, np.arange(lo, hi))
                present = n_top[lo:hi] + n_interval[lo:hi] > 0
                ex_group[lo:hi] = np.where(present, written, -1)
                ex_start[lo:hi] = first
                written += 1
                for i in range(lo, hi):
                    labels[i] = _label(fire_tokens[i, : n_top[i]], vocab)

    atomic_write(examples_path, write_examples)

    columns = {
        "feature": pa.array(np.arange(n, dtype=np.int32)),
        "n_active": pa.array(count.astype(np.int64)),
        "density": pa.array(density.astype(np.float64)),
        "mean_act": pa.array(mean_act.astype(np.float32)),
        "max_act": pa.array(max_act.astype(np.float32)),
        "hist_max": pa.array(hist_max.astype(np.float32)),
        "hist": _lists(acc.hist.cpu().numpy().astype(np.int64)),
        # blocks where the latent fires; with cooc_shared and manifest n_blocks this gives phi too
        "n_blocks_active": pa.array(acc.cooc.blk_count.cpu().numpy().astype(np.int64)),
        "label": pa.array(labels, pa.string()),
        "top_tokens": _lists(fire_tokens.astype(np.int32), fire_tokens >= 0),
        "ex_group": pa.array(ex_group),
        "ex_start": pa.array(ex_start),
        "n_top": pa.array(n_top),
        "n_interval": pa.array(n_interval),
    }
    for side in ("top", "bottom"):
        if logits is None:  # the site's width is not the residual stream's
            empty = np.zeros((n, 0))
            ids, vals = empty.astype(np.int32), empty.astype(np.float32)
        else:
            ids = logits[f"{side}_ids"].numpy().astype(np.int32)
            vals = logits[f"{side}_values"].numpy().astype(np.float32)
        columns[f"{side}_logit_ids"], columns[f"{side}_logit_values"] = _lists(ids), _lists(vals)
    nb_ids, nb_cos = neighbours
    columns["neighbor_ids"] = _lists(nb_ids.numpy().astype(np.int32))
    columns["neighbor_cos"] = _lists(nb_cos.numpy().astype(np.float32))
    ok = cooc_ids >= 0
    columns["cooc_ids"] = _lists(cooc_ids.astype(np.int32), ok)
    columns["cooc_jaccard"] = _lists(cooc_jac.astype(np.float32), ok)
    columns["cooc_shared"] = _lists(cooc_shared.astype(np.int64), ok)
    columns["cooc_exact"] = _lists(cooc_exact.astype(bool), ok)
    atomic_write(out / "features.parquet", lambda tmp: pq.write_table(pa.table(columns), tmp))
    vocab_table = pa.table({"id": np.arange(len(vocab), dtype=np.int32), "token": vocab})
    atomic_write(out / "vocab.parquet", lambda tmp: pq.write_table(vocab_table, tmp))

    manifest = dict(
        format=FORMAT,
        version=VERSION,
        **manifest,
        n_latents=n,
        n_tokens=acc.n_tokens,
        n_windows=acc.n_windows,
        n_blocks=acc.cooc.n_blocks,
        context=T,
        context_tokens=C,
        config=dict(acc.cfg.__dict__),
        dead_fraction=float((count == 0).mean()),
        cooc_partners=int(ok.sum()),
        cooc_exact_partners=int(cooc_exact[ok].sum()),
        features_per_group=FEATURES_PER_GROUP,
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def write_store(out: Path, acc, log, sae, model, tokenizer, manifest: dict, progress=True) -> dict:
    """The whole store for a finished pass, plus RUN/sparsity.safetensors next to the SAE.

    Logit effects come from W_dec (n, d_out): a transcoder's rows are in its target's units, so
    they exist where d_out is the model's width (mlp_out, resid_post)."""
    started = time.perf_counter()
    logits = logit_effects(sae.W_dec, model)
    neighbours = decoder_neighbours(sae.W_dec)
    head = model.get_output_embeddings()
    vocab = token_strings(tokenizer, max(len(tokenizer), head.weight.shape[0] if head else 0))
    manifest = dict(
        manifest,
        architecture=sae.cfg.architecture,
        target=sae.cfg.target or None,  # a transcoder's output site; the examples are `site`'s
        d_in=sae.cfg.d_in,
        d_out=sae.cfg.d_out,
        k=sae.cfg.k,  # active latents per token; the target L0 for jumprelu and relu
        code_width=sae.cfg.inference_width,  # latent slots per token in the code, zero-padded
        logit_effects=(
            None
            if logits is None
            else "W_dec[f] (centred for LayerNorm) * final-norm gain @ W_U^T, as sae_vis on "
            "TransformerLens with the norm weight folded into W_U"
        ),
        cooccurrence=f"Jaccard over blocks of {acc.cfg.cooc_block} tokens among "
        f"{acc.cfg.cooc_slots} candidates per latent; cooc_exact marks the partners counted over "
        "every block, the others' shared blocks are extrapolated inside exact bounds",
    )
    manifest = write_tables(out, acc, log.read, logits, neighbours, vocab, manifest, progress)
    density = acc.count.cpu().double() / max(acc.n_tokens, 1)
    sparsity = log10_density(density).float()
    atomic_write_bytes(
        Path(out).parent / "sparsity.safetensors",
        safetensors.torch.save({"sparsity": sparsity}, metadata={"format": "pt"}),
    )
    manifest["write_seconds"] = time.perf_counter() - started
    atomic_write_json(Path(out) / "manifest.json", manifest)
    return manifest
