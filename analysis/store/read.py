"""Reading the feature store (layout.py) for the dashboard: the per-latent table in memory, one
latent's examples per row-group read, the latent list's pages and searches."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from analysis.store.layout import FORMAT, INTERVAL, TOP, VERSION
from hooks.errors import UserError
from hooks.paths import sha256_file
from sae.formats import weights_file

SORTABLE = ("feature", "density", "n_active", "mean_act", "max_act", "label")


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
        weights = weights_file(path.parent)
        if expect_sha256 is None and weights is not None:
            expect_sha256 = sha256_file(weights)  # the store must match its run's SAE
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

    def labels(self, ids) -> list[str]:
        """The labels of some latents ('' where a latent has none)."""
        return [self._labels[int(i)] or "" for i in ids]

    def label_contains(self, text: str) -> np.ndarray:
        """(n_latents,) bool: latents whose label contains `text`, ignoring case."""
        q = text.strip().lower()
        if "lower_labels" not in self._flat:  # lower-cased once a store
            self._flat["lower_labels"] = [str(s or "").lower() for s in self._labels]
        lower = self._flat["lower_labels"]
        return np.fromiter((q in s for s in lower), dtype=bool, count=len(lower))

    def fires_on(self, text: str) -> np.ndarray:
        """(n_latents,) bool: latents whose top examples fire on a token matching `text` (see
        _matching_tokens)."""
        rows, values = self._flat_list("top_tokens")
        hit = np.zeros(self.n_latents, dtype=bool)
        hit[rows[np.isin(values, self._matching_tokens(text))]] = True
        return hit

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
