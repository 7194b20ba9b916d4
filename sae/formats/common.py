"""What every checkpoint format shares: the file names, and reading and writing cfg.json and
safetensors files with one-sentence errors (loading never unpickles)."""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor

from hooks.errors import UserError
from hooks.paths import atomic_write_bytes
from sae.config import BATCH_KINDS, SAEConfig

CFG = "cfg.json"
WEIGHTS = "sae.safetensors"  # ours and sparsify's
SAELENS_WEIGHTS, SAELENS_SPARSITY = "sae_weights.safetensors", "sparsity.safetensors"


def weights_file(run_dir: Path) -> Path | None:
    """The SAE weights file of a run folder (ours, sparsify's or SAELens's), or None."""
    for name in (WEIGHTS, SAELENS_WEIGHTS):
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    return None


def log10_density(density: Tensor) -> Tensor:
    """SAELens's sparsity convention: log10 of the firing fraction, 1e-10 keeping dead ones finite."""
    return torch.log10(density + 1e-10)


def tensor_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """Our folded tensors and their shapes: the batch kinds and JumpReLU add a threshold per
    latent, a transcoder with a skip connection its W_skip."""
    d, n, d_out = cfg.d_in, cfg.n_latents, cfg.d_out
    shapes = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d_out), "b_dec": (d_out,)}
    if cfg.architecture in (*BATCH_KINDS, "jumprelu"):
        shapes["threshold"] = (n,)
    return shapes | ({"W_skip": (d, d_out)} if cfg.skip else {})


def write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata={"format": "pt"}))


def read_cfg(file: Path) -> dict:
    if not file.is_file():
        raise UserError(f"{file.parent} has no {CFG}, which every SAE checkpoint needs.")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file} is not valid JSON ({e}).") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{file} must hold a JSON object, not {type(cfg).__name__}.")
    return cfg


def read_tensors(file: Path, keys_only: bool = False) -> dict[str, Tensor] | list[str]:
    if not file.is_file():
        raise UserError(f"{file.parent} has no {file.name}, which its {CFG} calls for.")
    try:
        if keys_only:
            with safe_open(file, framework="pt") as f:
                return list(f.keys())
        return {k: v.float() for k, v in safetensors.torch.load_file(file).items()}
    except Exception as e:  # SafetensorError, OSError...: any failure means an unreadable file
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{file} is not a readable safetensors file ({reason}).") from None


def check_tensors(tensors: dict[str, Tensor], shapes: dict[str, tuple], file: Path, cfg) -> None:
    """Every expected tensor is there, with the shape that cfg.json implies."""
    for name, shape in shapes.items():
        if name not in tensors:
            have = ", ".join(sorted(tensors)) or "none"
            raise UserError(f"{file} has no tensor '{name}' (it has: {have}).")
        if tuple(tensors[name].shape) != shape:
            d_out = f", d_out={cfg.d_out}" if cfg.is_transcoder else ""
            raise UserError(
                f"Tensor {name} in {file} has shape {tuple(tensors[name].shape)}, but {CFG} "
                f"(d_in={cfg.d_in}{d_out}, {cfg.n_latents} latents) needs {shape}."
            )


def entry(raw: dict, key: str, file: Path):
    if key not in raw:
        raise UserError(f"{file} has no '{key}' entry (it has: {', '.join(raw)}).")
    return raw[key]
