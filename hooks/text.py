"""Text sources: the built-in corpus (gensim's Wikipedia sample + Lee news) and users' data.

Every source becomes a stream of `Document`s in a deterministic order, so the token windows cut
from it (and the activations captured from those) can always be traced back to their text.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import importlib.util
import json
import os
import re
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from hooks.errors import UserError
from hooks.paths import atomic_write_bytes, cache_dir

# Bump whenever strip_wiki_markup (or the corpus assembly) changes: it is part of the cache key,
# so a cleaner change rebuilds the cached corpus instead of silently serving stale text.
CLEANER_VERSION = 1

WIKI_GLOB = "enwiki-latest-pages-articles1*-shortened.bz2"
LEE_NAME = "lee_background.cor"
SUPPORTED_SOURCES = (
    '"builtin", a .txt file, a directory of .txt files, a .jsonl file, a .parquet file, '
    "a directory written by datasets' save_to_disk, or a Hugging Face hub dataset name"
)
TXT_MODES = ("blocks", "file")


@dataclass(frozen=True)
class Document:
    doc_id: int  # position of the document in its source's deterministic order
    title: str  # article title, file name, or "" when the source has none
    text: str


# -----------------------------------------------------------------------------
# wiki markup stripping

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)  # an unterminated comment runs to the end
# elements whose content is not prose: dropped whole, tags and content
_DROPPED_TAGS = "ref|math|gallery|timeline|imagemap|score|syntaxhighlight|source|hiero|chem"
_SELF_CLOSING = re.compile(rf"<(?:{_DROPPED_TAGS})\b[^>]*/>", re.I)
_DROPPED_ELEMENT = re.compile(rf"<({_DROPPED_TAGS})\b[^>]*>.*?</\1\s*>", re.I | re.S)
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\b[^>]*>")
# [http://x label] -> label; a bare [http://x] renders as a footnote number, so it goes
_EXTERNAL_LINK = re.compile(
    r"\[(?:(?:https?|ftps?|mailto|irc|news|gopher):|//)[^\s\]]*\s*([^\]]*)\]"
)
# an innermost [[...]]: no [[ or ]] inside, though single brackets are fine ("[1840]]]" ends
# a caption); the loop peels nesting. Possessive, so a link that never closes fails in linear time.
_INTERNAL_LINK = re.compile(r"\[\[((?:\[[^\[\]]*\]|[^\[\]]|\[(?!\[)|\](?!\]))*+)\]\]")
_DROPPED_NAMESPACES = {"file", "image", "category", "media"}
_INTERLANGUAGE = re.compile(r"[a-z]{2,3}(?:-[a-z]+)*:")  # [[de:Anarchismus]]
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$", re.M)
_BOLD_ITALIC = re.compile(r"'{2,}")
_LIST_MARKS = re.compile(r"^[*#:;]+[ \t]*", re.M)
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_RULE = re.compile(r"^-{4,}[ \t]*$", re.M)
_EMPTY_PARENS = re.compile(r"\([\s,;:]*\)")  # what "({{IPA|...}})" leaves behind
_SPACES = re.compile(r"[^\S\n]+")  # any whitespace but newlines, incl. the &nbsp; character
# "word {{lang|..}}, word" leaves "word , word"; only a mark followed by a space (or the end)
# is pulled back, so text about punctuation itself ("the ,< pair") keeps its spacing
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?])(?=\s|$)", re.M)
_BLANK_LINES = re.compile(r"\n{3,}")


def _drop_nested(text: str, opener: str, closer: str) -> str:
    """Remove balanced opener...closer spans (nesting allowed) and any unmatched marks."""
    tokens = re.compile(re.escape(opener) + "|" + re.escape(closer))
    while True:
        spans: list[tuple[int, int]] = []  # outermost matched spans and stray closers
        stack: list[int] = []
        for m in tokens.finditer(text):
            if m.group() == opener:
                stack.append(m.start())
            elif stack:
                start = stack.pop()
                if not stack:
                    spans.append((start, m.end()))
            else:
                spans.append((m.start(), m.end()))
        # An opener that never closes must not eat the rest of the article: drop only its mark
        # and rescan, so the spans nested inside it are found as outermost spans next time.
        spans += [(start, start + len(opener)) for start in stack]
        spans.sort()
        pieces, pos = [], 0
        for start, end in spans:
            pieces.append(text[pos:start])
            pos = end
        pieces.append(text[pos:])
        text = "".join(pieces)
        if not stack:
            return text


def _link_text(m: re.Match) -> str:
    """The visible text of one [[...]] link ("" for files, categories, interlanguage links)."""
    inner = m.group(1)
    target, pipe, label = inner.partition("|")
    target = target.strip()
    if target.startswith(":"):  # [[:Category:X]] is a visible link to the category page
        target = target[1:]
    elif ":" in target and target.split(":", 1)[0].strip().lower() in _DROPPED_NAMESPACES:
        return ""
    elif not pipe and _INTERLANGUAGE.match(target):
        return ""
    if label.strip():
        return label
    if pipe:  # the "pipe trick": [[Paris (band)|]] shows "Paris"
        return re.sub(r"\s*\(.*\)$", "", target.split(":", 1)[-1])
    return target


def strip_wiki_markup(wikitext: str) -> str:
    """Turn MediaWiki source into plain prose; headings stay as lines of their own."""
    text = _COMMENT.sub("", wikitext)
    text = _SELF_CLOSING.sub("", text)
    text = _DROPPED_ELEMENT.sub("", text)
    text = _drop_nested(text, "{{", "}}")  # templates, infoboxes, citations
    text = _drop_nested(text, "{|", "|}")  # tables
    while True:  # innermost links first, so a File caption's own links don't hide the File link
        stripped = _INTERNAL_LINK.sub(_link_text, text)
        if stripped == text:
            break
        text = stripped
    text = text.replace("[[", "").replace("]]", "")  # marks of malformed links
    text = _EXTERNAL_LINK.sub(r"\1", text)  # after [[...]], which may sit inside a label
    text = _HTML_TAG.sub("", text)
    text = _HEADING.sub(lambda m: f"\n{m.group(2)}\n", text)
    text = _BOLD_ITALIC.sub("", text)
    text = _MAGIC_WORD.sub("", text)
    text = _RULE.sub("", text)
    text = _LIST_MARKS.sub("", text)
    # entities last: an escaped "&lt;ref&gt;" is text the article shows, not markup to strip
    text = html.unescape(text)
    text = _EMPTY_PARENS.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


# -----------------------------------------------------------------------------
# the built-in corpus


def _builtin_sources() -> tuple[Path, Path]:
    """The two gensim test files, found without importing gensim (which is slow to import)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise UserError(
            'The "builtin" corpus needs the gensim package, which is not installed; '
            "run `pip install gensim` or pass a .txt/.jsonl/.parquet path instead."
        )
    data = Path(spec.origin).parent / "test" / "test_data"
    wiki = sorted(data.glob(WIKI_GLOB))
    lee = data / LEE_NAME
    if not wiki or not lee.is_file():
        raise UserError(
            f"The gensim install at {data} lacks {WIKI_GLOB} or {LEE_NAME}; "
            "reinstall gensim (>= 4.3) or pass a .txt/.jsonl/.parquet path instead."
        )
    return wiki[0], lee


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]  # "{http://www.mediawiki.org/xml/export-0.10/}page" -> "page"


