"""sae.kernels against dense PyTorch references: values, gradients, AuxK, dtypes and Triton."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from sae import kernels
from sae.kernels import _topk, sparse_decode, topk_encode

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def make_encoder(N=48, d=20, n=96, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=dtype)
    W_enc = torch.randn(d, n, generator=g, dtype=dtype) / d**0.5
    b_enc = 0.1 * torch.randn(n, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, W_enc, b_enc)]


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def scatter_dense(acts, idx, n):
    """(N, k) acts at idx -> dense (N, n); differentiable in acts; duplicate indices add up."""
    return torch.zeros(acts.shape[0], n, dtype=acts.dtype).scatter_add(1, idx, acts)


def dense_reference(x, W_enc, b_enc, k, dead_mask=None, k_aux=0):
    """Ordinary autograd: dense pre-activations, top-k, ReLU, scattered back to (N, n)."""
    pre = x @ W_enc + b_enc
    idx = pre.topk(k, dim=1).indices
    main = scatter_dense(pre.gather(1, idx).relu(), idx, pre.shape[1])
    if dead_mask is None:
        return main, None
    k_dead = min(k_aux, int(dead_mask.sum()))
    aux_idx = pre.masked_fill(~dead_mask, float("-inf")).topk(k_dead, dim=1).indices
    return main, scatter_dense(pre.gather(1, aux_idx).relu(), aux_idx, pre.shape[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_encode_matches_dense_reference(dtype):
    x, W_enc, b_enc = make_encoder(dtype=dtype)
    n, k = W_enc.shape[1], 7
    out = topk_encode(x, W_enc, b_enc, k, chunk_size=10)
    assert out.top_acts.shape == (48, k) and out.top_idx.dtype == torch.int64
    assert out.aux_acts is None and out.aux_idx is None
    ours, ref = scatter_dense(out.top_acts, out.top_idx, n), dense_reference(x, W_enc, b_enc, k)[0]
    torch.testing.assert_close(ours, ref, **TOL[dtype])

    weight = torch.randn(48, n, dtype=dtype)  # a generic linear loss on the dense codes
    for g_ours, g_ref in zip(
        grads((ours * weight).sum(), [x, W_enc, b_enc]),
        grads((ref * weight).sum(), [x, W_enc, b_enc]),
        strict=True,
    ):
        torch.testing.assert_close(g_ours, g_ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decode_matches_dense_reference(dtype):
    N, n, d, k = 40, 64, 24, 6
    top_idx = torch.rand(N, n).topk(k, dim=1).indices
    top_acts = torch.rand(N, k, dtype=dtype, requires_grad=True)
    W_dec = torch.randn(n, d, dtype=dtype, requires_grad=True)
    ours = sparse_decode(top_acts, top_idx, W_dec)
    ref = scatter_dense(top_acts, top_idx, n) @ W_dec
    torch.testing.assert_close(ours, ref, **TOL[dtype])
    grad_out = torch.randn(N, d, dtype=dtype)
    for g_ours, g_ref in zip(
        grads((ours * grad_out).sum(), [top_acts, W_dec]),
        grads((ref * grad_out).sum(), [top_acts, W_dec]),
        strict=True,
    ):
        torch.testing.assert_close(g_ours, g_ref, **TOL[dtype])


def test_gradcheck_encode_with_aux():
    x, W_enc, b_enc = make_encoder(N=6, d=5, n=24, seed=1)
    dead_mask = torch.zeros(24, dtype=torch.bool)
    dead_mask[::3] = True  # 8 dead latents

    def f(x, W_enc, b_enc):
        out = topk_encode(x, W_enc, b_enc, 4, dead_mask, k_aux=3, chunk_size=4)
        return out.top_acts, out.aux_acts

    assert torch.autograd.gradcheck(f, (x, W_enc, b_enc))


@pytest.mark.parametrize("k, d", [(3, 7), (5, 2)])  # k > d too
def test_gradcheck_decode(k, d):
    top_idx = torch.rand(5, 12).topk(k, dim=1).indices
    top_acts = torch.rand(5, k, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(12, d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: sparse_decode(a, top_idx, w), (top_acts, W_dec))


def test_chunked_forward_equals_unchunked():
    x, W_enc, b_enc = make_encoder(N=100, n=200, dtype=torch.float32)
    dead_mask = torch.rand(200) < 0.3
    whole = topk_encode(x, W_enc, b_enc, 9, dead_mask, k_aux=5, chunk_size=100)
    for chunk_size in (1, 7, 64):
        chunked = topk_encode(x, W_enc, b_enc, 9, dead_mask, k_aux=5, chunk_size=chunk_size)
        for a, b in zip(whole, chunked, strict=True):
            torch.testing.assert_close(a.sort(1).values, b.sort(1).values, rtol=1e-6, atol=1e-6)


def test_two_stage_topk_is_exact():
    pre = torch.randn(16, 8192)  # large enough for the grouped path
    values, idx = _topk(pre, 32)
    torch.testing.assert_close(values.sort(1).values, pre.topk(32, dim=1).values.sort(1).values)
    torch.testing.assert_close(pre.gather(1, idx), values)
    assert all(len(set(row)) == 32 for row in idx.tolist())
    ties = torch.randint(0, 5, (16, 8192)).float()  # heavy ties: values still exact
    values, idx = _topk(ties, 32)
    assert torch.equal(values.sort(1).values, ties.topk(32, dim=1).values.sort(1).values)
    assert torch.equal(ties.gather(1, idx), values)


def test_auxk_gradient_reaches_encoder():
    """A loss built only from aux_acts trains W_enc, exactly in the selected dead columns."""
    x, W_enc, b_enc = make_encoder(N=32, n=80)
    dead_mask = torch.zeros(80, dtype=torch.bool)
    dead_mask[torch.randperm(80)[:20]] = True
    out = topk_encode(x, W_enc, b_enc, 5, dead_mask, k_aux=6)
    assert dead_mask[out.aux_idx].all()

    weight = torch.randn(32, 6, dtype=torch.float64)
    dW, db = grads((out.aux_acts * weight).sum(), [W_enc, b_enc])
    trained = out.aux_idx[out.aux_acts > 0].unique()
    assert len(trained) > 0
    assert torch.equal(dW.abs().sum(0).nonzero().squeeze(1), trained)  # nonzero columns
    assert torch.equal(db.nonzero().squeeze(1), trained)

    aux_ref = dense_reference(x, W_enc, b_enc, 5, dead_mask, 6)[1]
    dense_weight = scatter_dense(weight, out.aux_idx, 80)
    dW_ref = grads((aux_ref * dense_weight).sum(), [W_enc])[0]
    torch.testing.assert_close(dW, dW_ref, **TOL[torch.float64])


@pytest.mark.parametrize("n_dead", [0, 3])
def test_k_aux_larger_than_dead_count(n_dead):
    x, W_enc, b_enc = make_encoder(N=16, n=40)
    W_enc.data[:, :n_dead] += 1.0  # push the dead latents' pre-activations positive
    dead_mask = torch.zeros(40, dtype=torch.bool)
    dead_mask[:n_dead] = True
    out = topk_encode(x, W_enc, b_enc, 4, dead_mask, k_aux=8)
    assert out.aux_acts.shape == (16, 8)
    assert (out.aux_acts[:, n_dead:] == 0).all()  # the extra slots carry zero activation...
    assert dead_mask[out.aux_idx[:, :n_dead]].all()

    weight = torch.randn(16, 8, dtype=torch.float64)
    ours = grads((out.aux_acts * weight).sum(), [x, W_enc, b_enc])
    aux_ref = dense_reference(x, W_enc, b_enc, 4, dead_mask, 8)[1]
    ref_weight = scatter_dense(weight[:, :n_dead], out.aux_idx[:, :n_dead], 40)
    ref = grads((aux_ref * ref_weight).sum(), [x, W_enc, b_enc])  # ...and zero gradient
    for g_ours, g_ref in zip(ours, ref, strict=True):
        torch.testing.assert_close(g_ours, g_ref if g_ref is not None else torch.zeros_like(g_ours))


def test_main_and_aux_gradients_add_on_shared_latents():
    """Every latent dead and k_aux > k: AuxK re-selects the main latents; gradients must add."""
    x, W_enc, b_enc = make_encoder(N=24, n=50)
    dead_mask = torch.ones(50, dtype=torch.bool)
    out = topk_encode(x, W_enc, b_enc, 4, dead_mask, k_aux=7)
    w_main, w_aux = torch.randn(24, 4, dtype=torch.float64), torch.randn(24, 7, dtype=torch.float64)
    loss = (out.top_acts * w_main).sum() + (out.aux_acts * w_aux).sum()
    main_ref, aux_ref = dense_reference(x, W_enc, b_enc, 4, dead_mask, 7)
    loss_ref = (main_ref * scatter_dense(w_main, out.top_idx, 50)).sum() + (
        aux_ref * scatter_dense(w_aux, out.aux_idx, 50)
    ).sum()
    for g_ours, g_ref in zip(
        grads(loss, [x, W_enc, b_enc]), grads(loss_ref, [x, W_enc, b_enc]), strict=True
    ):
        torch.testing.assert_close(g_ours, g_ref)


def test_needs_input_grad_respected():
    x, W_enc, b_enc = make_encoder()
    x.requires_grad_(False)
    out = topk_encode(x, W_enc, b_enc, 5)
    out.top_acts.sum().backward()
    assert x.grad is None and W_enc.grad is not None and b_enc.grad is not None


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_bf16_close_to_fp32():
    x, W_enc, b_enc = (t.detach().bfloat16() for t in make_encoder(N=64, d=32, n=256))
    x32, W32, b32 = (t.float().requires_grad_() for t in (x, W_enc, b_enc))
    x, W_enc, b_enc = (t.requires_grad_() for t in (x, W_enc, b_enc))
    dead_mask = torch.rand(256) < 0.25
    out = topk_encode(x, W_enc, b_enc, 8, dead_mask, k_aux=4)
    assert out.top_acts.dtype == torch.bfloat16
    # fp32 reference at bf16's indices, so near-ties that round differently cannot flip the test
    pre32 = x32 @ W32 + b32
    acts32, aux32 = pre32.gather(1, out.top_idx).relu(), pre32.gather(1, out.aux_idx).relu()
    assert rel_err(out.top_acts, acts32) < 1e-2 and rel_err(out.aux_acts, aux32) < 1e-2
    assert (
        pre32.topk(8, dim=1).indices.sort(1).values == out.top_idx.sort(1).values
    ).float().mean() > 0.9

    w_main, w_aux = torch.randn(64, 8), torch.randn(64, 4)
    ours = grads(
        (out.top_acts.float() * w_main).sum() + (out.aux_acts.float() * w_aux).sum(),
        [x, W_enc, b_enc],
    )
    ref = grads((acts32 * w_main).sum() + (aux32 * w_aux).sum(), [x32, W32, b32])
    for g_ours, g_ref in zip(ours, ref, strict=True):
        assert g_ours.dtype == torch.bfloat16 and rel_err(g_ours, g_ref) < 2e-2

    W_dec32 = torch.randn(256, 32, requires_grad=True)
    W_dec = W_dec32.detach().bfloat16().requires_grad_()
    acts = out.top_acts.detach().requires_grad_()
    recon, recon32 = (
        sparse_decode(acts, out.top_idx, W_dec),
        sparse_decode(acts.float(), out.top_idx, W_dec32),
    )
    assert recon.dtype == torch.bfloat16 and rel_err(recon, recon32) < 2e-2
    grad_out = torch.randn(64, 32)
    ours = grads((recon.float() * grad_out).sum(), [acts, W_dec])
    ref = grads((recon32 * grad_out).sum(), [W_dec32])
    assert rel_err(ours[1], ref[0]) < 2e-2 and ours[0].dtype == torch.bfloat16


def run_python(code, **env):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_imports_and_decodes_without_triton():
    run_python("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        from sae import kernels
        assert kernels.triton is None
        out = kernels.sparse_decode(torch.rand(3, 2), torch.tensor([[0, 1]] * 3), torch.randn(4, 5))
        assert out.shape == (3, 5)
    """)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_decode_matches_torch_path():
    # TRITON_INTERPRET must be set before triton is first imported, so this runs in a fresh process.
    out = run_python(
        """
        import torch
        from sae.kernels import _SparseDecode, triton_decode
        shapes = [(6, 20, 72, 5), (4, 50, 576, 40)]  # d not a power of two; k > BLOCK_K
        for (N, n, d, k), dtype in zip(shapes + shapes[:1], 2 * [torch.float32] + [torch.bfloat16]):
            idx = torch.rand(N, n).topk(k, dim=1).indices
            idx[1] = idx[0]  # latents shared between tokens; some latents untouched
            acts = torch.rand(N, k, dtype=dtype, requires_grad=True)
            W_dec = torch.randn(n, d, dtype=dtype, requires_grad=True)
            grad_out = torch.randn(N, d, dtype=dtype)
            results = []
            for decode in (triton_decode, _SparseDecode.apply):
                out = decode(acts, idx, W_dec)
                results.append((out, *torch.autograd.grad(out, [acts, W_dec], grad_out)))
            for a, b in zip(*results):
                assert a.dtype == b.dtype == dtype
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        print("ok")
        """,
        TRITON_INTERPRET="1",
    )
    assert out.strip().endswith("ok")


@pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
def test_triton_dispatch(monkeypatch):
    cuda_fp32 = SimpleNamespace(is_cuda=True, dtype=torch.float32)  # stands in for a CUDA tensor
    assert kernels._use_triton(cuda_fp32)
    assert not kernels._use_triton(torch.zeros(1))  # CPU: torch path
    assert not kernels._use_triton(SimpleNamespace(is_cuda=True, dtype=torch.float64))
    monkeypatch.setenv("SAEWB_DISABLE_TRITON", "1")
    assert not kernels._use_triton(cuda_fp32)
