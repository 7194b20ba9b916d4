"""The data-parallel world: which rank this is, its device, and the collectives the trainer uses.

Under torchrun every rank trains on `cuda:LOCAL_RANK` when asked for `cuda`; an explicit
`cuda:N` puts every rank on that one GPU (NCCL refuses that, so it takes gloo, as does
SAEWB_DIST_BACKEND=gloo). Every collective goes through World, which asserts that each tensor it
sends lives on the training device: NCCL refuses host tensors, and gloo would hide them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def _check(self, t: torch.Tensor) -> None:
        if t.device != self.device:
            raise AssertionError(
                f"A collective was handed a tensor on {t.device}, but training runs on "
                f"{self.device}; NCCL refuses tensors off the training device."
            )

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce in place (a no-op in one process)."""
        if self.size > 1:
            self._check(t)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            self._check(t)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` (same shape on all ranks), concatenated along dim 0 in rank order."""
        if self.size == 1:
            return t
        self._check(t)
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def pick_device(device: str, env: Mapping[str, str] | None = None) -> torch.device:
    """The device this rank trains on: `cuda` means `cuda:LOCAL_RANK` under torchrun."""
    env = os.environ if env is None else env
    if device == "cuda":  # set_device needs an index; under torchrun it is this rank's GPU
        return torch.device("cuda", int(env.get("LOCAL_RANK", "0")))
    return torch.device(device)


def backend_for(device: str, env: Mapping[str, str] | None = None) -> str:
    """NCCL for `cuda` (one GPU per rank); gloo on CPU and for an explicit `cuda:N`, which puts
    every rank on one GPU (NCCL refuses that). SAEWB_DIST_BACKEND overrides."""
    env = os.environ if env is None else env
    if "SAEWB_DIST_BACKEND" in env:
        return env["SAEWB_DIST_BACKEND"]
    return "nccl" if device == "cuda" else "gloo"


def init_world(device: str) -> World:
    from hooks.models import parse_device

    parse_device(device)  # one sentence for an unknown device or a missing CUDA
    dev = pick_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(device=dev)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device))
    return World(rank=dist.get_rank(), size=dist.get_world_size(), device=dev)
