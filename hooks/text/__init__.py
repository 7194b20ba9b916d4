"""Text sources: the built-in corpus (gensim's Wikipedia sample + Lee news) and users' data.

Every source becomes a stream of `Document`s in a deterministic order, so the token windows cut
from it (and the activations captured from those) can always be traced back to their text.

    document.py  Document, what every reader yields
    wiki.py      strip_wiki_markup: MediaWiki source to plain prose
    builtin.py   builtin_documents: the built-in corpus, built once and cached
    sources.py   iter_documents: every source (builtin, txt, jsonl, parquet, datasets, hub)
"""

from hooks.text.builtin import builtin_documents
from hooks.text.document import Document
from hooks.text.sources import SUPPORTED_SOURCES, TXT_MODES, iter_documents
from hooks.text.wiki import strip_wiki_markup

__all__ = [
    "SUPPORTED_SOURCES",
    "TXT_MODES",
    "Document",
    "builtin_documents",
    "iter_documents",
    "strip_wiki_markup",
]
