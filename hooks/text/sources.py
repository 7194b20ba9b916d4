"""Every text source as a stream of Documents: the built-in corpus, or users' .txt, .jsonl and
.parquet files, datasets' save_to_disk folders and Hugging Face hub datasets."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from hooks.errors import UserError
from hooks.text.builtin import builtin_documents
from hooks.text.document import Document

SUPPORTED_SOURCES = (
    '"builtin", a .txt file, a directory of .txt files, a .jsonl file, a .parquet file, '
    "a directory written by datasets' save_to_disk, or a Hugging Face hub dataset name"
)
TXT_MODES = ("blocks", "file")


def _read_utf8(path: Path) -> Iterator[str]:
    """Lines of a text file; a file that is not UTF-8 is a user error, not a traceback."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a BOM from Windows editors
            yield from f
    except UnicodeDecodeError as e:
        raise UserError(
            f"{str(path)!r} is not UTF-8 text (bad byte at offset {e.start}); "
            "save it as UTF-8 or convert it to .jsonl/.parquet."
        ) from None


def _txt_texts(path: Path, title: str, txt_mode: str) -> Iterator[tuple[str, str]]:
    if txt_mode == "file":
        yield title, "".join(_read_utf8(path))
        return
    block: list[str] = []
    for line in _read_utf8(path):
        if line.strip():
            block.append(line.rstrip("\n"))
        elif block:
            yield title, "\n".join(block)
            block = []
    if block:
        yield title, "\n".join(block)


