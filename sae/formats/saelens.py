"""SAELens (>= 6) folders: export_saelens writes every kind as the SAELens architecture it runs
as, read_saelens reads ours and SAELens's own (see sae/formats/__init__.py for the table)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from hooks.errors import UserError
from hooks.paths import atomic_write_json
from hooks.sites import canonical_site, layout, resolve_site
from sae.config import ARCHITECTURES, BATCH_KINDS, SAEConfig
from sae.formats.common import (
    CFG,
    SAELENS_SPARSITY,
    SAELENS_WEIGHTS,
    check_tensors,
    entry,
    log10_density,
    read_cfg,
    read_tensors,
    tensor_shapes,
    write_tensors,
)
from sae.model import SAE

SAELENS_VERSION = "6.54.12"  # the version we verified against; >= 6 skips its legacy-config path
# our kind -> its SAELens architecture as (an SAE, a transcoder, a skip transcoder)
_JUMPRELU = ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder")
SAELENS_ARCHITECTURE = {
    "topk": ("topk", None, None),  # SAELens has no TopK transcoder
    "batchtopk": _JUMPRELU,
    "matryoshka": _JUMPRELU,
    "jumprelu": _JUMPRELU,
    "relu": ("standard", "transcoder", "skip_transcoder"),
}
# SAELens's name for the way each kind trains (metadata.training_architecture)
SAELENS_TRAINING = dict(
    topk="topk", batchtopk="batchtopk", matryoshka="matryoshka_batchtopk", jumprelu="jumprelu",
    relu="standard",
)  # fmt: skip
# SAELens architecture -> (the kind it reads as before metadata decides, transcoder, skip).
# batchtopk and matryoshka_batchtopk are SAELens's training checkpoints (save_model), whose
# threshold is the scalar tensor topk_threshold.
SAELENS_KINDS = {
    "topk": ("topk", False, False),
    "jumprelu": ("jumprelu", False, False),
    "standard": ("relu", False, False),
    "transcoder": ("relu", True, False),
    "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
    "batchtopk": ("batchtopk", False, False),
    "matryoshka_batchtopk": ("matryoshka", False, False),
}
SAELENS_TRAINING_FORMS = ("batchtopk", "matryoshka_batchtopk")
DEFAULT_K = 64  # the inference width's k for a JumpReLU or ReLU file that records no L0
# Block children whose output is the MLP's input, most specific first: Gemma 2/3's pre-MLP norm,
# Falcon's ln_mlp, GPT-2's ln_2, and the norm after attention in the Llama family, NeoX, Bloom...
_MLP_NORMS = ("pre_feedforward_layernorm", "ln_mlp", "ln_2", "post_attention_layernorm")
# The one input norm of a parallel-attention block (GPT-J, Phi, Falcon), which the MLP shares
_SHARED_NORMS = ("ln_1", "input_layernorm")


def export_saelens(
    sae: SAE,
    out_dir: Path,
    sparsity: Tensor | None = None,
    metadata: dict | None = None,
    model: nn.Module | None = None,
    hook_module: str | None = None,
    hook_module_out: str | None = None,
) -> None:
    """SAELens (>= 6) folder. `sparsity` is each latent's firing fraction in [0, 1], stored as
    log10(fraction + 1e-10) like SAELens. See the module docstring for each kind's architecture.

    SAELens wraps a HF model (model_class_name AutoModelForCausalLM) and hooks the output of the
    module named `hook_name`, loading `model_name` with from_pretrained. So `hook_name` is the
    module path of our site (`saelens_hook_name`), a transcoder's `hook_name_out` that of its
    target, and `model_name` what transformers loads; our own names go in `saewb_site`,
    `saewb_target` and `saewb_model`, which load_sae reads back. The module paths are
    `hook_module` / `hook_module_out` if given, else found on `model` (the loaded model), else on
    a weightless copy of the run's model built from its config.

    SAELens runs a JumpReLU or standard file on every latent above its threshold, as our
    `SAE.reconstruct` does; `SAE.encode`'s fixed-width code keeps at most cfg.inference_width
    (4k) of them a token.
    """
    out_dir, cfg = Path(out_dir), sae.cfg
    arch = SAELENS_ARCHITECTURE[cfg.architecture][cfg.skip + cfg.is_transcoder]
    if arch is None:
        raise UserError(
            "SAELens has no TopK transcoder, so this topk transcoder has no SAELens form; "
            "export it with export_sparsify (sparsify's TopK transcoder) or keep the native format."
        )
    if sparsity is not None:
        sparsity = sparsity.detach().float().cpu()
        if sparsity.shape != (cfg.n_latents,) or not ((sparsity >= 0) & (sparsity <= 1)).all():
            raise UserError(
                f"sparsity must hold the {cfg.n_latents} latents' firing fractions in [0, 1], "
                f"got shape {tuple(sparsity.shape)}, range [{sparsity.min():g}, {sparsity.max():g}]."
            )
    if hook_module is None or (cfg.is_transcoder and hook_module_out is None):
        tree = model if model is not None else _module_tree(cfg.model, cfg.site)
        hook_module = hook_module or saelens_hook_name(cfg.site, tree)
        if cfg.is_transcoder:
            hook_module_out = hook_module_out or saelens_hook_name(
                cfg.target, tree, "hook_module_out"
            )
    state = sae.folded_state()
    meta = dict(sae_lens_version=SAELENS_VERSION, sae_lens_training_version=SAELENS_VERSION)
    meta |= dict(model_name=_loadable_name(cfg.model, model), hook_name=hook_module)
    meta |= dict(hf_hook_name=hook_module, hook_head_index=None, context_size=None)
    meta |= dict(prepend_bos=True, dataset_path=None, model_class_name="AutoModelForCausalLM")
    meta |= dict(exclude_special_tokens=False, saewb_model=cfg.model, saewb_site=cfg.site)
    meta |= dict(saewb_architecture=cfg.architecture)
    meta["training_architecture"] = SAELENS_TRAINING[cfg.architecture]
    if cfg.architecture in BATCH_KINDS:  # what SAELens's BatchTopK configs keep there
        details = dict(k=cfg.k)
        if cfg.architecture == "matryoshka":
            details["matryoshka_widths"] = list(cfg.prefixes)
        meta["training_architecture_details"] = details
    if cfg.architecture == "topk":
        meta["l0"] = float(cfg.k)
    if cfg.is_transcoder:
        meta |= dict(hook_name_out=hook_module_out, hf_hook_name_out=hook_module_out)
        meta["saewb_target"] = cfg.target
    meta |= metadata or {}
    out = dict(
        d_in=cfg.d_in, d_sae=cfg.n_latents, dtype=str(state["W_enc"].dtype).removeprefix("torch.")
    )
    # a transcoder's input is not centred (SAELens refuses the flag on transcoders)
    out |= dict(device="cpu", apply_b_dec_to_input=not cfg.is_transcoder)
    out |= dict(normalize_activations="none", reshape_activations="none")
    out["k"] = cfg.k  # only SAELens's topk reads k; load_sae reads it for every kind
    if cfg.is_transcoder:
        out["d_out"] = cfg.d_out
    if cfg.skip:
        state["W_skip"] = state["W_skip"].T.contiguous()  # SAELens's (d_out, d_in)
    if cfg.architecture == "topk":  # false: folding the input scale leaves rows of norm 1/s
        out["rescale_acts_by_decoder_norm"] = False
    out["architecture"] = arch
    write_tensors(out_dir / SAELENS_WEIGHTS, state)
    if sparsity is not None:
        write_tensors(out_dir / SAELENS_SPARSITY, {"sparsity": log10_density(sparsity)})
    atomic_write_json(out_dir / CFG, {**out, "metadata": meta})


def saelens_hook_name(site: str, model: nn.Module, argument: str = "hook_module") -> str:
    """The module whose output is `site` on `model`: what SAELens's HF wrapper hooks.
    `argument` is the export_saelens argument the errors point to.

    The wrapper hooks module outputs only. A site read at a block's input (resid_pre.L) is the
    output of block L-1, which every HF decoder feeds straight into block L; resid_pre.0 is
    the output of no one module in general (GPT-2 adds two embeddings, Gemma scales its own).
    mlp_in.L is the output of the norm before block L's MLP (ln_2, post_attention_layernorm,
    Gemma 2's pre_feedforward_layernorm, a parallel block's shared input norm); a block whose
    MLP reads the residual stream itself (OLMo 2) has no such module.
    """
    resolved = resolve_site(model, site)
    if resolved.minus_arg is not None or resolved.rows_of is not None:
        raise UserError(
            f"SAELens hooks a module's output as it is, but {site} is the output of "
            f"{resolved.module_path} less its residual input or reshaped from (B*T, d) rows; "
            f"pass {argument}= if SAELens should hook that module anyway."
        )
    if not resolved.use_input:
        return resolved.module_path
    parent, _, index = resolved.module_path.rpartition(".")
    if resolved.name.startswith("mlp_in."):
        if norm := _mlp_norm(model, parent):
            return f"{parent}.{norm}"
        raise UserError(
            f"SAELens hooks module outputs, and {site} (the input of {resolved.module_path}) is "
            f"the output of no norm module saewb recognises in {parent}; pass {argument}= "
            "naming the module whose output it is."
        )
    if index.isdigit() and int(index) > 0:
        return f"{parent}.{int(index) - 1}"
    raise UserError(
        f"SAELens hooks module outputs, and {site} (the input of {resolved.module_path}) is "
        f"the output of no single module; pass {argument}= naming the module whose output it is."
    )


def _mlp_norm(model: nn.Module, block: str) -> str | None:
    """The child of `block` whose output is its MLP's input, or None.

    Norms that close a branch (Gemma 2's and OLMo 2's post-norms, which layout() reads as the
    branches' outputs) are never an input. Checked by value on every tiny architecture in
    tests/conftest.py (tests/test_formats.py).
    """
    lay = layout(model)
    children = dict(dict(model.named_modules())[block].named_children())
    norms = [
        name
        for name, child in children.items()
        if "norm" in type(child).__name__.lower() and name not in (lay.attn, lay.mlp)
    ]
    named = next((name for name in _MLP_NORMS if name in norms), None)
    if named is not None:
        return named
    # A pre-norm block with a single norm feeds it to both branches: a parallel block.
    return norms[0] if len(norms) == 1 and norms[0] in _SHARED_NORMS else None


def _module_tree(name: str, site: str) -> nn.Module:
    """The model's module tree without weights (meta device), built from its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hooks.models import resolve_model_path

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name, progress=False))
    except Exception as e:  # not a local folder, not a reachable hub name
        raise UserError(
            f"Cannot read the config of model '{name}' to find the module SAELens should hook "
            f"for {site} ({type(e).__name__}); pass model= (the loaded model) or hook_module= "
            "(e.g. 'model.layers.3')."
        ) from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _loadable_name(name: str, model: nn.Module | None) -> str:
    """What transformers' from_pretrained loads for our model name: a hub id or a folder (for
    the built-in SmolLM2, its dense copy in the cache)."""
    loaded_from = getattr(getattr(model, "config", None), "_name_or_path", "")
    if loaded_from:
        return loaded_from
    from hooks.models import resolve_model_path

    return resolve_model_path(name, progress=False) if name else name


