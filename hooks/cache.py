"""The on-disk activation cache: harvest once, train many SAEs from it.

Layout of a cache directory:
  manifest.json              model, sites, d_model, dtype, tokenizer, the token selection (text
                             source, windows, kept tokens, model dtype), token count, the rows and
                             window cursor of every finished shard, package version
  shard_00000.safetensors    one tensor per site (rows, d_model), plus token, doc, pos, window (rows,)

Shards are written to a temp file and renamed, and the manifest is rewritten (atomically) only after
a shard is in place. A harvest killed at any moment therefore resumes from the last complete shard:
it regenerates the deterministic window stream, skips the windows already covered, and stops at
exactly the requested number of rows.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from hooks.activations import META, Rows, live_rows
from hooks.buffer import MixingBuffer
from hooks.errors import UserError
from hooks.models import LoadedModel, parse_dtype
from hooks.paths import atomic_write, atomic_write_json
from hooks.selection import Selection
from hooks.sites import canonical_site
from hooks.windows import Window

FORMAT = "saewb-activation-cache"
MANIFEST = "manifest.json"
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Settings that must match for a resumed harvest to continue the same stream.
_RESUME_KEYS = ("model", "sites", "d_model", "dtype", "selection")


def _package_version() -> str:
    try:
        return version("sae-workbench")
    except PackageNotFoundError:
        return "unknown"


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def harvest(
    loaded: LoadedModel,
    sites: list[str],
    windows: Iterator[Window],
    n_tokens: int,
    out: Path,
    selection: Selection,
    batch_windows: int = 8,
    dtype: torch.dtype = torch.float32,
    shard_tokens: int = 16384,
    progress: bool = True,
) -> dict:
    """Capture `n_tokens` rows at `sites` into `out`, resuming a partial cache there.

    `windows` must be the same deterministic stream on every call, made by `selection` (usually
    `selection.windows(tokenizer)`); the selection is stored in, and checked against, the
    manifest, so a resume with other settings is refused.
    """
    if n_tokens <= 0:
        raise UserError(f"--tokens must be a positive number of tokens, got {n_tokens}.")
    model_dtype = next(loaded.model.parameters()).dtype
    if model_dtype != parse_dtype(selection.model_dtype):
        raise UserError(
            f"The model runs in {model_dtype}, but the selection says model_dtype="
            f"{selection.model_dtype!r}; load the model with that dtype."
        )
    out = Path(out)
    sites = [canonical_site(s) for s in sites]  # a TransformerLens name is stored as ours
    wanted = {
        "format": FORMAT,
        "model": loaded.name,
        "sites": list(sites),
        "d_model": loaded.d_model,
        "dtype": DTYPE_NAMES[dtype],
        "tokenizer": getattr(loaded.tokenizer, "name_or_path", type(loaded.tokenizer).__name__),
        "vocab_size": len(loaded.tokenizer),
        "selection": selection.to_dict(),
        "package_version": _package_version(),
    }
    # Look at the first window before creating anything, so an empty source leaves no folder.
    windows = iter(windows)
    first = next(windows, None)
    if first is None:
        raise UserError(
            f"The text source '{selection.dataset}' gave no full window of "
            f"{selection.context_size} tokens; use more text or a smaller --context."
        )
    stream = itertools.chain([first], windows)
    options = selection.capture

    def rows_after(skip: int) -> Iterator[tuple[int, Rows]]:
        source = live_rows(
            loaded, sites, itertools.islice(stream, skip, None), batch_windows, options, dtype
        )
        for consumed, rows in source:
            yield skip + consumed, rows

    return write_cache(
        out, wanted, rows_after, n_tokens, shard_tokens, progress, desc=f"harvest {','.join(sites)}"
    )


def write_cache(
    out: Path,
    wanted: dict,
    rows_after,
    n_tokens: int,
    shard_tokens: int = 16384,
    progress: bool = True,
    desc: str = "cache",
) -> dict:
    """Fill (or resume filling) a cache with exactly `n_tokens` rows.

    `rows_after(cursor)` must yield (cursor, Rows) for the deterministic stream that starts after
    `cursor` units (windows, for a live model); `wanted` is the manifest's description.
    """
    manifest = _start_or_resume(Path(out), {"format": FORMAT, **wanted}, n_tokens)
    done = manifest["tokens"]
    if done >= n_tokens:
        return manifest
    skip = manifest["shards"][-1]["windows_end"] if manifest["shards"] else 0
    parts: list[Rows] = []
    pending = cursor = 0
    with tqdm(
        total=n_tokens,
        initial=done,
        unit="tok",
        unit_scale=True,
        disable=not progress,
        desc=desc,
        dynamic_ncols=True,
    ) as bar:
        for cursor, rows in rows_after(skip):
            rows = rows.select(slice(0, n_tokens - done - pending))
            parts.append(rows)
            pending += len(rows)
            bar.update(len(rows))
            if pending >= shard_tokens or done + pending >= n_tokens:
                _write_shard(out, manifest, Rows.cat(parts), cursor)
                done += pending
                parts, pending = [], 0
                if done >= n_tokens:
                    break
    if parts:
        _write_shard(out, manifest, Rows.cat(parts), cursor)
        done += pending
    manifest["complete"] = True
    if done < n_tokens:
        manifest["note"] = f"the data ran out after {done} of the {n_tokens} tokens asked for"
        print(f"[saewb] warning: {manifest['note']}; the cache holds {done} tokens.")
    atomic_write_json(Path(out) / MANIFEST, manifest)
    return manifest


def _start_or_resume(out: Path, wanted: dict, n_tokens: int) -> dict:
    path = out / MANIFEST
    if path.exists():
        manifest = read_manifest(out)
        if manifest.get("selection") and wanted.get("selection"):  # name the setting that differs
            Selection.from_dict(manifest["selection"], f"The cache {out}").require_same(
                Selection.from_dict(wanted["selection"], "the harvest"),
                what=f"The cache in {out}",
                fix="choose another --cache directory or the same settings.",
            )
        for key in _RESUME_KEYS:
            if manifest.get(key) != wanted.get(key):
                raise UserError(
                    f"{out} already holds a cache with {key}={manifest.get(key)!r}, not "
                    f"{wanted.get(key)!r}; choose another --cache directory or the same settings."
                )
        # Files from a write that was cut short never made it into the manifest.
        for stray in out.glob(".shard_*.tmp"):  # atomic_write's temp files
            stray.unlink()
        manifest["tokens_target"] = n_tokens
        manifest["complete"] = False
        return manifest
    if out.exists() and any(out.iterdir()):
        raise UserError(
            f"{out} exists, is not empty and holds no {MANIFEST}; pick an empty folder."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"Cannot create the cache directory {out}: {exc.strerror}.") from None
    manifest = {**wanted, "tokens_target": n_tokens, "tokens": 0, "complete": False, "shards": []}
    atomic_write_json(path, manifest)
    return manifest


def _write_shard(out: Path, manifest: dict, rows: Rows, windows_end: int) -> None:
    name = _shard_name(len(manifest["shards"]))
    tensors = {k: v.contiguous() for k, v in rows.to_tensors().items()}
    try:
        atomic_write(
            out / name, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT})
        )
    except OSError as exc:
        raise UserError(
            f"Writing {name} in {out} failed ({exc.strerror or exc}); the {len(manifest['shards'])} "
            "finished shards are intact and the harvest resumes from them."
        ) from None
    manifest["shards"].append({"file": name, "rows": len(rows), "windows_end": windows_end})
    manifest["tokens"] += len(rows)
    atomic_write_json(out / MANIFEST, manifest)


def read_manifest(path: Path) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if not file.exists():
        raise UserError(f"{path} is not an activation cache: it has no {MANIFEST}.")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{file} is corrupt: it is not valid JSON.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{file} is not a saewb activation-cache manifest.")
    return manifest


class ActivationCache:
    """Read side of a cache: shards stream in a seeded order; the whole cache is never loaded."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest["shards"]:
            raise UserError(f"The cache {self.path} holds no finished shard yet; run harvest.")

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    @property
    def tokens(self) -> int:
        return int(self.manifest["tokens"])

    @property
    def selection(self) -> Selection | None:
        """The token selection the cache was harvested with (None for planted, synthetic data)."""
        if "planted" in self.manifest:
            return None
        return Selection.from_dict(self.manifest.get("selection"), where=f"The cache {self.path}")

    def check(
        self, model: str | None = None, site: str | None = None, d_model: int | None = None
    ) -> None:
        """Refuse a cache made for another model, site or width, in one sentence."""
        m = self.manifest
        if model is not None and m["model"] != model:
            raise UserError(
                f"The cache {self.path} holds activations of model '{m['model']}', not '{model}'."
            )
        if site is not None and canonical_site(site) not in map(canonical_site, m["sites"]):
            raise UserError(f"The cache {self.path} holds sites {m['sites']}, not '{site}'.")
        if d_model is not None and m["d_model"] != d_model:
            raise UserError(f"The cache {self.path} holds width {m['d_model']}, not {d_model}.")

    def read_shard(self, index: int, sites: list[str] | None = None) -> Rows:
        sites = sites or self.sites
        file = self.path / self.manifest["shards"][index]["file"]
        try:
            with safe_open(file, framework="pt") as f:  # memory-mapped; reads only these keys
                tensors = {key: f.get_tensor(key) for key in [*sites, *META]}
        except Exception as exc:
            raise UserError(f"Shard {file} is missing or corrupt ({exc}).") from None
        return Rows.from_tensors(tensors, sites)

    def iter_shards(
        self, seed: int = 0, start: int = 0, epochs: int | None = 1, sites: list[str] | None = None
    ) -> Iterator[tuple[int, Rows]]:
        """Yield (cursor, rows) for shards in a seeded order, reshuffled every epoch."""
        n = len(self.manifest["shards"])
        for cursor in itertools.count(start):
            epoch, i = divmod(cursor, n)
            if epochs is not None and epoch >= epochs:
                return
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
            yield cursor + 1, self.read_shard(int(order[i]), sites)

    def batches(
        self,
        batch_size: int,
        seed: int = 0,
        buffer_tokens: int = 1 << 16,
        epochs: int | None = 1,
        sites: list[str] | None = None,
    ) -> MixingBuffer:
        buffer_tokens = max(buffer_tokens, 2 * batch_size)
        shards = self.iter_shards(seed, epochs=epochs, sites=sites)
        return MixingBuffer(shards, buffer_tokens, batch_size, seed)

    def describe(self) -> str:
        m = self.manifest
        sizes = [s["rows"] for s in m["shards"]]
        disk = sum((self.path / s["file"]).stat().st_size for s in m["shards"])
        state = "complete" if m.get("complete") else "partial (resume with the same harvest)"
        lines = [
            f"cache       {self.path}",
            f"model       {m['model']}  (d_model {m['d_model']}, tokenizer {m['tokenizer']})",
            f"sites       {', '.join(m['sites'])}",
            f"dtype       {m['dtype']}",
            f"tokens      {m['tokens']:,} of {m['tokens_target']:,} asked for, {state}",
            f"shards      {len(sizes)} (rows {min(sizes):,}..{max(sizes):,}), {disk / 2**20:.1f} MiB",
            f"selection   {m.get('selection')}",
            f"written by  sae-workbench {m.get('package_version')}",
        ]
        return "\n".join(lines)
