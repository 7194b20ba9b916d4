"""Tokenising documents into fixed-size context windows that remember where each token came from.

Documents are tokenised one at a time, joined with a separator token, and cut into windows of
`context_size` tokens (optionally each starting with BOS). The order is deterministic; shuffling,
when asked for, is a seeded shuffle buffer over windows. Each token keeps (doc_id, offset in the
document's tokens), with -1 for the BOS and separator tokens that the windowing inserted.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from hooks.errors import UserError

BOS_MODES = ("prepend", "none")
SEPARATORS = ("eos", "bos", "none")


@dataclass
class Window:
    index: int  # position in the deterministic (unshuffled) window stream
    tokens: torch.Tensor  # (T,) int64
    doc: torch.Tensor  # (T,) int32, -1 for inserted BOS/separator tokens
    pos: torch.Tensor  # (T,) int32, token offset inside the document, -1 for inserted tokens


@dataclass(frozen=True)
class WindowSpec:
    context_size: int = 128
    bos: str = "prepend"
    separator: str = "eos"

    def __post_init__(self) -> None:
        if self.context_size < 2:
            raise UserError(f"--context must be at least 2 tokens, got {self.context_size}.")
        if self.bos not in BOS_MODES:
            raise UserError(f"Unknown BOS mode '{self.bos}'; use one of {', '.join(BOS_MODES)}.")
        if self.separator not in SEPARATORS:
            raise UserError(
                f"Unknown separator '{self.separator}'; use one of {', '.join(SEPARATORS)}."
            )


def special_id(tokenizer, which: str) -> int | None:
    token_id = getattr(tokenizer, f"{which}_token_id", None)
    if token_id is None and which == "bos":
        token_id = tokenizer.eos_token_id  # GPT-2 style: one special token plays both roles
    return token_id


def iter_windows(
    documents: Iterable,
    tokenizer,
    spec: WindowSpec = WindowSpec(),
) -> Iterator[Window]:
    """Yield every full window of the documents, in order."""
    bos_id = special_id(tokenizer, "bos") if spec.bos == "prepend" else None
    sep_id = special_id(tokenizer, spec.separator) if spec.separator != "none" else None
    body = spec.context_size - (1 if bos_id is not None else 0)
    tokens: list[int] = []
    docs: list[int] = []
    offsets: list[int] = []
    index = 0
    for document in documents:
        ids = tokenizer(document.text, add_special_tokens=False)["input_ids"]
        tokens += ids
        docs += [document.doc_id] * len(ids)
        offsets += range(len(ids))
        if sep_id is not None:
            tokens.append(sep_id)
            docs.append(-1)
            offsets.append(-1)
        while len(tokens) >= body:
            yield _make_window(index, tokens[:body], docs[:body], offsets[:body], bos_id)
            index += 1
            del tokens[:body], docs[:body], offsets[:body]
    # The tail shorter than a window is dropped: every window has exactly context_size tokens.


def _make_window(index, tokens, docs, offsets, bos_id) -> Window:
    if bos_id is not None:
        tokens, docs, offsets = [bos_id, *tokens], [-1, *docs], [-1, *offsets]
    return Window(
        index=index,
        tokens=torch.tensor(tokens, dtype=torch.int64),
        doc=torch.tensor(docs, dtype=torch.int32),
        pos=torch.tensor(offsets, dtype=torch.int32),
    )


def holdout_split(documents: Iterable, part: str, every: int = 20) -> Iterator:
    """Every `every`-th document is held out for evaluation, so metrics never see training text."""
    if part not in ("train", "eval", "all"):
        raise UserError(f"Unknown split '{part}'; use train, eval or all.")
    for document in documents:
        held_out = document.doc_id % every == every - 1
        if part == "all" or held_out == (part == "eval"):
            yield document


def shuffled(windows: Iterable[Window], seed: int, buffer: int = 512) -> Iterator[Window]:
    """A seeded shuffle buffer: the same seed and input give the same order."""
    rng = random.Random(seed)
    pool: list[Window] = []
    for window in windows:
        pool.append(window)
        if len(pool) >= buffer:
            yield pool.pop(rng.randrange(len(pool)))
    rng.shuffle(pool)
    yield from pool


def batched(windows: Iterable[Window], batch_size: int) -> Iterator[list[Window]]:
    batch: list[Window] = []
    for window in windows:
        batch.append(window)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def stack(batch: list[Window]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T) tokens, doc ids and offsets for a batch of windows."""
    return (
        torch.stack([w.tokens for w in batch]),
        torch.stack([w.doc for w in batch]),
        torch.stack([w.pos for w in batch]),
    )
