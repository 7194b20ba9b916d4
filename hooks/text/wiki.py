"""The MediaWiki markup cleaner: wikitext in, plain prose out.

A change to strip_wiki_markup's output must bump hooks.text.builtin.CLEANER_VERSION, which keys
the cached built-in corpus.
"""

from __future__ import annotations

import html
import re

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