def read_saelens(folder: Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    """Our kind, from the first rule that applies: metadata.saewb_architecture (our exports);
    metadata.training_architecture batchtopk or matryoshka_batchtopk (SAELens's
    save_inference_model; training_architecture_details.matryoshka_widths are the prefixes);
    topk; a jumprelu file whose thresholds are all equal and that records k is batchtopk (our
    exports before saewb_architecture), any other jumprelu file is jumprelu; standard is relu.
    SAELens's training checkpoints (architecture batchtopk / matryoshka_batchtopk, threshold
    tensor topk_threshold) read as those kinds. The transcoder architectures read the same way,
    from hook_name to hook_name_out (or saewb_site to saewb_target); one without hook_name_out
    writes back where it reads, as SAELens's splice does.

    k is the recorded k (top level, else training_architecture_details). A JumpReLU or ReLU file
    without one (Gemma Scope's, SAELens's standard and JumpReLU ones) gets k = ceil(metadata.l0)
    when SAELens recorded the L0, else min(n, 64): k only sets how many latents a token may keep
    at inference (cfg.inference_width, 4k), so a token above 4k active latents loses its smallest.
    """
    raw, file = read_cfg(folder / CFG), folder / SAELENS_WEIGHTS
    arch, meta = raw.get("architecture", "standard"), raw.get("metadata") or {}
    if arch not in SAELENS_KINDS:
        supported = ", ".join(repr(a) for a in SAELENS_KINDS)
        raise UserError(
            f"{folder / CFG} has SAELens architecture {arch!r}; supported are {supported}."
        )
    for key in ("normalize_activations", "reshape_activations"):
        if raw.get(key) not in ("none", None, False):
            raise UserError(f"{folder / CFG} sets {key}={raw[key]!r}; only 'none' is supported.")
    kind, transcoder, skip = SAELENS_KINDS[arch]
    details = meta.get("training_architecture_details") or {}
    d_in, n = (entry(raw, key, folder / CFG) for key in ("d_in", "d_sae"))
    d_out = entry(raw, "d_out", folder / CFG) if transcoder else None
    if transcoder and raw.get("apply_b_dec_to_input"):
        raise UserError(
            f"{folder / CFG} sets apply_b_dec_to_input on a transcoder, whose b_dec has the "
            "output's width; SAELens refuses this too."
        )
    t = read_tensors(file)
    if arch in SAELENS_TRAINING_FORMS:  # the scalar batch threshold of a training checkpoint
        check_tensors(t, {"topk_threshold": ()}, file, SAEConfig(d_in, n, 1))
        t["threshold"] = t.pop("topk_threshold").expand(n).clone()
    kind = _saelens_kind(raw, meta, kind, arch, t, folder / CFG)
    prefixes = raw.get("matryoshka_widths", details.get("matryoshka_widths"))
    model = meta.get("saewb_model") or meta.get("model_name") or ""
    site = meta.get("saewb_site") or canonical_site(
        meta.get("hook_name") or raw.get("hook_name") or ""
    )
    target = ""
    if transcoder:
        out_hook = meta.get("hook_name_out") or raw.get("hook_name_out")
        target = meta.get("saewb_target") or (canonical_site(out_hook) if out_hook else site)
        target = target or "unknown"  # a transcoder needs one; nothing names it here
    k = _saelens_k(raw, meta, details, n, kind, folder / CFG)
    cfg = SAEConfig(
        d_in, n, k, kind, model=model, site=site, target=target, d_out=d_out, skip=skip,
        prefixes=prefixes if kind == "matryoshka" else None,
    )  # fmt: skip
    shapes = tensor_shapes(cfg)
    if skip:
        shapes["W_skip"] = shapes["W_skip"][::-1]  # SAELens's (d_out, d_in)
    check_tensors(t, shapes, file, cfg)
    if skip:
        t["W_skip"] = t["W_skip"].T
    if kind in BATCH_KINDS and not (t["threshold"] == t["threshold"][0]).all():
        raise UserError(
            f"{file} is a {kind} SAE by its metadata, but its JumpReLU thresholds differ from "
            "latent to latent where a batch top-k SAE has one."
        )
    if not transcoder and not raw.get("apply_b_dec_to_input", True):
        t["b_enc"] = t["b_enc"] + t["b_dec"] @ t["W_enc"]  # x W + b == (x - b_dec) W + b + b_dec W
    rescale = raw.get("rescale_acts_by_decoder_norm", arch in SAELENS_TRAINING_FORMS)
    if arch in ("topk", *SAELENS_TRAINING_FORMS) and rescale:
        # fold the norms in, as SAELens's fold_W_dec_norm (the batch threshold is on the
        # rescaled pre-activations, which folding turns into the plain ones)
        norms = t["W_dec"].norm(dim=1).clamp_min(1e-8)
        t |= {"W_enc": t["W_enc"] * norms, "b_enc": t["b_enc"] * norms}
        t["W_dec"] = t["W_dec"] / norms[:, None]
    return cfg, t


def _saelens_kind(raw: dict, meta: dict, kind: str, arch: str, t: dict, file: Path) -> str:
    """Our kind for a SAELens file whose architecture reads as `kind` (see read_saelens)."""
    ours = meta.get("saewb_architecture")
    if ours is not None:
        if ours not in ARCHITECTURES or arch not in SAELENS_ARCHITECTURE[ours]:
            as_saelens = {a: "/".join(filter(None, SAELENS_ARCHITECTURE[a])) for a in ARCHITECTURES}
            written = ", ".join(f"{a} as {theirs}" for a, theirs in as_saelens.items())
            raise UserError(
                f"{file} records saewb_architecture {ours!r} on SAELens architecture {arch!r}; "
                f"saewb writes {written}."
            )
        return ours
    if kind != "jumprelu":
        return kind
    training = {"batchtopk": "batchtopk", "matryoshka_batchtopk": "matryoshka"}
    if meta.get("training_architecture") in training:
        return training[meta["training_architecture"]]
    theta = t.get("threshold")
    equal = theta is not None and theta.numel() > 0 and bool((theta == theta[0]).all())
    return "batchtopk" if "k" in raw and equal else "jumprelu"


def _saelens_k(raw: dict, meta: dict, details: dict, n: int, kind: str, file: Path) -> int:
    """The recorded k; for the non-TopK kinds without one, ceil(metadata.l0), else min(n, 64)."""
    k = raw.get("k", details.get("k"))
    if k is None and kind == "topk":
        entry(raw, "k", file)  # a TopK SAE is nothing without its k: one sentence
    if k is None:
        l0 = meta.get("l0")
        k = l0 if isinstance(l0, int | float) and l0 > 0 else DEFAULT_K
    if isinstance(k, bool) or not isinstance(k, int | float) or not math.isfinite(k):
        raise UserError(f"{file} has k={k!r}; it must be a number of latents per token.")
    k = math.ceil(k)  # SAELens's BatchTopK k is a mean per token, a float
    return k if kind == "topk" else min(max(k, 1), n)
