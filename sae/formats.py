"""Checkpoint formats: our native folder, SAELens and EleutherAI sparsify. Never pickle.

    saewb     cfg.json (SAEConfig + "format": "saewb", "version")  sae.safetensors (folded weights)
    saelens   cfg.json  sae_weights.safetensors  [sparsity.safetensors]
    sparsify  cfg.json (SparseCoderConfig + d_in)  sae.safetensors (encoder.weight [n, d], ...)

Every writer stores folded weights (input scale 1), so each file takes raw activations. Every
reader checks the tensors against cfg.json and turns bad input into one-sentence UserErrors.
Checked against sae-lens 6.54.12 and eai-sparsify 1.3.3 (tests/test_formats_peers.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor, nn

from hooks.errors import UserError
from hooks.paths import atomic_write_bytes, atomic_write_json
from hooks.sites import canonical_site, resolve_site
from sae.model import BATCH_KINDS, SAE, SAEConfig

NATIVE, NATIVE_VERSION = "saewb", 1
CFG = "cfg.json"
WEIGHTS = "sae.safetensors"  # ours and sparsify's
SAELENS_WEIGHTS, SAELENS_SPARSITY = "sae_weights.safetensors", "sparsity.safetensors"
SAELENS_VERSION = "6.54.12"  # the version we verified against; >= 6 skips its legacy-config path
SPARSIFY_NAMES = dict(W_enc="encoder.weight", b_enc="encoder.bias", W_dec="W_dec", b_dec="b_dec")


def weights_file(run_dir: Path) -> Path | None:
    """The SAE weights file of a run folder (ours, sparsify's or SAELens's), or None."""
    for name in (WEIGHTS, SAELENS_WEIGHTS):
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    return None


def log10_density(density: Tensor) -> Tensor:
    """SAELens's sparsity convention: log10 of the firing fraction, 1e-10 keeping dead ones finite."""
    return torch.log10(density + 1e-10)


def _shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """Our folded tensors and their shapes: the batch kinds and JumpReLU add a threshold per
    latent, a transcoder with a skip connection its W_skip."""
    d, n, d_out = cfg.d_in, cfg.n_latents, cfg.d_out
    shapes = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d_out), "b_dec": (d_out,)}
    if cfg.architecture in (*BATCH_KINDS, "jumprelu"):
        shapes["threshold"] = (n,)
    return shapes | ({"W_skip": (d, d_out)} if cfg.skip else {})


def _write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata={"format": "pt"}))


# -- writers -----------------------------------------------------------------------------------


def save_sae(sae: SAE, run_dir: Path, extra_cfg: dict | None = None) -> None:
    """Native checkpoint. Each file is replaced atomically; the weights go first, so a crash
    between the two leaves the old cfg.json, and load_sae reports any shape mismatch."""
    run_dir = Path(run_dir)
    cfg = {**sae.cfg.to_dict(), **(extra_cfg or {}), "format": NATIVE, "version": NATIVE_VERSION}
    _write_tensors(run_dir / WEIGHTS, sae.folded_state())
    atomic_write_json(run_dir / CFG, cfg)


def export_saelens(
    sae: SAE,
    out_dir: Path,
    sparsity: Tensor | None = None,
    metadata: dict | None = None,
    model: nn.Module | None = None,
    hook_module: str | None = None,
) -> None:
    """SAELens (>= 6) folder. `sparsity` is each latent's firing fraction in [0, 1], stored as
    log10(fraction + 1e-10) like SAELens. BatchTopK is saved as jumprelu, as SAELens does.

    SAELens wraps a HF model (model_class_name AutoModelForCausalLM) and hooks the output of the
    module named `hook_name`, loading `model_name` with from_pretrained. So `hook_name` is the
    module path of our site (`saelens_hook_name`) and `model_name` what transformers loads;
    our own names go in `saewb_site` and `saewb_model`, which load_sae reads back. The module
    path is `hook_module` if given, else found on `model` (the loaded model), else on a
    weightless copy of the run's model built from its config.
    """
    out_dir, cfg, state = Path(out_dir), sae.cfg, sae.folded_state()
    if sparsity is not None:
        sparsity = sparsity.detach().float().cpu()
        if sparsity.shape != (cfg.n_latents,) or not ((sparsity >= 0) & (sparsity <= 1)).all():
            raise UserError(
                f"sparsity must hold the {cfg.n_latents} latents' firing fractions in [0, 1], "
                f"got shape {tuple(sparsity.shape)}, range [{sparsity.min():g}, {sparsity.max():g}]."
            )
    if hook_module is None:
        tree = model if model is not None else _module_tree(cfg.model, cfg.site)
        hook_module = saelens_hook_name(cfg.site, tree)
    meta = dict(sae_lens_version=SAELENS_VERSION, sae_lens_training_version=SAELENS_VERSION)
    meta |= dict(model_name=_loadable_name(cfg.model, model), hook_name=hook_module)
    meta |= dict(hf_hook_name=hook_module, hook_head_index=None, context_size=None)
    meta |= dict(prepend_bos=True, dataset_path=None, model_class_name="AutoModelForCausalLM")
    meta |= dict(exclude_special_tokens=False, saewb_model=cfg.model, saewb_site=cfg.site)
    meta |= metadata or {}
    out = dict(
        d_in=cfg.d_in, d_sae=cfg.n_latents, dtype=str(state["W_enc"].dtype).removeprefix("torch.")
    )
    out |= dict(device="cpu", apply_b_dec_to_input=True, normalize_activations="none")
    out |= dict(reshape_activations="none", k=cfg.k)  # jumprelu ignores k; load_sae reads it
    if cfg.architecture == "batchtopk":
        out["architecture"] = "jumprelu"  # with the "threshold" tensor from folded_state
    else:  # false: folding the input scale leaves decoder rows of norm 1/s, not 1
        out |= dict(rescale_acts_by_decoder_norm=False, architecture="topk")
    _write_tensors(out_dir / SAELENS_WEIGHTS, state)
    if sparsity is not None:
        _write_tensors(out_dir / SAELENS_SPARSITY, {"sparsity": log10_density(sparsity)})
    atomic_write_json(out_dir / CFG, {**out, "metadata": meta})


