"""The window tokens of an analyze pass on disk: an append-only file the store writer reads back."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from torch import Tensor


class WindowLog:
    """Append-only int32 file: per window its T tokens, T document ids, T document offsets and its
    index in the window stream. Examples refer to windows by number; the store writer reads their
    tokens back from here, so memory never grows with the number of tokens."""

    def __init__(self, path: Path, context: int):
        self.path, self.T = Path(path), context
        self.width = 3 * context + 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")

    def __len__(self) -> int:
        self._file.flush()
        return self.path.stat().st_size // (4 * self.width)

    def append(self, tokens: Tensor, doc: Tensor, pos: Tensor, index: list[int]) -> None:
        """tokens, doc, pos (B, T); index: each window's number in its stream."""
        rows = np.empty((len(index), self.width), dtype=np.int32)
        rows[:, : self.T] = tokens.numpy()
        rows[:, self.T : 2 * self.T] = doc.numpy()
        rows[:, 2 * self.T : 3 * self.T] = pos.numpy()
        rows[:, -1] = index
        self._file.write(rows.tobytes())

    def sync(self) -> int:
        """Flush to disk; the number of windows written."""
        self._file.flush()
        os.fsync(self._file.fileno())
        return len(self)

    def truncate(self, n_windows: int) -> None:
        """Drop windows written after the checkpoint a resume starts from."""
        self._file.flush()
        self._file.truncate(n_windows * 4 * self.width)

    def close(self) -> None:
        self._file.close()

    def read(self, windows: np.ndarray) -> dict[str, np.ndarray]:
        """tokens, doc, pos (m, T) and index (m,) of the given window numbers."""
        self._file.flush()
        table = np.memmap(self.path, dtype=np.int32, mode="r").reshape(-1, self.width)
        rows = np.asarray(table[np.asarray(windows, dtype=np.int64)])
        T = self.T
        return dict(
            tokens=rows[:, :T],
            doc=rows[:, T : 2 * T],
            pos=rows[:, 2 * T : 3 * T],
            index=rows[:, -1],
        )
