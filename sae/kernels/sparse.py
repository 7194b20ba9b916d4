"""The sparse (N, k) activations as matrices: CSR views by token and by latent, and the
per-latent sums that give both weight gradients.

idx is (N, k) int64, the latents each token selected; an entry is one (token, slot) pair.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision gradients are accumulated in fp32 (MKL's sparse matmul has no bf16 anyway)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _by_token(idx: Tensor, values: Tensor, n: int) -> Tensor:
    """Sparse (N, n) CSR holding values[t, j] at (t, idx[t, j]). Rows are tokens: nothing to sort."""
    N, K = idx.shape
    crow = torch.arange(0, N * K + 1, K, device=idx.device)
    return _csr(crow, idx.reshape(-1), values.reshape(-1), (N, n))


def _latent_order(idx: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Sort the N*k (token, latent) entries by latent: CSR row offsets (n + 1,) and the order."""
    flat = idx.reshape(-1)  # (N*k,)
    if idx.is_cuda:  # bincount reads its input's max on the host: two waits for the GPU
        keys = flat.int()  # int32 keys sort faster than int64; stable keeps tokens ascending
        order = torch.argsort(keys, stable=True)
        bounds = torch.arange(n + 1, dtype=torch.int32, device=idx.device)
        return torch.searchsorted(keys[order], bounds), order
    if n <= 1 << 16:
        # numpy sorts 16-bit keys stably by radix, which beats torch's comparison sort on the CPU
        keys = flat.numpy().astype(np.uint16)
        order = torch.from_numpy(np.argsort(keys, kind="stable"))
    else:
        order = torch.argsort(flat.int(), stable=True)
    crow = torch.zeros(n + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(flat, minlength=n), 0, out=crow[1:])
    return crow, order


def _by_latent(idx: Tensor, values: Tensor, n: int) -> Tensor:
    """The transpose of _by_token, a sparse (n, N) CSR: entries sorted by latent."""
    crow, order = _latent_order(idx, n)
    tokens = order // idx.shape[1]  # flat position -> token
    return _csr(crow, tokens, values.reshape(-1)[order], (n, idx.shape[0]))


def _latent_sums_flat(cols: Tensor, tokens: Tensor, weights: Tensor, rows: Tensor, n: int):
    """_latent_sums for M loose entries (latent cols[e] of token tokens[e], weight weights[e]):
    (n, d) with out[l] = sum of weights[e] * rows[tokens[e]] over the entries of latent l."""
    crow, order = _latent_order(cols[:, None], n)
    return F.embedding_bag(  # (n, d)
        tokens[order], rows, crow[:-1], mode="sum", per_sample_weights=weights[order]
    )


def _latent_sums(idx: Tensor, weights: Tensor, rows: Tensor, n: int) -> Tensor:
    """(n, d) with out[l] = sum of weights[t, j] * rows[t] over the entries idx[t, j] = l: the
    weight gradients of both kernels. On CPU one embedding_bag with a bag per latent writes the
    result once, where MKL's sparse matmul also zero-fills and copies an (n, d) temporary. On
    CUDA, cuSPARSE: a Triton kernel per latent waits on the few latents with a thousand entries.
    """
    if idx.is_cuda:
        return _by_latent(idx, weights, n) @ rows
    crow, order = _latent_order(idx, n)
    tokens = order // idx.shape[1]  # flat position -> token
    return F.embedding_bag(  # (n, d)
        tokens, rows, crow[:-1], mode="sum", per_sample_weights=weights.reshape(-1)[order]
    )
