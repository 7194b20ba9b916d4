"""The feature store's streaming pass: `saewb analyze RUN` reads held-out windows once and keeps,
per latent, everything a feature page shows (analysis/store.py writes and reads the store).

Per batch of windows the model runs to the SAE's site (early exit), the SAE encodes every token
into k (latent, activation) pairs, and `FeatureAccumulator.update` folds those sparse codes into
fixed-size per-latent state, all vectorised over the batch's E = B*T*k entries:

  density, mean, max   index_add / scatter_reduce over the entries
  histogram            H equal-width bins on [0, 2^e_f], where 2^e_f is the smallest power of two
                       >= the latent's max so far. When the max outgrows it, e_f rises and bins
                       merge exactly (bin i -> i >> shift): fixed bins, one pass, no second read.
  top-K examples       (n, K) best values, slots unsorted; the batch's best token per (latent,
                       window) joins a topk over [kept, candidates] and takes the slots it wins
                       (at most one example per window, so no two contexts overlap). The context's
                       per-token activations are gathered from the batch's codes when an example
                       enters, and only then.
  interval samples     10 bins on the same [0, 2^e_f] grid x 5 examples: each active token gets a
                       seeded hash key, and a bin keeps its 5 smallest keys, which is a uniform
                       sample without replacement that merges exactly when bins merge and does not
                       depend on batch boundaries (so a resumed run equals an uninterrupted one).
  co-occurrence        over blocks of `cooc_block` tokens. A dense n x n count is 4 GiB at 32k
                       latents, so each latent keeps M = 32 candidate partners, chosen in the
                       first batch where it fires (the latents firing on the same tokens most
                       often, rarer ones first on ties), and counts exactly the blocks it shares
                       with them from then on. Jaccard = shared / (blocks_i + blocks_j - shared).

State is O(n_latents x (K + 50) x context) whatever the number of tokens; window tokens go to an
append-only file on disk. Checkpoints are one atomic safetensors file every `checkpoint_tokens`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import Tensor
from tqdm import tqdm

from analysis.run import Run, open_run
from hooks.errors import UserError
from hooks.paths import atomic_write_bytes

EMPTY_EXP = -(2**20)  # "no activation yet": below any float32 exponent
EMPTY_KEY = 2**62  # larger than any sample key
_PRIME = 2**31 - 1  # sample keys live in [0, 2^31); products stay below 2^62 in int64
FP16_MAX = 65504.0

STATE_DIR = "partial"  # RUN/features/partial: the resumable streaming state
STATE_FILE = "state.safetensors"
WINDOWS_FILE = "windows.bin"


@dataclass(frozen=True)
class StoreConfig:
    top_k: int = 20  # top activating examples per latent
    n_intervals: int = 10  # interval-sample bins ...
    per_interval: int = 5  # ... and examples per bin
    hist_bins: int = 50  # a multiple of n_intervals, so interval counts are sums of hist bins
    ctx_before: int = 24  # context tokens kept before an example's token ...
    ctx_after: int = 7  # ... and after it (32 in all, shifted to stay inside the window)
    cooc_block: int = 16  # tokens per co-occurrence block
    cooc_slots: int = 32  # candidate partners per latent whose shared blocks are counted
    seed: int = 0  # interval sampling

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise UserError(f"--top-k must be at least 1, got {self.top_k}.")
        if self.n_intervals < 1 or self.per_interval < 1 or self.hist_bins % self.n_intervals:
            raise UserError(
                f"hist_bins ({self.hist_bins}) must be a multiple of n_intervals "
                f"({self.n_intervals}), and both must be positive."
            )
        if self.cooc_block < 1 or self.cooc_slots < 1:
            raise UserError("cooc_block and cooc_slots must be at least 1.")


# -- small vectorised helpers ------------------------------------------------------------------


def ceil_log2(x: Tensor) -> Tensor:
    """Smallest integer e with x <= 2^e, exactly (x > 0)."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2^exponent, mantissa in [0.5, 1)
    return exponent - (mantissa == 0.5).to(exponent.dtype)


def bin_index(acts: Tensor, exp: Tensor, n_bins: int) -> Tensor:
    """Bin of each activation among n_bins equal bins on [0, 2^exp]. In float64 the scaling by a
    power of two and by n_bins is exact, so a brute-force numpy check gets the same bins."""
    scaled = torch.ldexp(acts.double(), -exp.double()) * n_bins
    return scaled.floor().long().clamp_(0, n_bins - 1)


def sample_keys(token_id: Tensor, latent: Tensor, seed: int) -> Tensor:
    """A pseudo-random key in [0, 2^31) per (global token id, latent): the interval reservoirs keep
    the smallest keys. A hash rather than an RNG stream, so keys do not depend on batching."""
    h = (
        (token_id % _PRIME) * 1_103_515_245 + (latent % _PRIME) * 12_345 + seed * 2_654_435
    ) % _PRIME
    for mult in (0x5BD1E995, 0x27D4EB2F, 0x165667B1):  # odd multipliers < 2^31: no overflow
        h = h ^ (h >> 15)
        h = (h * mult) % _PRIME
    return h ^ (h >> 13)


