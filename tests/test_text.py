"""Tests for hooks/text/: the wiki markup stripper, the built-in corpus and users' data."""

from __future__ import annotations

import bz2
import contextlib
import io
import json
import re
import time

import pytest

from hooks.errors import UserError
from hooks.text import Document, builtin, builtin_documents, iter_documents, strip_wiki_markup


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache; the real corpus tests opt into a shared one."""
    monkeypatch.setenv("SAEWB_CACHE", str(tmp_path / "cache"))


def docs_of(source, **kwargs) -> list[tuple[int, str, str]]:
    return [(d.doc_id, d.title, d.text) for d in iter_documents(str(source), **kwargs)]


# -----------------------------------------------------------------------------
# the markup stripper

WIKITEXT = """{{Infobox person
| name = Ada {{nowrap|Lovelace}}
| image = Ada.jpg
}}
'''Ada Lovelace'''<ref name="bio">{{cite book|title=Ada}}</ref> was an [[England|English]] \
[[mathematician]].<ref name="bio"/> She worked on the ''[[Analytical Engine]]''.
[[File:Ada portrait.jpg|thumb|left|Portrait of [[Ada Lovelace|Ada]] by [[Alfred Chalon|Chalon]], [1840]]]
== Early life ==
She was born in [[London]]&nbsp;in 1815 &amp; raised by her mother.<!-- a hidden comment -->
{| class="wikitable"
|-
! Year !! Event
|-
| 1815 || Born {{circa|1815}}
|}
=== Works ===
* Notes on the [[Analytical Engine|engine]] (1843)
# See [http://example.org/notes the notes] and [[Paris (band)|]].
: Indented <span style="color:red">remark</span> by '''''[[Charles Babbage]]'''''.
[[Image:Diagram.png|thumb|A [[Bernoulli number|Bernoulli]] table from [http://example.org/ a site]]]
[[Category:Mathematicians]]
[[Category:1815 births|Lovelace, Ada]]
[[de:Ada Lovelace]]"""

EXPECTED = """Ada Lovelace was an English mathematician. She worked on the Analytical Engine.

Early life

She was born in London in 1815 & raised by her mother.

Works

Notes on the engine (1843)
See the notes and Paris.
Indented remark by Charles Babbage."""


def test_strip_wiki_markup_exact_output():
    assert strip_wiki_markup(WIKITEXT) == EXPECTED


@pytest.mark.parametrize(
    "wikitext, expected",
    [
        # an unclosed template drops only its own mark, not the rest of the article
        ("x {{unclosed a {{b}} c [[d]] e", "x unclosed a c d e"),
        # an external link whose label holds an internal link
        ('[http://x.org "Talk" (at [[UC, B|UC B]], 1962)]', '"Talk" (at UC B, 1962)'),
        # a bare external link renders as a footnote number, so it goes
        ("see [http://x.org] here", "see here"),
        ("a <ref>one</ref>b<ref name=x/> c<ref group='n'>two {{t}}</ref>.", "a b c."),
        ("[[:Category:Foo]] and [[Media:a.ogg|sound]]", "Category:Foo and"),
        ("a {{lang|grc|ἀναρχία}}, b ({{IPA|x}}) c", "a, b c"),
        ("&lt;ref&gt; is shown as text", "<ref> is shown as text"),
        ("==Heading==\ntext\n\n\n\n----\nmore __NOTOC__", "Heading\n\ntext\n\nmore"),
    ],
)
def test_strip_wiki_markup_cases(wikitext, expected):
    assert strip_wiki_markup(wikitext) == expected


def test_strip_wiki_markup_is_linear_on_unclosed_links():
    start = time.perf_counter()
    out = strip_wiki_markup("[[x" + "[y]" * 5000 + " z")
    assert time.perf_counter() - start < 1.0
    assert "[[" not in out


# -----------------------------------------------------------------------------
# the built-in corpus (real gensim files; one shared cache for the session)


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory):
    """Build the real corpus once into a session cache; keep what it printed while building."""
    cache = tmp_path_factory.mktemp("builtin-cache")
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(stderr):
        mp.setenv("SAEWB_CACHE", str(cache))
        start = time.perf_counter()
        docs = builtin_documents(progress=True)
        build_s = time.perf_counter() - start
    return cache, docs, stderr.getvalue(), build_s


def _redirect_titles() -> set[str]:
    """Redirect page titles, found independently of the module under test."""
    wiki, _ = builtin._builtin_sources()
    xml = bz2.open(wiki).read().decode()
    pages = re.findall(r"<page>.*?</page>", xml, re.S)
    return {
        re.search(r"<title>(.*?)</title>", p).group(1)
        for p in pages
        if "<redirect" in p or re.search(r"<text[^>]*>\s*#redirect", p, re.I)
    }


def test_builtin_corpus_shape(builtin_cache):
    _, docs, stderr, _ = builtin_cache
    lee_name = builtin.LEE_NAME
    wiki = [d for d in docs if d.title != lee_name]
    lee = [d for d in docs if d.title == lee_name]
    assert 100 <= len(wiki) <= 115
    assert 250 <= len(lee) <= 310
    assert docs[: len(wiki)] == wiki, "wiki articles come first, then the Lee documents"
    assert [d.doc_id for d in docs] == list(range(len(docs)))
    assert docs[0].title == "Anarchism"
    assert len({d.title for d in wiki}) == len(wiki)
    for d in docs:
        for mark in ("{{", "}}", "[[", "]]", "<ref", "{|", "|}", "&nbsp;", "'''"):
            assert mark not in d.text, (d.title, mark)
        assert d.text == d.text.strip() and d.text
    total = sum(len(d.text.encode()) for d in docs)
    assert 2.5e6 <= total <= 3.6e6
    assert 300e3 <= sum(len(d.text.encode()) for d in lee) <= 420e3
    redirects = _redirect_titles()
    assert len(redirects) >= 90
    assert not redirects & {d.title for d in wiki}
    assert "cleaning built-in wiki corpus" in stderr  # the tqdm bar went to stderr


def test_builtin_second_call_reads_the_cache(builtin_cache, monkeypatch):
    cache, docs, _, _ = builtin_cache
    monkeypatch.setenv("SAEWB_CACHE", str(cache))

    def no_build(*args, **kwargs):
        raise AssertionError("the cached corpus should have been used")

    monkeypatch.setattr(builtin, "_build_builtin", no_build)
    start = time.perf_counter()
    again = builtin_documents(progress=False)
    assert time.perf_counter() - start < 2.0
    assert again == docs
    assert [d.text for d in iter_documents("builtin")] == [d.text for d in docs]
    files = list((cache / "corpus").glob("builtin-*.jsonl"))
    assert len(files) == 1


def test_builtin_cache_key_follows_cleaner_version(monkeypatch):
    wiki, lee = builtin._builtin_sources()
    before = builtin._cache_path(wiki, lee)
    monkeypatch.setattr(builtin, "CLEANER_VERSION", builtin.CLEANER_VERSION + 1)
    assert builtin._cache_path(wiki, lee) != before
    assert before.parent.name == "corpus"


@pytest.mark.parametrize("damage", ["garbage", "truncate", "empty"])
def test_builtin_corrupt_cache_is_rebuilt(monkeypatch, damage):
    fake = [Document(0, "A", "alpha"), Document(1, "B", "beta")]
    calls = []

    def fake_build(wiki, lee, progress):
        calls.append(progress)
        return list(fake)

    monkeypatch.setattr(builtin, "_build_builtin", fake_build)
    assert builtin_documents(progress=False) == fake
    path = builtin._cache_path(*builtin._builtin_sources())
    good = path.read_text()
    if damage == "garbage":
        path.write_bytes(b"\x00\xffnot json at all\n")
    elif damage == "truncate":
        path.write_text(good.splitlines()[0] + "\n" + good.splitlines()[1] + "\n")
    else:
        path.write_text("")
    assert builtin_documents(progress=False) == fake
    assert len(calls) == 2
    assert path.read_text() == good


# -----------------------------------------------------------------------------
# users' data


def test_txt_blocks_and_file_modes(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first line\nsecond line\n\n\n  \nthird block  \n\n")
    assert docs_of(path) == [
        (0, "notes.txt", "first line\nsecond line"),
        (1, "notes.txt", "third block"),
    ]
    assert docs_of(path, txt_mode="file") == [
        (0, "notes.txt", "first line\nsecond line\n\n\n  \nthird block"),
    ]
    assert [d.text for d in iter_documents(path)] == ["first line\nsecond line", "third block"]


def test_txt_directory_sorted_recursive(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.txt").write_text("bee one\n\nbee two\n")
    (tmp_path / "a.txt").write_text("ay\n")
    (tmp_path / "sub" / "c.txt").write_text("sea\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "readme.md").write_text("not a txt file")
    (tmp_path / ".hidden" / "d.txt").write_text("hidden copy")
    assert docs_of(tmp_path) == [
        (0, "a.txt", "ay"),
        (1, "b.txt", "bee one"),
        (2, "b.txt", "bee two"),
        (3, "sub/c.txt", "sea"),
    ]
    assert docs_of(tmp_path, txt_mode="file") == [
        (0, "a.txt", "ay"),
        (1, "b.txt", "bee one\n\nbee two"),
        (2, "sub/c.txt", "sea"),
    ]


def test_jsonl_with_custom_column_and_titles(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [
        {"body": "one", "title": "T1"},
        {"body": "  "},  # empty after strip: skipped, and doc_id does not count it
        {"body": "two", "n": 3},
        {"body": None},
    ]
    path.write_text(
        "\n".join(json.dumps(r) for r in rows[:2])
        + "\n\n"
        + "\n".join(json.dumps(r) for r in rows[2:])
    )
    assert docs_of(path, text_column="body") == [(0, "T1", "one"), (1, "data.jsonl", "two")]


def test_parquet_streams_batches_with_custom_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    texts = [f"doc {i}" if i % 7 else "" for i in range(2500)]  # crosses record batches
    pq.write_table(pa.table({"content": texts, "id": list(range(2500))}), path, row_group_size=600)
    got = list(iter_documents(str(path), text_column="content"))
    want = [t for t in texts if t]
    assert [d.text for d in got] == want
    assert [d.doc_id for d in got] == list(range(len(want)))
    assert {d.title for d in got} == {"data.parquet"}


def test_save_to_disk_dataset_and_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["alpha", "", "beta"], "label": [0, 1, 2]})
    ds.save_to_disk(str(tmp_path / "single"))
    assert docs_of(tmp_path / "single") == [(0, "single", "alpha"), (1, "single", "beta")]

    other = datasets.Dataset.from_dict({"text": ["gamma"], "label": [3]})
    datasets.DatasetDict({"train": ds, "validation": other}).save_to_disk(str(tmp_path / "dd"))
    assert [t for _, _, t in docs_of(tmp_path / "dd")] == ["alpha", "beta"]
    assert docs_of(tmp_path / "dd", split="validation") == [(0, "dd", "gamma")]
    with pytest.raises(UserError, match=r"'test'.*\['train', 'validation'\]"):
        iter_documents(str(tmp_path / "dd"), split="test")
    with pytest.raises(UserError, match=r"'body'.*\['text', 'label'\]"):
        iter_documents(str(tmp_path / "single"), text_column="body")


def test_iter_documents_streams_lazily(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text('{"text": "ok"}\n' + "{not json\n")
    it = iter_documents(str(path))
    assert next(it).text == "ok"  # the first document arrives before the bad line is read
    with pytest.raises(UserError, match="Line 2"):
        next(it)


# -----------------------------------------------------------------------------
# bad input: one UserError sentence naming the value


def test_missing_path_with_known_suffix(tmp_path):
    missing = str(tmp_path / "nope" / "corpus.jsonl")
    with pytest.raises(UserError, match="does not exist") as e:
        iter_documents(missing)
    assert missing in str(e.value)


def test_jsonl_missing_column_names_line_and_columns(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"body": "b", "id": 1}\n')
    with pytest.raises(UserError, match=r"Line 3 .*'text'.*\['body', 'id'\]"):
        list(iter_documents(str(path)))


def test_jsonl_invalid_line_and_non_text_values(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b",\n')
    with pytest.raises(UserError, match=r"Line 2 of .*d\.jsonl.* not valid JSON"):
        list(iter_documents(str(path)))
    path.write_text('{"text": 42}\n')
    with pytest.raises(UserError, match=r"'text' value at line 1 .* int"):
        list(iter_documents(str(path)))
    path.write_text('["text"]\n')
    with pytest.raises(UserError, match=r"Line 1 .*found list"):
        list(iter_documents(str(path)))


def test_parquet_missing_column_lists_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), path)
    with pytest.raises(UserError, match=r"no 'text' column; its columns are \['body', 'id'\]"):
        iter_documents(str(path))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="broken.parquet.*not a readable Parquet"):
        iter_documents(str(tmp_path / "broken.parquet"))


@pytest.mark.parametrize("content", ["", "\n\n   \n", '\n{"text": ""}\n'])
def test_empty_sources_say_no_text(tmp_path, content):
    path = tmp_path / ("empty.jsonl" if "{" in content else "empty.txt")
    path.write_text(content)
    with pytest.raises(UserError, match="contains no text") as e:
        list(iter_documents(str(path)))
    assert str(path) in str(e.value)


def test_directory_without_text_files(tmp_path):
    (tmp_path / "a.md").write_text("hello")
    with pytest.raises(UserError, match="contains no .txt files"):
        list(iter_documents(str(tmp_path)))


def test_unsupported_suffix_lists_supported_kinds(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(UserError, match=r"unsupported suffix '\.csv'.*\.jsonl.*\.parquet") as e:
        iter_documents(str(path))
    assert str(path) in str(e.value)


def test_not_utf8_and_bad_options(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="latin1.txt.*not UTF-8"):
        list(iter_documents(str(path)))
    with pytest.raises(UserError, match="txt_mode 'lines'"):
        iter_documents(str(path), txt_mode="lines")
    with pytest.raises(UserError, match="not a Hugging Face dataset name"):
        iter_documents("no such thing!")


def test_unknown_hub_name_fails_fast_offline(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # datasets reads these at import time, so set both the env and the already-loaded flags
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    name = "saewb-test/definitely-not-a-real-dataset"
    start = time.perf_counter()
    with pytest.raises(UserError, match="builtin") as e:
        iter_documents(name)
    assert time.perf_counter() - start < 10
    message = str(e.value)
    assert name in message and "Hugging Face hub" in message and ".jsonl" in message
    assert "\n" not in message


def test_path_objects_are_accepted(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("hello")
    assert [(d.doc_id, d.title, d.text) for d in iter_documents(path)] == [(0, "p.txt", "hello")]
