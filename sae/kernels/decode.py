"""The sparse decoder sum_j top_acts[t, j] * W_dec[top_idx[t, j]] and its backward: a torch path
everywhere, and a Triton path that CUDA fp32 and bf16 tensors take.

W_dec is (n, d); top_acts and top_idx are the encoder's (N, k) outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.kernels.sparse import _acc_dtype, _by_token, _csr, _latent_sums, _latent_sums_flat
from sae.kernels.triton_kernels import _gather_sum, _sampled_dots, _use_triton, triton


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, top_acts, top_idx, W_dec):
        ctx.save_for_backward(top_acts, top_idx, W_dec)
        return F.embedding_bag(top_idx, W_dec, per_sample_weights=top_acts, mode="sum")  # (N, d)

    @staticmethod
    def backward(ctx, grad_out):
        top_acts, top_idx, W_dec = ctx.saved_tensors
        (N, k), n = top_idx.shape, W_dec.shape[0]
        acc = _acc_dtype(W_dec.dtype)
        grad_out = grad_out.to(acc)
        d_acts = dW_dec = None
        if ctx.needs_input_grad[0]:
            # d_acts[t, j] = <grad_out[t], W_dec[idx[t, j]]>: grad_out @ W_dec^T sampled at the N*k
            # touched entries only, with neither (N, n) nor (N, k, d) materialised. cuSPARSE needs
            # a canonical CSR (columns sorted within each row); the CPU kernel takes the entries
            # in any order, so the CPU skips the sort.
            sorted_idx, perm = top_idx.sort(dim=1) if top_idx.is_cuda else (top_idx, None)
            pattern = _by_token(sorted_idx, grad_out.new_ones(N * k), n)
            sampled = torch.sparse.sampled_addmm(pattern, grad_out, W_dec.to(acc).t(), beta=0.0)
            d_acts = sampled.values().view(N, k)
            if perm is not None:
                d_acts = grad_out.new_empty(N, k).scatter_(1, perm, d_acts)
            d_acts = d_acts.to(top_acts.dtype)
        if ctx.needs_input_grad[2]:  # dense (n, d) for the optimizer; untouched rows are zero
            dW_dec = _latent_sums(top_idx, top_acts.to(acc), grad_out, n).to(W_dec.dtype)
        return d_acts, None, dW_dec


class _TritonDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, top_acts, top_idx, W_dec):
        top_acts, top_idx, W_dec = top_acts.contiguous(), top_idx.contiguous(), W_dec.contiguous()
        ctx.save_for_backward(top_acts, top_idx, W_dec)
        return _gather_sum(top_acts, top_idx, W_dec, W_dec.dtype)  # (N, d)

    @staticmethod
    def backward(ctx, grad_out):
        top_acts, top_idx, W_dec = ctx.saved_tensors
        n = W_dec.shape[0]
        d_acts = dW_dec = None
        if ctx.needs_input_grad[0]:
            d_acts = _sampled_dots(grad_out, top_idx, W_dec, top_acts.dtype)  # (N, k)
        if ctx.needs_input_grad[2]:  # cuSPARSE, as in _SparseDecode (see _latent_sums)
            acc = _acc_dtype(W_dec.dtype)
            dW_dec = _latent_sums(top_idx, top_acts.to(acc), grad_out.to(acc), n).to(W_dec.dtype)
        return d_acts, None, dW_dec


class _EntryDecode(torch.autograd.Function):
    """The decoder on M loose entries sorted by token (values, latents, tokens), for codes whose
    tokens keep different numbers of latents: no padding is decoded."""

    @staticmethod
    def forward(ctx, values, cols, tokens, N, W_dec):
        crow = torch.zeros(N + 1, dtype=torch.long, device=cols.device)
        torch.cumsum(torch.bincount(tokens, minlength=N), 0, out=crow[1:])  # (N + 1,)
        ctx.save_for_backward(values, cols, tokens, crow, W_dec)
        return F.embedding_bag(cols, W_dec, crow[:-1], per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad_out):
        values, cols, tokens, crow, W_dec = ctx.saved_tensors
        N, n = grad_out.shape[0], W_dec.shape[0]
        acc = _acc_dtype(W_dec.dtype)
        grad_out = grad_out.to(acc)
        d_values = dW_dec = None
        if ctx.needs_input_grad[0]:  # <grad_out[t], W_dec[l]> at the M entries only (CPU CSR)
            pattern = _csr(crow, cols, grad_out.new_ones(cols.numel()), (N, n))
            sampled = torch.sparse.sampled_addmm(pattern, grad_out, W_dec.to(acc).t(), beta=0.0)
            d_values = sampled.values().to(values.dtype)
        if ctx.needs_input_grad[4]:
            dW_dec = _latent_sums_flat(cols, tokens, values.to(acc), grad_out, n)
            dW_dec = dW_dec.to(W_dec.dtype)
        return d_values, None, None, None, dW_dec


def decode_kept(acts: Tensor, idx: Tensor, keep: Tensor, W_dec: Tensor) -> Tensor:
    """sparse_decode of the (N, K) entries where `keep`, all others taken as zero. On the CPU
    only those entries are decoded (their number varies by token); on CUDA the padded (N, K)
    code is, as a count of kept entries would wait for the GPU."""
    if acts.is_cuda:
        return sparse_decode(acts * keep, idx, W_dec)
    tokens, slots = keep.nonzero(as_tuple=True)  # (M,) each, token-major
    values = acts[tokens, slots].to(W_dec.dtype)
    return _EntryDecode.apply(values, idx[tokens, slots], tokens, acts.shape[0], W_dec)


def sparse_decode(top_acts: Tensor, top_idx: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j top_acts[t, j] * W_dec[top_idx[t, j]] -> (N, d_in), without a dense (N, n) matrix."""
    if _use_triton(W_dec):
        return triton_decode(top_acts, top_idx, W_dec)
    return _SparseDecode.apply(top_acts, top_idx, W_dec)


def triton_decode(top_acts: Tensor, top_idx: Tensor, W_dec: Tensor) -> Tensor:
    """sparse_decode through the Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    return _TritonDecode.apply(top_acts, top_idx, W_dec)
