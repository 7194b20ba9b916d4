"""The built-in corpus: gensim's Wikipedia sample (cleaned) and its Lee news stories, built once
and cached as JSONL."""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from hooks.errors import UserError
from hooks.paths import atomic_write_bytes, cache_dir
from hooks.text.document import Document
from hooks.text.wiki import strip_wiki_markup

# Bump whenever strip_wiki_markup (hooks/text/wiki.py) or the corpus assembly changes: it is part
# of the cache key, so a cleaner change rebuilds the cached corpus instead of serving stale text.
CLEANER_VERSION = 1

WIKI_GLOB = "enwiki-latest-pages-articles1*-shortened.bz2"
LEE_NAME = "lee_background.cor"


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
