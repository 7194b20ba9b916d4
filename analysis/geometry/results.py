"""One analysis's outputs on disk: RUN/geometry/<name>/ with summary.json (the numbers), one
parquet file per table (the arrays the dashboard draws from) and one plotly JSON per figure.

A folder appears whole or not at all: it is written beside its place and renamed into it, so a
kill loses at most the analysis that was being written, and `summary.json` marks it done."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SUMMARY = "summary.json"


@dataclass
class Result:
    summary: dict  # JSON-able numbers and settings
    tables: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # name -> columns
    figures: dict = field(default_factory=dict)  # name -> plotly Figure


def _plain(value):
    """JSON without NaN/inf (written as null) and with numpy scalars and arrays unwrapped."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def is_done(folder: Path) -> bool:
    return (folder / SUMMARY).exists()


def write_result(folder: Path, result: Result) -> None:
    """Write result into folder, replacing what was there only once the new one is complete."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    for name, columns in result.tables.items():
        pq.write_table(
            pa.table({k: np.asarray(v) for k, v in columns.items()}), partial / f"{name}.parquet"
        )
    for name, figure in result.figures.items():
        (partial / f"{name}.json").write_text(figure.to_json())
    (partial / SUMMARY).write_text(json.dumps(_plain(result.summary), indent=1))
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(partial, folder)
    shutil.rmtree(old, ignore_errors=True)


def read_summary(folder: Path) -> dict:
    return json.loads((Path(folder) / SUMMARY).read_text())


def read_table(folder: Path, name: str) -> dict[str, np.ndarray]:
    table = pq.read_table(Path(folder) / f"{name}.parquet")
    return {k: table.column(k).to_numpy(zero_copy_only=False) for k in table.column_names}
