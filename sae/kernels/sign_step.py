"""ScheduleFreeSign's fused step: ScheduleFreeWrapper(Signum(momentum=0)) for one parameter in
one Triton pass, which reads y, z and the gradient once and writes y and z once."""

from __future__ import annotations

from torch import Tensor

from sae.kernels.triton_kernels import tl, triton

if triton is not None:

    @triton.jit
    def _lerp(a, b, w):  # torch.lerp's formula, so the fused step rounds as the wrapper does
        return tl.where(tl.abs(w) < 0.5, a + w * (b - a), b - (b - a) * (1 - w))

    @triton.jit
    def _sf_sign_kernel(y, z, g, numel, lr, w_x, ckp1, w_y, BLOCK: tl.constexpr):
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


def sf_sign_step_(y: Tensor, z: Tensor, g: Tensor, lr: float, beta: float, ckp1: float) -> None:
    """One ScheduleFreeWrapper(Signum(momentum=0), momentum=beta) step of one parameter
    (contiguous fp32, on CUDA or under TRITON_INTERPRET=1): y (the parameter) and z are updated
    in place."""
    numel, block = y.numel(), 4096
    _sf_sign_kernel[(triton.cdiv(numel, block),)](
        y, z, g, numel, lr, 1 - 1 / beta, ckp1, 1 - beta, block
    )
