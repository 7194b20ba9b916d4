"""Argument groups that several subcommands share, and turning them into the layers' values."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from hooks.errors import UserError

_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kKmMgG]?)\s*$")
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
DTYPES = ("fp32", "bf16", "fp16")


def parse_count(text: str, what: str = "--tokens") -> int:
    """'2000000', '2_000_000', '2M', '500k' or '2e6' -> int; anything else is a UserError."""
    match = _COUNT.match(str(text).replace("_", ""))
    value = float(match.group(1)) * _SCALE[match.group(2).lower()] if match else None
    if value is None or value != int(value) or value <= 0:
        raise UserError(
            f"{what} must be a positive whole number such as 100000, 100k or 2M, got '{text}'."
        )
    return int(value)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="'smollm2-135m' (built in), a HF model name or a local directory",
    )
    p.add_argument("--device", default="cpu")


# The flags that choose which tokens become data (hooks.selection.Selection). Their defaults are
# None here, so that the Selection's own defaults are the only ones and a flag the user gave can
# be told from one they did not (training from a cache refuses the first kind).
SELECTION_FLAGS = {
    "dataset": "dataset",
    "text_column": "text_column",
    "context": "context_size",
    "bos": "bos",
    "keep_first": "drop_first",
    "keep_special": "drop_special",
    "drop_outliers": "outlier_factor",
    "model_dtype": "model_dtype",
}


def add_selection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset", help="'builtin' (default), a .txt/.jsonl/.parquet file or folder, or a HF name"
    )
    p.add_argument("--text-column", help="column holding the text (jsonl/parquet/HF; 'text')")
    p.add_argument("--context", type=int, help="tokens per window (128)")
    p.add_argument(
        "--bos", choices=["prepend", "none"], help="BOS at each window's start (prepend)"
    )
    p.add_argument(
        "--keep-first",
        action="store_true",
        default=None,
        help="keep position 0 (excluded by default: it is an attention sink)",
    )
    p.add_argument(
        "--keep-special", action="store_true", default=None, help="keep BOS/EOS/PAD tokens"
    )
    p.add_argument(
        "--drop-outliers",
        type=float,
        metavar="M",
        help="drop tokens whose norm exceeds M x the median norm",
    )
    p.add_argument("--model-dtype", choices=DTYPES, help="dtype the model runs in (fp32)")


def selection_flags_given(args: argparse.Namespace) -> list[str]:
    """The selection flags on the command line, as the user spelled them."""
    return ["--" + f.replace("_", "-") for f in SELECTION_FLAGS if getattr(args, f) is not None]


def selection_from_args(args: argparse.Namespace):
    """The token selection the flags ask for; a flag not given keeps the Selection default."""
    from hooks.selection import Selection

    given = {field: getattr(args, flag) for flag, field in SELECTION_FLAGS.items()}
    given = {k: v for k, v in given.items() if v is not None}
    for field in ("drop_first", "drop_special"):  # --keep-X means drop_X = False
        if field in given:
            given[field] = not given[field]
    if "dataset" in given:  # a file or folder is recorded absolute: later stages run elsewhere
        path = Path(given["dataset"]).expanduser()
        given["dataset"] = str(path.resolve()) if path.exists() else str(given["dataset"])
    return Selection(**given)
