"""`saewb geometry`: run the chosen analyses of one or more runs into RUN/geometry/, skipping
those already done unless forced, and join their per-feature labels into one table for the map.

Each analysis is one function `name(run, inputs, *, seed, progress, **options) -> Result`; its
folder is written whole (results.write_result), so a kill loses only the analysis it was in."""

from __future__ import annotations

import inspect
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from analysis.geometry.codes import DEFAULT_TOKENS, Inputs
from analysis.geometry.results import Result, is_done, read_summary, read_table, write_result
from analysis.run import Run, open_run
from hooks.errors import UserError

NAMES = ("galaxy", "lobes", "multidim", "crystals", "map")  # map last: it shows the others' ids
JOINED = "features.parquet"  # RUN/geometry/features.parquet: every per-feature label, one row each


def analyses(names: tuple[str, ...] | list[str] = NAMES) -> dict[str, Callable[..., Result]]:
    """The analysis functions by name; only those asked for are imported."""
    found: dict[str, Callable[..., Result]] = {}
    if "galaxy" in names:
        from analysis.geometry.galaxy import galaxy

        found["galaxy"] = galaxy
    if "lobes" in names:
        from analysis.geometry.lobes import lobes

        found["lobes"] = lobes
    if "multidim" in names:
        from analysis.geometry.multidim import multidim

        found["multidim"] = multidim
    if "crystals" in names:
        from analysis.geometry.crystals import crystals

        found["crystals"] = crystals
    if "map" in names:
        from analysis.geometry.map import feature_map

        found["map"] = feature_map
    return found


def parse_only(text: str | None) -> list[str]:
    if not text:
        return list(NAMES)
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in NAMES]
    if unknown or not chosen:
        raise UserError(
            f"--only got unknown analysis '{','.join(unknown) or text}'; choose from "
            f"{','.join(NAMES)}."
        )
    return [name for name in NAMES if name in chosen]


def parse_options(pairs: list[str], functions: dict[str, Callable]) -> dict[str, dict]:
    """['lobes.n_clusters=32', ...] -> {'lobes': {'n_clusters': 32}}, typed by the defaults."""
    options: dict[str, dict] = {}
    for pair in pairs or []:
        match = re.fullmatch(r"(\w+)\.(\w+)=(.*)", pair)
        if not match:
            raise UserError(f"--option must look like lobes.n_clusters=32, got '{pair}'.")
        name, key, raw = match.groups()
        if name not in functions:
            raise UserError(
                f"--option names unknown analysis '{name}'; use one of {', '.join(functions)}."
            )
        params = inspect.signature(functions[name]).parameters
        usable = [p for p in params.values() if p.kind is p.KEYWORD_ONLY and p.name != "progress"]
        if key not in {p.name for p in usable}:
            raise UserError(
                f"{name} has no option '{key}'; its options are "
                f"{', '.join(p.name for p in usable)}."
            )
        options.setdefault(name, {})[key] = _typed(raw, params[key].default, pair)
    return options


def _typed(raw: str, default, pair: str):
    kind = type(default)
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        if kind in (int, float):
            return kind(raw)
    except ValueError:
        what = {bool: "true or false", int: "an integer", float: "a number"}[kind]
        raise UserError(f"--option {pair}: '{raw}' is not {what}.") from None
    return None if raw.lower() == "none" and default is None else raw


def layer_of(site: str) -> int | None:
    match = re.search(r"\.(\d+)$", site)
    return int(match.group(1)) if match else None


def run_geometry(
    paths: list[Path | str],
    only: str | None = None,
    force: bool = False,
    seed: int = 0,
    options: list[str] | None = None,
    n_tokens: int = DEFAULT_TOKENS,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, dict[str, dict]]:
    """Each run's analyses (their summaries, by run and name); several runs also get the slope by
    layer, in the first run's geometry/galaxy_by_layer/."""
    names = parse_only(only)
    named = {pair.partition(".")[0] for pair in options or [] if "." in pair}
    functions = analyses(names + sorted(named & set(NAMES)))
    chosen = parse_options(options or [], functions)
    runs = [open_run(p, device) for p in paths]
    done: dict[str, dict[str, dict]] = {}
    for run in runs:
        inputs = Inputs(run, n_tokens, device, progress)
        done[str(run.path)] = {}
        for name in names:
            folder = run.path / "geometry" / name
            if is_done(folder) and not force:
                print(
                    f"[saewb] {folder} is done; skipping it (--force redoes it).", file=sys.stderr
                )
            else:
                started = time.perf_counter()
                fn = functions[name]
                result = fn(run, inputs, seed=seed, progress=progress, **chosen.get(name, {}))
                result.summary.setdefault("seconds", time.perf_counter() - started)
                write_result(folder, result)
                print(
                    f"[saewb] {name}: {folder} ({time.perf_counter() - started:.1f} s)",
                    file=sys.stderr,
                )
            done[str(run.path)][name] = read_summary(folder)
        join_features(run)
    if len(runs) > 1 and "galaxy" in names:
        from analysis.geometry.galaxy import galaxy_by_layer

        rows = [(str(run.path), layer_of(run.site), done[str(run.path)]["galaxy"]) for run in runs]
        write_result(runs[0].path / "geometry" / "galaxy_by_layer", galaxy_by_layer(rows))
    return done


JOIN = {  # analysis folder, table, its per-feature columns (renamed in the joined table)
    "map": ("coords", {"x": "map_x", "y": "map_y"}),
    "lobes": ("labels", {"cooc_lobe": "cooc_lobe", "geometric_lobe": "geometric_lobe"}),
    "multidim": ("clusters", {"cluster": "multidim_cluster"}),
}


def join_features(run: Run) -> Path | None:
    """RUN/geometry/features.parquet: one row per latent with the map's coordinates and every
    cluster id found (-1 where a latent has none), so the map can be coloured by any of them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hooks.paths import atomic_write

    n = run.sae.cfg.n_latents
    columns: dict[str, np.ndarray] = {"feature": np.arange(n)}
    for name, (table, renames) in JOIN.items():
        folder = run.path / "geometry" / name
        if not (folder / f"{table}.parquet").exists():
            continue
        data = read_table(folder, table)
        for source, target in renames.items():
            if source not in data:
                continue
            fill = np.nan if data[source].dtype.kind == "f" else -1
            column = np.full(n, fill, dtype=data[source].dtype)
            column[data["feature"].astype(np.int64)] = data[source]
            columns[target] = column
    if len(columns) == 1:
        return None
    path = run.path / "geometry" / JOINED
    atomic_write(path, lambda f: pq.write_table(pa.table(columns), f))
    return path