def rank_in_runs(x: Tensor) -> Tensor:
    """For x sorted along its last dim: each element's rank among the equal values before it."""
    pos = torch.arange(x.shape[-1], device=x.device).expand_as(x)
    change = torch.ones_like(x, dtype=torch.bool)
    change[..., 1:] = x[..., 1:] != x[..., :-1]
    start = torch.where(change, pos, torch.zeros_like(pos)).cummax(dim=-1).values
    return pos - start


def lexsort(*keys: Tensor) -> Tensor:
    """Indices that sort by keys[0], then keys[1], ... (stable sorts, least significant first)."""
    order = torch.arange(keys[0].shape[0], device=keys[0].device)
    for key in reversed(keys):
        order = order[key[order].argsort(stable=True)]
    return order


# -- the streaming state -----------------------------------------------------------------------

_STATE = (
    "count", "act_sum", "act_max", "exp", "hist",
    "top_val", "top_win", "top_pos", "top_ctx",
    "iv_key", "iv_val", "iv_win", "iv_pos", "iv_ctx",
    "blk_count", "cand", "cand_count", "cand_from", "cand_partner_from",
)  # fmt: skip


class _Lookup:
    """The batch's codes sorted by (latent, window slot, position), to read one latent's per-token
    activations over a context window when one of its examples enters the state."""

    def __init__(self, b: Tensor, t: Tensor, f: Tensor, a: Tensor, T: int, B: int):
        keys = (f * B + b) * T + t  # unique: a token's k latents are distinct
        order = keys.argsort()
        self.keys, self.t, self.acts, self.T, self.B = keys[order], t[order], a[order], T, B

    def context(self, latent: Tensor, slot: Tensor, start: Tensor, C: int) -> Tensor:
        """(Q, C) activations of `latent` at positions start..start+C-1 of window `slot`."""
        # The entries of one (latent, window) are one run of the sorted keys: two searches per
        # query instead of one per context token.
        base = (latent * self.B + slot) * self.T
        lo = torch.searchsorted(self.keys, base + start)
        hi = torch.searchsorted(self.keys, base + start + C)
        q = torch.arange(len(lo), device=lo.device).repeat_interleave(hi - lo)
        e = torch.arange(len(q), device=lo.device) - (hi - lo).cumsum(0)[q] + hi[q]  # entry ids
        out = torch.zeros(len(lo), C, device=lo.device)
        out[q, self.t[e] - start[q]] = self.acts[e]
        return out.clamp_(max=FP16_MAX).half()  # display values; exact maxima are kept in fp32


