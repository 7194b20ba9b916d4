"""Fused kernels of the TopK SAE: a chunked TopK encoder whose backward is sparse, and a sparse
decoder (torch everywhere, Triton on CUDA).

Shapes follow SAELens: W_enc [d_in, n], b_enc [n], W_dec [n, d_in]. N is the number of tokens and
k the number of active latents per token. The encoder either takes centred x, or uncentred x and
b_dec, whose gradient it then computes without dx.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

try:  # optional: the torch path covers CPU and CUDA without it
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# Tokens per forward chunk on CPU. Chunking bounds the (chunk, n) pre-activations in memory and
# keeps them in cache for the top-k. On 2 cores at N=4096, d=576, n=9216, k=32 (bench/kernels.py),
# forward+backward with 512 matched or beat 256, 1024 and the whole batch in fp32 and bf16.
DEFAULT_CHUNK_SIZE = 512
# On CUDA chunks only bound memory: at most this many pre-activation elements at once (1 GiB fp32).
CUDA_CHUNK_ELEMENTS = 1 << 28
# Group width of the two-stage CPU top-k (see _topk).
TOPK_GROUP = 16


class EncodeResult(NamedTuple):
    top_acts: Tensor  # (N, k), ReLU applied after the top-k, in no particular order
    top_idx: Tensor  # (N, k) int64
    aux_acts: Tensor | None  # (N, k_aux): AuxK over the dead latents only
    aux_idx: Tensor | None  # (N, k_aux) int64


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision gradients are accumulated in fp32 (MKL's sparse matmul has no bf16 anyway)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _transposed(a: Tensor, dtype: torch.dtype | None = None, block: int = 128) -> Tensor:
    """a.T, contiguous, optionally cast to dtype. On CPU, copying 128 rows at a time is ~4x faster
    than a.t().contiguous(). On CUDA a tiled Triton transpose beats a.t().contiguous(), which ran
    at ~1 TB/s on an H200 (1.07 ms for 512 MiB); a narrowing cast goes first there (fewer bytes
    to transpose; the two commute)."""
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
        keys = flat.int()  # int32 keys sort ~2x faster; stable keeps tokens ascending
        order = torch.argsort(keys, stable=True)
        bounds = torch.arange(n + 1, dtype=torch.int32, device=idx.device)
        return torch.searchsorted(keys[order], bounds), order
    if n <= 1 << 16:
        # numpy sorts 16-bit keys stably by radix: 2x (N*k=131k) to 12x (16k) faster than torch
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


def _latent_sums(idx: Tensor, weights: Tensor, rows: Tensor, n: int) -> Tensor:
    """(n, d) with out[l] = sum of weights[t, j] * rows[t] over the entries idx[t, j] = l: the
    weight gradients of both kernels. On CPU one embedding_bag with a bag per latent writes the
    result once; MKL's sparse matmul zero-fills and copies an (n, d) temporary besides (~20%
    slower). On CUDA, cuSPARSE: 0.87 ms at N=4096, k=64, n=65536 on an H200, where a Triton
    per-latent kernel took 4 ms, held up by the latents with a thousand entries."""
    if idx.is_cuda:
        return _by_latent(idx, weights, n) @ rows
    crow, order = _latent_order(idx, n)
    tokens = order // idx.shape[1]  # flat position -> token
    return F.embedding_bag(  # (n, d)
        tokens, rows, crow[:-1], mode="sum", per_sample_weights=weights.reshape(-1)[order]
    )


def _topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k along dim 1, unsorted: _grouped_topk where n allows, else torch.topk. On an
    H200 at (4096, 65536), k=64 the grouped form took 0.85 ms against torch.topk's 3.29 (fp32),
    and 0.64 against 2.08 ms (bf16)."""
    rows, n = pre.shape
    if n % TOPK_GROUP != 0 or n < 8 * k * TOPK_GROUP:
        return pre.topk(k, dim=1, sorted=False)
    return _grouped_topk(pre, k, TOPK_GROUP)


