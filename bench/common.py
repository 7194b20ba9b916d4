"""What every bench script measures the same way: memory, FVU, unused latents, our TrainConfig,
and sparsify's training step.

    from common import fvu, rss_mib, SparsifyTrainer     # a script in bench/ (its folder is
                                                         # on sys.path when it runs)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def clock(kind: str = "wall"):
    """A timer: "wall" is time.perf_counter; "cpu" is time.process_time, the CPU time of this
    process. On a shared machine whose cores are oversubscribed, wall time measures the queue;
    CPU time at one torch thread measures the work (at two threads it also counts spin-waits)."""
    if kind not in ("wall", "cpu"):
        raise ValueError(f"clock must be wall or cpu, got {kind!r}")
    import time

    return time.perf_counter if kind == "wall" else time.process_time


def matmul_variants(x: torch.Tensor, W: torch.Tensor) -> dict:
    """x @ W three ways: into a fresh output ("alloc"), into one preallocated output ("out"), and
    in 512-token chunks into one buffer ("chunk512", as the fused encoder runs it). The faster of
    the last two is the bound; a fresh (N, n) output also pays its page faults."""
    whole = x.new_empty(x.shape[0], W.shape[1])
    chunk = x.new_empty(512, W.shape[1])

    def chunked():
        for start in range(0, len(x), 512):
            rows = x[start : start + 512]
            torch.mm(rows, W, out=chunk[: len(rows)])

    return {"alloc": lambda: x @ W, "out": lambda: torch.mm(x, W, out=whole), "chunk512": chunked}


def rss_mib(field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident set of this process in MiB. VmHWM, unlike
    ru_maxrss, is not inherited across exec, so a child's figure is its own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fvu(x: torch.Tensor, recon: torch.Tensor) -> float:
    """sum ||x - x_hat||^2 / sum ||x - mean x||^2 over a batch, in float64."""
    x, recon = x.double(), recon.double()
    return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def unused(fired: torch.Tensor, n: int) -> float:
    """Share of the n latents that fire on no token (fired: indices of firing latents)."""
    return 1.0 - torch.unique(fired).numel() / n


def train_config(encode_dtype: str = "fp32", **kwargs):
    """Our TrainConfig with the dtype of the encoder's matmul and top-k set."""
    from sae.train import TrainConfig

    return TrainConfig(encode_dtype=encode_dtype, **kwargs)


class SparsifyTrainer:
    """EleutherAI sparsify's SparseCoder with the per-step logic of its Trainer.fit(): b_dec from
    the first batch, unit-norm decoder, FVU loss (auxk_alpha 0, no k decay, grad_acc_steps 1),
    gradient projection, did_fire bookkeeping and its per-step float(fvu) logging sync.

    optimizer "signum" is its default, schedule-free SignSGD; "adam" is torch's Adam (as without
    bitsandbytes) with its lr rule and 1000-step warm-up. encode_dtype "bf16" is its real CUDA
    default (the forward is decorated with bf16 autocast); on the CPU the undecorated forward
    runs under CPU autocast to the same effect. "fp32" calls the undecorated forward."""

    def __init__(self, d, n, k, device, optimizer, encode_dtype, steps, seed=0):
        if torch.device(device).type != "cuda":
            os.environ["SPARSIFY_DISABLE_TRITON"] = "1"  # its Triton decoder needs CUDA
        from schedulefree import ScheduleFreeWrapper
        from sparsify import SparseCoder, SparseCoderConfig
        from sparsify.sign_sgd import SignSGD
        from transformers import get_linear_schedule_with_warmup

        torch.manual_seed(seed)
        self.n = n
        self.sae = sae = SparseCoder(
            d, SparseCoderConfig(num_latents=n, k=k), device, dtype=torch.float32
        )
        self.plain = type(sae).forward.__wrapped__.__get__(sae)
        if encode_dtype == "bf16" and torch.device(device).type == "cuda":
            self.forward = sae.forward
        elif encode_dtype == "bf16":

            def forward(*a, **kw):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return self.plain(*a, **kw)

            self.forward = forward
        else:
            self.forward = self.plain
        self.schedulers = []
        if optimizer == "adam":
            self.lr = 2e-4 / (n / 2**14) ** 0.5
            self.opt = torch.optim.Adam([dict(params=sae.parameters(), lr=self.lr)])
            self.schedulers = [get_linear_schedule_with_warmup(self.opt, 1000, steps)]
        else:
            self.lr = 5e-3 / (n / 2**14) ** 0.5
            sign = SignSGD([dict(params=sae.parameters(), lr=self.lr)])
            self.opt = ScheduleFreeWrapper(sign, momentum=0.95)
            self.opt.train()
        self.schedule_free = isinstance(self.opt, ScheduleFreeWrapper)
        self.since_fired = torch.zeros(n, dtype=torch.long, device=device)
        self.did_fire = torch.zeros(n, dtype=torch.bool, device=device)
        self.steps_done = 0
        self.fvu_sum = 0.0
        self.last_fvu = float("nan")

    def step(self, x: torch.Tensor) -> None:
        """One training step on the (N, d) batch x."""
        sae = self.sae
        num_tokens = x.shape[0]  # their tokens_mask.sum().item(): a host sync as well
        if self.steps_done == 0:
            sae.b_dec.data = x.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = self.forward(x=x, y=x, dead_mask=None, total_variance=total_variance)
        self.did_fire[out.latent_indices.flatten()] = True
        self.fvu_sum += float(out.fvu.detach())  # their per-step logging sync
        loss = out.fvu + 0.0 * out.auxk_loss + out.multi_topk_fvu / 8
        loss.div(1).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        for scheduler in self.schedulers:
            scheduler.step()
        with torch.no_grad():
            self.since_fired += num_tokens
            self.since_fired[self.did_fire] = 0
            self.did_fire.zero_()
        self.last_fvu = float(out.fvu.detach())
        self.steps_done += 1

    def evaluate(self, x_eval: torch.Tensor) -> dict:
        """FVU and unused latents on held-out rows, at the weights its checkpoints save (the
        schedule-free average)."""
        if self.schedule_free:
            self.opt.eval()
        with torch.no_grad():
            out = self.plain(x_eval)
        return {
            "fvu": fvu(x_eval, out.sae_out),
            "unused_latents": unused(out.latent_indices[out.latent_acts > 0], self.n),
            "train_fvu_last": self.last_fvu,
            "lr": self.lr,
        }


def stub_cache(d: int, folder: Path) -> Path:
    """A 4096-token planted-feature cache of width d (site "synthetic"): only so that a Trainer
    can be built (it reads d_in and the model name from the manifest) when its batches come from
    elsewhere."""
    from sae.synthetic import write_synthetic_cache

    path = Path(folder) / f"cache-d{d}"
    if not (path / "manifest.json").exists():
        write_synthetic_cache(path, d, n_features=64, tokens=4096)
    return path