class FeatureAccumulator:
    """Fixed-size per-latent statistics, fed one batch of sparse codes at a time."""

    def __init__(
        self,
        n_latents: int,
        context: int,
        cfg: StoreConfig | None = None,
        device: str | torch.device = "cpu",
    ):
        self.cfg = cfg = cfg or StoreConfig()
        self.n, self.T, self.device = n_latents, context, torch.device(device)
        self.C = min(cfg.ctx_before + 1 + cfg.ctx_after, context)  # context tokens per example
        n, K, C, M = n_latents, cfg.top_k, self.C, cfg.cooc_slots
        NB, P, H = cfg.n_intervals, cfg.per_interval, cfg.hist_bins
        i64, i32 = torch.int64, torch.int32

        def full(shape, value, dtype):
            return torch.full(shape, value, dtype=dtype, device=self.device)

        self.n_tokens = 0  # tokens kept (not special, not position 0): the density denominator
        self.n_windows = 0
        self.n_blocks = 0  # co-occurrence blocks holding at least one kept token
        self.count = full((n,), 0, i64)  # active tokens per latent
        self.act_sum = full((n,), 0, torch.float64)
        self.act_max = full((n,), 0, torch.float32)
        self.exp = full((n,), EMPTY_EXP, i32)  # histogram and intervals span [0, 2^exp]
        self.hist = full((n, H), 0, i64)
        self.top_val = full((n, K), 0, torch.float32)  # sorted descending; 0 = empty slot
        self.top_win = full((n, K), -1, i64)  # window number in this pass
        self.top_pos = full((n, K), 0, i32)  # token position in the window
        self.top_ctx = full((n, K, C), 0, torch.float16)
        self.iv_key = full((n, NB, P), EMPTY_KEY, i64)  # sorted ascending within a bin
        self.iv_val = full((n, NB, P), 0, torch.float32)
        self.iv_win = full((n, NB, P), -1, i64)
        self.iv_pos = full((n, NB, P), 0, i32)
        self.iv_ctx = full((n, NB, P, C), 0, torch.float16)
        self.blk_count = full((n,), 0, i64)  # blocks where the latent fires
        # int32 halves the (pairs, M) gathers of _cooc; counts overflow only after ~34B tokens
        self.cand = full((n, M), -1, i32)  # candidate co-occurring latents, -1 = free slot
        self.cand_count = full((n, M), 0, i32)  # blocks shared since the candidate was added
        self.cand_from = full((n, M), 0, i64)  # the latent's block count when it was added
        self.cand_partner_from = full((n, M), 0, i64)  # ... and the partner's
        self._fired: Tensor | None = None  # scratch table for _cooc

    # -- one batch ---------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, acts: Tensor, idx: Tensor, keep: Tensor, window_ids: Tensor) -> None:
        """Fold in B windows: acts, idx (B, T, k) sparse codes; keep (B, T) bool marks the tokens
        that count; window_ids (B,) their numbers in the pass (distinct, increasing)."""
        B, T, _ = acts.shape
        if T != self.T:
            raise ValueError(f"windows of {T} tokens, but the accumulator was built for {self.T}")
        keep = keep.to(self.device)
        window_ids = window_ids.to(self.device, torch.int64)
        self.n_tokens += int(keep.sum())
        self.n_windows += B
        active = (acts > 0) & keep[..., None]
        b, t, s = active.nonzero(as_tuple=True)  # E active entries
        f = idx[b, t, s].long()  # (E,) latent
        a = acts[b, t, s].float()  # (E,) activation
        self._count_blocks(keep)
        if f.numel() == 0:
            return
        self._stats(f, a)
        lookup = _Lookup(b, t, f, a, T, B)
        self._top(b, t, f, a, window_ids, lookup, B)
        self._intervals(b, t, f, a, window_ids, lookup)
        self._cooc(b, t, f, B)

    def _stats(self, f: Tensor, a: Tensor) -> None:
        self.count.index_add_(0, f, torch.ones_like(f))
        self.act_sum.index_add_(0, f, a.double())
        self.act_max.scatter_reduce_(0, f, a, "amax")
        exp = torch.where(self.act_max > 0, ceil_log2(self.act_max), EMPTY_EXP).to(torch.int32)
        grown = (self.exp != EMPTY_EXP) & (exp > self.exp)
        if grown.any():
            self._rebin(grown.nonzero().squeeze(1), exp)
        self.exp = exp
        H = self.cfg.hist_bins
        self.hist.view(-1).index_add_(0, f * H + bin_index(a, self.exp[f], H), torch.ones_like(f))

    def _rebin(self, F: Tensor, exp: Tensor) -> None:
        """Latents F outgrew [0, 2^exp]: double the range (maybe several times) and merge bins."""
        H, NB, P, C = self.cfg.hist_bins, self.cfg.n_intervals, self.cfg.per_interval, self.C
        shift = (exp[F] - self.exp[F]).long().clamp_(max=40)  # (F,)
        dest = torch.arange(H, device=self.device)[None] >> shift[:, None]  # (F, H)
        self.hist[F] = torch.zeros_like(self.hist[F]).scatter_add_(1, dest, self.hist[F])
        # Interval reservoirs: re-bin the kept samples; a new bin keeps its P smallest keys, which
        # is exact because every old bin kept its own P smallest.
        key = self.iv_key[F].view(len(F), NB * P)
        bins = bin_index(self.iv_val[F].view(len(F), NB * P), exp[F][:, None], NB)
        bins = torch.where(key == EMPTY_KEY, NB, bins)  # empty slots sort last and are dropped
        order = key.argsort(dim=1, stable=True)
        order = order.gather(1, bins.gather(1, order).argsort(dim=1, stable=True))
        bins = bins.gather(1, order)
        rank = rank_in_runs(bins)
        ok = (bins < NB) & (rank < P)
        rows = torch.arange(len(F), device=self.device)[:, None].expand_as(bins)[ok]
        dest = (bins * P + rank)[ok]
        for name, empty in (("iv_key", EMPTY_KEY), ("iv_val", 0), ("iv_win", -1), ("iv_pos", 0)):
            old = getattr(self, name)[F].view(len(F), NB * P).gather(1, order)
            new = torch.full_like(old, empty)
            new[rows, dest] = old[ok]
            getattr(self, name)[F] = new.view(len(F), NB, P)
        old = self.iv_ctx[F].view(len(F), NB * P, C).gather(1, order[..., None].expand(-1, -1, C))
        new = torch.zeros_like(old)
        new[rows, dest] = old[ok]
        self.iv_ctx[F] = new.view(len(F), NB, P, C)

    def _context_start(self, pos: Tensor) -> Tensor:
        """First context position: ctx_before tokens back, shifted to stay inside the window."""
        return (pos.long() - self.cfg.ctx_before).clamp(0, self.T - self.C)

    def _top(self, b, t, f, a, window_ids, lookup: _Lookup, B: int) -> None:
        K, C = self.cfg.top_k, self.C
        sel = a > self.top_val.amin(1)[f]  # only entries that beat the weakest kept example
        if not sel.any():
            return
        b, t, f, a = b[sel], t[sel], f[sel], a[sel]
        # The best token of each (latent, window): at most one example per window.
        group = f * B + b
        order = lexsort(group, -a)
        first = rank_in_runs(group[order]) == 0
        b, t, f, a = (x[order][first] for x in (b, t, f, a))
        # Per latent: its K kept examples next to one candidate per window slot, (F, K + B).
        # Padding is -1, below an empty slot's 0, so only real candidates ever win a slot.
        latents, row = torch.unique(f, return_inverse=True)
        cand_val = torch.full((len(latents), B), -1.0, device=self.device)
        cand_pos = torch.zeros(len(latents), B, dtype=torch.int32, device=self.device)
        cand_val[row, b], cand_pos[row, b] = a, t.int()
        val, j = torch.cat([self.top_val[latents], cand_val], 1).topk(K, dim=1)  # (F, K)
        (rn, cn), slots = self._replaced(j, K)
        lat, slot, pos = latents[rn], j[rn, cn] - K, cand_pos[rn, j[rn, cn] - K]
        self.top_val[lat, slots] = val[rn, cn]
        self.top_win[lat, slots] = window_ids[slot]
        self.top_pos[lat, slots] = pos
        self.top_ctx[lat, slots] = lookup.context(lat, slot, self._context_start(pos), C)

    @staticmethod
    def _replaced(j: Tensor, width: int) -> tuple[tuple[Tensor, Tensor], Tensor]:
        """After a topk over cat([kept (F, width), candidates], 1) that picked columns j (F, width):
        the winning candidates (row, column of j) and, aligned with them, the kept slots they
        replace. Slots stay unsorted, so only replaced slots are written (contexts included)."""
        kept = torch.zeros(j.shape, dtype=torch.bool, device=j.device)
        r, c = (j < width).nonzero(as_tuple=True)
        kept[r, j[r, c]] = True
        # Both lists are row-major with as many entries per row, so they pair up in order.
        return (j >= width).nonzero(as_tuple=True), (~kept).nonzero(as_tuple=True)[1]

    def _intervals(self, b, t, f, a, window_ids, lookup: _Lookup) -> None:
        NB, P, C = self.cfg.n_intervals, self.cfg.per_interval, self.C
        group = f * NB + bin_index(a, self.exp[f], NB)  # (E,) reservoir of each entry
        key = sample_keys(window_ids[b] * self.T + t, f, self.cfg.seed)
        keys = self.iv_key.view(-1, P)  # (n * NB, P), unsorted
        sel = key < keys[group].amax(1)  # beats the reservoir's largest kept key
        if not sel.any():
            return
        b, t, f, a, group, key = (x[sel] for x in (b, t, f, a, group, key))
        order = lexsort(group, key)
        b, t, f, a, group, key = (x[order] for x in (b, t, f, a, group, key))
        rank = rank_in_runs(group)
        few = rank < P  # at most P per reservoir can enter
        b, t, f, a, group, key, rank = (x[few] for x in (b, t, f, a, group, key, rank))
        groups, row = torch.unique(group, return_inverse=True)
        # Padding above EMPTY_KEY, so that only real candidates ever win a slot.
        cand_key = torch.full(
            (len(groups), P), EMPTY_KEY + 1, dtype=torch.int64, device=self.device
        )
        cand_key[row, rank] = key
        entry = torch.zeros_like(cand_key)  # which entry each candidate column holds
        entry[row, rank] = torch.arange(len(key), device=self.device)
        merged, j = torch.cat([keys[groups], cand_key], 1).topk(P, dim=1, largest=False)
        (rn, cn), slots = self._replaced(j, P)
        e = entry[rn, j[rn, cn] - P]
        flat = groups[rn] * P + slots  # reservoir slot, in the (n * NB * P) layout
        self.iv_key.view(-1)[flat] = key[e]
        self.iv_val.view(-1)[flat] = a[e]
        self.iv_win.view(-1)[flat] = window_ids[b[e]]
        self.iv_pos.view(-1)[flat] = t[e].int()
        ctx = lookup.context(f[e], b[e], self._context_start(t[e]), C)
        self.iv_ctx.view(-1, C)[flat] = ctx

    def _count_blocks(self, keep: Tensor) -> None:
        B, T, size = keep.shape[0], self.T, self.cfg.cooc_block
        n_blk = -(-T // size)
        padded = torch.zeros(B, n_blk * size, dtype=torch.bool, device=self.device)
        padded[:, :T] = keep
        self.n_blocks += int(padded.view(B, n_blk, size).any(-1).sum())

    def _cooc(self, b, t, f, B: int) -> None:
        n, size = self.n, self.cfg.cooc_block
        n_blk = -(-self.T // size)
        NBk = B * n_blk  # blocks in this batch
        self._add_candidates(b * self.T + t, f, B * self.T)
        pairs = torch.unique(f * NBk + b * n_blk + t // size)  # distinct (latent, block)
        pf, pb = pairs // NBk, pairs % NBk
        self.blk_count.index_add_(0, pf, torch.ones_like(pf))
        # Count shared blocks with each candidate: a (blocks, n) table of who fired where, kept
        # between batches and cleared entry by entry (cheaper than zeroing it every batch).
        if self._fired is None or self._fired.shape[0] < NBk:
            self._fired = torch.zeros(NBk, n, dtype=torch.bool, device=self.device)
        self._fired[pb, pf] = True
        cand = self.cand[pf]  # (pairs, M)
        where = (pb * n)[:, None] + cand.clamp(min=0)  # flat index: faster than 2-d indexing
        hit = self._fired.view(-1)[where] & (cand >= 0)
        self._fired[pb, pf] = False
        self.cand_count.index_add_(0, pf, hit.int())

    def _add_candidates(self, token: Tensor, f: Tensor, n_tokens: int) -> None:
        """Latents with free candidate slots take the latents that fire on the same tokens as
        they do in this batch: most shared tokens first, then rarer partners (only a partner of
        similar density can reach a high Jaccard). Proposing from tokens rather than blocks costs
        k per entry instead of the block's whole active set (~512 per entry at k=32, 16 tokens)."""
        M, n = self.cfg.cooc_slots, self.n
        need = self.cand[f, M - 1] < 0  # slots fill left to right: the last one marks "full"
        if not need.any():
            return
        members = f[token.argsort(stable=True)]  # latents of each token, token after token
        per_token = torch.bincount(token, minlength=n_tokens)
        starts = per_token.cumsum(0) - per_token
        qf, qt = f[need], token[need]
        lens = per_token[qt]
        owner = qf.repeat_interleave(lens)
        offset = torch.arange(int(lens.sum()), device=self.device)
        offset -= (lens.cumsum(0) - lens).repeat_interleave(lens)
        partner = members[starts[qt].repeat_interleave(lens) + offset]
        mine = partner != owner
        pairs, shared = torch.unique(owner[mine] * n + partner[mine], return_counts=True)
        o, j = pairs // n, pairs % n
        # Sort by owner, most shared first, rarer partner first, lower id: two int64 keys.
        owner_key = o * 2**32 + (2**32 - 1 - shared)
        partner_key = self.blk_count[j].clamp(max=2**31 - 1) * 2**31 + j
        order = lexsort(owner_key, partner_key)
        o, j = o[order], j[order]
        # An owner's best M proposals hold at most M - free partners it already has, so its free
        # slots are filled from them: test membership on those only.
        best = rank_in_runs(o) < M
        o, j = o[best], j[best]
        fresh = ~(self.cand[o] == j[:, None]).any(1)
        o, j = o[fresh], j[fresh]
        slot = (self.cand[o] >= 0).sum(1) + rank_in_runs(o)
        ok = slot < M
        o, j, slot = o[ok], j[ok], slot[ok]
        self.cand[o, slot] = j.int()
        self.cand_count[o, slot] = 0
        self.cand_from[o, slot] = self.blk_count[o]  # this batch's blocks are counted next
        self.cand_partner_from[o, slot] = self.blk_count[j]

    # -- results -----------------------------------------------------------------------------

    @torch.no_grad()
    def cooccurrence(self, top: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(ids, jaccard, shared blocks, exact), each (n, top), best first; ids -1 where none.

        A pair's count covers the blocks since the candidate was added. Before that the latent
        fired in `cand_from` blocks and the partner in `cand_partner_from`, so the blocks they
        shared then lie in [0, min of the two]: the count is exact when either is 0 (a candidate
        taken in the latent's first batch, or one that had never fired). Either side of a pair may
        hold the other, and both bounds hold, so they are intersected. When they do not meet, the
        shared count is extrapolated at the rate seen since the add and kept inside them, so it
        never exceeds either latent's blocks and the Jaccard stays in [0, 1]."""
        n, M = self.cand.shape
        bi = self.blk_count[:, None].double()  # (n, 1)
        valid = self.cand >= 0
        j = self.cand.clamp(min=0).long()  # (n, M)
        bj = self.blk_count[j].double()
        count = self.cand_count.double()
        gap = torch.minimum(self.cand_from, self.cand_partner_from).double()
        lo, hi = count, count + gap  # bounds from the latent's own count
        # The partner's count of this pair, where the partner holds the latent too.
        rev = (self.cand[j] == torch.arange(n, device=j.device)[:, None, None]) & valid[..., None]
        has_rev, r = rev.any(2), rev.int().argmax(2)  # (n, M)
        r_count = self.cand_count[j, r].double()
        r_gap = torch.minimum(self.cand_from[j, r], self.cand_partner_from[j, r]).double()
        lo = torch.where(has_rev, torch.maximum(lo, r_count), lo)
        hi = torch.where(has_rev, torch.minimum(hi, r_count + r_gap), hi)
        # Extrapolate from the side whose count covers more blocks (the smaller gap).
        seen = (bi - self.cand_from).clamp(min=1)
        est = count + self.cand_from * count / seen
        r_seen = (bj - self.cand_from[j, r]).clamp(min=1)
        r_est = r_count + self.cand_from[j, r] * r_count / r_seen
        est = torch.where(has_rev & (r_gap < gap), r_est, est)
        shared = torch.minimum(torch.maximum(est, lo), hi)
        union = (bi + bj - shared).clamp(min=1)
        jaccard = torch.where(valid & (shared > 0), shared / union, -1.0)
        top = min(top, M)
        jac, best = jaccard.topk(top, dim=1)
        ids = torch.where(jac > 0, self.cand.gather(1, best).long(), -1)
        exact = (lo == hi).gather(1, best) & (ids >= 0)
        return (
            ids.cpu(),
            jac.clamp(min=0).float().cpu(),
            shared.gather(1, best).round().long().cpu(),
            exact.cpu(),
        )

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, Tensor], dict]:
        tensors = {name: getattr(self, name).contiguous().cpu() for name in _STATE}
        meta = dict(
            n_latents=self.n,
            context=self.T,
            config=asdict(self.cfg),
            n_tokens=self.n_tokens,
            n_windows=self.n_windows,
            n_blocks=self.n_blocks,
        )
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, Tensor], meta: dict) -> None:
        missing = [name for name in _STATE if name not in tensors]
        if missing:
            raise UserError(
                f"The analyze checkpoint lacks {', '.join(missing)} (an older format); delete it "
                "and run again."
            )
        for name in _STATE:
            getattr(self, name).copy_(tensors[name])
        self.n_tokens, self.n_windows = meta["n_tokens"], meta["n_windows"]
        self.n_blocks = meta["n_blocks"]


# -- window tokens on disk ---------------------------------------------------------------------


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


# -- geometry that needs no data ----------------------------------------------------------------


def final_norm_gain(model: torch.nn.Module, d: int) -> tuple[Tensor, bool]:
    """(gain (d,), centred) of the final norm before the unembedding.

    Like sae_vis on TransformerLens (which folds ln_final's weight into W_U, and centres W_U for
    LayerNorm models), the logit effect of a direction v is (centre(v) * gain) @ W_U^T. The 1/rms
    scale depends on the input, so it is left out: it rescales all logits of a token alike."""
    from hooks.sites import base_model

    base = base_model(model)
    for path in ("norm", "ln_f", "final_layer_norm", "final_layernorm", "decoder.final_layer_norm"):
        module = base
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, torch.nn.Module):
            weight = getattr(module, "weight", None)
            gain = torch.ones(d) if weight is None else weight.detach().float().cpu()
            if "gemma" in type(module).__name__.lower():
                gain = 1 + gain  # Gemma's RMSNorm scales by (1 + weight)
            return gain, isinstance(module, torch.nn.LayerNorm)
    return torch.ones(d), False


