"""Training state on disk: one SAE's trainable state (Member), checkpoints, and the run's files.

  state/latest.json           which checkpoint is current (rewritten atomically, last)
  state/step-<tokens>[-b]/    data-<rank>.safetensors + .json   mixing buffer, RNG, data cursor
                              sae-<i>.safetensors + .json        weights (unfolded), optimiser,
                                                                 dead-latent counters, log sums
                              trainer.json                       step, tokens, derived values
  state/train_config.json     the config a resume must match

A checkpoint is written into a hidden folder, renamed to a name no other checkpoint has, and
only then published in latest.json: the checkpoint latest.json names is never touched before
the new one is, so a crash at any point leaves a whole checkpoint to resume from.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hooks.paths import atomic_write, atomic_write_bytes, atomic_write_json
from sae.config import SAEConfig
from sae.model import SAE
from sae.optim import default_lr, make_optimizer
from sae.train.config import TrainConfig


class Member:
    """One SAE with its optimiser, dead-latent counter and the log sums since the last line."""

    def __init__(self, index: int, site: str, sae_cfg: SAEConfig, cfg: TrainConfig, run_dir: Path,
                 device: torch.device):  # fmt: skip
        self.index, self.site, self.cfg, self.run_dir = index, site, cfg, run_dir
        self.sae = SAE(sae_cfg, device=device)
        self.sae.reset_parameters(torch.Generator().manual_seed(cfg.seed + 1000 * index))
        self.lr = cfg.lr or default_lr(cfg.optimizer, sae_cfg.n_latents)
        self.optimizer = make_optimizer(cfg.optimizer, self.sae, self.lr)
        self.since_fired = torch.zeros(sae_cfg.n_latents, dtype=torch.int64, device=device)
        self.log_sums: dict[str, float | torch.Tensor] = {}

    def state(self) -> tuple[dict, dict]:
        tensors = {f"param.{k}": v.detach().contiguous() for k, v in self.sae.state_dict().items()}
        tensors["since_fired"] = self.since_fired
        opt = self.optimizer.state_dict()
        # the sums of a log line in progress, so that a resumed run's first line averages the
        # same steps as an uninterrupted run's
        log_sums = {k: float(v) for k, v in self.log_sums.items()}
        meta = {"param_groups": opt["param_groups"], "scalars": {}, "log_sums": log_sums}
        for pid, entries in opt["state"].items():
            for key, value in entries.items():
                if torch.is_tensor(value):
                    tensors[f"opt.{pid}.{key}"] = value.contiguous()
                else:
                    meta["scalars"][f"{pid}.{key}"] = value
        return tensors, meta

    def load(self, tensors: dict, meta: dict) -> None:
        self.sae.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("param.")})
        self.since_fired.copy_(tensors["since_fired"])
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = value
        for key, value in meta["scalars"].items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.log_sums = dict(meta.get("log_sums", {}))


def write_tensors(path: Path, tensors: dict, meta: dict) -> None:
    """`<path>.safetensors` and `<path>.json`, each written atomically with fsync."""
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(Path(f"{path}.safetensors"), lambda tmp: save_file(cpu, str(tmp)))
    atomic_write_json(Path(f"{path}.json"), meta)


def read_tensors(path: Path, device: torch.device | str = "cpu") -> tuple[dict, dict]:
    tensors = load_file(f"{path}.safetensors", device=str(device))
    return tensors, json.loads(Path(f"{path}.json").read_text())


def checkpoint_name(tokens: int, current: str | None) -> str:
    """A folder name for the checkpoint at `tokens` that is not `current`, the published one
    (a run that ends on a checkpoint boundary saves the same token count twice)."""
    name = f"step-{tokens:012d}"
    return f"{name}-b" if name == current else name


def make_empty_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def publish_checkpoint(state_dir: Path, tmp: Path, name: str, tokens: int) -> None:
    """Rename the written folder into place, point latest.json at it, then drop the others."""
    os.replace(tmp, state_dir / name)
    _fsync_dir(state_dir)
    atomic_write_json(state_dir / "latest.json", {"dir": name, "tokens": tokens})
    _fsync_dir(state_dir)
    for old in state_dir.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(state_dir: Path) -> Path:
    return state_dir / json.loads((state_dir / "latest.json").read_text())["dir"]


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def truncate_log(path: Path, tokens: int) -> None:
    """Drop log lines written after the checkpoint a resume starts from."""
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line and json.loads(line)["tokens"] <= tokens
    ]
    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())


def versions() -> dict:
    import transformers

    from sae import __version__

    return {
        "sae-workbench": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }
