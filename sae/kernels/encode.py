"""The fused TopK encoder: a chunked forward that never holds the (N, n) pre-activations, an
exact two-stage top-k, and a backward that touches only the selected latents.

Shapes follow SAELens: W_enc (d, n), b_enc (n,). N is the number of tokens and k the number of
active latents per token. The encoder takes centred x, or uncentred x and b_dec, whose gradient
it then computes without dx.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.kernels.sparse import _acc_dtype, _latent_sums
from sae.kernels.triton_kernels import _gather_sum, _triton_enabled, _triton_transpose, _use_triton

# Tokens per forward chunk on CPU. Chunking bounds the (chunk, n) pre-activations in memory and
# keeps them in cache for the top-k; 512 is the fastest chunk at bench/kernels.py's shape.
DEFAULT_CHUNK_SIZE = 512
# On CUDA chunks only bound memory: at most this many pre-activation elements at once (1 GiB fp32).
CUDA_CHUNK_ELEMENTS = 1 << 28
# Group width of the two-stage top-k (see _grouped_topk).
TOPK_GROUP = 16


class EncodeResult(NamedTuple):
    top_acts: Tensor  # (N, k), ReLU applied after the top-k, in no particular order
    top_idx: Tensor  # (N, k) int64
    aux_acts: Tensor | None  # (N, k_aux): AuxK over the dead latents only
    aux_idx: Tensor | None  # (N, k_aux) int64


def _transposed(a: Tensor, dtype: torch.dtype | None = None, block: int = 128) -> Tensor:
    """a.T, contiguous, optionally cast to dtype. On CPU, copying 128 rows at a time keeps the
    strided reads in cache, which a.t().contiguous() does not. On CUDA a tiled Triton transpose
    beats a.t().contiguous(); a narrowing cast goes first there (fewer bytes to transpose; the
    two commute)."""
    if a.is_cuda:
        if _triton_enabled() and a.dim() == 2:
            if dtype is not None and dtype.itemsize < a.dtype.itemsize:
                a = a.to(dtype)
            out = _triton_transpose(a.contiguous())
        else:
            out = a.t().contiguous()
    else:
        out = a.new_empty(a.shape[1], a.shape[0])
        for start in range(0, a.shape[0], block):
            out[:, start : start + block] = a[start : start + block].t()
    return out if dtype is None else out.to(dtype)


def _topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k along dim 1, unsorted: _grouped_topk where n allows (it is faster than
    torch.topk on CPU and CUDA), else torch.topk."""
    rows, n = pre.shape
    if n % TOPK_GROUP != 0 or n < 8 * k * TOPK_GROUP:
        return pre.topk(k, dim=1, sorted=False)
    return _grouped_topk(pre, k, TOPK_GROUP)


