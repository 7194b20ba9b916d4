"""What moves JumpReLU's L0 towards its target: the trainer's defaults against two changes to the
L0 penalty, on the planted-feature data and shape of bench/train_kinds.py (d 576, n 9,216, target
L0 32, 200k tokens, batch 4096, FVU and L0 on its held-out batch).

    PYTHONPATH=. python bench/jumprelu_l0.py [--variants default,pre,pre+signed] [--rates 0.1,1,3]

  default     the trainer as it is: the L0 step's straight-through gradient reaches theta only,
              and the controller moves lambda > 0 multiplicatively (sae.sparsity)
  pre         the step's straight-through gradient also reaches the pre-activations (d step /
              d pre = +K((pre - theta) / bandwidth) / bandwidth), so the penalty moves the encoder
  signed      lambda moves additively by rate x lambda_0 x clip((L0 - k) / k) a step, so it turns
              negative, and pulls the L0 up, while the code is sparser than k
  pre+signed  both

The changes are patched in for the run only; BENCHMARKS.md ("JumpReLU's L0") has the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import train_kinds  # noqa: E402
from train_throughput import synthetic_data  # noqa: E402

import sae.kernels.threshold as threshold  # noqa: E402
import sae.model as model  # noqa: E402
from sae.sparsity import INITIAL_SPARSITY, control_sparsity  # noqa: E402

DEFAULT_BACKWARD = threshold._ThresholdEncode.backward


def step_grad_into_pre(ctx, grad_acts, grad_idx, grad_step):
    """The threshold encoder's backward, plus the L0 step's pseudo-gradient into pre."""
    grads = list(DEFAULT_BACKWARD(ctx, grad_acts, grad_idx, grad_step))
    if grad_step is None:
        return tuple(grads)
    x, W_enc, theta_param, pre_kept, idx = ctx.saved_tensors
    theta = theta_param.float()[idx]  # (N, K)
    eps = ctx.bandwidth
    kernel = ((pre_kept.float() - theta).abs() < eps / 2).float() / eps  # (N, K)
    grad_pre = (grad_step.float() * kernel).to(x.dtype)
    needs = ctx.needs_input_grad
    extra = threshold.sparse_encoder_grads(
        grad_pre, idx, x, W_enc, needs[0], needs[1], needs[2], needs[6],
        ctx.b_enc_dtype, ctx.b_dec_dtype,
    )  # fmt: skip
    for slot, g in zip((0, 1, 2, 6), extra):
        if g is not None:
            grads[slot] = g if grads[slot] is None else grads[slot] + g
    return tuple(grads)


def signed_controller(rate: float, k: int):
    start = INITIAL_SPARSITY / k

    @torch.no_grad()
    def control(coefficient, l0, target):
        coefficient.add_(rate * start * ((l0 - target) / target).clamp(-1, 1))

    return control


def run(variant: str, rate: float, cache: Path, held: Path, k: int) -> dict:
    threshold._ThresholdEncode.backward = staticmethod(
        step_grad_into_pre if "pre" in variant else DEFAULT_BACKWARD
    )
    model.control_sparsity = signed_controller(rate, k) if "signed" in variant else control_sparsity
    spec = dict(kind="jumprelu", trainer="ours", cache=str(cache), eval=str(held), n=9216, k=k,
                tokens=200_000, batch=4096)  # fmt: skip
    result = train_kinds.run_ours(spec)
    return dict(variant=variant, rate=rate if "signed" in variant else None,
                fvu=round(result["fvu"], 4), l0=round(result["l0"], 2))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="default,pre,signed,pre+signed")
    p.add_argument("--rates", default="0.1,1,3", help="the signed controller's rates")
    p.add_argument("--k", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(2)
    cache, held, _ = synthetic_data(200_000)
    for variant in args.variants.split(","):
        rates = [float(r) for r in args.rates.split(",")] if "signed" in variant else [None]
        for rate in rates:
            print(json.dumps(run(variant, rate, cache, held, args.k)), flush=True)


if __name__ == "__main__":
    main()
