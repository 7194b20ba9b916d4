"""Optimisers and the learning-rate schedule of the trainer.

  adam       Adam as in Gao et al.: linear warm-up, constant, then linear decay to zero.
  signum     sign of the momentum, same schedule.
  sf-signsgd the default: schedule-free sign descent (the `schedulefree` package's wrapper
             around plain sign SGD, momentum 0.95), as sparsify's default, with half the lr on
             W_enc: warm-up, then a constant lr and no decay (the wrapper's running average
             plays the decay's part). Per token it beats both others by far on short runs.

A schedule-free optimiser keeps two points: training computes gradients at y (what the
parameters hold while training), and the weights to use or save are the average x. `eval_weights`
switches the parameters to x for a while and back to y exactly.
"""

from __future__ import annotations

import contextlib
import math

import torch
from schedulefree import ScheduleFreeWrapper
from torch import Tensor

from hooks.errors import UserError

OPTIMIZERS = ("adam", "signum", "sf-signsgd")


class Signum(torch.optim.Optimizer):
    """p -= lr * sign(m), m = beta * m + (1 - beta) * g. Every parameter moves by exactly lr.
    With momentum 0 it is plain sign SGD: p -= lr * sign(g)."""

    def __init__(self, params, lr: float, momentum: float = 0.95):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["momentum"] == 0:
                    p.add_(p.grad.sign(), alpha=-group["lr"])
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                m: Tensor = state["momentum_buffer"]
                m.lerp_(p.grad, 1 - group["momentum"])
                p.add_(m.sign(), alpha=-group["lr"])


class ScheduleFreeSign(ScheduleFreeWrapper):
    """ScheduleFreeWrapper(Signum(momentum=0)) with the same arithmetic and the same state ('z'
    per parameter; k, lr_max and weight_sum per group), stepped per parameter without the
    wrapper's XOR swaps: one Triton pass for CUDA fp32 parameters (reads y, z and the gradient
    once, writes y and z once), four in-place torch ops elsewhere (the composed update below),
    against the wrapper's ~8 passes and 6 byte-wise XORs. The torch path overwrites each gradient
    with its sign. Weight decay at y, or another base optimiser, takes the wrapper's own step."""

    def _simple(self) -> bool:
        if self.weight_decay_at_y != 0.0 or not isinstance(self.base, Signum):
            return False
        return all(group["momentum"] == 0 for group in self.param_groups)

    @staticmethod
    def _triton_ok(tensors: list[Tensor]) -> bool:
        from sae import kernels

        return kernels.triton is not None and all(
            t.is_cuda and t.dtype == torch.float32 and t.is_contiguous() for t in tensors
        )

    @torch.no_grad()
    def step(self, closure=None):
        if not self.train_mode or not self._simple():
            return super().step(closure)
        from sae.kernels import sf_sign_step_

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        beta = self.momentum
        for group in self.param_groups:
            # the wrapper's bookkeeping, in its order (the base step does not touch it)
            k = group.get("k", 0)
            lr = group["lr"] * group.get("d", 1.0)
            lr_max = group["lr_max"] = max(lr, group.get("lr_max", 0))
            weight = ((k + 1) ** self.r) * (lr_max**self.weight_lr_power)
            weight_sum = group["weight_sum"] = group.get("weight_sum", 0.0) + weight
            ckp1 = weight / weight_sum
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "z" not in state:
                    state["z"] = torch.clone(p, memory_format=torch.preserve_format)
                z = state["z"]
                if self._triton_ok([p, p.grad, z]):
                    sf_sign_step_(p, z, p.grad, group["lr"], beta, ckp1)
                    continue
                # The wrapper's four moves (y -> x, z -= lr sign(g), x towards z, x -> y) are
                # linear, and compose to y' = lerp(y, z, ckp1) - lr (1 - beta (1 - ckp1)) sign(g)
                # on the old z: three passes, and the gradient is consumed as its own sign.
                sign = p.grad.sign_()
                p.lerp_(z, ckp1)
                p.add_(sign, alpha=-group["lr"] * (1 - beta * (1 - ckp1)))
                z.add_(sign, alpha=-group["lr"])
            group["k"] = k + 1
        return loss


def clipping_commutes(optimizer) -> bool:
    """Whether clipping the gradient (scaling it by one positive factor c) cannot change the
    update, so that the trainer may skip the clipping pass.

    True for sign descent without momentum: sign(c g) = sign(g). That includes the schedule-free
    sign descent: its momentum interpolates the iterates, and the base step takes the sign of
    the raw gradient. False for Signum with momentum: the buffer sums gradients of different
    steps, each clipped by its own factor, so its sign depends on their scales. The wrapper's
    weight decay at y moves the parameters, not the gradient, so it does not matter here.
    """
    if isinstance(optimizer, ScheduleFreeWrapper):
        optimizer = optimizer.base
    return isinstance(optimizer, Signum) and all(
        group["momentum"] == 0 for group in optimizer.param_groups
    )


def default_lr(optimizer: str, n_latents: int) -> float:
    """Gao et al.'s 1/sqrt(n) fit: 2e-4 at 2^14 latents for Adam; sparsify's 5e-3 for sign SGD."""
    base = {"adam": 2e-4, "signum": 5e-3, "sf-signsgd": 5e-3}[optimizer]
    return base / math.sqrt(n_latents / 2**14)


# Sign descent moves every entry of W_enc by lr, i.e. a column by lr * sqrt(d_in), a third of
# its unit norm per step at sparsify's lr. Half that on W_enc measured better for the
# schedule-free optimiser on both the synthetic and the SmolLM2 benchmarks (0.3-0.5 are equal).
SF_ENCODER_LR_SCALE = 0.5


def make_optimizer(name: str, model: torch.nn.Module, lr: float):
    """The optimiser for `model`'s parameters, ready to step (a schedule-free one is already in
    train mode). A param group's `lr_scale` multiplies the lr the trainer sets."""
    if name not in OPTIMIZERS:
        raise UserError(f"Unknown optimizer '{name}'; use one of {', '.join(OPTIMIZERS)}.")
    params = list(model.parameters())
    if name == "adam":
        # eps as in OpenAI's trainer: FVU-scale gradients are small.
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=6.25e-10, fused=True)
    if name == "sf-signsgd":
        named = dict(model.named_parameters())
        encoder = [named["W_enc"]] if "W_enc" in named else []
        rest = [p for p in params if all(p is not q for q in encoder)]
        groups = [{"params": encoder, "lr_scale": SF_ENCODER_LR_SCALE}] if encoder else []
        groups.append({"params": rest, "lr_scale": 1.0})
        opt = ScheduleFreeSign(Signum(groups, lr=lr, momentum=0.0), momentum=0.95)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        opt.train()  # no averaged point exists yet, so this only sets the mode
        return opt
    return Signum(params, lr=lr)


def is_schedule_free(optimizer) -> bool:
    return isinstance(optimizer, ScheduleFreeWrapper)


@contextlib.contextmanager
def eval_weights(optimizer):
    """Inside, the parameters hold the weights to evaluate or save (a schedule-free optimiser's
    average x); on exit they hold exactly what they held before (its y), bit for bit."""
    if not is_schedule_free(optimizer) or not optimizer.train_mode:
        yield
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, y in zip(params, saved, strict=True):
                p.copy_(y)
        optimizer.train_mode = True  # train() would recompute y from x, with rounding


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, constant, then linear decay to 0 over the last steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_start = total_steps - decay_steps
    if decay_steps > 0 and step >= decay_start:
        return max(0.0, (total_steps - step) / decay_steps)
    return 1.0
