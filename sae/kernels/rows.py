"""In-place row operations on the decoder (n, d): project each row's gradient onto the row's
tangent space, and renormalise each row to unit norm. One Triton pass per call on CUDA (reads
each row once, writes it once), plain torch elsewhere."""

from __future__ import annotations

import torch
from torch import Tensor

from sae.kernels.triton_kernels import _use_triton, tl, triton

if triton is not None:

    @triton.jit
    def _row_project_kernel(g, w, d, BLOCK_D: tl.constexpr):
        # g[r] -= <g[r], w[r]> w[r]: one program per row
        base = tl.program_id(0).to(tl.int64) * d
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            gv = tl.load(g + base + cols, mask=cols < d, other=0.0)
            wv = tl.load(w + base + cols, mask=cols < d, other=0.0)
            acc += gv * wv
        dot = tl.sum(acc, axis=0)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            gv = tl.load(g + base + cols, mask=cols < d, other=0.0)
            wv = tl.load(w + base + cols, mask=cols < d, other=0.0)
            tl.store(g + base + cols, gv - dot * wv, mask=cols < d)

    @triton.jit
    def _row_normalize_kernel(w, d, eps, BLOCK_D: tl.constexpr):
        # w[r] /= max(||w[r]||, eps): one program per row
        base = tl.program_id(0).to(tl.int64) * d
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            wv = tl.load(w + base + cols, mask=cols < d, other=0.0)
            acc += wv * wv
        norm = tl.maximum(tl.sqrt_rn(tl.sum(acc, axis=0)), eps)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            wv = tl.load(w + base + cols, mask=cols < d, other=0.0)
            tl.store(w + base + cols, tl.div_rn(wv, norm), mask=cols < d)


def _row_block(d: int) -> int:
    return min(2048, triton.next_power_of_2(d))


def _triton_project_rows_(grad: Tensor, W: Tensor) -> None:
    _row_project_kernel[(W.shape[0],)](grad, W, W.shape[1], _row_block(W.shape[1]))


def _triton_normalize_rows_(W: Tensor, eps: float) -> None:
    _row_normalize_kernel[(W.shape[0],)](W, W.shape[1], eps, _row_block(W.shape[1]))


def project_out_rows_(grad: Tensor, W: Tensor) -> None:
    """grad[r] -= <grad[r], W[r]> W[r] for every row, in place."""
    if _use_triton(W) and grad.dtype == W.dtype and grad.is_contiguous() and W.is_contiguous():
        _triton_project_rows_(grad, W)
        return
    parallel = torch.linalg.vecdot(grad, W, dim=1)  # (n,)
    grad.addcmul_(parallel[:, None], W, value=-1)  # in place: no (n, d) product temporary


def normalize_rows_(W: Tensor, eps: float = 1e-8) -> None:
    """W[r] /= max(||W[r]||, eps) for every row, in place."""
    if _use_triton(W) and W.is_contiguous():
        _triton_normalize_rows_(W, eps)
        return
    W /= W.norm(dim=1, keepdim=True).clamp_min(eps)
