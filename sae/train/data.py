"""The activations a rank trains on: a live model or a cache, through a seeded mixing buffer.

From a cache every rank draws the same global batch and keeps its slice; from a live model every
rank captures its own share of the windows. The stream's state resumes it exactly.
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

from hooks.errors import UserError
from sae.train.config import TrainConfig, derive
from sae.train.distributed import World


class DataStream:
    """Batches of activations for this rank, with a state that resumes the stream exactly."""

    def __init__(
        self, cfg: TrainConfig, world: World, loaded=None, buffer_tokens: int | None = None
    ):
        from hooks.buffer import MixingBuffer

        self.cfg, self.world = cfg, world
        self.from_cache = cfg.cache is not None
        # None: as a fresh run derives it; a resume hands in the recorded value
        self.buffer_tokens = buffer_tokens or derive(cfg, schedule_free=False).buffer_tokens
        if self.from_cache:
            from hooks.cache import ActivationCache

            self.cache = ActivationCache(Path(cfg.cache))
            for site in cfg.capture_sites():
                self.cache.check(site=site)
            self.d_in = int(self.cache.manifest["d_model"])
            self.local_batch = cfg.batch  # every rank draws the global batch and keeps a slice
        else:
            self.loaded = loaded
            self.d_in = loaded.d_model
            if cfg.batch % world.size:
                raise UserError(f"--batch {cfg.batch} must divide evenly over {world.size} ranks.")
            self.local_batch = cfg.batch // world.size
        # A live run captures only the rows it will train on: once they are all in the buffer
        # the model stops and the buffer serves what it holds, instead of capturing a last
        # buffer-full that is never used (a cache is cheap to read, so it keeps streaming).
        self.rows_needed = math.ceil(cfg.tokens / cfg.batch) * self.local_batch
        self.captured = 0  # live rows handed to the buffer so far
        # From a cache all ranks draw the same global batches; live ranks mix their own rows.
        seed = cfg.seed if self.from_cache else cfg.seed + 7919 * world.rank
        self.buffer = MixingBuffer(self._source(0), self.buffer_tokens, self.local_batch, seed)

    def _source(self, cursor: int):
        if self.from_cache:
            return self.cache.iter_shards(
                self.cfg.seed, start=cursor, epochs=None, sites=self.cfg.capture_sites()
            )
        return self._live(cursor)

    def _live(self, cursor: int):
        from hooks.activations import live_rows

        cfg, world = self.cfg, self.world

        def epochs():
            for epoch in itertools.count():
                if epoch:
                    print(
                        f"[saewb] the text ran out; starting pass {epoch + 1} over it",
                        file=sys.stderr,
                    )
                yield from cfg.selection.windows(self.loaded.tokenizer, "train")

        mine = itertools.islice(epochs(), world.rank, None, world.size)  # this rank's share
        rows = live_rows(
            self.loaded,
            cfg.capture_sites(),
            itertools.islice(mine, cursor, None),
            cfg.model_batch,
            cfg.selection.capture,
        )
        if self.captured >= self.rows_needed:
            return
        for consumed, batch in rows:
            self.captured += len(batch)
            yield cursor + consumed, batch
            if self.captured >= self.rows_needed:
                return

    def __iter__(self):
        for batch in self.buffer:
            if self.from_cache and self.world.size > 1:
                share = self.cfg.batch // self.world.size
                lo = self.world.rank * share
                hi = len(batch) if self.world.rank == self.world.size - 1 else lo + share
                batch = batch.select(slice(lo, hi))
            yield batch

    def state(self) -> tuple[dict, dict]:
        state = self.buffer.state_dict()
        tensors = {f"pool.{k}": v.contiguous() for k, v in state.pop("pool").items()}
        tensors["rng"] = state.pop("rng")
        state["captured"] = self.captured
        return tensors, state

    def load(self, tensors: dict, meta: dict) -> None:
        pool = {k.removeprefix("pool."): v for k, v in tensors.items() if k.startswith("pool.")}
        self.buffer.load_state_dict(
            {**meta, "pool": pool, "rng": tensors["rng"]}, self.cfg.capture_sites()
        )
        self.captured = int(meta.get("captured", 0))
        if not self.from_cache and self.captured < self.rows_needed:
            self.buffer.exhausted = False  # an extended live run captures the rows it now needs
        self.buffer.source = self._source(self.buffer.cursor)
