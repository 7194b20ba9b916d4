"""EleutherAI sparsify hookpoint folders: TopK SAEs and TopK transcoders of one width."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from hooks.errors import UserError
from hooks.paths import atomic_write_json
from sae.config import SAEConfig
from sae.formats.common import (
    CFG,
    WEIGHTS,
    check_tensors,
    entry,
    read_cfg,
    read_tensors,
    tensor_shapes,
    write_tensors,
)
from sae.model import SAE

SPARSIFY_NAMES = dict(W_enc="encoder.weight", b_enc="encoder.bias", W_dec="W_dec", b_dec="b_dec")
SPARSIFY_NAMES_SKIP = SPARSIFY_NAMES | dict(W_skip="W_skip")
# a sparsify hookpoint on an MLP module (relative to base_model: layers.3.mlp, h.3.mlp)
_SPARSIFY_MLP = re.compile(r"^(?:.+\.)?(?:layers|h|blocks|layer)\.(\d+)\.(?:mlp|feed_forward)$")


def export_sparsify(sae: SAE, out_dir: Path) -> None:
    """sparsify hookpoint folder (load it with SparseCoder.load_from_disk): a TopK SAE, or a
    TopK transcoder (transcode, skip_connection) from a module's input to its output, which
    sparsify gives one width. Name the folder after the hookpoint (layers.N.mlp for mlp_in.N ->
    mlp_out.N): load_sae reads a transcoder's sites from it.

    sparsify encodes ReLU(linear(x - b_dec)) then top-k (no b_dec for a transcoder); we take the
    top-k, then ReLU. Whenever at least k pre-activations are positive both pick the same latents
    and values; otherwise the extra slots hold zeros in both (with possibly different indices), so
    the dense activations and the reconstruction agree.
    """
    cfg = sae.cfg
    if cfg.architecture != "topk":
        what = "transcoder" if cfg.is_transcoder else "SAE"
        raise UserError(
            f"sparsify has only TopK activations, so a {cfg.architecture} {what} has no sparsify "
            "form; export it with export_saelens or keep the native format."
        )
    if cfg.d_out != cfg.d_in:
        raise UserError(
            f"A sparsify transcoder has one width for its input and output, but this one maps "
            f"{cfg.d_in} to {cfg.d_out}; keep the native format (SAELens has no TopK transcoder)."
        )
    out_dir, state = Path(out_dir), sae.folded_state()
    state["W_enc"] = state["W_enc"].T  # nn.Linear layout, (n, d)
    names = SPARSIFY_NAMES
    if cfg.skip:
        state["W_skip"] = state["W_skip"].T  # sparsify's (d_out, d_in), applied as x @ W_skip.mT
        names = SPARSIFY_NAMES_SKIP
    write_tensors(out_dir / WEIGHTS, {theirs: state[ours] for ours, theirs in names.items()})
    # true only if the folded rows really are unit norm: sparsify renormalises them while
    # training an SAE (and ignores the flag while transcoding)
    unit_rows = torch.allclose(state["W_dec"].norm(dim=1), torch.ones(()), atol=1e-4)
    out = dict(activation="topk", expansion_factor=cfg.n_latents // cfg.d_in)
    out |= dict(normalize_decoder=unit_rows, num_latents=cfg.n_latents, k=cfg.k)
    out |= dict(multi_topk=cfg.multi_topk, skip_connection=cfg.skip)
    out |= dict(transcode=cfg.is_transcoder, d_in=cfg.d_in)
    atomic_write_json(out_dir / CFG, out)


def read_sparsify(folder: Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    """A TopK SAE, or with transcode a TopK transcoder from the hookpoint module's input to its
    output (one width). A transcoder's sites come from the folder's name, the hookpoint: an MLP
    module (layers.N.mlp, h.N.mlp) reads as mlp_in.N -> mlp_out.N (on Gemma 2/3 and OLMo 2 our
    mlp_out.N is the post-norm after that module, so relabel those); any other folder name is
    kept as the site, meaning that module's input, and the target says it is its output."""
    raw, file = read_cfg(folder / CFG), folder / WEIGHTS
    if raw.get("activation", "topk") != "topk":
        raise UserError(
            f"{folder / CFG} sets activation={raw['activation']!r}; only 'topk' is supported."
        )
    transcode, skip = bool(raw.get("transcode", False)), bool(raw.get("skip_connection", False))
    if skip and not transcode:
        raise UserError(
            f"{folder / CFG} sets skip_connection on an SAE (transcode false); saewb gives a skip "
            "connection to transcoders only."
        )
    d_in = entry(raw, "d_in", folder / CFG)
    n = raw.get("num_latents") or d_in * raw.get("expansion_factor", 32)  # sparsify's defaults
    site = target = ""
    if transcode:
        hookpoint = folder.name
        match = _SPARSIFY_MLP.match(hookpoint)
        site, target = (
            (f"mlp_in.{match.group(1)}", f"mlp_out.{match.group(1)}")
            if match
            else (hookpoint, f"output of {hookpoint}")
        )
    cfg = SAEConfig(
        d_in, n, raw.get("k", 32), multi_topk=bool(raw.get("multi_topk", False)), site=site,
        target=target, skip=skip,
    )  # fmt: skip
    t, shapes = read_tensors(file), tensor_shapes(cfg)
    shapes["W_enc"] = shapes["W_enc"][::-1]  # nn.Linear layout
    names = SPARSIFY_NAMES_SKIP if skip else SPARSIFY_NAMES
    check_tensors(t, {names[k]: shape for k, shape in shapes.items()}, file, cfg)
    state = {ours: t[theirs] for ours, theirs in names.items()}
    state["W_enc"] = state["W_enc"].T
    if skip:
        state["W_skip"] = state["W_skip"].T  # sparsify's (d_out, d_in) -> our (d_in, d_out)
    return cfg, state
