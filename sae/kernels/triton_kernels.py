"""The Triton kernels of the encoder and decoder (gather-sum, sampled dot products, transpose),
their launchers, and the switch that decides when CUDA tensors take them.

Triton is optional: without it every caller takes its torch path, on CPU and CUDA alike. Under
TRITON_INTERPRET=1 the launchers also run on CPU tensors, which is how the tests check them.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # optional: the torch path covers CPU and CUDA without it
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def _triton_enabled() -> bool:
    return triton is not None and os.environ.get("SAEWB_DISABLE_TRITON") != "1"


def _use_triton(t: Tensor) -> bool:
    # The kernels accumulate in fp32, so fp64 stays on the torch path.
    return _triton_enabled() and t.is_cuda and t.dtype != torch.float64


# d is blocked in BLOCK_D columns rather than padded to a power of two, so d=576 runs as 9 blocks
# of 64 instead of one block of 1024 with 44% idle lanes.
def _block_d(d: int) -> int:
    """The widest block in (128, 64, 32) that pads d by at most 1/16."""
    for block in (128, 64):
        if -(-d // block) * block - d <= d // 16:
            return block
    return 32


def _block_k(k: int) -> int:
    return min(32, triton.next_power_of_2(k))


if triton is not None:

    @triton.jit
    def _decode_fwd_kernel(acts, idx, W, out, k, d, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per (token, block of d): out[t, cols] = sum_j acts[t, j] * W[idx[t, j], cols]
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            j = k0 + tl.arange(0, BLOCK_K)
            lat = tl.load(idx + t * k + j, mask=j < k, other=0)  # (BLOCK_K,)
            a = tl.load(acts + t * k + j, mask=j < k, other=0.0).to(tl.float32)
            mask = (j < k)[:, None] & (cols < d)[None, :]
            rows = tl.load(W + lat[:, None] * d + cols[None, :], mask=mask, other=0.0)
            acc += tl.sum(a[:, None] * rows.to(tl.float32), axis=0)  # (BLOCK_D,)
        tl.store(out + t * d + cols, acc, mask=cols < d)

    @triton.jit
    def _decode_dacts_kernel(
        grad, idx, W, d_acts, k, d, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        # One program per (token, block of k): d_acts[t, j] = <grad[t], W[idx[t, j]]>
        t = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        lat = tl.load(idx + t * k + j, mask=j < k, other=0)  # (BLOCK_K,)
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            g = tl.load(grad + t * d + cols, mask=cols < d, other=0.0).to(tl.float32)
            mask = (j < k)[:, None] & (cols < d)[None, :]
            rows = tl.load(W + lat[:, None] * d + cols[None, :], mask=mask, other=0.0)
            acc += tl.sum(rows.to(tl.float32) * g[None, :], axis=1)
        tl.store(d_acts + t * k + j, acc, mask=j < k)

    @triton.jit
    def _transpose_kernel(src, dst, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # dst (C, R) = src (R, C)^T, one (BLOCK_R, BLOCK_C) tile per program
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows < R)[:, None] & (cols < C)[None, :]
        tile = tl.load(src + rows[:, None].to(tl.int64) * C + cols[None, :], mask=mask)
        out = dst + cols[:, None].to(tl.int64) * R + rows[None, :]
        tl.store(out, tl.trans(tile), mask=(cols < C)[:, None] & (rows < R)[None, :])


def _gather_sum(vals: Tensor, idx: Tensor, table: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, d) with out[t] = sum_j vals[t, j] * table[idx[t, j]], accumulated in fp32: the
    decoder's forward, and the encoder's input gradient on W_enc^T."""
    vals, idx, table = vals.contiguous(), idx.contiguous(), table.contiguous()
    (N, K), d = idx.shape, table.shape[1]
    out = table.new_empty(N, d, dtype=dtype)
    grid = (N, triton.cdiv(d, _block_d(d)))
    _decode_fwd_kernel[grid](vals, idx, table, out, K, d, _block_k(K), _block_d(d))
    return out


def _sampled_dots(grad: Tensor, idx: Tensor, table: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, k) with out[t, j] = <grad[t], table[idx[t, j]]>: grad @ table^T at the touched entries."""
    grad, idx, table = grad.contiguous(), idx.contiguous(), table.contiguous()
    (N, k), d = idx.shape, table.shape[1]
    out = torch.empty(N, k, dtype=dtype, device=grad.device)
    grid = (N, triton.cdiv(k, _block_k(k)))
    _decode_dacts_kernel[grid](grad, idx, table, out, k, d, _block_k(k), 64)
    return out


def _triton_transpose(a: Tensor) -> Tensor:
    """a.T of a contiguous 2-D tensor, contiguous: 64 x 64 tiles."""
    R, C = a.shape
    out = a.new_empty(C, R)
    block = 64
    _transpose_kernel[(triton.cdiv(R, block), triton.cdiv(C, block))](a, out, R, C, block, block)
    return out
