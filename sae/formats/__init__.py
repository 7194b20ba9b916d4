"""Checkpoint formats: our native folder, SAELens and EleutherAI sparsify. Never pickle.

    saewb     cfg.json (SAEConfig + "format": "saewb", "version")  sae.safetensors (folded weights)
    saelens   cfg.json  sae_weights.safetensors  [sparsity.safetensors]
    sparsify  cfg.json (SparseCoderConfig + d_in)  sae.safetensors (encoder.weight [n, d], ...)

How each kind is written (load_sae reads every row back as the same kind):

    kind        SAELens SAE   SAELens transcoder (skip: ..._skip_...)         sparsify
    topk        topk          none: no TopK transcoder (use sparsify)         topk SAE or transcoder
    batchtopk   jumprelu      jumprelu_transcoder, jumprelu_skip_transcoder   none
    matryoshka  jumprelu      jumprelu_transcoder, jumprelu_skip_transcoder   none
    jumprelu    jumprelu      jumprelu_transcoder, jumprelu_skip_transcoder   none
    relu        standard      transcoder, skip_transcoder                     none

SAELens files record `k` and `metadata.saewb_architecture`; BatchTopK and Matryoshka repeat their
one threshold for every latent and set `metadata.training_architecture` ("batchtopk",
"matryoshka_batchtopk" with training_architecture_details.matryoshka_widths), as SAELens's own
save_inference_model does. load_sae also reads SAELens's files of these architectures (its
Gemma Scope style JumpReLU files, its training checkpoints of batchtopk and matryoshka_batchtopk)
and sparsify's TopK SAEs and transcoders. A SAELens W_skip is (d_out, d_in), sparsify's too;
ours is (d_in, d_out). sparsify has one width, so its transcoders map d_in to d_in. SAELens runs
a jumprelu or standard file on every latent above its threshold, and so does our
`SAE.reconstruct`; `SAE.encode`'s fixed-width code keeps the largest 4k of them a token
(SAEConfig.inference_width).

Every writer stores folded weights (input scale 1), so each file takes raw activations. Every
reader checks the tensors against cfg.json and turns bad input into one-sentence UserErrors.
Checked against sae-lens 6.54.12 and eai-sparsify 1.3.3 (tests/test_formats_peers.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from hooks.errors import UserError
from hooks.paths import atomic_write_json
from sae.config import SAEConfig
from sae.formats.common import (
    CFG,
    SAELENS_WEIGHTS,
    WEIGHTS,
    check_tensors,
    log10_density,
    read_cfg,
    read_tensors,
    tensor_shapes,
    weights_file,
    write_tensors,
)
from sae.formats.saelens import export_saelens, read_saelens, saelens_hook_name
from sae.formats.sparsify import export_sparsify, read_sparsify
from sae.model import SAE

NATIVE, NATIVE_VERSION = "saewb", 1

__all__ = [
    "detect_format", "export_saelens", "export_sparsify", "load_sae", "log10_density",
    "saelens_hook_name", "save_sae", "weights_file",
]  # fmt: skip


def save_sae(sae: SAE, run_dir: Path, extra_cfg: dict | None = None) -> None:
    """Native checkpoint. Each file is replaced atomically; the weights go first, so a crash
    between the two leaves the old cfg.json, and load_sae reports any shape mismatch."""
    run_dir = Path(run_dir)
    cfg = {**sae.cfg.to_dict(), **(extra_cfg or {}), "format": NATIVE, "version": NATIVE_VERSION}
    write_tensors(run_dir / WEIGHTS, sae.folded_state())
    atomic_write_json(run_dir / CFG, cfg)


def read_native(folder: Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    raw, file = read_cfg(folder / CFG), folder / WEIGHTS
    if raw.get("version") != NATIVE_VERSION:
        raise UserError(
            f"{folder / CFG} has format version {raw.get('version')!r}; this workbench reads "
            f"version {NATIVE_VERSION}."
        )
    try:
        cfg = SAEConfig.from_dict(raw)
    except TypeError as e:  # a missing field
        raise UserError(f"{folder / CFG} is incomplete: {e}.") from None
    tensors = read_tensors(file)
    check_tensors(tensors, tensor_shapes(cfg), file, cfg)
    return cfg, tensors


def _detect_one(folder: Path) -> str | None:
    if (folder / CFG).is_file() and read_cfg(folder / CFG).get("format") == NATIVE:
        return NATIVE
    if (folder / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (folder / WEIGHTS).is_file() and "encoder.weight" in read_tensors(folder / WEIGHTS, True):
        return "sparsify"
    return None


def _resolve(path: Path) -> tuple[Path, str]:
    """(checkpoint folder, format). A file means its folder; a sparsify run, its one hookpoint."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not folder.is_dir():
        raise UserError(f"No SAE checkpoint at {path}: the folder does not exist.")
    if fmt := _detect_one(folder):
        return folder, fmt
    hooks = sorted(p.name for p in folder.iterdir() if p.is_dir() and _detect_one(p) == "sparsify")
    if len(hooks) == 1:
        return folder / hooks[0], "sparsify"
    if hooks:
        raise UserError(
            f"{folder} is a sparsify run with {len(hooks)} hookpoints ({', '.join(hooks)}); "
            f"pass the folder of one of them."
        )
    found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    raise UserError(
        f"{folder} holds no known SAE checkpoint (found: {found}); expected {CFG} with "
        f'"format": "{NATIVE}", {SAELENS_WEIGHTS} (SAELens) or {WEIGHTS} with encoder.weight '
        f"(sparsify)."
    )


def detect_format(path: Path) -> str:
    """ "saewb", "saelens" or "sparsify" for a checkpoint folder (or a file inside one)."""
    return _resolve(path)[1]


def load_sae(path: Path, device: str | torch.device = "cpu") -> SAE:
    """An eval-mode SAE or transcoder (scales 1) from a folder in any of the three formats."""
    folder, fmt = _resolve(path)
    loader = {NATIVE: read_native, "saelens": read_saelens, "sparsify": read_sparsify}[fmt]
    cfg, state = loader(folder)
    sae = SAE(cfg, device=device)
    sae.load_folded(state)
    return sae.eval()
