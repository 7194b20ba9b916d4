"""The sparse autoencoders and transcoders the trainer learns, one module for every kind.

    pre    = ((x * s) - b_dec) @ W_enc + b_enc                              (N, n), chunk by chunk
    z      = topk       ReLU(TopK_k(pre))                                   (N, k) values + indices
             batchtopk  ReLU of the k * N largest of the batch (inference: > one threshold)
             matryoshka batchtopk, with every prefix of the dictionary reconstructing on its own
             jumprelu   pre * H(pre - theta), theta (n,) trained by a straight-through estimator
             relu       ReLU(pre), with an L1 penalty weighted by the decoder rows' norms
    x_hat  = (z @ W_dec + b_dec) / s

`s` is one input scale, estimated from the first batches so that E||x * s||^2 = d_in, which makes
the learning rate independent of the site's norm. At save time it is folded into the weights
(W_enc * s, W_dec / s, b_dec / s), so a saved SAE takes raw activations like any other.

A transcoder reads one site and predicts another (`target`): its input is not centred by b_dec,
the output has its own scale s_out and width d_out, and an optional linear skip connection adds
(x * s) @ W_skip. For jumprelu and relu, k is the target L0, which a coefficient controller on
the sparsity penalty reaches (see `update_sparsity_coefficient`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hooks.errors import UserError
from sae.config import BATCH_KINDS, THRESHOLD_KINDS, SAEConfig
from sae.kernels import (
    EncodeResult,
    decode_kept,
    fixed_width,
    normalize_rows_,
    project_out_rows_,
    sparse_decode,
    threshold_encode,
    topk_encode,
)
from sae.sparsity import INITIAL_SPARSITY, batch_topk, control_sparsity, rate_cut
from sae.statistics import Reduce, scale_and_mean, variance


class ForwardOutput(NamedTuple):
    recon: Tensor  # (N, d_out), in the target's units
    fvu: Tensor  # scalar: sum ||y - y_hat||^2 / sum ||y - mean y||^2 (y = x for an SAE)
    loss: Tensor  # scalar: what the trainer minimises (fvu plus the kind's terms below)
    aux_loss: Tensor  # scalar, AuxK (0 when no latent is dead), or JumpReLU's pre-act loss
    multi_topk_fvu: Tensor  # scalar (0 unless multi_topk)
    prefix_fvu: Tensor  # scalar: matryoshka's summed FVU of the prefixes short of the full one
    sparsity_loss: Tensor  # scalar: lambda * L0 (jumprelu) or lambda * weighted L1 (relu)
    top_acts: Tensor  # (N, K): K = k for topk, 4k candidates for the batch kinds, varies else
    top_idx: Tensor  # (N, K)


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu"):
        super().__init__()
        self.cfg = cfg
        d, n, d_out = cfg.d_in, cfg.n_latents, cfg.d_out
        self.W_enc = nn.Parameter(torch.empty(d, n, device=device))
        self.b_enc = nn.Parameter(torch.zeros(n, device=device))
        self.W_dec = nn.Parameter(torch.empty(n, d_out, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_out, device=device))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(d, d_out, device=device))
        if cfg.architecture == "jumprelu":
            # fp32 whatever the training dtype: theta's small steps would vanish in bf16
            self.log_threshold = nn.Parameter(torch.zeros(n, device=device, dtype=torch.float32))
        self.register_buffer("input_scale", torch.ones((), device=device))
        if cfg.is_transcoder:
            self.register_buffer("output_scale", torch.ones((), device=device))
        if cfg.architecture != "jumprelu":
            # BatchTopK's inference threshold: an EMA of the smallest activation kept in
            # training (0, unused, for topk and relu)
            self.register_buffer("threshold", torch.zeros((), device=device))
        if cfg.architecture in THRESHOLD_KINDS:
            # lambda, moved by update_sparsity_coefficient; a buffer, so checkpoints keep it
            coefficient = torch.full((), INITIAL_SPARSITY / cfg.k, device=device)
            self.register_buffer("sparsity_coefficient", coefficient)
        self.threshold_lr = 0.01  # the EMA rate; the trainer shortens it for short runs
        # JumpReLU trains as TopK while this is set: the trainer's warm-up, after which
        # cut_like_batch_topk sets the thresholds from the warmed-up encoder
        self.warm_topk = False
        self.reset_parameters()

    @property
    def unit_decoder(self) -> bool:
        """Decoder rows are kept at unit norm, except ReLU's (its L1 weighs their norms)."""
        return self.cfg.architecture != "relu"

    @property
    def out_scale(self) -> Tensor:
        return self.output_scale if self.cfg.is_transcoder else self.input_scale

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows, W_enc = W_dec^T (tied) where the widths match."""
        W = torch.randn(self.W_dec.shape, generator=generator, device="cpu")
        W /= W.norm(dim=1, keepdim=True)
        self.W_dec.copy_(W)
        if self.cfg.d_out == self.cfg.d_in:
            self.W_enc.copy_(W.T)
        else:
            V = torch.randn(self.W_enc.shape[::-1], generator=generator, device="cpu")
            self.W_enc.copy_((V / V.norm(dim=1, keepdim=True)).T)
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.cfg.skip:
            self.W_skip.zero_()
        if self.cfg.architecture == "jumprelu":
            self.log_threshold.fill_(math.log(0.1))  # init_from_sample sets it from data

    def latent_threshold(self) -> Tensor:
        """Each latent's inference threshold (n,) on the pre-activation (0 for topk and relu)."""
        arch, n = self.cfg.architecture, self.cfg.n_latents
        if arch == "jumprelu":
            return self.log_threshold.exp()
        if arch in BATCH_KINDS:
            return self.threshold.expand(n)
        return self.b_enc.new_zeros(n)

    # -- the forward pass ------------------------------------------------------------------

    def _scaled(self, x: Tensor) -> Tensor:
        return x.to(self.W_enc.dtype) * self.input_scale  # (N, d)

    def _centre(self) -> Tensor | None:
        """What the encoder subtracts from its scaled input: b_dec, or nothing for a transcoder."""
        return None if self.cfg.is_transcoder else self.b_dec

    def encode(
        self,
        x: Tensor,
        dead_mask: Tensor | None = None,
        k_aux: int = 0,
        k: int | None = None,
        encode_dtype: torch.dtype | None = None,
    ) -> EncodeResult:
        """(top_acts, top_indices, aux...) for raw x (N, d_in). `encode_dtype` (bf16) runs the matmul
        and top-k search in that dtype; the activations come back in the weights' dtype.

        At inference every kind but topk gives the latents above its threshold, at most 4k per
        token (cfg.inference_width, the largest first), as the JumpReLU SAE BatchTopK and
        Matryoshka export as; `reconstruct` decodes them all.
        """
        return self._encode_scaled(self._scaled(x), dead_mask, k_aux, k, encode_dtype)

    def _encode_scaled(self, xs, dead_mask=None, k_aux=0, k=None, encode_dtype=None):
        arch = self.cfg.architecture
        warm = self.warm_topk and self.training
        if (arch in THRESHOLD_KINDS and not warm) or (
            arch in BATCH_KINDS and not self.training and k is None
        ):
            enc = self._thresholded(xs, encode_dtype)
            width = self.cfg.inference_width
            return EncodeResult(*fixed_width(enc.acts, enc.idx, width), None, None)
        params = dict(b_dec=self._centre(), encode_dtype=encode_dtype)
        return topk_encode(xs, self.W_enc, self.b_enc, k or self.cfg.k, dead_mask, k_aux, **params)

    def _thresholded(self, xs: Tensor, encode_dtype: torch.dtype | None = None):
        """Every latent above its threshold, (N, K): how every kind but topk encodes at
        inference (a BatchTopK SAE as the JumpReLU it exports as)."""
        theta = self.latent_threshold().detach()
        params = dict(b_dec=self._centre(), encode_dtype=encode_dtype)
        return threshold_encode(xs, self.W_enc, self.b_enc, theta, **params)

    def decode(self, top_acts: Tensor, top_idx: Tensor, x: Tensor | None = None) -> Tensor:
        """Output in the target's units, (N, d_out). A skip connection needs the input x."""
        out = self._decode_scaled(top_acts, top_idx) + self.b_dec
        if self.cfg.skip:
            if x is None:
                raise ValueError("this transcoder has a skip connection: decode needs x")
            out = out + self._scaled(x) @ self.W_skip
        return out / self.out_scale

    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(y_hat (N, d_out) in the target's units, acts (N, K), idx (N, K)) for raw x (N, d_in).

        Exact for every kind: at inference the thresholded kinds decode every latent above its
        threshold, as SAELens's JumpReLU does, where `encode` keeps at most 4k per token for a
        fixed-width code."""
        if self.cfg.architecture != "topk" and not self.training:
            enc = self._thresholded(self._scaled(x))
            acts, idx = enc.acts, enc.idx
        else:
            enc = self.encode(x)
            acts, idx = enc.top_acts, enc.top_idx
        return self.decode(acts, idx, x), acts, idx

    def _decode_scaled(self, top_acts: Tensor, top_idx: Tensor, kept: Tensor | None = None):
        """(N, d_out) without b_dec; `kept` (N, K) limits the decode to those entries."""
        acts = top_acts.to(self.W_dec.dtype)
        if kept is not None:
            return decode_kept(acts, top_idx, kept, self.W_dec)
        return sparse_decode(acts, top_idx, self.W_dec)

    def forward(
        self,
        x: Tensor,
        dead_mask: Tensor | None = None,
        encode_dtype: torch.dtype | None = None,
        reduce: Reduce | None = None,
        n_dead: int | None = None,
        gather: Reduce | None = None,
        target: Tensor | None = None,
    ) -> ForwardOutput:
        """Reconstruction and losses for raw x (N, d_in), and a transcoder's raw target (N, d_out).

        `encode_dtype` (bf16) runs the encoder's matmul and top-k search in that dtype, as autocast
        would; the decoder, the losses and every gradient stay in the weights' precision.
        `reduce` sums statistics over data-parallel ranks, so that every rank divides by the
        variance of the global batch and the ranks' summed gradients equal one process's.
        `gather` (every rank's 1-D tensor, concatenated) lets BatchTopK take its cutoff over the
        global batch; it needs `reduce` too.
        `n_dead`, when the caller already knows it, is dead_mask.sum(): reading it here would
        wait for the GPU.
        """
        cfg, arch = self.cfg, self.cfg.architecture
        xs = self._scaled(x)  # (N, d)
        if cfg.is_transcoder:
            if target is None:
                raise ValueError("a transcoder's forward needs its target activations")
            ys = target.to(self.W_dec.dtype) * self.output_scale  # (N, d_out)
        else:
            ys = xs
        total_variance = variance(ys, reduce)
        if dead_mask is not None and n_dead is None:
            n_dead = int(dead_mask.sum())  # a host sync on CUDA
        use_dead = dead_mask is not None and n_dead > 0
        zero = xs.new_zeros(())
        skip = xs @ self.W_skip if cfg.skip else None  # (N, d_out)
        aux_loss = multi_fvu = prefix_fvu = sparsity_loss = zero
        kept = None  # the entries to decode, where only some of (N, K) are non-zero
        if arch in THRESHOLD_KINDS and not (self.warm_topk and self.training):
            acts, idx, sparsity_loss, aux_loss = self._threshold_forward(
                xs, dead_mask if use_dead else None, encode_dtype, reduce
            )
            use_dead = False  # no AuxK: JumpReLU's pre-act loss plays its part
            enc = None
        else:
            by_batch = arch in BATCH_KINDS and self.training
            # Multi-TopK and BatchTopK both start from each token's 4k largest candidates.
            k_cand = min(4 * cfg.k, cfg.n_latents) if cfg.multi_topk or by_batch else cfg.k
            if arch in BATCH_KINDS and not self.training:
                k_cand = None  # inference: the JumpReLU threshold (see encode)
            n_dead = n_dead if use_dead else 0
            # With no more dead latents than k_aux, AuxK selects all of them: two small dense
            # GEMMs over the dead columns beat sparse bookkeeping of k_aux entries per token.
            sparse_aux = use_dead and n_dead > cfg.k_aux
            aux = (dead_mask, cfg.k_aux) if sparse_aux else (None, 0)
            enc = self._encode_scaled(xs, *aux, k=k_cand, encode_dtype=encode_dtype)
            acts, idx = enc.top_acts, enc.top_idx  # (N, k_cand)
            if cfg.multi_topk and self.training:
                # FVU of the top 4k too (Gao et al.), so that latents beyond the top k also learn.
                multi = self._decode_scaled(acts, idx) + self.b_dec
                multi = multi if skip is None else multi + skip
                multi_fvu = F.mse_loss(multi, ys, reduction="sum") / total_variance
            if by_batch:
                acts = batch_topk(acts, cfg.k, self.threshold, self.threshold_lr, reduce, gather)
                kept = acts > 0  # (N, 4k): about k per token, so only these are decoded
            elif k_cand is not None and k_cand > cfg.k:
                order = acts.topk(cfg.k, dim=1).indices
                acts, idx = acts.gather(1, order), idx.gather(1, order)  # (N, k)
        base = self.b_dec if skip is None else skip + self.b_dec  # (N | 1, d_out)
        if arch == "matryoshka" and self.training:
            recon_s, prefix_fvu = self._matryoshka(acts, idx, kept, base, ys, total_variance)
        else:
            recon_s = self._decode_scaled(acts, idx, kept) + base  # (N, d_out), scaled units
        # one fused pass each way, no (N, d) error and square temporaries
        fvu = F.mse_loss(recon_s, ys, reduction="sum") / total_variance
        if use_dead:
            aux_loss = self._auxk(xs, ys, recon_s, enc, dead_mask, n_dead, sparse_aux, reduce)
        aux_weight = 1.0 if arch == "jumprelu" else cfg.aux_alpha  # pre_act_loss has its own
        loss = fvu + aux_weight * aux_loss + multi_fvu / 8 + prefix_fvu + sparsity_loss
        return ForwardOutput(
            recon_s / self.out_scale, fvu, loss, aux_loss, multi_fvu, prefix_fvu, sparsity_loss,
            acts, idx,
        )  # fmt: skip

    def _auxk(self, xs, ys, recon_s, enc, dead_mask, n_dead, sparse_aux, reduce) -> Tensor:
        """AuxK: the dead latents model the residual. b_dec is deliberately not added (it is
        already in recon_s; sparsify issue 132 counted it twice)."""
        residual = ys - recon_s.detach()
        if sparse_aux:
            aux_recon = self._decode_scaled(enc.aux_acts, enc.aux_idx)
        else:
            pre = self._dense_pre(xs, dead_mask, n_dead)[0]  # (N, n_dead)
            aux_recon = pre.relu() @ self.W_dec[self._dead(dead_mask, n_dead)]  # (N, d)
        scale = min(n_dead / self.cfg.k_aux, 1.0)
        aux_var = variance(residual, reduce).clamp_min(1e-12)
        return scale * F.mse_loss(aux_recon, residual, reduction="sum") / aux_var

    @staticmethod
    def _dead(dead_mask: Tensor, n_dead: int) -> Tensor:
        if dead_mask.is_cuda:  # the count is known: no wait for the GPU
            return torch.nonzero_static(dead_mask, size=n_dead).squeeze(1)
        return dead_mask.nonzero().squeeze(1)  # (n_dead,)

    def _dense_pre(self, xs: Tensor, dead_mask: Tensor, n_dead: int) -> tuple[Tensor, Tensor]:
        """(pre (N, n_dead), dead (n_dead,)): the dead latents' pre-activations, densely."""
        dead = self._dead(dead_mask, n_dead)
        W_dead = self.W_enc[:, dead]  # (d, n_dead)
        bias = self.b_enc[dead]
        if not self.cfg.is_transcoder:  # (xs - b_dec) @ W with b_dec folded into the bias
            bias = bias - self.b_dec @ W_dead  # (n_dead,)
        return torch.addmm(bias, xs, W_dead), dead

    def _threshold_forward(self, xs, dead_mask, encode_dtype, reduce):
        """(acts, idx, sparsity loss, pre-act loss) of jumprelu and relu in training.

        Both penalties are means over the global batch's tokens, as the FVU is a global ratio."""
        cfg = self.cfg
        rows = xs.new_tensor(float(xs.shape[0]))
        rows = reduce(rows) if reduce is not None else rows
        lam = self.sparsity_coefficient
        if cfg.architecture == "jumprelu":
            theta = self.latent_threshold()  # differentiable: the STE trains log theta
            enc = threshold_encode(
                xs, self.W_enc, self.b_enc, theta, cfg.bandwidth, b_dec=self._centre(),
                encode_dtype=encode_dtype,
            )  # fmt: skip
            sparsity = lam * enc.step.sum() / rows  # lambda * L0
            pre_act = xs.new_zeros(())
            if dead_mask is not None and cfg.pre_act_loss > 0:
                # dead latents are pulled towards their threshold (SAELens's pre_act_loss)
                pre, dead = self._dense_pre(xs, dead_mask, int(dead_mask.sum()))
                gap = (theta[dead] - pre).relu()  # (N, n_dead)
                pre_act = cfg.pre_act_loss * gap.sum() / rows
            return enc.acts, enc.idx, sparsity, pre_act
        theta = self.b_enc.new_zeros(cfg.n_latents)  # ReLU: a threshold of 0, not trained
        enc = threshold_encode(
            xs, self.W_enc, self.b_enc, theta, b_dec=self._centre(), encode_dtype=encode_dtype
        )
        norms = self.W_dec.norm(dim=1)  # (n,): the L1 weighs each latent by its decoder norm
        sparsity = lam * (enc.acts * norms[enc.idx]).sum() / rows
        return enc.acts, enc.idx, sparsity, xs.new_zeros(())

    def _matryoshka(self, acts, idx, kept, base, ys, total_variance) -> tuple[Tensor, Tensor]:
        """(full reconstruction, summed FVU of the shorter prefixes): each prefix of the
        dictionary reconstructs from its own latents, built up group by group."""
        recon = base
        prefix_fvu = ys.new_zeros(())
        lo = 0
        for hi in self.cfg.prefixes:
            in_group = kept & (idx >= lo) & (idx < hi)  # (N, K)
            recon = recon + self._decode_scaled(acts, idx, in_group)
            if hi < self.cfg.n_latents:
                prefix_fvu = prefix_fvu + F.mse_loss(recon, ys, reduction="sum") / total_variance
            lo = hi
        return recon, prefix_fvu

    def update_sparsity_coefficient(self, l0: Tensor) -> None:
        """Move lambda towards the target L0 cfg.k (jumprelu, relu; see sae.sparsity)."""
        if self.cfg.architecture in THRESHOLD_KINDS:
            control_sparsity(self.sparsity_coefficient, l0, self.cfg.k)

    # -- constraints and folding ---------------------------------------------------------

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        if self.unit_decoder:
            normalize_rows_(self.W_dec)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out the part of each row's gradient along the (unit) row: it only changes norms."""
        if self.W_dec.grad is None or not self.unit_decoder:
            return
        project_out_rows_(self.W_dec.grad, self.W_dec)

    @torch.no_grad()
    def init_from_sample(
        self,
        x: Tensor,
        reduce: Reduce | None = None,
        target: Tensor | None = None,
        gather: Reduce | None = None,
    ) -> None:
        """From a sample of raw activations (N, d_in), pooled over ranks when `reduce` sums:
        the input scale s with E||x s||^2 = d_in, b_dec at the (scaled) mean of the output (the
        input, or a transcoder's target), and for jumprelu and relu the encoder's cut so that
        each latent fires on k / n of the sample to start with, as it should at the target L0.
        Under data parallelism the cut needs `gather` too, and equals one process's exactly."""
        scale, mean = scale_and_mean(x, self.cfg.d_in, reduce)
        self.input_scale.fill_(scale)
        if self.cfg.is_transcoder:
            out_scale, mean = scale_and_mean(target, self.cfg.d_out, reduce)
            self.output_scale.fill_(out_scale)
            self.b_dec.copy_((mean * out_scale).to(self.b_dec.dtype))
        else:
            self.b_dec.copy_((mean * scale).to(self.b_dec.dtype))
        if self.cfg.architecture in THRESHOLD_KINDS:
            self.cut_at_target_l0(x, reduce, gather)

    @torch.no_grad()
    def cut_at_target_l0(
        self, x: Tensor, reduce: Reduce | None = None, gather: Reduce | None = None
    ) -> None:
        """Set each latent's threshold (jumprelu) or lower its bias (relu) so that it fires on
        k / n of the tokens of x (N, d_in): the target L0 on this sample."""
        cfg, n = self.cfg, self.cfg.n_latents
        rows = x.new_tensor(float(len(x)))
        rows = int(reduce(rows)) if reduce is not None else len(x)
        m = max(1, round(rows * cfg.k / n))  # tokens each latent should fire on
        cut = rate_cut(self._pre_chunks(x), m, gather)  # (n,): each latent's m-th largest
        if cfg.architecture == "jumprelu":
            self.log_threshold.copy_(cut.float().clamp_min(cfg.bandwidth).log())
        else:
            self.b_enc.sub_(cut.clamp(-1e4, 1e4).to(self.b_enc.dtype))

    @torch.no_grad()
    def cut_like_batch_topk(
        self, x: Tensor, reduce: Reduce | None = None, gather: Reduce | None = None
    ) -> None:
        """One threshold for every latent (jumprelu): the smallest of the k*N largest
        activations of x (N, d_in), which BatchTopK keeps, so that the target L0 holds and each
        latent keeps the firing rate that the TopK warm-up gave it."""
        k = min(4 * self.cfg.k, self.cfg.n_latents)
        enc = topk_encode(self._scaled(x), self.W_enc, self.b_enc, k, b_dec=self._centre())
        low = enc.top_acts.new_zeros(())
        batch_topk(enc.top_acts, self.cfg.k, low, 1.0, reduce, gather)  # low: the cutoff
        self.log_threshold.fill_(math.log(max(float(low), self.cfg.bandwidth)))

    def _pre_chunks(self, x: Tensor):
        """The encoder's pre-activations on raw x, (1024, n) at a time."""
        for start in range(0, len(x), 1024):
            xs = self._scaled(x[start : start + 1024])
            if self._centre() is not None:
                xs = xs - self._centre()
            yield torch.addmm(self.b_enc, xs, self.W_enc)

    @torch.no_grad()
    def folded_state(self) -> dict[str, Tensor]:
        """Weights that take raw activations: the scales folded in (acts are unchanged)."""
        s, s_out = self.input_scale, self.out_scale
        state = {
            "W_enc": self.W_enc * s,
            "b_enc": self.b_enc.clone(),
            "W_dec": self.W_dec / s_out,
            "b_dec": self.b_dec / s_out,
        }
        if self.cfg.skip:
            state["W_skip"] = self.W_skip * s / s_out
        if self.cfg.architecture in BATCH_KINDS or self.cfg.architecture == "jumprelu":
            state["threshold"] = self.latent_threshold().float().clone()
        return {k: v.detach().contiguous() for k, v in state.items()}

    @torch.no_grad()
    def load_folded(self, state: dict[str, Tensor]) -> None:
        """Load weights saved by folded_state (scales 1)."""
        names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["W_skip"] if self.cfg.skip else [])
        for name in names:
            expected = getattr(self, name).shape
            if state[name].shape != expected:
                raise UserError(
                    f"Weight {name} has shape {tuple(state[name].shape)}, but the config says "
                    f"{tuple(expected)} (d_in {self.cfg.d_in}, d_out {self.cfg.d_out}, "
                    f"{self.cfg.n_latents} latents)."
                )
            getattr(self, name).copy_(state[name])
        self.input_scale.fill_(1.0)
        if self.cfg.is_transcoder:
            self.output_scale.fill_(1.0)
        if "threshold" in state and self.cfg.architecture in BATCH_KINDS:
            self.threshold.copy_(state["threshold"].float().mean())
        if "threshold" in state and self.cfg.architecture == "jumprelu":
            self.log_threshold.copy_(state["threshold"].float().clamp_min(1e-30).log())
