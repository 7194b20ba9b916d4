"""From windows of text to rows of activations: the live source that buffers and caches consume.

A row is one kept token: its activation at every requested site, plus its token id and
provenance (window index, document id, offset in the document).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from hooks.models import LoadedModel
from hooks.sites import Capture, outlier_mask, special_token_ids, token_mask
from hooks.windows import Window, batched, stack

META = ("token", "doc", "pos", "window")


@dataclass
class Rows:
    """Aligned rows: acts[site] is (R, d); token, doc, pos are (R,) int32 and window (R,) int64."""

    acts: dict[str, torch.Tensor]
    token: torch.Tensor
    doc: torch.Tensor
    pos: torch.Tensor
    window: torch.Tensor

    def __len__(self) -> int:
        return int(self.token.shape[0])

    def select(self, index: torch.Tensor | slice) -> Rows:
        return Rows(
            acts={s: a[index] for s, a in self.acts.items()},
            **{m: getattr(self, m)[index] for m in META},
        )

    @staticmethod
    def cat(parts: list[Rows]) -> Rows:
        return Rows(
            acts={s: torch.cat([p.acts[s] for p in parts]) for s in parts[0].acts},
            **{m: torch.cat([getattr(p, m) for p in parts]) for m in META},
        )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.acts, **{m: getattr(self, m) for m in META}}

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor], sites: list[str]) -> Rows:
        return Rows(acts={s: tensors[s] for s in sites}, **{m: tensors[m] for m in META})


@dataclass
class CaptureOptions:
    """Which tokens become rows."""

    drop_special: bool = True  # BOS/EOS/PAD tokens
    drop_first: bool = True  # position 0, an attention sink in SmolLM2
    outlier_factor: float | None = None  # drop tokens with norm > factor x median norm

    def keep(
        self,
        tokens: torch.Tensor,
        special_ids: frozenset[int],
        acts: Iterable[torch.Tensor] = (),
    ) -> torch.Tensor:
        """Which (B, T) positions become data. `acts` are the (B, T, d) activations the outlier
        rule looks at (each site's own median); without them only the token rules apply."""
        keep = token_mask(
            tokens,
            special_ids=special_ids if self.drop_special else frozenset(),
            drop_first=self.drop_first,
        )
        if not self.drop_first:  # position 0 is kept whatever its token (BOS, when prepended)
            keep[:, 0] = True
        if self.outlier_factor:
            for site_acts in acts:  # norms where the activations are; only the mask moves
                site_keep = keep.to(site_acts.device)
                keep &= outlier_mask(site_acts, site_keep, self.outlier_factor).to(keep.device)
        return keep


def window_rows(
    capture: Capture,
    batch: list[Window],
    special_ids: frozenset[int],
    options: CaptureOptions,
    dtype: torch.dtype,
) -> Rows:
    """Run one batch of windows through the model and keep the selected tokens' activations."""
    tokens, doc, pos = stack(batch)  # (B, T) each
    device = next(capture.model.parameters()).device
    acts = capture(tokens.to(device))  # {site: (B, T, d)}
    keep = options.keep(tokens, special_ids, acts.values())  # (B, T) on the CPU
    windows = torch.tensor([w.index for w in batch], dtype=torch.int64)[:, None].expand_as(tokens)
    keep_dev = keep.to(device)
    return Rows(
        acts={s: a[keep_dev].to("cpu", dtype) for s, a in acts.items()},  # (R, d)
        token=tokens[keep].to(torch.int32),
        doc=doc[keep],
        pos=pos[keep],
        window=windows[keep],
    )


def live_rows(
    loaded: LoadedModel,
    sites: list[str],
    windows: Iterable[Window],
    batch_windows: int = 8,
    options: CaptureOptions | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[int, Rows]]:
    """Yield (windows consumed so far, rows) for each batch of windows, with early exit."""
    options = options or CaptureOptions()
    special = special_token_ids(loaded.tokenizer)
    consumed = 0
    with Capture(loaded.model, sites) as capture:
        for batch in batched(windows, batch_windows):
            consumed += len(batch)
            yield consumed, window_rows(capture, batch, special, options, dtype)
