"""sae.kernels against dense PyTorch references: values, gradients, AuxK, dtypes and Triton.

Every kernel check runs on the CPU and, when torch sees a CUDA device, again on it: there the
Triton decoder is chosen automatically for fp32 and bf16 (fp64 stays on the torch path), so
`python -m pytest tests/test_kernels.py` on a GPU machine checks the real CUDA and Triton code.
"""

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
from sae.kernels import sparse_decode, topk_encode
from sae.kernels.encode import _topk, _transposed
from sae.kernels.sparse import _latent_order, _latent_sums
from sae.kernels.triton_kernels import _use_triton

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}

HAS_CUDA = torch.cuda.is_available()
# "cpu" always; "cuda" wherever torch sees a GPU (skipped otherwise, so CI time is unchanged)
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")),
]
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


def make_encoder(N=48, d=20, n=96, dtype=torch.float64, seed=0, device="cpu"):
    """Drawn on the CPU with a seeded generator, so every device gets the same inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=dtype)
    W_enc = torch.randn(d, n, generator=g, dtype=dtype) / d**0.5
    b_enc = 0.1 * torch.randn(n, generator=g, dtype=dtype)
    return [t.to(device).requires_grad_() for t in (x, W_enc, b_enc)]


def rand(*shape, dtype=torch.float32, device="cpu", requires_grad=False, normal=False):
    t = (torch.randn if normal else torch.rand)(*shape, dtype=dtype).to(device)
    return t.requires_grad_(requires_grad)


def random_indices(N, n, k, device="cpu"):
    """(N, k) distinct latents per token."""
    return torch.rand(N, n).topk(k, dim=1).indices.to(device)


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def scatter_dense(acts, idx, n):
    """(N, k) acts at idx -> dense (N, n); differentiable in acts; duplicate indices add up."""
    return torch.zeros(acts.shape[0], n, dtype=acts.dtype, device=acts.device).scatter_add(
        1, idx, acts
    )


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_encode_matches_dense_reference(dtype, device):
    x, W_enc, b_enc = make_encoder(dtype=dtype, device=device)
    n, k = W_enc.shape[1], 7
    out = topk_encode(x, W_enc, b_enc, k, chunk_size=10)
    assert out.top_acts.shape == (48, k) and out.top_idx.dtype == torch.int64
    assert out.top_acts.device.type == device
    assert out.aux_acts is None and out.aux_idx is None
    ours, ref = scatter_dense(out.top_acts, out.top_idx, n), dense_reference(x, W_enc, b_enc, k)[0]
    torch.testing.assert_close(ours, ref, **TOL[dtype])

    weight = rand(48, n, dtype=dtype, device=device, normal=True)  # a generic linear loss
    for g_ours, g_ref in zip(
        grads((ours * weight).sum(), [x, W_enc, b_enc]),
        grads((ref * weight).sum(), [x, W_enc, b_enc]),
        strict=True,
    ):
        torch.testing.assert_close(g_ours, g_ref, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decode_matches_dense_reference(dtype, device):
    N, n, d, k = 40, 64, 24, 6
    top_idx = random_indices(N, n, k, device)
    top_acts = rand(N, k, dtype=dtype, device=device, requires_grad=True)
    W_dec = rand(n, d, dtype=dtype, device=device, requires_grad=True, normal=True)
    ours = sparse_decode(top_acts, top_idx, W_dec)
    ref = scatter_dense(top_acts, top_idx, n) @ W_dec
    torch.testing.assert_close(ours, ref, **TOL[dtype])
    grad_out = rand(N, d, dtype=dtype, device=device, normal=True)
    for g_ours, g_ref in zip(
        grads((ours * grad_out).sum(), [top_acts, W_dec]),
        grads((ref * grad_out).sum(), [top_acts, W_dec]),
        strict=True,
    ):
        torch.testing.assert_close(g_ours, g_ref, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_encode_with_aux(device):
    x, W_enc, b_enc = make_encoder(N=6, d=5, n=24, seed=1, device=device)
    dead_mask = torch.zeros(24, dtype=torch.bool, device=device)
    dead_mask[::3] = True  # 8 dead latents

    def f(x, W_enc, b_enc):
        out = topk_encode(x, W_enc, b_enc, 4, dead_mask, k_aux=3, chunk_size=4)
        return out.top_acts, out.aux_acts

    assert torch.autograd.gradcheck(f, (x, W_enc, b_enc))


@pytest.mark.parametrize("device", DEVICES)
def test_b_dec_inside_the_kernel(device):
    """topk_encode(x, ..., b_dec=b) is topk_encode(x - b, ...) in value and in every gradient,
    with b_dec's gradient from the mat-vec instead of the input gradient; gradcheck in fp64."""
    x, W_enc, b_enc = make_encoder(N=6, d=5, n=24, seed=2, device=device)
    x = x.detach()  # data: the trainer never needs dx
    b_dec = rand(5, dtype=torch.float64, device=device, requires_grad=True, normal=True)
    dead_mask = torch.zeros(24, dtype=torch.bool, device=device)
    dead_mask[::4] = True

    def f(b_dec, W_enc, b_enc):
        out = topk_encode(x, W_enc, b_enc, 4, dead_mask, k_aux=3, chunk_size=4, b_dec=b_dec)
        return out.top_acts, out.aux_acts

    assert torch.autograd.gradcheck(f, (b_dec, W_enc, b_enc))
    inside = topk_encode(x, W_enc, b_enc, 4, dead_mask, 3, b_dec=b_dec)
    outside = topk_encode(x - b_dec, W_enc, b_enc, 4, dead_mask, 3)
    assert torch.equal(inside.top_idx, outside.top_idx)
    weight = rand(6, 4, dtype=torch.float64, device=device, normal=True)
    params = [b_dec, W_enc, b_enc]
    for a, b in zip(
        grads((inside.top_acts * weight).sum() + inside.aux_acts.sum(), params),
        grads((outside.top_acts * weight).sum() + outside.aux_acts.sum(), params),
        strict=True,
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k, d", [(3, 7), (5, 2)])  # k > d too
def test_gradcheck_decode(k, d, device):
    top_idx = random_indices(5, 12, k, device)
    top_acts = rand(5, k, dtype=torch.float64, device=device, requires_grad=True)
    W_dec = rand(12, d, dtype=torch.float64, device=device, requires_grad=True, normal=True)
    assert torch.autograd.gradcheck(lambda a, w: sparse_decode(a, top_idx, w), (top_acts, W_dec))


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_forward_equals_unchunked(device):
    x, W_enc, b_enc = make_encoder(N=100, n=200, dtype=torch.float32, device=device)
    dead_mask = (torch.rand(200) < 0.3).to(device)
    whole = topk_encode(x, W_enc, b_enc, 9, dead_mask, k_aux=5, chunk_size=100)
    for chunk_size in (1, 7, 64):
        chunked = topk_encode(x, W_enc, b_enc, 9, dead_mask, k_aux=5, chunk_size=chunk_size)
        for a, b in zip(whole, chunked, strict=True):
            torch.testing.assert_close(a.sort(1).values, b.sort(1).values, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_two_stage_topk_is_exact(device):
    pre = torch.randn(16, 8192).to(device)  # large enough for the grouped path on the CPU
    values, idx = _topk(pre, 32)
    torch.testing.assert_close(values.sort(1).values, pre.topk(32, dim=1).values.sort(1).values)
    torch.testing.assert_close(pre.gather(1, idx), values)
    assert all(len(set(row)) == 32 for row in idx.tolist())
    ties = torch.randint(0, 5, (16, 8192)).float().to(device)  # heavy ties: values still exact
    values, idx = _topk(ties, 32)
    assert torch.equal(values.sort(1).values, ties.topk(32, dim=1).values.sort(1).values)
    assert torch.equal(ties.gather(1, idx), values)


@pytest.mark.parametrize("device", DEVICES)
def test_auxk_gradient_reaches_encoder(device):
    """A loss built only from aux_acts trains W_enc, exactly in the selected dead columns."""
    x, W_enc, b_enc = make_encoder(N=32, n=80, device=device)
    dead_mask = torch.zeros(80, dtype=torch.bool, device=device)
    dead_mask[torch.randperm(80)[:20].to(device)] = True
    out = topk_encode(x, W_enc, b_enc, 5, dead_mask, k_aux=6)
    assert dead_mask[out.aux_idx].all()

    weight = rand(32, 6, dtype=torch.float64, device=device, normal=True)
    dW, db = grads((out.aux_acts * weight).sum(), [W_enc, b_enc])
    trained = out.aux_idx[out.aux_acts > 0].unique()
    assert len(trained) > 0
    assert torch.equal(dW.abs().sum(0).nonzero().squeeze(1), trained)  # nonzero columns
    assert torch.equal(db.nonzero().squeeze(1), trained)

    aux_ref = dense_reference(x, W_enc, b_enc, 5, dead_mask, 6)[1]
    dense_weight = scatter_dense(weight, out.aux_idx, 80)
    dW_ref = grads((aux_ref * dense_weight).sum(), [W_enc])[0]
    torch.testing.assert_close(dW, dW_ref, **TOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_dead", [0, 3])
def test_k_aux_larger_than_dead_count(n_dead, device):
    x, W_enc, b_enc = make_encoder(N=16, n=40, device=device)
    W_enc.data[:, :n_dead] += 1.0  # push the dead latents' pre-activations positive
    dead_mask = torch.zeros(40, dtype=torch.bool, device=device)
    dead_mask[:n_dead] = True
    out = topk_encode(x, W_enc, b_enc, 4, dead_mask, k_aux=8)
    assert out.aux_acts.shape == (16, 8)
    assert (out.aux_acts[:, n_dead:] == 0).all()  # the extra slots carry zero activation...
    assert dead_mask[out.aux_idx[:, :n_dead]].all()

    weight = rand(16, 8, dtype=torch.float64, device=device, normal=True)
    ours = grads((out.aux_acts * weight).sum(), [x, W_enc, b_enc])
    aux_ref = dense_reference(x, W_enc, b_enc, 4, dead_mask, 8)[1]
    ref_weight = scatter_dense(weight[:, :n_dead], out.aux_idx[:, :n_dead], 40)
    ref = grads((aux_ref * ref_weight).sum(), [x, W_enc, b_enc])  # ...and zero gradient
    for g_ours, g_ref in zip(ours, ref, strict=True):
        torch.testing.assert_close(g_ours, g_ref if g_ref is not None else torch.zeros_like(g_ours))


@pytest.mark.parametrize("device", DEVICES)
def test_main_and_aux_gradients_add_on_shared_latents(device):
    """Every latent dead and k_aux > k: AuxK re-selects the main latents; gradients must add."""
    x, W_enc, b_enc = make_encoder(N=24, n=50, device=device)
    dead_mask = torch.ones(50, dtype=torch.bool, device=device)
    out = topk_encode(x, W_enc, b_enc, 4, dead_mask, k_aux=7)
    w_main = rand(24, 4, dtype=torch.float64, device=device, normal=True)
    w_aux = rand(24, 7, dtype=torch.float64, device=device, normal=True)
    loss = (out.top_acts * w_main).sum() + (out.aux_acts * w_aux).sum()
    main_ref, aux_ref = dense_reference(x, W_enc, b_enc, 4, dead_mask, 7)
    loss_ref = (main_ref * scatter_dense(w_main, out.top_idx, 50)).sum() + (
        aux_ref * scatter_dense(w_aux, out.aux_idx, 50)
    ).sum()
    for g_ours, g_ref in zip(
        grads(loss, [x, W_enc, b_enc]), grads(loss_ref, [x, W_enc, b_enc]), strict=True
    ):
        torch.testing.assert_close(g_ours, g_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_needs_input_grad_respected(device):
    x, W_enc, b_enc = make_encoder(device=device)
    x.requires_grad_(False)
    out = topk_encode(x, W_enc, b_enc, 5)
    out.top_acts.sum().backward()
    assert x.grad is None and W_enc.grad is not None and b_enc.grad is not None


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_close_to_fp32(device):
    x, W_enc, b_enc = (
        t.detach().bfloat16() for t in make_encoder(N=64, d=32, n=256, device=device)
    )
    x32, W32, b32 = (t.float().requires_grad_() for t in (x, W_enc, b_enc))
    x, W_enc, b_enc = (t.requires_grad_() for t in (x, W_enc, b_enc))
    dead_mask = (torch.rand(256) < 0.25).to(device)
    out = topk_encode(x, W_enc, b_enc, 8, dead_mask, k_aux=4)
    assert out.top_acts.dtype == torch.bfloat16
    # fp32 reference at bf16's indices, so near-ties that round differently cannot flip the test
    pre32 = x32 @ W32 + b32
    acts32, aux32 = pre32.gather(1, out.top_idx).relu(), pre32.gather(1, out.aux_idx).relu()
    assert rel_err(out.top_acts, acts32) < 1e-2 and rel_err(out.aux_acts, aux32) < 1e-2
    assert (
        pre32.topk(8, dim=1).indices.sort(1).values == out.top_idx.sort(1).values
    ).float().mean() > 0.9

    w_main = rand(64, 8, device=device, normal=True)
    w_aux = rand(64, 4, device=device, normal=True)
    ours = grads(
        (out.top_acts.float() * w_main).sum() + (out.aux_acts.float() * w_aux).sum(),
        [x, W_enc, b_enc],
    )
    ref = grads((acts32 * w_main).sum() + (aux32 * w_aux).sum(), [x32, W32, b32])
    for g_ours, g_ref in zip(ours, ref, strict=True):
        assert g_ours.dtype == torch.bfloat16 and rel_err(g_ours, g_ref) < 2e-2

    W_dec32 = rand(256, 32, device=device, requires_grad=True, normal=True)
    W_dec = W_dec32.detach().bfloat16().requires_grad_()
    acts = out.top_acts.detach().requires_grad_()
    recon, recon32 = (
        sparse_decode(acts, out.top_idx, W_dec),
        sparse_decode(acts.float(), out.top_idx, W_dec32),
    )
    assert recon.dtype == torch.bfloat16 and rel_err(recon, recon32) < 2e-2
    grad_out = rand(64, 32, device=device, normal=True)
    ours = grads((recon.float() * grad_out).sum(), [acts, W_dec])
    ref = grads((recon32 * grad_out).sum(), [W_dec32])
    assert rel_err(ours[1], ref[0]) < 2e-2 and ours[0].dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_encode_dtype_with_fp32_gradients(device):
    """encode_dtype=bf16 on fp32 weights: bf16 values at nearly the fp32 top-k, returned in fp32,
    and gradients exactly those of the fp32 pre-activations at the chosen latents."""
    x, W_enc, b_enc = make_encoder(N=64, d=32, n=256, dtype=torch.float32, device=device)
    x = x.detach()
    b_dec = rand(32, device=device, requires_grad=True, normal=True)
    dead_mask = (torch.rand(256, generator=torch.Generator().manual_seed(1)) < 0.25).to(device)
    out = topk_encode(x, W_enc, b_enc, 8, dead_mask, 4, b_dec=b_dec, encode_dtype=torch.bfloat16)
    assert out.top_acts.dtype == out.aux_acts.dtype == torch.float32
    pre32 = (x - b_dec) @ W_enc + b_enc  # (64, 256)
    acts32, aux32 = pre32.gather(1, out.top_idx), pre32.gather(1, out.aux_idx)
    assert (
        rel_err(out.top_acts, acts32.relu()) < 1e-2 and rel_err(out.aux_acts, aux32.relu()) < 1e-2
    )
    exact = pre32.topk(8, dim=1).indices.sort(1).values
    overlap = (exact == out.top_idx.sort(1).values).float().mean()
    assert 0.9 < overlap <= 1.0
    assert not torch.equal(out.top_acts, acts32.relu())  # the values did come from bf16

    w_main = rand(64, 8, device=device, normal=True)
    w_aux = rand(64, 4, device=device, normal=True)
    params = [W_enc, b_enc, b_dec]
    ours = grads((out.top_acts * w_main).sum() + (out.aux_acts * w_aux).sum(), params)
    # the reference masks with the kernel's own ReLU decisions, made on the bf16 values
    ref_loss = (acts32 * (out.top_acts > 0) * w_main).sum() + (
        aux32 * (out.aux_acts > 0) * w_aux
    ).sum()
    for g_ours, g_ref in zip(ours, grads(ref_loss, params), strict=True):
        assert g_ours.dtype == torch.float32
        torch.testing.assert_close(g_ours, g_ref, **TOL[torch.float32])


@pytest.mark.parametrize("n", [50, 70_000])  # 16-bit radix sort, and torch's sort beyond it
def test_latent_sums_against_index_add(n):
    g = torch.Generator().manual_seed(3)
    N, k, d = 40, 6, 5
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(N)])
    idx[1] = idx[0]  # latents shared between tokens
    weights = torch.randn(N, k, generator=g, dtype=torch.float64)
    rows = torch.randn(N, d, generator=g, dtype=torch.float64)
    ref = torch.zeros(n, d, dtype=torch.float64).index_add_(
        0, idx.reshape(-1), (weights[:, :, None] * rows[:, None, :]).reshape(-1, d)
    )
    torch.testing.assert_close(_latent_sums(idx, weights, rows, n), ref)
    crow, order = _latent_order(idx, n)
    assert torch.equal(idx.reshape(-1)[order], idx.reshape(-1).sort(stable=True).values)
    assert torch.equal(crow[-1], torch.tensor(N * k)) and bool(
        (order.diff()[idx.reshape(-1)[order][1:] == idx.reshape(-1)[order][:-1]] > 0).all()
    )  # stable


def run_python(code, **env):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    if result.returncode and env.get("TRITON_INTERPRET") == "1" and INTERPRETER_BUG in output:
        import numpy
        import triton

        pytest.skip(
            f"triton {triton.__version__}'s interpreter cannot run under numpy "
            f"{numpy.__version__} (it calls int() on 1-element arrays); the CUDA variant of this "
            "test checks the kernels wherever a GPU is present"
        )
    assert result.returncode == 0, output
    return result.stdout


# triton 3.6's interpreter (triton/runtime/interpreter.py) turns scalar kernel arguments into
# 1-element arrays and calls int() on them, which numpy 2.5 refuses.
INTERPRETER_BUG = "only 0-dimensional arrays can be converted to Python scalars"


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


# The Triton decoder against the torch path, forward and both gradients. Runs in a fresh process
# under TRITON_INTERPRET=1 on the CPU (the variable must be set before triton is first imported),
# and in this process on a real GPU, where it also meets realistic widths.
TRITON_CHECK = """
import torch
from sae.kernels.decode import _SparseDecode, triton_decode

def check(device, cases):
    for (N, n, d, k), dtype in cases:
        if device == "cuda":  # poison the caching allocator: unwritten outputs come back NaN
            torch.full((1 << 26,), float("nan"), device=device)
        idx = torch.rand(N, n).topk(k, dim=1).indices.to(device)
        idx[1] = idx[0]  # latents shared between tokens; some latents untouched
        acts = torch.rand(N, k, dtype=dtype).to(device).requires_grad_()
        W_dec = torch.randn(n, d, dtype=dtype).to(device).requires_grad_()
        grad_out = torch.randn(N, d, dtype=dtype).to(device)
        results = []
        for decode in (triton_decode, _SparseDecode.apply):
            out = decode(acts, idx, W_dec)
            results.append((out, *torch.autograd.grad(out, [acts, W_dec], grad_out)))
        for a, b in zip(*results):
            assert a.dtype == b.dtype == dtype and a.device.type == device
            assert torch.isfinite(a).all()
            # atol scales with the values: sums over d = 2048 differ in order by ~1e-6 relative
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            scale = max(1.0, b.abs().max().item())
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale)
"""
SMALL_SHAPES = [(6, 20, 72, 5), (4, 50, 576, 40)]  # d not a power of two; k > BLOCK_K


# The other Triton launchers (transpose, row kernels, the sign step) against their torch
# formulations, called directly: on CPU tensors only the interpreter can run them.
TRITON_CHECK_OTHERS = """
from sae.kernels.rows import _triton_normalize_rows_, _triton_project_rows_
from sae.kernels.sign_step import sf_sign_step_
from sae.kernels.triton_kernels import _triton_transpose

def check_others(device):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(130, 70, generator=g).to(device)  # not multiples of the 64 x 64 tiles
    assert torch.equal(_triton_transpose(a), a.t())

    W = torch.randn(20, 3000, generator=g).to(device)  # d over the 2048-wide row block
    W /= W.norm(dim=1, keepdim=True)
    grad = torch.randn(20, 3000, generator=g).to(device)
    ref = grad - (grad * W).sum(1, keepdim=True) * W
    _triton_project_rows_(grad, W)
    torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6)
    V = torch.randn(20, 3000, generator=g).to(device) * 3
    V[0] = 0  # the eps clamp: a zero row stays zero
    ref = V / V.norm(dim=1, keepdim=True).clamp_min(1e-8)
    _triton_normalize_rows_(V, 1e-8)
    torch.testing.assert_close(V, ref, rtol=1e-5, atol=1e-6)

    y, z, grad = (torch.randn(5000, generator=g).to(device) for _ in range(3))
    grad[:3] = 0.0  # sign(0) = 0
    lr, beta, ckp1 = 1e-2, 0.9, 0.3
    x = torch.lerp(y, z, 1 - 1 / beta)  # the wrapper's four moves, one at a time
    z_ref = z - lr * grad.sign()
    x = torch.lerp(x, z_ref, ckp1)
    y_ref = torch.lerp(x, z_ref, 1 - beta)
    sf_sign_step_(y, z, grad, lr, beta, ckp1)
    torch.testing.assert_close(z, z_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-7)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_match_torch_path_under_interpreter():
    cases = list(zip(SMALL_SHAPES + SMALL_SHAPES[:1], 2 * ["float32"] + ["bfloat16"]))
    cases = ", ".join(f"({shape}, torch.{dtype})" for shape, dtype in cases)
    code = TRITON_CHECK + TRITON_CHECK_OTHERS + f"\ncheck('cpu', [{cases}])\ncheck_others('cpu')"
    out = run_python(code + "\nprint('ok')", TRITON_INTERPRET="1")
    assert out.strip().endswith("ok")


@needs_cuda
@pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
def test_triton_decode_matches_torch_path_on_cuda():
    namespace: dict = {}
    exec(TRITON_CHECK, namespace)
    shapes = SMALL_SHAPES + [(300, 4096, 2048, 64), (257, 9216, 576, 32)]  # GPU bench widths
    cases = [(s, dt) for s in shapes for dt in (torch.float32, torch.bfloat16)]
    namespace["check"]("cuda", cases)
    exec(TRITON_CHECK_OTHERS, namespace)
    namespace["check_others"]("cuda")


@pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
def test_triton_dispatch(monkeypatch):
    cuda_fp32 = SimpleNamespace(is_cuda=True, dtype=torch.float32)  # stands in for a CUDA tensor
    assert _use_triton(cuda_fp32)
    assert not _use_triton(torch.zeros(1))  # CPU: torch path
    assert not _use_triton(SimpleNamespace(is_cuda=True, dtype=torch.float64))
    monkeypatch.setenv("SAEWB_DISABLE_TRITON", "1")
    assert not _use_triton(cuda_fp32)


@needs_cuda
@pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_decoder_selected_on_cuda(dtype, monkeypatch):
    """On real CUDA tensors sparse_decode picks Triton for fp32 and bf16, torch for fp64."""
    acts = rand(8, 4, dtype=dtype, device="cuda", requires_grad=True)
    idx, W_dec = random_indices(8, 32, 4, "cuda"), rand(32, 16, dtype=dtype, device="cuda")
    name = type(sparse_decode(acts, idx, W_dec).grad_fn).__name__
    assert name.startswith("_TritonDecode" if dtype != torch.float64 else "_SparseDecode"), name
    monkeypatch.setenv("SAEWB_DISABLE_TRITON", "1")
    assert type(sparse_decode(acts, idx, W_dec).grad_fn).__name__.startswith("_SparseDecode")


# -- the CUDA-only branches: each against the torch formulation it replaces ----------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_matches_torch(dtype, device):
    a = torch.randn(130, 70).to(device, dtype)  # not multiples of the 64 x 64 tiles
    assert torch.equal(_transposed(a), a.t())
    assert _transposed(a).is_contiguous()
    if dtype == torch.float32:  # the narrowing cast goes first on CUDA: same values
        out = _transposed(a, torch.bfloat16)
        assert out.dtype == torch.bfloat16 and torch.equal(out, a.t().bfloat16())


@pytest.mark.parametrize("device", DEVICES)
def test_latent_order(device):
    idx = random_indices(300, 70, 6, device)
    idx[1] = idx[0]  # shared latents; with 70 latents and 6 per token, some are never used
    crow, order = _latent_order(idx, 70)
    flat = idx.reshape(-1).cpu()
    counts = torch.bincount(flat, minlength=70)
    assert torch.equal(crow.cpu(), torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    assert torch.equal(flat[order.cpu()], flat.sort(stable=True).values)
    assert torch.equal(order.cpu(), torch.argsort(flat, stable=True))  # tokens ascending


@pytest.mark.parametrize("device", DEVICES)
def test_row_projection_and_normalisation(device):
    W = torch.randn(50, 37, dtype=torch.float32).to(device)
    W /= W.norm(dim=1, keepdim=True)
    g = torch.randn(50, 37).to(device)
    ref = g - (g * W).sum(1, keepdim=True) * W
    kernels.project_out_rows_(g, W)
    torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)
    assert (g * W).sum(1).abs().max() < 1e-5

    V = torch.randn(50, 3000).to(device) * 3  # d over the 2048-wide row block: two passes
    V[0] = 0  # the eps clamp: a zero row stays zero
    ref = V / V.norm(dim=1, keepdim=True).clamp_min(1e-8)
    kernels.normalize_rows_(V)
    torch.testing.assert_close(V, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(V[0], torch.zeros_like(V[0]))


@pytest.mark.parametrize("device", DEVICES)
def test_fused_schedule_free_sign_step_matches_the_wrapper(device):
    """ScheduleFreeSign (one Triton pass per parameter on CUDA, a composed update elsewhere)
    against schedulefree's wrapper around Signum(momentum=0): parameters, z, and the group
    bookkeeping, over a warm-up."""
    from schedulefree import ScheduleFreeWrapper

    from sae.optim import ScheduleFreeSign, Signum

    g = torch.Generator().manual_seed(0)
    shapes = [(64, 33), (5000,), (1,)]  # the wrapper cannot swap 0-d tensors
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]
    for gs in grads:
        gs[0][:3] = 0.0  # sign(0) = 0: no move
    runs = []
    for cls in (ScheduleFreeWrapper, ScheduleFreeSign):
        params = [torch.nn.Parameter(t.clone().to(device)) for t in init]
        groups = [{"params": params[:1]}, {"params": params[1:]}]
        opt = cls(Signum(groups, lr=1e-2, momentum=0.0), momentum=0.95)
        opt.train()
        for step, gs in enumerate(grads):
            for group, scale in zip(opt.param_groups, (0.5, 1.0), strict=True):
                group["lr"] = 1e-2 * scale * (step + 1) / 4  # a warm-up, as the trainer's
            for p, grad in zip(params, gs, strict=True):
                p.grad = grad.clone().to(device)  # ours overwrites it with its sign
            opt.step()
        runs.append((params, opt))
    (p_ref, o_ref), (p_new, o_new) = runs
    for a, b in zip(p_ref, p_new, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(o_new.state[b]["z"], o_ref.state[a]["z"], rtol=1e-6, atol=1e-7)
    for ga, gb in zip(o_ref.param_groups, o_new.param_groups, strict=True):
        assert {k: ga[k] for k in ("k", "lr_max", "weight_sum")} == {
            k: gb[k] for k in ("k", "lr_max", "weight_sum")
        }
    o_ref.eval(), o_new.eval()  # the averages agree too
    for a, b in zip(p_ref, p_new, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
