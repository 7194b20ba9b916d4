"""The feature store's streaming statistics: `FeatureAccumulator.update` folds one batch of sparse
codes into fixed-size per-latent state, all vectorised over the batch's E active entries (of the
B*T*K slots; K is the code's width, and slots holding 0, the padding of jumprelu and relu, or a
ReLU'd top-k slot, are not entries):

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
  co-occurrence        over blocks of `cooc_block` tokens, M = 32 candidate partners per latent
                       (cooccur.py).

State is O(n_latents x (K + 50) x context) whatever the number of tokens; `state_dict` is what a
checkpoint holds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from analysis.store.cooccur import STATE as COOC_STATE
from analysis.store.cooccur import Cooccurrence
from analysis.store.ops import (
    EMPTY_EXP,
    EMPTY_KEY,
    bin_index,
    ceil_log2,
    lexsort,
    rank_in_runs,
    sample_keys,
)
from hooks.errors import UserError

FP16_MAX = 65504.0


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


_STATE = (
    "count", "act_sum", "act_max", "exp", "hist",
    "top_val", "top_win", "top_pos", "top_ctx",
    "iv_key", "iv_val", "iv_win", "iv_pos", "iv_ctx",
)  # fmt: skip


class _Lookup:
    """The batch's codes sorted by (latent, window slot, position), to read one latent's per-token
    activations over a context window when one of its examples enters the state."""

    def __init__(self, b: Tensor, t: Tensor, f: Tensor, a: Tensor, T: int, B: int):
        keys = (f * B + b) * T + t  # unique: a token's active latents are distinct
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
        n, K, C = n_latents, cfg.top_k, self.C
        NB, P, H = cfg.n_intervals, cfg.per_interval, cfg.hist_bins
        i64, i32 = torch.int64, torch.int32

        def full(shape, value, dtype):
            return torch.full(shape, value, dtype=dtype, device=self.device)

        self.n_tokens = 0  # tokens kept (not special, not position 0): the density denominator
        self.n_windows = 0
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
        self.cooc = Cooccurrence(n, context, cfg.cooc_block, cfg.cooc_slots, self.device)

    # -- one batch ---------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, acts: Tensor, idx: Tensor, keep: Tensor, window_ids: Tensor) -> None:
        """Fold in B windows: acts, idx (B, T, K) sparse codes (a token's nonzero slots hold
        distinct latents; zeros are not activity); keep (B, T) bool marks the tokens that count;
        window_ids (B,) their numbers in the pass (distinct, increasing)."""
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
        self.cooc.count_blocks(keep)
        if f.numel() == 0:
            return
        self._stats(f, a)
        lookup = _Lookup(b, t, f, a, T, B)
        self._top(b, t, f, a, window_ids, lookup, B)
        self._intervals(b, t, f, a, window_ids, lookup)
        self.cooc.update(b, t, f, B)

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

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, Tensor], dict]:
        tensors = {name: getattr(self, name).contiguous().cpu() for name in _STATE}
        tensors |= {name: getattr(self.cooc, name).contiguous().cpu() for name in COOC_STATE}
        meta = dict(
            n_latents=self.n,
            context=self.T,
            config=asdict(self.cfg),
            n_tokens=self.n_tokens,
            n_windows=self.n_windows,
            n_blocks=self.cooc.n_blocks,
        )
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, Tensor], meta: dict) -> None:
        missing = [name for name in _STATE + COOC_STATE if name not in tensors]
        if missing:
            raise UserError(
                f"The analyze checkpoint lacks {', '.join(missing)} (an older format); delete it "
                "and run again."
            )
        for name in _STATE:
            getattr(self, name).copy_(tensors[name])
        for name in COOC_STATE:
            getattr(self.cooc, name).copy_(tensors[name])
        self.n_tokens, self.n_windows = meta["n_tokens"], meta["n_windows"]
        self.cooc.n_blocks = meta["n_blocks"]