@torch.no_grad()
def logit_effects(
    W_dec: Tensor, model: torch.nn.Module, top: int = 10, chunk: int = 256
) -> dict[str, Tensor] | None:
    """Top and bottom `top` tokens of W_dec[f] . W_U per latent (ids and values, each (n, top)),
    in chunks of latents so the (chunk, vocab) logits stay small. None if the site's width is
    not the model's (e.g. a raw module path inside an MLP)."""
    head = model.get_output_embeddings()
    if head is None or head.weight.shape[1] != W_dec.shape[1]:
        return None
    dirs = W_dec.detach().float()  # on the SAE's device: ~2 TFLOP at 32k latents x 49k tokens
    W_U = head.weight.detach().to(dirs.device, torch.float32)  # (V, d)
    gain, centred = final_norm_gain(model, W_dec.shape[1])
    if centred:
        dirs = dirs - dirs.mean(1, keepdim=True)
    dirs = dirs * gain.to(dirs.device)
    top = min(top, W_U.shape[0])
    out = {k: [] for k in ("top_ids", "top_values", "bottom_ids", "bottom_values")}
    for start in range(0, len(dirs), chunk):
        logits = dirs[start : start + chunk] @ W_U.T  # (chunk, V)
        hi, lo = logits.topk(top, dim=1), logits.topk(top, dim=1, largest=False)
        out["top_ids"].append(hi.indices)
        out["top_values"].append(hi.values)
        out["bottom_ids"].append(lo.indices)
        out["bottom_values"].append(lo.values)
    return {k: torch.cat(v).cpu() for k, v in out.items()}


