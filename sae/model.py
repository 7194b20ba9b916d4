"""The TopK sparse autoencoder (and its BatchTopK variant).

    z      = ReLU(TopK(((x * s) - b_dec) @ W_enc + b_enc))       (N, k) values + indices
    x_hat  = (z @ W_dec + b_dec) / s

`s` is one input scale, estimated from the first batches so that E||x * s||^2 = d_in, which makes
the learning rate independent of the site's norm. At save time it is folded into the weights
(W_enc * s, W_dec / s, b_dec / s), so a saved SAE takes raw activations like any other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hooks.errors import UserError
from sae.kernels import normalize_rows_, project_out_rows_, sparse_decode, topk_encode

ARCHITECTURES = ("topk", "batchtopk")


@dataclass
class SAEConfig:
    d_in: int
    n_latents: int
    k: int
    architecture: str = "topk"
    k_aux: int | None = None  # latents in the AuxK loss; None: d_in // 2, as in Gao et al.
    aux_alpha: float = 1 / 32
    multi_topk: bool = False  # add FVU(4k) / 8 to the loss
    model: str = ""  # where the activations came from
    site: str = ""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise UserError(
                f"Unknown SAE architecture '{self.architecture}'; use one of {ARCHITECTURES}."
            )
        if self.d_in <= 0 or self.n_latents <= 0:
            raise UserError(
                f"d_in and n_latents must be positive, got {self.d_in} and {self.n_latents}."
            )
        if not 0 < self.k <= self.n_latents:
            raise UserError(
                f"k must be between 1 and the number of latents ({self.n_latents}), got {self.k}."
            )
        if self.k_aux is None:
            self.k_aux = min(self.d_in // 2, self.n_latents)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SAEConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


Reduce = Callable[[Tensor], Tensor]


def variance(x: Tensor, reduce: Reduce | None = None) -> Tensor:
    """sum ||x - mean x||^2 over the rows of x (N, d), and over all ranks when `reduce` sums.

    Computed from float64 sums so that ranks can add their parts before subtracting.
    """
    xd = x.detach().double()
    flat = xd.reshape(-1)
    stats = torch.cat(
        [
            torch.dot(flat, flat).view(1),  # one pass, no (N, d) temporary of squares
            xd.sum(0),
            # a fill, not new_tensor: copying a host list to the GPU waits for the GPU
            torch.full((1,), x.shape[0], dtype=torch.float64, device=x.device),
        ]
    )
    if reduce is not None:
        stats = reduce(stats)
    total = stats[0] - stats[1:-1].pow(2).sum() / stats[-1].clamp_min(1)
    return total.to(x.dtype)


class ForwardOutput(NamedTuple):
    recon: Tensor  # (N, d_in), in the input's units
    fvu: Tensor  # scalar: sum ||x - x_hat||^2 / sum ||x - mean x||^2
    aux_loss: Tensor  # scalar, AuxK (0 when no latent is dead)
    multi_topk_fvu: Tensor  # scalar (0 unless multi_topk)
    top_acts: Tensor  # (N, k)
    top_idx: Tensor  # (N, k)


class TopKSAE(nn.Module):
    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu"):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_in, cfg.n_latents
        self.W_enc = nn.Parameter(torch.empty(d, n, device=device))
        self.b_enc = nn.Parameter(torch.zeros(n, device=device))
        self.W_dec = nn.Parameter(torch.empty(n, d, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device))
        self.register_buffer("input_scale", torch.ones((), device=device))
        # BatchTopK's inference threshold: an EMA of the smallest activation kept in training.
        self.register_buffer("threshold", torch.zeros((), device=device))
        self.threshold_lr = 0.01  # the EMA rate; the trainer shortens it for short runs
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Tied init: unit-norm random decoder rows, W_enc = W_dec^T."""
        W = torch.randn(self.W_dec.shape, generator=generator, device="cpu")
        W /= W.norm(dim=1, keepdim=True)
        self.W_dec.copy_(W)
        self.W_enc.copy_(W.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # -- the forward pass ------------------------------------------------------------------

    def encode(
        self,
        x: Tensor,
        dead_mask: Tensor | None = None,
        k_aux: int = 0,
        k: int | None = None,
        encode_dtype: torch.dtype | None = None,
    ):
        """(top_acts, top_indices, aux...) for raw x (N, d_in). `encode_dtype` (bf16) runs the matmul
        and top-k search in that dtype; the activations come back in the weights' dtype.

        A trained BatchTopK SAE encodes at inference like the JumpReLU it exports as: the
        activations above its threshold, at most 4k per token.
        """
        xs = x.to(self.W_enc.dtype) * self.input_scale  # (N, d); the kernel subtracts b_dec
        return self._encode_scaled(xs, dead_mask, k_aux, k, encode_dtype)

    def _encode_scaled(self, xs, dead_mask=None, k_aux=0, k=None, encode_dtype=None):
        jumprelu = self.cfg.architecture == "batchtopk" and not self.training and k is None
        params = dict(b_dec=self.b_dec, encode_dtype=encode_dtype)
        if jumprelu and float(self.threshold) > 0:
            k_max = min(4 * self.cfg.k, self.cfg.n_latents)
            enc = topk_encode(xs, self.W_enc, self.b_enc, k_max, **params)
            acts = enc.top_acts * (enc.top_acts > self.threshold)  # (N, 4k), zeros below
            return enc._replace(top_acts=acts)
        k = k or self.cfg.k
        return topk_encode(xs, self.W_enc, self.b_enc, k, dead_mask, k_aux, **params)

    def decode(self, top_acts: Tensor, top_idx: Tensor) -> Tensor:
        """Reconstruction in the input's units, (N, d_in)."""
        return (self._decode_scaled(top_acts, top_idx) + self.b_dec) / self.input_scale

    def _decode_scaled(self, top_acts: Tensor, top_idx: Tensor) -> Tensor:
        return sparse_decode(top_acts.to(self.W_dec.dtype), top_idx, self.W_dec)

    def forward(
        self,
        x: Tensor,
        dead_mask: Tensor | None = None,
        encode_dtype: torch.dtype | None = None,
        reduce: Reduce | None = None,
        n_dead: int | None = None,
        gather: Reduce | None = None,
    ) -> ForwardOutput:
        """Reconstruction and losses for raw x (N, d_in).

        `encode_dtype` (bf16) runs the encoder's matmul and top-k search in that dtype, as autocast
        would; the decoder, the losses and every gradient stay in the weights' precision.
        `reduce` sums statistics over data-parallel ranks, so that every rank divides by the
        variance of the global batch and the ranks' summed gradients equal one process's.
        `gather` (every rank's 1-D tensor, concatenated) lets BatchTopK take its cutoff over the
        global batch; it needs `reduce` too.
        `n_dead`, when the caller already knows it, is dead_mask.sum(): reading it here would
        wait for the GPU.
        """
        cfg = self.cfg
        xs = x.to(self.W_enc.dtype) * self.input_scale  # (N, d)
        total_variance = variance(xs, reduce)
        if dead_mask is not None and n_dead is None:
            n_dead = int(dead_mask.sum())  # a host sync on CUDA
        use_aux = dead_mask is not None and n_dead > 0
        batch_topk = cfg.architecture == "batchtopk" and self.training
        # Multi-TopK and BatchTopK both start from each token's 4k largest candidates.
        k_cand = min(4 * cfg.k, cfg.n_latents) if cfg.multi_topk or batch_topk else cfg.k
        if cfg.architecture == "batchtopk" and not self.training:
            k_cand = None  # inference: the JumpReLU threshold (see encode)
        n_dead = n_dead if use_aux else 0
        # With no more dead latents than k_aux, AuxK selects all of them: two small dense GEMMs
        # over the dead columns beat sparse bookkeeping of k_aux entries per token.
        sparse_aux = use_aux and n_dead > cfg.k_aux
        aux = (dead_mask, cfg.k_aux) if sparse_aux else (None, 0)
        enc = self._encode_scaled(xs, *aux, k=k_cand, encode_dtype=encode_dtype)
        acts, idx = enc.top_acts, enc.top_idx  # (N, k_cand)
        multi_fvu = xs.new_zeros(())
        if cfg.multi_topk and self.training:
            # FVU of the top 4k too (Gao et al.), so that latents beyond the top k also learn.
            multi = self._decode_scaled(acts, idx) + self.b_dec
            multi_fvu = F.mse_loss(multi, xs, reduction="sum") / total_variance
        if batch_topk:
            acts = self._batch_topk(acts, reduce, gather)  # k * N over the global batch, zeros else
        elif k_cand is not None and k_cand > cfg.k:
            order = acts.topk(cfg.k, dim=1).indices
            acts, idx = acts.gather(1, order), idx.gather(1, order)  # (N, k)
        recon_s = self._decode_scaled(acts, idx) + self.b_dec  # (N, d), scaled units
        # one fused pass each way, no (N, d) error and square temporaries
        fvu = F.mse_loss(recon_s, xs, reduction="sum") / total_variance
        aux_loss = xs.new_zeros(())
        if use_aux:
            # AuxK: the dead latents model the residual. b_dec is deliberately not added (it is
            # already in recon_s; sparsify issue 132 counted it twice).
            residual = xs - recon_s.detach()
            if sparse_aux:
                aux_recon = self._decode_scaled(enc.aux_acts, enc.aux_idx)
            else:
                if dead_mask.is_cuda:  # the count is known: no wait for the GPU
                    dead = torch.nonzero_static(dead_mask, size=n_dead).squeeze(1)
                else:
                    dead = dead_mask.nonzero().squeeze(1)  # (n_dead,)
                W_dead = self.W_enc[:, dead]  # (d, n_dead)
                # (xs - b_dec) @ W with b_dec folded into the bias: no (N, d) pass either way
                bias = self.b_enc[dead] - self.b_dec @ W_dead  # (n_dead,)
                pre = torch.addmm(bias, xs, W_dead)  # (N, n_dead)
                aux_recon = pre.relu() @ self.W_dec[dead]  # (N, d)
            scale = min(n_dead / cfg.k_aux, 1.0)
            aux_var = variance(residual, reduce).clamp_min(1e-12)
            aux_loss = scale * F.mse_loss(aux_recon, residual, reduction="sum") / aux_var
        return ForwardOutput(recon_s / self.input_scale, fvu, aux_loss, multi_fvu, acts, idx)

    def _batch_topk(
        self, acts: Tensor, reduce: Reduce | None = None, gather: Reduce | None = None
    ) -> Tensor:
        """Keep the k*N largest activations of the (global) batch, zeros elsewhere, and track
        the smallest kept one as the threshold for inference.

        Under data parallelism each rank sends its own k*N_global largest values (padded with
        -inf): the global k*N-th value is among them, so the cutoff is exactly one process's.
        """
        with torch.no_grad():
            flat = acts.detach().flatten()  # (N * k_cand,)
            keep = self.cfg.k * acts.shape[0]
            total = flat.numel()
            if gather is not None:
                counts = reduce(acts.new_tensor([acts.shape[0], flat.numel()], dtype=torch.int64))
                rows, total = (int(c) for c in counts.tolist())  # one host sync
                keep = self.cfg.k * rows
                mine = flat.topk(min(keep, flat.numel()), sorted=False).values
                padded = flat.new_full((keep,), -math.inf)
                padded[: mine.numel()] = mine
                candidates = gather(padded)  # (world * keep,), the global top keep among them
            else:
                candidates = flat
            cutoff = candidates.topk(keep, sorted=False).values.min() if keep < total else None
            # The smallest kept positive value, by masks rather than indexing: no host sync.
            kept = candidates > 0 if cutoff is None else (candidates >= cutoff) & (candidates > 0)
            low = torch.where(kept, candidates, math.inf).min().to(self.threshold.dtype)
            rate = self.threshold_lr
            moved = torch.where(self.threshold == 0, low, (1 - rate) * self.threshold + rate * low)
            self.threshold.copy_(torch.where(torch.isfinite(low), moved, self.threshold))
        return acts if cutoff is None else acts * (acts >= cutoff)

    # -- constraints and folding ---------------------------------------------------------

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        normalize_rows_(self.W_dec)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out the part of each row's gradient along the (unit) row: it only changes norms."""
        if self.W_dec.grad is None:
            return
        project_out_rows_(self.W_dec.grad, self.W_dec)

    @torch.no_grad()
    def init_from_sample(self, x: Tensor, reduce: Reduce | None = None) -> None:
        """Input scale s with E||x s||^2 = d_in, and b_dec at the (scaled) mean, from a sample
        of raw activations (N, d_in), pooled over ranks when `reduce` sums."""
        stats = torch.cat(
            [
                x.double().pow(2).sum().view(1),
                x.double().sum(0),
                x.new_tensor([x.shape[0]], dtype=torch.float64),
            ]
        )
        if reduce is not None:
            stats = reduce(stats)
        count = stats[-1].clamp_min(1)
        mean_sq = float(stats[0] / count)
        scale = math.sqrt(self.cfg.d_in / max(mean_sq, 1e-12))
        self.input_scale.fill_(scale)
        self.b_dec.copy_((stats[1:-1] / count * scale).to(self.b_dec.dtype))

    @torch.no_grad()
    def folded_state(self) -> dict[str, Tensor]:
        """Weights that take raw activations: the input scale folded in (acts are unchanged)."""
        s = self.input_scale
        state = {
            "W_enc": self.W_enc * s,
            "b_enc": self.b_enc.clone(),
            "W_dec": self.W_dec / s,
            "b_dec": self.b_dec / s,
        }
        if self.cfg.architecture == "batchtopk":
            state["threshold"] = self.threshold.expand(self.cfg.n_latents).clone()
        return {k: v.detach().contiguous() for k, v in state.items()}

    @torch.no_grad()
    def load_folded(self, state: dict[str, Tensor]) -> None:
        """Load weights saved by folded_state (input scale 1)."""
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            expected = getattr(self, name).shape
            if state[name].shape != expected:
                raise UserError(
                    f"Weight {name} has shape {tuple(state[name].shape)}, but the config says "
                    f"{tuple(expected)} (d_in {self.cfg.d_in}, {self.cfg.n_latents} latents)."
                )
            getattr(self, name).copy_(state[name])
        self.input_scale.fill_(1.0)
        if "threshold" in state:
            self.threshold.copy_(state["threshold"].float().mean())