def saelens_hook_name(site: str, model: nn.Module) -> str:
    """The module whose output is `site` on `model`: what SAELens's HF wrapper hooks.

    The wrapper hooks module outputs only. A site read at a block's input (resid_pre.L) is the
    output of block L-1, which every HF decoder feeds straight into block L; resid_pre.0 is
    the output of no one module in general (GPT-2 adds two embeddings, Gemma scales its own).
    """
    resolved = resolve_site(model, site)
    if resolved.minus_arg is not None or resolved.rows_of is not None:
        raise UserError(
            f"SAELens hooks a module's output as it is, but {site} is the output of "
            f"{resolved.module_path} less its residual input or reshaped from (B*T, d) rows; "
            "pass hook_module= if SAELens should hook that module anyway."
        )
    if not resolved.use_input:
        return resolved.module_path
    parent, _, index = resolved.module_path.rpartition(".")
    if index.isdigit() and int(index) > 0:
        return f"{parent}.{int(index) - 1}"
    raise UserError(
        f"SAELens hooks module outputs, and {site} (the input of {resolved.module_path}) is "
        "the output of no single module; pass hook_module= naming the module whose output it is."
    )


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


def export_sparsify(sae: SAE, out_dir: Path) -> None:
    """sparsify hookpoint folder (load it with SparseCoder.load_from_disk).

    sparsify encodes ReLU(linear(x - b_dec)) then top-k; we take the top-k, then ReLU. Whenever at
    least k pre-activations are positive both pick the same latents and values; otherwise the
    extra slots hold zeros in both (with possibly different indices), so the dense activations
    and the reconstruction agree.
    """
    if sae.cfg.architecture == "batchtopk":
        raise UserError(
            "sparsify has no thresholded (JumpReLU) activation for a BatchTopK SAE; export it "
            "to SAELens (as jumprelu) or keep the native format."
        )
    out_dir, cfg, state = Path(out_dir), sae.cfg, sae.folded_state()
    state["W_enc"] = state["W_enc"].T  # nn.Linear layout, (n, d)
    _write_tensors(
        out_dir / WEIGHTS, {theirs: state[ours] for ours, theirs in SPARSIFY_NAMES.items()}
    )
    # true only if the folded rows really are unit norm: sparsify renormalises them while training
    unit_rows = torch.allclose(state["W_dec"].norm(dim=1), torch.ones(()), atol=1e-4)
    out = dict(activation="topk", expansion_factor=cfg.n_latents // cfg.d_in)
    out |= dict(normalize_decoder=unit_rows, num_latents=cfg.n_latents, k=cfg.k)
    out |= dict(multi_topk=cfg.multi_topk, skip_connection=False, transcode=False, d_in=cfg.d_in)
    atomic_write_json(out_dir / CFG, out)


# -- readers -----------------------------------------------------------------------------------


def _read_cfg(file: Path) -> dict:
    if not file.is_file():
        raise UserError(f"{file.parent} has no {CFG}, which every SAE checkpoint needs.")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file} is not valid JSON ({e}).") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{file} must hold a JSON object, not {type(cfg).__name__}.")
    return cfg


def _read_tensors(file: Path, keys_only: bool = False) -> dict[str, Tensor] | list[str]:
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


def _check(tensors: dict[str, Tensor], shapes: dict[str, tuple], file: Path, cfg) -> None:
    """Every expected tensor is there, with the shape that cfg.json implies."""
    for name, shape in shapes.items():
        if name not in tensors:
            have = ", ".join(sorted(tensors)) or "none"
            raise UserError(f"{file} has no tensor '{name}' (it has: {have}).")
        if tuple(tensors[name].shape) != shape:
            raise UserError(
                f"Tensor {name} in {file} has shape {tuple(tensors[name].shape)}, but {CFG} "
                f"(d_in={cfg.d_in}, {cfg.n_latents} latents) needs {shape}."
            )