def _wiki_articles(path: Path, progress: bool) -> Iterator[tuple[str, str]]:
    """(title, clean text) of every main-namespace, non-redirect page, streamed in file order."""
    from tqdm import tqdm

    with (
        open(path, "rb") as raw,
        bz2.BZ2File(raw) as xml_file,
        tqdm(
            total=path.stat().st_size,
            unit="B",
            unit_scale=True,
            desc="cleaning built-in wiki corpus",
            disable=not progress,
        ) as bar,
    ):
        for _, elem in ET.iterparse(xml_file, events=("end",)):
            if _local(elem.tag) != "page":
                continue
            fields = {_local(child.tag): child for child in elem}
            revision = fields.get("revision")
            text_elem = None
            if revision is not None:
                text_elem = next((c for c in revision if _local(c.tag) == "text"), None)
            title = (fields["title"].text or "") if "title" in fields else ""
            ns = (fields["ns"].text or "").strip() if "ns" in fields else "0"
            wikitext = (text_elem.text or "") if text_elem is not None else ""
            is_redirect = "redirect" in fields or wikitext.lstrip().upper().startswith("#REDIRECT")
            elem.clear()  # keep memory flat: the parsed page is no longer needed
            bar.update(raw.tell() - bar.n)
            if ns != "0" or is_redirect:
                continue
            text = strip_wiki_markup(wikitext)
            if text:
                yield title, text


def _cache_path(wiki: Path, lee: Path) -> Path:
    key = json.dumps(
        {
            "sources": [[p.name, p.stat().st_size] for p in (wiki, lee)],
            "cleaner_version": CLEANER_VERSION,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "corpus" / f"builtin-{digest}.jsonl"


def _read_cache(path: Path) -> list[Document] | None:
    """The cached corpus, or None when the file is missing or damaged (then it is rebuilt)."""
    try:
        with open(path, encoding="utf-8") as f:
            header = json.loads(f.readline())
            docs = [Document(**json.loads(line)) for line in f]
        if header.get("cleaner_version") != CLEANER_VERSION or header.get("n_docs") != len(docs):
            raise ValueError("header does not match the documents")
        if any(d.doc_id != i or not isinstance(d.text, str) for i, d in enumerate(docs)):
            raise ValueError("doc_ids out of order")
        return docs
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        print(f"[sae-workbench] rebuilding damaged corpus cache {path} ({e})", file=sys.stderr)
        return None


def _build_builtin(wiki: Path, lee: Path, progress: bool) -> list[Document]:
    pairs = list(_wiki_articles(wiki, progress))
    with open(lee, encoding="utf-8") as f:  # one news story per line
        pairs += [(lee.name, line.strip()) for line in f if line.strip()]
    return [Document(i, title, text) for i, (title, text) in enumerate(pairs)]


def builtin_documents(progress: bool = True) -> list[Document]:
    """The built-in corpus: ~106 cleaned Wikipedia articles, then ~300 Lee news stories.

    Built once (a few seconds) and cached as JSONL under cache_dir()/corpus.
    """
    wiki, lee = _builtin_sources()
    path = _cache_path(wiki, lee)
    docs = _read_cache(path)
    if docs is not None:
        return docs
    t0 = time.perf_counter()
    docs = _build_builtin(wiki, lee, progress)
    header = {"cleaner_version": CLEANER_VERSION, "n_docs": len(docs)}
    lines = [json.dumps(header)] + [json.dumps(asdict(d), ensure_ascii=False) for d in docs]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
    if progress:
        n_chars = sum(len(d.text) for d in docs)
        print(
            f"[sae-workbench] built-in corpus: {len(docs)} documents, {n_chars:,} characters, "
            f"built in {time.perf_counter() - t0:.1f}s, cached at {path}",
            file=sys.stderr,
        )
    return docs


# -----------------------------------------------------------------------------
# users' data


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