def _grouped_topk(pre: Tensor, k: int, G: int) -> tuple[Tensor, Tensor]:
    """Exact top-k along dim 1 in two stages (needs n % G == 0 and n >= k * G).

    Split the n latents into n/G groups; the k largest elements of a row lie in the k groups with
    the largest maxima (fewer than k groups can hold an element larger than any one of them).
    Group g = latents {g, g + n/G, g + 2n/G, ...}: strided, so the group max is a vectorised max
    over G contiguous rows. Then the top-k among those k*G candidates: ~1.5x faster than
    torch.topk on the CPU at n=9216, k=32 in fp32 and bf16 (bench/kernels.py), ~4x on an H200.
    """
    rows, n = pre.shape
    groups = pre.view(rows, G, n // G)
    top_groups = groups.amax(1).topk(k, dim=1, sorted=False).indices  # (rows, k)
    candidates = groups.gather(2, top_groups[:, None, :].expand(-1, G, -1))  # (rows, G, k)
    values, j = candidates.view(rows, G * k).topk(k, dim=1, sorted=False)  # (rows, k)
    return values, (j // k) * (n // G) + top_groups.gather(1, j % k)


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, dead_mask, k_aux, chunk_size, b_dec, search_dtype):
        if b_dec is not None:
            x = x - b_dec  # (N, d) centred here, so that backward needs no dx for b_dec's grad
        # The pre-activations (matmul and top-k) may run in a narrower dtype; the outputs and
        # the backward keep x's and W_enc's own precision.
        W_s, b_s = W_enc, b_enc
        if search_dtype is not None and search_dtype != W_enc.dtype:
            W_s, b_s = W_enc.to(search_dtype), b_enc.to(search_dtype)
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
        acc = _acc_dtype(x.dtype)
        grad = torch.cat(grads, 1).to(acc)  # (N, K) with K = k + k_aux
        idx = torch.cat(idxs, 1)  # (N, K)
        n = W_enc.shape[1]

        dx = dW_enc = db_enc = None
        if ctx.needs_input_grad[0]:  # dx = G @ W_enc^T: the decoder's gather-sum, on W_enc^T
            if _use_triton(x):  # 0.45 ms against embedding_bag's 1.38 (H200, d=2048, K=64)
                dx = _gather_sum(grad, idx, _transposed(W_enc), x.dtype)
            else:
                W_T = _transposed(W_enc).to(acc)  # (n, d)
                dx = F.embedding_bag(idx, W_T, per_sample_weights=grad, mode="sum").to(x.dtype)
        if ctx.needs_input_grad[1]:  # dW_enc = (G^T @ x)^T; ~10x faster than index_add on CPU
            dW_enc = _transposed(_latent_sums(idx, grad, x.to(acc), n), W_enc.dtype)  # (d, n)
        db_dec = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[7]:
            db = grad.new_zeros(n).index_add_(0, idx.reshape(-1), grad.reshape(-1))  # (n,)
            db_enc = db.to(ctx.b_enc_dtype) if ctx.needs_input_grad[2] else None
            if ctx.needs_input_grad[7]:  # pre = (x - b_dec) W + b: d b_dec = -W_enc @ db, a
                db_dec = -(W_enc.to(acc) @ db).to(ctx.b_dec_dtype)  # mat-vec instead of dx
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
    search_dtype: torch.dtype | None = None,
) -> EncodeResult:
    """ReLU(TopK(x @ W_enc + b_enc)) for centred x (N, d_in), plus AuxK over the dead latents.
    With b_dec, x is uncentred and the kernel subtracts b_dec; b_dec's gradient is then the
    mat-vec -W_enc @ (per-latent gradient sums), without the (N, d) input gradient.
    search_dtype=bf16 runs the matmul and the top-k in bf16 (half the matmul's time on CPUs with
    bf16 units); the activations are those bf16 values in x's dtype, and the gradients are
    computed in x's and W_enc's own precision.

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
        *_TopKEncode.apply(x, W_enc, b_enc, k, dead_mask, k_aux, chunk_size, b_dec, search_dtype)
    )


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
            # in any order, which saves a sort (8 ms for AuxK's 1024 x 288 entries).
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


def _triton_enabled() -> bool:
    return triton is not None and os.environ.get("SAEWB_DISABLE_TRITON") != "1"


def _use_triton(t: Tensor) -> bool:
    # The kernels accumulate in fp32, so fp64 stays on the torch path.
    return _triton_enabled() and t.is_cuda and t.dtype != torch.float64


def sparse_decode(top_acts: Tensor, top_idx: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j top_acts[t, j] * W_dec[top_idx[t, j]] -> (N, d_in), without a dense (N, n) matrix."""
    if _use_triton(W_dec):
        return triton_decode(top_acts, top_idx, W_dec)
    return _SparseDecode.apply(top_acts, top_idx, W_dec)


# --------------------------------------------------------------------------------------------
# Triton decoder. d is blocked in BLOCK_D columns rather than padded to a power of two, so d=576
# runs as 9 blocks of 64 instead of one block of 1024 with 44% idle lanes.