def _grouped_topk(pre: Tensor, k: int, G: int) -> tuple[Tensor, Tensor]:
    """Exact top-k along dim 1 in two stages (needs n % G == 0 and n >= k * G).

    Split the n latents into n/G groups; the k largest elements of a row lie in the k groups with
    the largest maxima (fewer than k groups can hold an element larger than any one of them).
    Group g = latents {g, g + n/G, g + 2n/G, ...}: strided, so the group max is a vectorised max
    over G contiguous rows. Then the top-k among those k*G candidates, a far smaller search than
    torch.topk over all n.
    """
    rows, n = pre.shape
    groups = pre.view(rows, G, n // G)
    top_groups = groups.amax(1).topk(k, dim=1, sorted=False).indices  # (rows, k)
    candidates = groups.gather(2, top_groups[:, None, :].expand(-1, G, -1))  # (rows, G, k)
    values, j = candidates.view(rows, G * k).topk(k, dim=1, sorted=False)  # (rows, k)
    return values, (j // k) * (n // G) + top_groups.gather(1, j % k)


def sparse_encoder_grads(
    grad: Tensor,
    idx: Tensor,
    x: Tensor,
    W_enc: Tensor,
    need_x: bool,
    need_W: bool,
    need_b_enc: bool,
    need_b_dec: bool,
    b_enc_dtype: torch.dtype,
    b_dec_dtype: torch.dtype | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dW_enc, db_enc, db_dec) of pre = (x - b_dec) @ W_enc + b_enc, from the gradient
    `grad` (N, K) of the pre-activations at the entries idx (N, K) only (zero elsewhere): the
    backward both sparse encoders share. x is the centred input the forward saved."""
    acc = _acc_dtype(x.dtype)
    grad = grad.to(acc)
    n = W_enc.shape[1]
    dx = dW_enc = db_enc = db_dec = None
    if need_x:  # dx = G @ W_enc^T: the decoder's gather-sum, on W_enc^T
        if _use_triton(x):
            dx = _gather_sum(grad, idx, _transposed(W_enc), x.dtype)
        else:
            W_T = _transposed(W_enc).to(acc)  # (n, d)
            dx = F.embedding_bag(idx, W_T, per_sample_weights=grad, mode="sum").to(x.dtype)
    if need_W:  # dW_enc = (G^T @ x)^T, without index_add's (N*K, d) rows
        dW_enc = _transposed(_latent_sums(idx, grad, x.to(acc), n), W_enc.dtype)  # (d, n)
    if need_b_enc or need_b_dec:
        db = grad.new_zeros(n).index_add_(0, idx.reshape(-1), grad.reshape(-1))  # (n,)
        db_enc = db.to(b_enc_dtype) if need_b_enc else None
        if need_b_dec:  # pre = (x - b_dec) W + b: d b_dec = -W_enc @ db, a mat-vec instead of dx
            db_dec = -(W_enc.to(acc) @ db).to(b_dec_dtype)
    return dx, dW_enc, db_enc, db_dec


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, dead_mask, k_aux, chunk_size, b_dec, encode_dtype):
        if b_dec is not None:
            x = x - b_dec  # (N, d) centred here, so that backward needs no dx for b_dec's grad
        # The pre-activations (matmul and top-k) may run in a narrower dtype; the outputs and
        # the backward keep x's and W_enc's own precision.
        W_s, b_s = W_enc, b_enc
        if encode_dtype is not None and encode_dtype != W_enc.dtype:
            W_s, b_s = W_enc.to(encode_dtype), b_enc.to(encode_dtype)
        N = x.shape[0]
        top_acts = x.new_empty(N, k)
        top_idx = torch.empty(N, k, dtype=torch.long, device=x.device)
        aux_acts = aux_idx = None
        if dead_mask is not None and k_aux > 0:
            dead = dead_mask.nonzero().squeeze(1)  # (n_dead,)
            k_dead = min(k_aux, dead.numel())
            # Slots beyond the number of dead latents keep act 0 at latent 0: zero output, and the
            # ReLU mask (act > 0) in backward gives them zero gradient.
            aux_acts = x.new_zeros(N, k_aux)
            aux_idx = torch.zeros(N, k_aux, dtype=torch.long, device=x.device)

        # One (chunk, n) buffer for every chunk: a fresh one each time costs page faults on CPU.
        buffer = W_s.new_empty(min(chunk_size, N), W_s.shape[1])
        for start in range(0, N, chunk_size):
            end = min(start + chunk_size, N)
            rows = x[start:end].to(W_s.dtype)
            pre = torch.addmm(b_s, rows, W_s, out=buffer[: end - start])  # (chunk, n)
            values, idx = _topk(pre, k)
            top_acts[start:end] = values.relu_()  # ReLU after TopK
            top_idx[start:end] = idx
            if aux_acts is not None and k_dead > 0:
                values, j = pre[:, dead].topk(k_dead, dim=1, sorted=False)  # (chunk, k_dead)
                aux_acts[start:end, :k_dead] = values.relu_()
                aux_idx[start:end, :k_dead] = dead[j]

        ctx.set_materialize_grads(False)
        ctx.b_enc_dtype = b_enc.dtype
        ctx.b_dec_dtype = None if b_dec is None else b_dec.dtype
        ctx.mark_non_differentiable(top_idx, *([aux_idx] if aux_idx is not None else []))
        ctx.save_for_backward(x, W_enc, top_acts, top_idx, aux_acts, aux_idx)
        return top_acts, top_idx, aux_acts, aux_idx

    @staticmethod
    def backward(ctx, grad_acts, _grad_idx, grad_aux_acts, _grad_aux_idx):
        x, W_enc, top_acts, top_idx, aux_acts, aux_idx = ctx.saved_tensors
        # Only the selected latents carry gradient. Main and AuxK (grad, index) pairs are
        # concatenated so that, unlike sparsify, the AuxK loss also trains the encoder.
        grads, idxs = [], []
        for grad, acts, idx in ((grad_acts, top_acts, top_idx), (grad_aux_acts, aux_acts, aux_idx)):
            if grad is not None and acts is not None:
                grads.append(grad * (acts > 0))  # ReLU mask
                idxs.append(idx)
        if not grads:
            return (None,) * 9
        grad = torch.cat(grads, 1)  # (N, K) with K = k + k_aux
        idx = torch.cat(idxs, 1)  # (N, K)
        needs = ctx.needs_input_grad
        dx, dW_enc, db_enc, db_dec = sparse_encoder_grads(
            grad, idx, x, W_enc, needs[0], needs[1], needs[2], needs[7], ctx.b_enc_dtype,
            ctx.b_dec_dtype,
        )  # fmt: skip
        return dx, dW_enc, db_enc, None, None, None, None, db_dec, None


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
    chunk_size: int | None = None,
    b_dec: Tensor | None = None,
    encode_dtype: torch.dtype | None = None,
) -> EncodeResult:
    """ReLU(TopK(x @ W_enc + b_enc)) for centred x (N, d_in), plus AuxK over the dead latents.
    With b_dec, x is uncentred and the kernel subtracts b_dec; b_dec's gradient is then the
    mat-vec -W_enc @ (per-latent gradient sums), without the (N, d) input gradient.
    encode_dtype=bf16 runs the matmul and the top-k in bf16 (faster on hardware with bf16
    units); the activations are those bf16 values in x's dtype, and the gradients are computed
    in x's and W_enc's own precision.

    dead_mask (bool [n]) and k_aux > 0 switch on AuxK: the top k_aux pre-activations among the dead
    latents, ReLU'd; with fewer than k_aux dead latents the extra slots hold 0 (latent 0, no
    gradient). Gradients flow only through the selected latents, AuxK's included. chunk_size=None
    picks DEFAULT_CHUNK_SIZE tokens on CPU, a memory bound on CUDA.
    """
    if chunk_size is None:
        chunk_size = (
            max(1, CUDA_CHUNK_ELEMENTS // W_enc.shape[1]) if x.is_cuda else DEFAULT_CHUNK_SIZE
        )
    return EncodeResult(
        *_TopKEncode.apply(x, W_enc, b_enc, k, dead_mask, k_aux, chunk_size, b_dec, encode_dtype)
    )
