"""Co-occurrence in the feature store: which latents fire in the same blocks of tokens.

A dense n x n count is 4 GiB at 32k latents, so each latent keeps M candidate partners, chosen in
the batches where it fires while it has free slots (the latents firing on the same tokens most
often, rarer ones first on ties), and counts exactly the blocks it shares with each from then on.
Jaccard = shared / (blocks_i + blocks_j - shared); `partners` says which counts saw every block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from analysis.store.ops import lexsort, rank_in_runs

STATE = ("blk_count", "cand", "cand_count", "cand_from", "cand_partner_from")


class Cooccurrence:
    """Per latent: its block count and M candidate partners with their shared-block counts."""

    def __init__(self, n_latents: int, context: int, block: int, slots: int, device: torch.device):
        self.n, self.T, self.size, self.M, self.device = n_latents, context, block, slots, device
        n, M, i64, i32 = n_latents, slots, torch.int64, torch.int32
        self.n_blocks = 0  # blocks holding at least one kept token
        self.blk_count = torch.zeros(n, dtype=i64, device=device)  # blocks where the latent fires
        # int32 halves the (pairs, M) gathers of update; counts overflow only after ~34B tokens
        self.cand = torch.full((n, M), -1, dtype=i32, device=device)  # partners, -1 = free slot
        self.cand_count = torch.zeros(n, M, dtype=i32, device=device)  # shared since the add
        self.cand_from = torch.zeros(n, M, dtype=i64, device=device)  # latent's blocks at the add
        self.cand_partner_from = torch.zeros(n, M, dtype=i64, device=device)  # ... the partner's
        self._fired: Tensor | None = None  # scratch (blocks, n) table for update

    def count_blocks(self, keep: Tensor) -> None:
        """keep (B, T): blocks holding at least one kept token, the denominator of phi."""
        B, T, size = keep.shape[0], self.T, self.size
        n_blk = -(-T // size)
        padded = torch.zeros(B, n_blk * size, dtype=torch.bool, device=self.device)
        padded[:, :T] = keep
        self.n_blocks += int(padded.view(B, n_blk, size).any(-1).sum())

    def update(self, b: Tensor, t: Tensor, f: Tensor, B: int) -> None:
        """Fold in a batch of B windows' active entries: window slot b, position t, latent f (E,)."""
        n, size = self.n, self.size
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
        M, n = self.M, self.n
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

    @torch.no_grad()
    def partners(self, top: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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
