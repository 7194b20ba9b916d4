"""The fused threshold encoder of JumpReLU and ReLU SAEs: a chunked forward that keeps only the
latents above their threshold (never more than one chunk of the dense (N, n) pre-activations),
and a backward that is sparse in those latents plus the threshold's pseudo-gradient.

    acts = pre * H(pre - theta),  pre = (x - b_dec) @ W_enc + b_enc,  theta (n,) >= 0

A token keeps a different number of latents, so the outputs are padded to the batch's widest
token, (N, K): padding holds act 0 at latent 0 and pre -inf, which no mask selects. Rajamanoharan
et al. (2024) train theta through a straight-through estimator with a rectangle kernel of width
`bandwidth`: d acts / d theta = -(theta / bandwidth) K((pre - theta) / bandwidth), and the L0
step H(pre - theta) gets d / d theta = -(1 / bandwidth) K(...). Latents just below their threshold
(within half a bandwidth) carry that gradient too, so while theta trains they are kept, with act 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.kernels.encode import CUDA_CHUNK_ELEMENTS, DEFAULT_CHUNK_SIZE, sparse_encoder_grads


class ThresholdResult(NamedTuple):
    acts: Tensor  # (N, K): pre where pre > theta, else 0 (band entries and padding)
    idx: Tensor  # (N, K) int64
    step: Tensor  # (N, K): H(pre - theta) as acts' dtype; its sum over a row is the token's L0


def _kept_entries(pre: Tensor, floor: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(rows, slots, cols, values) of the entries pre > floor (chunk, n), row by row."""
    keep = pre > floor  # (chunk, n)
    rows, cols = keep.nonzero(as_tuple=True)  # row-major: each row's entries are contiguous
    counts = keep.sum(1)
    starts = counts.cumsum(0) - counts  # (chunk,)
    slots = torch.arange(rows.numel(), device=pre.device) - starts[rows]
    return rows, slots, cols, pre[rows, cols]


class _ThresholdEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, threshold, bandwidth, chunk_size, b_dec, encode_dtype):
        if b_dec is not None:
            x = x - b_dec  # (N, d) centred here, so that backward needs no dx for b_dec's grad
        W_s, b_s = W_enc, b_enc
        if encode_dtype is not None and encode_dtype != W_enc.dtype:
            W_s, b_s = W_enc.to(encode_dtype), b_enc.to(encode_dtype)
        # at least fp32 whatever the encoder's dtype (fp64 stays fp64, for gradcheck)
        theta = threshold.detach().to(torch.promote_types(threshold.dtype, torch.float32))
        train_theta = threshold.requires_grad and bandwidth > 0
        floor = theta - bandwidth / 2 if train_theta else theta  # band entries too while training
        N = x.shape[0]
        parts, width = [], 1
        buffer = W_s.new_empty(min(chunk_size, N), W_s.shape[1])
        for start in range(0, N, chunk_size):
            end = min(start + chunk_size, N)
            pre = torch.addmm(b_s, x[start:end].to(W_s.dtype), W_s, out=buffer[: end - start])
            rows, slots, cols, values = _kept_entries(pre, floor)
            if rows.numel():
                width = max(width, int(slots.max()) + 1)
            parts.append((rows + start, slots, cols, values.to(x.dtype)))
        pre_kept = x.new_full((N, width), float("-inf"))  # (N, K)
        idx = torch.zeros(N, width, dtype=torch.long, device=x.device)
        for rows, slots, cols, values in parts:
            pre_kept[rows, slots] = values
            idx[rows, slots] = cols
        active = pre_kept > theta[idx].to(x.dtype)  # (N, K)
        acts = torch.where(active, pre_kept, 0.0)
        step = active.to(x.dtype)
        ctx.set_materialize_grads(False)
        ctx.bandwidth, ctx.b_enc_dtype = bandwidth, b_enc.dtype
        ctx.b_dec_dtype = None if b_dec is None else b_dec.dtype
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(x, W_enc, threshold, pre_kept, idx)
        return acts, idx, step

    @staticmethod
    def backward(ctx, grad_acts, _grad_idx, grad_step):
        x, W_enc, threshold, pre_kept, idx = ctx.saved_tensors
        needs = ctx.needs_input_grad
        fp = torch.promote_types(threshold.dtype, torch.float32)
        theta = threshold.to(fp)[idx]  # (N, K)
        dx = dW_enc = db_enc = db_dec = d_theta = None
        if grad_acts is not None:  # through the kept latents above their threshold only
            grad_pre = grad_acts * (pre_kept > theta.to(pre_kept.dtype))
            dx, dW_enc, db_enc, db_dec = sparse_encoder_grads(
                grad_pre, idx, x, W_enc, needs[0], needs[1], needs[2], needs[6],
                ctx.b_enc_dtype, ctx.b_dec_dtype,
            )  # fmt: skip
        if needs[3]:
            eps = ctx.bandwidth
            kernel = ((pre_kept.to(fp) - theta).abs() < eps / 2).to(fp) / eps  # (N, K)
            grad_theta = torch.zeros_like(theta)
            if grad_acts is not None:
                grad_theta -= grad_acts.to(fp) * theta * kernel
            if grad_step is not None:
                grad_theta -= grad_step.to(fp) * kernel
            d_theta = torch.zeros(threshold.shape, dtype=fp, device=idx.device)
            d_theta.index_add_(0, idx.reshape(-1), grad_theta.reshape(-1))
            d_theta = d_theta.to(threshold.dtype)
        return dx, dW_enc, db_enc, d_theta, None, None, db_dec, None


def threshold_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    threshold: Tensor,
    bandwidth: float = 0.0,
    chunk_size: int | None = None,
    b_dec: Tensor | None = None,
    encode_dtype: torch.dtype | None = None,
) -> ThresholdResult:
    """JumpReLU_theta(x @ W_enc + b_enc) for centred x (N, d_in), as padded (N, K) entries.

    threshold (n,) is compared in fp32. When it requires grad and bandwidth > 0, it gets the
    straight-through pseudo-gradient of both acts and step; a threshold of zeros without grad is
    a ReLU encoder. With b_dec, x is uncentred and the kernel subtracts b_dec. encode_dtype=bf16
    runs the matmul in bf16; outputs and gradients keep x's and W_enc's precision.
    """
    if chunk_size is None:
        chunk_size = (
            max(1, CUDA_CHUNK_ELEMENTS // W_enc.shape[1]) if x.is_cuda else DEFAULT_CHUNK_SIZE
        )
    return ThresholdResult(
        *_ThresholdEncode.apply(
            x, W_enc, b_enc, threshold, bandwidth, chunk_size, b_dec, encode_dtype
        )
    )


def fixed_width(acts: Tensor, idx: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """(N, K) entries as (N, width): the `width` largest where K is wider, zeros padding else."""
    K = acts.shape[1]
    if K > width:
        order = acts.topk(width, dim=1).indices
        return acts.gather(1, order), idx.gather(1, order)
    if K < width:
        acts = F.pad(acts, (0, width - K))
        idx = F.pad(idx, (0, width - K))
    return acts, idx
