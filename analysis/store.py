"""The feature store on disk, and its reader for the dashboard.

    RUN/features/
      manifest.json     format, version, sha256 of the SAE weights it was built for, token and
                        window counts, settings (written last: no manifest, no store)
      features.parquet  one row per latent: density, mean/max activation, histogram, logit
                        effects, decoder neighbours, co-occurring latents (Jaccard and shared
                        blocks), its active-block count, label, and where its examples are
                        (row group, offset, counts)
      examples.parquet  one row per example, sorted by (feature, kind, bin, rank); each row group
                        holds FEATURES_PER_GROUP latents, so one latent's examples are one small
                        row-group read
      vocab.parquet     display string of every token id
    RUN/sparsity.safetensors   SAELens-style log10(density + 1e-10), key "sparsity"

Example rows: kind 0 = top activating (rank 0 = strongest), kind 1 = interval sample (bin b of
the equal-width bins on [0, hist_max]); `tokens`/`acts` are the context window (ids and this
latent's activation per token) and `index` is the example token's place in it.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.torch
import torch

from analysis.features import (
    EMPTY_KEY,
    decoder_neighbours,
    logit_effects,
    token_strings,
    weights_sha256,
)
from hooks.errors import UserError
from hooks.paths import atomic_write_bytes, atomic_write_json

FORMAT, VERSION = "saewb-features", 1
FEATURES_PER_GROUP = 32  # latents per examples.parquet row group (~2k rows at K=20 + 50)
TOP, INTERVAL = 0, 1
SORTABLE = ("feature", "density", "n_active", "mean_act", "max_act", "label")


# -- writing -----------------------------------------------------------------------------------


def _lists(values: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """A list column from a (rows, width) array, keeping only `valid` entries of each row."""
    rows, width = values.shape
    if valid is None:
        offsets = np.arange(0, rows * width + 1, width, dtype=np.int32)
        flat = values.reshape(-1)
    else:
        offsets = np.zeros(rows + 1, dtype=np.int32)
        np.cumsum(valid.sum(1), out=offsets[1:])
        flat = values[valid]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def _replace_with(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temp file in the same folder, then rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    cooc_ids, cooc_jac, cooc_shared, cooc_exact = (x.numpy() for x in acc.cooccurrence())
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

    def write_examples(tmp: str) -> None:
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

    _replace_with(examples_path, write_examples)

    columns = {
        "feature": pa.array(np.arange(n, dtype=np.int32)),
        "n_active": pa.array(count.astype(np.int64)),
        "density": pa.array(density.astype(np.float64)),
        "mean_act": pa.array(mean_act.astype(np.float32)),
        "max_act": pa.array(max_act.astype(np.float32)),
        "hist_max": pa.array(hist_max.astype(np.float32)),
        "hist": _lists(acc.hist.cpu().numpy().astype(np.int64)),
        # blocks where the latent fires; with cooc_shared and manifest n_blocks this gives phi too
        "n_blocks_active": pa.array(acc.blk_count.cpu().numpy().astype(np.int64)),
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
    _replace_with(out / "features.parquet", lambda tmp: pq.write_table(pa.table(columns), tmp))
    vocab_table = pa.table({"id": np.arange(len(vocab), dtype=np.int32), "token": vocab})
    _replace_with(out / "vocab.parquet", lambda tmp: pq.write_table(vocab_table, tmp))

    manifest = dict(
        format=FORMAT,
        version=VERSION,
        **manifest,
        n_latents=n,
        n_tokens=acc.n_tokens,
        n_windows=acc.n_windows,
        n_blocks=acc.n_blocks,
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
    """The whole store for a finished pass, plus RUN/sparsity.safetensors next to the SAE."""
    started = time.perf_counter()
    logits = logit_effects(sae.W_dec, model)
    neighbours = decoder_neighbours(sae.W_dec)
    head = model.get_output_embeddings()
    vocab = token_strings(tokenizer, max(len(tokenizer), head.weight.shape[0] if head else 0))
    manifest = dict(
        manifest,
        d_in=sae.cfg.d_in,
        k=sae.cfg.k,
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
    sparsity = torch.log10(density + 1e-10).float()
    atomic_write_bytes(
        Path(out).parent / "sparsity.safetensors",
        safetensors.torch.save({"sparsity": sparsity}, metadata={"format": "pt"}),
    )
    manifest["write_seconds"] = time.perf_counter() - started
    atomic_write_json(Path(out) / "manifest.json", manifest)
    return manifest


# -- reading -----------------------------------------------------------------------------------


class FeatureStore:
    """Read side for the dashboard. Opening reads the per-latent table (one row per latent) into
    memory; a feature's examples are one row-group read.

        store = FeatureStore("checkpoints/run/features")
        store.n_latents, store.feature(4711), store.table(0, 50, "-density", {"dead": False})
    """

    def __init__(self, path: Path | str, expect_sha256: str | None = None):
        self.path = path = Path(path)
        if not (path / "manifest.json").is_file():
            raise UserError(
                f"{path} holds no feature store (no manifest.json); run `saewb analyze` on the "
                "run first."
            )
        self.manifest = manifest = json.loads((path / "manifest.json").read_text())
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise UserError(
                f"{path} holds a {manifest.get('format')!r} store version "
                f"{manifest.get('version')!r}; this workbench reads {FORMAT!r} version {VERSION}."
            )
        if expect_sha256 is None and (path.parent / manifest.get("sae_file", "-")).is_file():
            expect_sha256 = weights_sha256(path.parent)  # the store must match its run's SAE
        if expect_sha256 is not None and manifest["sae_sha256"] != expect_sha256:
            raise UserError(
                f"The feature store in {path} was built for another SAE (weights sha256 "
                f"{manifest['sae_sha256'][:12]}, this one {expect_sha256[:12]}); rerun "
                "`saewb analyze` to rebuild it."
            )
        self.features = pq.read_table(path / "features.parquet")
        self._labels = self.features.column("label").to_pylist()
        self._scalars = {
            name: self.features.column(name).to_numpy()
            for name in ("feature", "density", "n_active", "mean_act", "max_act")
        }
        self.vocab = pq.read_table(path / "vocab.parquet").column("token").to_pylist()
        self._examples = pq.ParquetFile(path / "examples.parquet")
        self._lock = threading.Lock()  # Dash serves requests from several threads
        self._flat: dict[str, tuple[np.ndarray, ...]] = {}
        self._lists: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def n_latents(self) -> int:
        return int(self.manifest["n_latents"])

    def _check(self, feature) -> int:
        if isinstance(feature, bool) or not isinstance(feature, int | np.integer):
            raise UserError(f"Feature id must be a whole number, got {feature!r}.")
        if not 0 <= feature < self.n_latents:
            raise UserError(
                f"Feature {feature} is out of range; this SAE has features 0..{self.n_latents - 1}."
            )
        return int(feature)

    def _example(self, row: dict) -> dict:
        return dict(
            act=row["act"],
            tokens=[self.vocab[t] for t in row["tokens"]],
            token_ids=row["tokens"],
            acts=row["acts"],
            index=row["index"],
            window=row["window"],
            doc=row["doc"],
            doc_pos=row["doc_pos"],
        )

    def examples(self, feature: int) -> list[dict]:
        """The raw example rows of one latent (top first, then intervals by bin)."""
        i = self._check(feature)
        info = self.features.slice(i, 1).select(["ex_group", "ex_start", "n_top", "n_interval"])
        group, start, n_top, n_iv = (info.column(c)[0].as_py() for c in info.column_names)
        if group < 0:
            return []
        with self._lock:
            table = self._examples.read_row_group(group, use_threads=False)
        return table.slice(start, n_top + n_iv).to_pylist()

    def feature(self, feature: int) -> dict:
        """Everything a feature page shows, as plain Python values."""
        i = self._check(feature)
        row = self.features.slice(i, 1).to_pylist()[0]
        rows = self.examples(i)
        n_tokens, NB = self.manifest["n_tokens"], self.manifest["config"]["n_intervals"]
        hist, top = row["hist"], row["hist_max"]
        H = len(hist)
        # Bins above the latent's max are empty by construction (the range is the next power of
        # two): keep the bins up to the one holding the max.
        used = int(np.ceil(row["max_act"] / top * H)) if top > 0 else 0
        intervals = []
        per = H // NB
        for b in range(NB):
            lo, hi = b * top / NB, (b + 1) * top / NB
            if top == 0 or lo >= row["max_act"]:
                break
            count = int(sum(hist[b * per : (b + 1) * per]))
            intervals.append(
                dict(
                    lo=lo,
                    hi=hi,
                    count=count,
                    frac_active=count / max(row["n_active"], 1),
                    frac_all=count / max(n_tokens, 1),
                    examples=[
                        self._example(r) for r in rows if r["kind"] == INTERVAL and r["bin"] == b
                    ],
                )
            )

        def tokens(side: str) -> list[dict]:
            ids, vals = row[f"{side}_logit_ids"], row[f"{side}_logit_values"]
            return [dict(id=t, token=self.vocab[t], value=v) for t, v in zip(ids, vals)]

        return dict(
            feature=i,
            label=row["label"],
            density=row["density"],
            n_active=row["n_active"],
            n_blocks_active=row["n_blocks_active"],
            mean_act=row["mean_act"],
            max_act=row["max_act"],
            histogram=dict(
                edges=[top * j / H for j in range(used + 1)], counts=hist[:used], n_bins=H
            ),
            logits=dict(top=tokens("top"), bottom=tokens("bottom")),
            neighbors=[
                dict(feature=j, cos=c, label=self._labels[j])
                for j, c in zip(row["neighbor_ids"], row["neighbor_cos"])
            ],
            cooccurring=[
                dict(feature=j, jaccard=x, shared_blocks=s, exact=e, label=self._labels[j])
                for j, x, s, e in zip(
                    row["cooc_ids"], row["cooc_jaccard"], row["cooc_shared"], row["cooc_exact"]
                )
            ],
            top_examples=[self._example(r) for r in rows if r["kind"] == TOP],
            intervals=intervals,
        )

    def table(
        self,
        offset: int = 0,
        limit: int = 50,
        sort: str | None = "feature",
        filters: dict | None = None,
    ) -> dict:
        """One page of the latent list: {"total": matching latents, "rows": [...]}.

        sort: a column of SORTABLE, '-' in front for descending (e.g. '-density'); None keeps the
        order of the "ids" filter (e.g. search results, best first), else feature order.
        filters: {"feature" | "density" | "max_act" | "mean_act" | "n_active": (lo, hi),
                  "dead": bool, "label": substring, "ids": latent ids}; None bounds are open."""
        cols = self._scalars
        keep = np.ones(self.n_latents, dtype=bool)
        ids = None
        for key, value in (filters or {}).items():
            if key in ("feature", "density", "max_act", "mean_act", "n_active"):
                lo, hi = value
                if lo is not None:
                    keep &= cols[key] >= lo
                if hi is not None:
                    keep &= cols[key] <= hi
            elif key == "dead":
                keep &= (cols["n_active"] == 0) == bool(value)
            elif key == "label":
                text = str(value).lower()
                keep &= np.array([text in label.lower() for label in self._labels])
            elif key == "ids":
                ids = np.asarray(list(value), dtype=np.int64)
                ids = ids[(ids >= 0) & (ids < self.n_latents)]
            else:
                raise UserError(
                    f"Unknown filter '{key}'; use feature, density, max_act, mean_act, n_active, "
                    "dead, label or ids."
                )
        ids = np.nonzero(keep)[0] if ids is None else ids[keep[ids]]
        if sort is not None:
            name = sort.lstrip("-")
            if name not in SORTABLE:
                raise UserError(f"Cannot sort by '{sort}'; use one of {', '.join(SORTABLE)}.")
            key = np.array(self._labels, dtype=object)[ids] if name == "label" else cols[name][ids]
            order = np.argsort(key, kind="stable")
            ids = ids[order[::-1] if sort.startswith("-") else order]
        page = ids[offset : offset + limit]
        return dict(total=len(ids), rows=[self._summary(int(i)) for i in page])

    def _summary(self, i: int, **extra) -> dict:
        """One latent's row of the feature list, with its firing tokens and promoted tokens."""
        cols = self._scalars
        fires = dict.fromkeys(self.vocab[t] for t in self._row_values("top_tokens", i))
        promotes = [self.vocab[t] for t in self._row_values("top_logit_ids", i)[:3]]
        return dict(
            feature=i,
            label=self._labels[i],
            density=float(cols["density"][i]),
            n_active=int(cols["n_active"][i]),
            mean_act=float(cols["mean_act"][i]),
            max_act=float(cols["max_act"][i]),
            top_tokens=list(fires)[:5],
            top_logits=promotes,
            **extra,
        )

    def _list_column(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, values) of a list column of the per-latent table, cached."""
        if column not in self._lists:
            col = self.features.column(column).combine_chunks()
            self._lists[column] = col.offsets.to_numpy(), col.flatten().to_numpy()
        return self._lists[column]

    def _row_values(self, column: str, i: int) -> np.ndarray:
        offsets, values = self._list_column(column)
        return values[offsets[i] : offsets[i + 1]]

    def _matching_tokens(self, text: str) -> np.ndarray:
        """Token ids whose string is `text` (ignoring case and spaces), else that contain it."""
        q = text.strip().lower()
        if not q:
            raise UserError("The search text is empty; type a word or a token.")
        strings = [s.strip().lower() for s in self.vocab]
        exact = [i for i, s in enumerate(strings) if s == q]
        return np.array(exact or [i for i, s in enumerate(strings) if q in s], dtype=np.int64)

    def _flat_list(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """(row of each element, element) of a list column, cached."""
        if column not in self._flat:
            offsets, values = self._list_column(column)
            self._flat[column] = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)), values
        return self._flat[column]

    def search_tokens(self, text: str, limit: int = 50) -> list[dict]:
        """Latents whose top examples fire on tokens matching `text`, most such examples first."""
        tokens = self._matching_tokens(text)
        rows, values = self._flat_list("top_tokens")
        hit = np.isin(values, tokens)
        hits = np.bincount(rows[hit], minlength=self.n_latents)
        ids = np.nonzero(hits)[0]
        order = np.lexsort((-self._scalars["max_act"][ids], -hits[ids]))
        return [self._summary(int(i), hits=int(hits[i])) for i in ids[order][:limit]]

    def search_logits(self, text: str, limit: int = 50) -> list[dict]:
        """Latents that promote tokens matching `text` most (among their top-10 logit effects)."""
        tokens = self._matching_tokens(text)
        rows, ids = self._flat_list("top_logit_ids")
        _, values = self._flat_list("top_logit_values")
        hit = np.isin(ids, tokens)
        best = np.full(self.n_latents, -np.inf)
        np.maximum.at(best, rows[hit], values[hit])
        found = np.nonzero(best > -np.inf)[0]
        order = found[np.argsort(-best[found], kind="stable")][:limit]
        token_of = {
            int(r): int(t) for r, t, v in zip(rows[hit], ids[hit], values[hit]) if v == best[r]
        }
        return [
            self._summary(int(i), token=self.vocab[token_of[int(i)]], value=float(best[i]))
            for i in order
        ]
