"""A document of a text source, the unit every reader yields."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    doc_id: int  # position of the document in its source's deterministic order
    title: str  # article title, file name, or "" when the source has none
    text: str