def _txt_dir_texts(root: Path, txt_mode: str) -> Iterator[tuple[str, str]]:
    files = sorted(
        (p for p in root.rglob("*.txt") if p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    # hidden folders (.git, .ipynb_checkpoints) hold copies and tooling, not the user's corpus
    files = [
        p for p in files if not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    if not files:
        raise UserError(
            f"The directory {str(root)!r} contains no .txt files and is not a datasets "
            f"save_to_disk folder; pass {SUPPORTED_SOURCES}."
        )
    for p in files:
        yield from _txt_texts(p, p.relative_to(root).as_posix(), txt_mode)


def _text_value(value: object, where: str, text_column: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(
            f"The {text_column!r} value at {where} is a {type(value).__name__}, not a string; "
            "choose a text_column that holds strings."
        )
    return value


def _jsonl_texts(path: Path, text_column: str) -> Iterator[tuple[str, str]]:
    for n, line in enumerate(_read_utf8(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"Line {n} of {str(path)!r} is not valid JSON ({e.msg}); "
                f"each line must be one JSON object with a {text_column!r} field."
            ) from None
        if not isinstance(record, dict) or text_column not in record:
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise UserError(
                f"Line {n} of {str(path)!r} has no {text_column!r} field (found {found}); "
                "pass the field that holds the text as text_column."
            )
        title = record.get("title")
        title = title if isinstance(title, str) and text_column != "title" else path.name
        yield title, _text_value(record[text_column], f"line {n} of {str(path)!r}", text_column)


def _open_parquet(path: Path, text_column: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{str(path)!r} is not a readable Parquet file ({e}).") from None
    columns = pf.schema_arrow.names
    if text_column not in columns:
        raise UserError(
            f"The Parquet file {str(path)!r} has no {text_column!r} column; "
            f"its columns are {columns}."
        )
    return pf


def _parquet_texts(pf, path: Path, text_column: str) -> Iterator[tuple[str, str]]:
    has_title = "title" in pf.schema_arrow.names and text_column != "title"
    columns = [text_column, "title"] if has_title else [text_column]
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=columns):  # streams, never the whole file
        texts = batch.column(0).to_pylist()
        titles = batch.column(1).to_pylist() if has_title else [path.name] * len(texts)
        for title, value in zip(titles, texts, strict=True):
            where = f"row {row} of {str(path)!r}"
            yield (
                title if isinstance(title, str) else path.name,
                _text_value(value, where, text_column),
            )
            row += 1


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _open_saved_dataset(path: Path, split: str, text_column: str):
    import datasets

    ds = datasets.load_from_disk(str(path))  # memory-mapped Arrow: nothing is read up front
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(
                f"The saved dataset {str(path)!r} has no split {split!r}; its splits are {list(ds)}."
            )
        ds = ds[split]
    if text_column not in ds.column_names:
        raise UserError(
            f"The saved dataset {str(path)!r} has no {text_column!r} column; "
            f"its columns are {ds.column_names}."
        )
    return ds


def _rows_texts(rows: Iterable[dict], name: str, text_column: str, default_title: str):
    for i, row in enumerate(rows):
        if text_column not in row:
            raise UserError(
                f"The dataset {name!r} has no {text_column!r} column; its columns are {sorted(row)}."
            )
        title = row.get("title")
        title = title if isinstance(title, str) and text_column != "title" else default_title
        yield title, _text_value(row[text_column], f"row {i} of {name!r}", text_column)


def _saved_dataset_rows(ds) -> Iterator[dict]:
    for batch in ds.iter(batch_size=1024):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns), strict=True):
            yield dict(zip(columns, values, strict=True))


# A hub id is "name" or "owner/name"; checking the shape first answers a typo at once instead
# of after the hub client's network retries.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?")


def _open_hub_dataset(name: str, split: str):
    import datasets

    hint = 'use "builtin" or a local .txt/.jsonl/.parquet path instead'
    try:
        return datasets.load_dataset(name, split=split, streaming=True)
    except ConnectionError:
        raise UserError(
            f"{name!r} is not an existing path and the Hugging Face hub could not be reached "
            f"to load it as a dataset; {hint}."
        ) from None
    except Exception as e:  # DatasetNotFoundError, bad split, bad config...: all user input
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{name!r} is not an existing path and could not be loaded as a Hugging Face hub "
            f"dataset ({reason}); {hint}."
        ) from None


_KNOWN_SUFFIXES = {".txt", ".jsonl", ".json", ".parquet", ".csv", ".arrow", ".gz", ".bz2"}


def _resolve(source: str, text_column: str, split: str, txt_mode: str) -> Iterator[tuple[str, str]]:
    """Check the source up front (so errors surface at the call) and return its (title, text)s."""
    if source == "builtin":
        return ((d.title, d.text) for d in builtin_documents())
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".txt":
            return _txt_texts(path, path.name, txt_mode)
        if suffix == ".jsonl":
            return _jsonl_texts(path, text_column)
        if suffix == ".parquet":
            pf = _open_parquet(path, text_column)
            return _parquet_texts(pf, path, text_column)
        raise UserError(
            f"The file {source!r} has an unsupported suffix {path.suffix or '(none)'!r}; "
            f"pass {SUPPORTED_SOURCES}."
        )
    if path.is_dir():
        if _is_saved_dataset(path):
            ds = _open_saved_dataset(path, split, text_column)
            return _rows_texts(_saved_dataset_rows(ds), source, text_column, path.name)
        return _txt_dir_texts(path, txt_mode)
    looks_like_path = path.suffix.lower() in _KNOWN_SUFFIXES or source.startswith(
        ("/", "./", "../", "~", ".\\")
    )
    if looks_like_path or not _HUB_NAME.fullmatch(source):
        raise UserError(
            f"The text source {source!r} does not exist (no such file or directory) and is not "
            f"a Hugging Face dataset name; pass {SUPPORTED_SOURCES}."
        )
    ds = _open_hub_dataset(source, split)
    return _rows_texts(ds, source, text_column, "")


def _numbered(source: str, texts: Iterator[tuple[str, str]]) -> Iterator[Document]:
    doc_id = 0
    for title, text in texts:
        text = text.strip()
        if not text:
            continue  # an empty line or block is not a document
        yield Document(doc_id, title, text)
        doc_id += 1
    if doc_id == 0:
        raise UserError(
            f"The text source {source!r} contains no text (every document is empty); "
            "pass a file or dataset that holds some text."
        )


def iter_documents(
    source: str | os.PathLike = "builtin",
    text_column: str = "text",
    split: str = "train",
    txt_mode: str = "blocks",
) -> Iterator[Document]:
    """Stream the documents of a text source; see SUPPORTED_SOURCES for what `source` may be.

    Bad sources (missing path, unknown suffix or column, unreachable hub) raise UserError at
    the call; problems found while reading (a bad JSON line, no text at all) at iteration.
    Documents are stripped, empty ones skipped, and doc_id counts the yielded ones from 0.
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if txt_mode not in TXT_MODES:
        raise UserError(f"txt_mode {txt_mode!r} is not valid; use one of {list(TXT_MODES)}.")
    if not isinstance(source, str) or not source.strip():
        raise UserError(f"The text source {source!r} is empty; pass {SUPPORTED_SOURCES}.")
    return _numbered(source, _resolve(source, text_column, split, txt_mode))
