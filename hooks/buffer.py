"""A seeded shuffling buffer between an activation source and the trainer.

Neighbouring tokens of one window are highly correlated, so training batches must not be runs of
them. The buffer fills up to `size` rows, shuffles, serves half of them as batches and keeps the
other half to mix with the next refill (the scheme SAELens also uses). The source is any iterator
of (cursor, Rows): the live model (cursor = windows consumed) or a cache (cursor = shards read).
The buffer's state (kept rows, RNG, cursor) is enough to resume a run exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from hooks.activations import Rows
from hooks.errors import UserError


class MixingBuffer:
    def __init__(
        self,
        source: Iterator[tuple[int, Rows]],
        size: int,
        batch_size: int,
        seed: int = 0,
    ):
        if batch_size <= 0:
            raise UserError(
                f"The batch size must be a positive number of tokens, got {batch_size}."
            )
        if size < 2 * batch_size:
            raise UserError(
                f"The mixing buffer ({size} tokens) must hold at least two batches "
                f"({2 * batch_size} tokens), so that every served half is mixed."
            )
        self.source = source
        self.size = size
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.pool: Rows | None = None  # shuffled rows; the first `to_serve` are being served
        self.to_serve = 0
        self.exhausted = False
        self.cursor = 0  # the source's cursor for the rows that have entered the buffer

    def _refill(self) -> None:
        parts = [self.pool] if self.pool is not None and len(self.pool) else []
        count = sum(len(p) for p in parts)
        while count < self.size and not self.exhausted:
            try:
                self.cursor, rows = next(self.source)
            except StopIteration:
                self.exhausted = True
                break
            if len(rows):
                parts.append(rows)
                count += len(rows)
        if count < self.batch_size:
            self.pool, self.to_serve = None, 0
            return
        pool = Rows.cat(parts)
        self.pool = pool.select(torch.randperm(len(pool), generator=self.generator))
        # Serve half (the whole pool once the source is dry), in whole batches.
        share = count if self.exhausted else count // 2
        self.to_serve = max(share // self.batch_size, 1) * self.batch_size

    def __iter__(self) -> Iterator[Rows]:
        while True:
            if self.to_serve == 0:
                self._refill()
                if self.to_serve == 0:
                    return
            batch = self.pool.select(slice(0, self.batch_size))
            self.pool = self.pool.select(slice(self.batch_size, None))
            self.to_serve -= self.batch_size
            yield batch

    def state_dict(self) -> dict:
        pool = self.pool.to_tensors() if self.pool is not None else {}
        return {
            "pool": pool,
            "to_serve": self.to_serve,
            "exhausted": self.exhausted,
            "rng": self.generator.get_state(),
            "cursor": self.cursor,
        }

    def load_state_dict(self, state: dict, sites: list[str]) -> None:
        """Restore; the caller must hand in a source that resumes after `state['cursor']`."""
        self.pool = Rows.from_tensors(state["pool"], sites) if state["pool"] else None
        self.to_serve = int(state["to_serve"])
        self.exhausted = bool(state["exhausted"])
        self.generator.set_state(state["rng"])
        self.cursor = int(state["cursor"])
