"""Optimisers and the learning-rate schedule of the trainer.

`Signum` (sign of the momentum) is what sparsify's default SignSGD amounts to; Adam follows Gao et
al. Both get the same schedule: linear warm-up, constant, then linear decay to zero.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hooks.errors import UserError

OPTIMIZERS = ("adam", "signum")


class Signum(torch.optim.Optimizer):
    """p -= lr * sign(m), m = beta * m + (1 - beta) * g. Every parameter moves by exactly lr."""

    def __init__(self, params, lr: float, momentum: float = 0.95):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                m: Tensor = state["momentum_buffer"]
                m.lerp_(p.grad, 1 - group["momentum"])
                p.add_(m.sign(), alpha=-group["lr"])


def default_lr(optimizer: str, n_latents: int) -> float:
    """Gao et al.'s 1/sqrt(n) fit: 2e-4 at 2^14 latents for Adam; sparsify's 5e-3 for sign SGD."""
    base = {"adam": 2e-4, "signum": 5e-3}[optimizer]
    return base / math.sqrt(n_latents / 2**14)


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise UserError(f"Unknown optimizer '{name}'; use one of {', '.join(OPTIMIZERS)}.")
    if name == "adam":
        # eps as in OpenAI's trainer: FVU-scale gradients are small.
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=6.25e-10, fused=True)
    return Signum(params, lr=lr)


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, constant, then linear decay to 0 over the last steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_start = total_steps - decay_steps
    if decay_steps > 0 and step >= decay_start:
        return max(0.0, (total_steps - step) / decay_steps)
    return 1.0