def _get(raw: dict, key: str, file: Path):
    if key not in raw:
        raise UserError(f"{file} has no '{key}' entry (it has: {', '.join(raw)}).")
    return raw[key]


def _detect_one(folder: Path) -> str | None:
    if (folder / CFG).is_file() and _read_cfg(folder / CFG).get("format") == NATIVE:
        return NATIVE
    if (folder / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (folder / WEIGHTS).is_file() and "encoder.weight" in _read_tensors(folder / WEIGHTS, True):
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


def _load_native(folder: Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    raw, file = _read_cfg(folder / CFG), folder / WEIGHTS
    if raw.get("version") != NATIVE_VERSION:
        raise UserError(
            f"{folder / CFG} has format version {raw.get('version')!r}; this workbench reads "
            f"version {NATIVE_VERSION}."
        )
    try:
        cfg = SAEConfig.from_dict(raw)
    except TypeError as e:  # a missing field
        raise UserError(f"{folder / CFG} is incomplete: {e}.") from None
    tensors = _read_tensors(file)
    _check(tensors, _shapes(cfg), file, cfg)
    return cfg, tensors


def _load_saelens(folder: Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    raw, file = _read_cfg(folder / CFG), folder / SAELENS_WEIGHTS
    arch, meta = raw.get("architecture"), raw.get("metadata") or {}
    if arch not in ("topk", "jumprelu"):
        raise UserError(
            f"{folder / CFG} has SAELens architecture {arch!r}; supported are 'topk' and "
            f"'jumprelu' (how SAELens >= 6 saves BatchTopK SAEs, with 'k' recorded)."
        )
    for key in ("normalize_activations", "reshape_activations"):
        if raw.get(key) not in ("none", None, False):
            raise UserError(f"{folder / CFG} sets {key}={raw[key]!r}; only 'none' is supported.")
    d_in, d_sae, k = (_get(raw, key, folder / CFG) for key in ("d_in", "d_sae", "k"))
    arch = "topk" if arch == "topk" else "batchtopk"  # jumprelu: how SAELens saves BatchTopK
    model, site = meta.get("model_name") or "", canonical_site(meta.get("hook_name") or "")
    model, site = meta.get("saewb_model") or model, meta.get("saewb_site") or site  # our exports
    cfg = SAEConfig(d_in, d_sae, k, arch, model=model, site=site)
    t = _read_tensors(file)
    _check(t, _shapes(cfg), file, cfg)
    if arch == "batchtopk" and not (t["threshold"] == t["threshold"][0]).all():
        raise UserError(
            f"{file} has per-latent JumpReLU thresholds; only BatchTopK's one is supported."
        )
    if not raw.get("apply_b_dec_to_input", True):  # x @ W + b == (x - b_dec) @ W + (b + b_dec @ W)
        t["b_enc"] = t["b_enc"] + t["b_dec"] @ t["W_enc"]
    if raw.get("rescale_acts_by_decoder_norm"):  # fold the norms in, as SAELens's fold_W_dec_norm
        norms = t["W_dec"].norm(dim=1).clamp_min(1e-8)
        t |= {"W_enc": t["W_enc"] * norms, "b_enc": t["b_enc"] * norms}
        t["W_dec"] = t["W_dec"] / norms[:, None]
    return cfg, t


def _load_sparsify(folder: Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    raw, file = _read_cfg(folder / CFG), folder / WEIGHTS
    for key, want in (("activation", "topk"), ("skip_connection", False), ("transcode", False)):
        if raw.get(key, want) != want:
            raise UserError(f"{folder / CFG} sets {key}={raw[key]!r}; only {want!r} is supported.")
    d_in = _get(raw, "d_in", folder / CFG)
    n = raw.get("num_latents") or d_in * raw.get("expansion_factor", 32)  # sparsify's defaults
    cfg = SAEConfig(d_in, n, raw.get("k", 32), multi_topk=bool(raw.get("multi_topk", False)))
    t, shapes = _read_tensors(file), _shapes(cfg)
    shapes["W_enc"] = shapes["W_enc"][::-1]  # nn.Linear layout
    _check(t, {SPARSIFY_NAMES[k]: shape for k, shape in shapes.items()}, file, cfg)
    state = {ours: t[theirs] for ours, theirs in SPARSIFY_NAMES.items()}
    return cfg, state | {"W_enc": state["W_enc"].T}


def load_sae(path: Path, device: str | torch.device = "cpu") -> SAE:
    """An eval-mode SAE (input scale 1) from a folder in any of the three formats."""
    folder, fmt = _resolve(path)
    loader = {NATIVE: _load_native, "saelens": _load_saelens, "sparsify": _load_sparsify}[fmt]
    cfg, state = loader(folder)
    sae = SAE(cfg, device=device)
    sae.load_folded(state)
    return sae.eval()