@torch.no_grad()
def decoder_neighbours(W_dec: Tensor, top: int = 10, chunk: int = 512) -> tuple[Tensor, Tensor]:
    """(ids, cosines), each (n, top): nearest other latents by decoder cosine, in row chunks so the
    (chunk, n) similarities stay small (never the n x n matrix)."""
    W = W_dec.detach().float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)
    n = W.shape[0]
    top = min(top, n - 1)
    ids, cos = [], []
    for start in range(0, n, chunk):
        sims = W[start : start + chunk] @ W.T  # (chunk, n)
        rows = torch.arange(sims.shape[0], device=W.device)
        sims[rows, rows + start] = -torch.inf  # not yourself
        best = sims.topk(top, dim=1)
        ids.append(best.indices.cpu())
        cos.append(best.values.cpu())
    return torch.cat(ids), torch.cat(cos)


def token_strings(tokenizer, vocab_size: int) -> list[str]:
    """Display string of every token id (ids past the tokenizer's vocabulary: '<id>')."""
    known = min(len(tokenizer), vocab_size)
    strings = tokenizer.batch_decode([[i] for i in range(known)])
    return strings + [f"<{i}>" for i in range(known, vocab_size)]


# -- the pass ----------------------------------------------------------------------------------


@torch.no_grad()
def encode_codes(
    sae, x: Tensor, dtype: torch.dtype | None = None, W_T: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(acts, idx), each (N, k): the SAE's sparse code of raw x (N, d).

    With dtype=bf16 the top-k search over all latents runs in bf16 (2.8x faster than fp32 on a
    CPU with AMX at 32k latents) and the chosen latents' activations are then recomputed in fp32
    (k dot products per token, not n), so the values are exact; only latents tied with the k-th
    place up to bf16 rounding can differ. W_T: W_enc transposed and contiguous, (n, d)."""
    enc = sae.encode(x, dtype=dtype)
    if dtype in (None, torch.float32):
        return enc.top_acts, enc.top_idx
    idx = enc.top_idx
    xs = x.float() * sae.input_scale - sae.b_dec  # (N, d), centred as in encode
    W_T = sae.W_enc.T if W_T is None else W_T
    acts = torch.empty(idx.shape, device=x.device)
    for lo in range(0, len(x), 256):  # (256, k, d) gathered rows at a time
        rows = W_T[idx[lo : lo + 256]]
        pre = torch.bmm(rows, xs[lo : lo + 256, :, None]).squeeze(-1)
        acts[lo : lo + 256] = pre + sae.b_enc[idx[lo : lo + 256]]
    acts.relu_()
    if sae.cfg.architecture == "batchtopk" and float(sae.threshold) > 0:
        acts *= acts > sae.threshold  # inference as JumpReLU, as in TopKSAE.encode
    return acts, idx


def weights_file(run_path: Path) -> Path:
    """The run's SAE weights file (native or SAELens name)."""
    for name in ("sae.safetensors", "sae_weights.safetensors"):
        if (Path(run_path) / name).is_file():
            return Path(run_path) / name
    raise UserError(f"{run_path} holds no SAE weights (sae.safetensors); run `saewb train` first.")


def weights_sha256(run_path: Path) -> str:
    """sha256 of the run's SAE weights file: what a store is tied to."""
    h = hashlib.sha256()
    with open(weights_file(run_path), "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _save_state(partial: Path, acc: FeatureAccumulator, log: WindowLog, extra: dict) -> None:
    tensors, meta = acc.state_dict()
    meta |= dict(extra, windows_written=log.sync())
    data = safetensors.torch.save(tensors, metadata={"meta": json.dumps(meta)})
    atomic_write_bytes(partial / STATE_FILE, data)


def _load_state(partial: Path) -> tuple[dict[str, Tensor], dict]:
    path = partial / STATE_FILE
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["meta"])
        return safetensors.torch.load_file(path), meta
    except Exception as e:  # unreadable or foreign: one sentence, not a traceback
        raise UserError(f"{path} is not a readable analyze checkpoint ({e}); delete it.") from None


def analyze(
    run: Run,
    n_tokens: int,
    top_k: int = 20,
    batch_windows: int = 16,
    resume: bool = False,
    loaded=None,
    windows: Iterable | None = None,
    device: str = "cpu",
    checkpoint_tokens: int = 1_000_000,
    config: StoreConfig | None = None,
    encode_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Path:
    """Stream `n_tokens` held-out tokens through the model and the run's SAE, and write the store
    to RUN/features/. `loaded` reuses a LoadedModel; `windows` replaces the held-out windows
    (benchmarks); a killed pass continues with resume=True and gives the same store.
    encode_dtype=torch.bfloat16 searches the top-k in bf16 (see encode_codes)."""
    from analysis.store import write_store
    from hooks.sites import Capture, resolve_site, special_token_ids
    from hooks.windows import batched, stack

    if n_tokens <= 0:
        raise UserError(f"--tokens must be a positive number of tokens, got {n_tokens}.")
    if batch_windows < 1:
        raise UserError(f"--batch must be at least 1 window, got {batch_windows}.")
    cfg = config or StoreConfig(top_k=top_k)
    out = run.path / "features"
    partial = out / STATE_DIR
    sha = weights_sha256(run.path)
    dtype_name = str(encode_dtype or torch.float32).removeprefix("torch.")
    saved = None
    if resume:
        if not (partial / STATE_FILE).exists():
            raise UserError(f"{out} holds no partial analysis to resume; run without --resume.")
        tensors, meta = _load_state(partial)
        if meta.get("sae_sha256") != sha:
            raise UserError(
                f"The partial analysis in {partial} was made for another SAE (weights sha256 "
                f"{str(meta.get('sae_sha256'))[:12]}, now {sha[:12]}); delete it and run again."
            )
        if meta["config"] != asdict(cfg):
            raise UserError(
                f"The partial analysis in {partial} used other settings ({meta['config']}); "
                "resume with the same --top-k, or delete it and run again."
            )
        if meta.get("encode_dtype") != dtype_name:
            raise UserError(
                f"The partial analysis in {partial} encoded in {meta.get('encode_dtype')}, not "
                f"{dtype_name}; resume with the same --dtype."
            )
        saved = tensors, meta
    elif (partial / STATE_FILE).exists():
        raise UserError(
            f"{out} holds a partial analysis; pass --resume to continue it, or delete {partial} "
            "to start over."
        )
    elif partial.exists():
        shutil.rmtree(partial)  # a pass killed before its first checkpoint

    sae = run.sae.to(device).eval()
    loaded = loaded or run.load_model(device, progress=progress)
    model = loaded.model
    site = resolve_site(model, run.site).name
    d_model = int(getattr(model.config, "hidden_size", sae.cfg.d_in))
    if run.site.startswith(("resid", "mlp_out", "attn_out")) and d_model != sae.cfg.d_in:
        raise UserError(
            f"The SAE takes {sae.cfg.d_in}-dim inputs, but {loaded.name} has width {d_model} at "
            f"{run.site}; the run's model and SAE do not match."
        )
    special = special_token_ids(loaded.tokenizer)
    W_T = sae.W_enc.detach().T.contiguous() if encode_dtype not in (None, torch.float32) else None
    T = run.selection.context_size
    acc = FeatureAccumulator(sae.cfg.n_latents, T, cfg, device)
    log = WindowLog(partial / WINDOWS_FILE, T)
    if saved is not None:
        acc.load_state_dict(*saved)
        log.truncate(saved[1]["windows_written"])
    extra = dict(sae_sha256=sha, site=run.site, model=run.model, encode_dtype=dtype_name)

    stream = windows if windows is not None else run.heldout_windows(loaded.tokenizer)
    stream = itertools.islice(stream, acc.n_windows, None)  # skip what the checkpoint holds
    next_checkpoint = (acc.n_tokens // checkpoint_tokens + 1) * checkpoint_tokens
    started, tokens_at_start = time.perf_counter(), acc.n_tokens
    bar = tqdm(
        total=n_tokens,
        initial=min(acc.n_tokens, n_tokens),
        unit="tok",
        unit_scale=True,
        disable=not progress,
        desc="analyze",
        dynamic_ncols=True,
    )
    try:
        with bar, Capture(model, [site]) as capture, torch.no_grad():
            batches = batched(stream, batch_windows) if acc.n_tokens < n_tokens else []
            for batch in batches:
                tokens, doc, pos = stack(batch)  # (B, T)
                if tokens.shape[1] != T:
                    raise UserError(f"Windows of {tokens.shape[1]} tokens, but the run uses {T}.")
                x = capture(tokens.to(device))[site]  # (B, T, d)
                B = x.shape[0]
                keep = run.selection.capture.keep(tokens, special, [x]).to(device)  # (B, T)
                acts, idx = encode_codes(sae, x.reshape(B * T, -1).float(), encode_dtype, W_T)
                ids = torch.arange(acc.n_windows, acc.n_windows + B)
                before = acc.n_tokens
                acc.update(acts.view(B, T, -1), idx.view(B, T, -1), keep, ids)
                log.append(tokens, doc, pos, [w.index for w in batch])
                bar.update(min(acc.n_tokens, n_tokens) - min(before, n_tokens))
                if acc.n_tokens >= n_tokens:
                    break
                if acc.n_tokens >= next_checkpoint:
                    _save_state(partial, acc, log, extra)
                    next_checkpoint += checkpoint_tokens
        if acc.n_tokens == 0:
            raise UserError(
                f"The held-out text of {run.path} ({run.selection.dataset}) gave no windows of {T} tokens; "
                "use a run trained on more text."
            )
        seconds = time.perf_counter() - started
        if acc.n_tokens < n_tokens:
            print(
                f"[saewb] the held-out text ran out after {acc.n_tokens:,} of the {n_tokens:,} "
                "tokens asked for; the store covers those.",
                file=sys.stderr,
            )
        if acc.n_tokens > tokens_at_start:  # a kill while writing the store resumes from here
            _save_state(partial, acc, log, extra)
        manifest = dict(
            extra,
            sae_file=weights_file(run.path).name,
            selection=run.selection.to_dict(),
            stream_seconds=seconds,
            stream_tokens_per_s=(acc.n_tokens - tokens_at_start) / max(seconds, 1e-9),
        )
        write_store(out, acc, log, sae, model, loaded.tokenizer, manifest, progress=progress)
    finally:
        log.close()
    shutil.rmtree(partial, ignore_errors=True)
    return out


# -- command line (wired into sae/cli.py) -------------------------------------------------------


def add_analyze_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze", help="build the feature store: examples, histograms, logits, neighbours"
    )
    p.add_argument("run", help="run directory with a trained SAE")
    p.add_argument("--tokens", default="1M", help="held-out tokens to stream (e.g. 500k, 2M)")
    p.add_argument("--top-k", type=int, default=20, help="top activating examples per latent")
    p.add_argument("--batch", type=int, default=16, help="windows per model forward")
    p.add_argument("--resume", action="store_true", help="continue a killed analyze exactly")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16"],
        help="top-k search dtype; bf16 is ~3x faster on CPUs with AMX, values stay fp32",
    )
    p.add_argument("--checkpoint-every", default="1M", help="tokens between checkpoints")


def cmd_analyze(args: argparse.Namespace) -> None:
    from hooks.models import parse_device
    from sae.cli import parse_count

    n_tokens = parse_count(args.tokens)
    every = parse_count(args.checkpoint_every, "--checkpoint-every")
    run = open_run(args.run, device="cpu")
    parse_device(args.device)
    started = time.perf_counter()
    out = analyze(
        run,
        n_tokens,
        top_k=args.top_k,
        batch_windows=args.batch,
        resume=args.resume,
        device=args.device,
        checkpoint_tokens=every,
        encode_dtype=torch.bfloat16 if args.dtype == "bf16" else None,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"feature store  {out}")
    print(f"tokens         {manifest['n_tokens']:,} held-out ({manifest['n_windows']:,} windows)")
    print(f"latents        {manifest['n_latents']:,}, dead {manifest['dead_fraction']:.3f}")
    print(f"took           {time.perf_counter() - started:.1f} s")