def _block_d(d: int) -> int:
    """The widest block in (128, 64, 32) that pads d by at most 1/16."""
    for block in (128, 64):
        if -(-d // block) * block - d <= d // 16:
            return block
    return 32


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

    @triton.jit
    def _lerp(a, b, w):  # torch.lerp's formula, so the fused step rounds as the wrapper does
        return tl.where(tl.abs(w) < 0.5, a + w * (b - a), b - (b - a) * (1 - w))

    @triton.jit
    def _sf_sign_kernel(y, z, g, numel, lr, w_x, ckp1, w_y, BLOCK: tl.constexpr):
        # ScheduleFreeWrapper(Signum(momentum=0)).step for one parameter, in one pass:
        # x = lerp(y, z, 1 - 1/beta); z -= lr sign(g); x = lerp(x, z, ckp1); y = lerp(x, z, 1 - beta)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < numel
        yv = tl.load(y + offs, mask=ok, other=0.0)
        zv = tl.load(z + offs, mask=ok, other=0.0)
        gv = tl.load(g + offs, mask=ok, other=0.0)
        x = _lerp(yv, zv, w_x)
        sign = tl.where(gv > 0, 1.0, tl.where(gv < 0, -1.0, gv))  # torch.sign: 0 and NaN stay
        zv = zv - lr * sign
        x = _lerp(x, zv, ckp1)
        tl.store(y + offs, _lerp(x, zv, w_y), mask=ok)
        tl.store(z + offs, zv, mask=ok)

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


def _block_k(k: int) -> int:
    return min(32, triton.next_power_of_2(k))


def _gather_sum(vals: Tensor, idx: Tensor, table: Tensor, dtype: torch.dtype) -> Tensor:
    """out[t] = sum_j vals[t, j] * table[idx[t, j]], accumulated in fp32 (Triton, CUDA)."""
    vals, idx, table = vals.contiguous(), idx.contiguous(), table.contiguous()
    (N, K), d = idx.shape, table.shape[1]
    out = table.new_empty(N, d, dtype=dtype)
    grid = (N, triton.cdiv(d, _block_d(d)))
    _decode_fwd_kernel[grid](vals, idx, table, out, K, d, _block_k(K), _block_d(d))
    return out


def _triton_transpose(a: Tensor) -> Tensor:
    """a.T of a contiguous 2-D CUDA tensor, contiguous: 64 x 64 tiles."""
    R, C = a.shape
    out = a.new_empty(C, R)
    block = 64
    _transpose_kernel[(triton.cdiv(R, block), triton.cdiv(C, block))](a, out, R, C, block, block)
    return out


def _row_block(d: int) -> int:
    return min(2048, triton.next_power_of_2(d))


def project_out_rows_(grad: Tensor, W: Tensor) -> None:
    """grad[r] -= <grad[r], W[r]> W[r] for every row, in place: one Triton pass on CUDA (reads
    grad and W once, writes grad once), plain torch elsewhere."""
    if _use_triton(W) and grad.dtype == W.dtype and grad.is_contiguous() and W.is_contiguous():
        _row_project_kernel[(W.shape[0],)](grad, W, W.shape[1], _row_block(W.shape[1]))
        return
    parallel = torch.linalg.vecdot(grad, W, dim=1)  # (n,)
    grad.addcmul_(parallel[:, None], W, value=-1)  # in place: no (n, d) product temporary


def normalize_rows_(W: Tensor, eps: float = 1e-8) -> None:
    """W[r] /= max(||W[r]||, eps) for every row, in place: one Triton pass on CUDA."""
    if _use_triton(W) and W.is_contiguous():
        _row_normalize_kernel[(W.shape[0],)](W, W.shape[1], eps, _row_block(W.shape[1]))
        return
    W /= W.norm(dim=1, keepdim=True).clamp_min(eps)


def sf_sign_step_(y: Tensor, z: Tensor, g: Tensor, lr: float, beta: float, ckp1: float) -> None:
    """One ScheduleFreeWrapper(Signum(momentum=0), momentum=beta) step of one parameter in one
    Triton pass (CUDA, contiguous fp32): y (the parameter) and z are updated in place."""
    numel, block = y.numel(), 4096
    _sf_sign_kernel[(triton.cdiv(numel, block),)](
        y, z, g, numel, lr, 1 - 1 / beta, ckp1, 1 - beta, block
    )


class _TritonDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, top_acts, top_idx, W_dec):
        top_acts, top_idx, W_dec = top_acts.contiguous(), top_idx.contiguous(), W_dec.contiguous()
        (N, k), d = top_idx.shape, W_dec.shape[1]
        out = W_dec.new_empty(N, d)
        grid = (N, triton.cdiv(d, _block_d(d)))
        _decode_fwd_kernel[grid](top_acts, top_idx, W_dec, out, k, d, _block_k(k), _block_d(d))
        ctx.save_for_backward(top_acts, top_idx, W_dec)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        top_acts, top_idx, W_dec = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        (N, k), (n, d) = top_idx.shape, W_dec.shape
        d_acts = dW_dec = None
        if ctx.needs_input_grad[0]:
            d_acts = torch.empty_like(top_acts)
            grid = (N, triton.cdiv(k, _block_k(k)))
            _decode_dacts_kernel[grid](grad_out, top_idx, W_dec, d_acts, k, d, _block_k(k), 64)
        if ctx.needs_input_grad[2]:  # cuSPARSE, as in _SparseDecode: 0.89 ms against 3.3 ms for
            # a Triton kernel per latent (H200, N=4096, k=64, n=65536, d=2048)
            acc = _acc_dtype(W_dec.dtype)
            dW_dec = _latent_sums(top_idx, top_acts.to(acc), grad_out.to(acc), n).to(W_dec.dtype)
        return d_acts, None, dW_dec


def triton_decode(top_acts: Tensor, top_idx: Tensor, W_dec: Tensor) -> Tensor:
    """sparse_decode through the Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    return _TritonDecode.apply(top_acts, top_idx, W_dec)
