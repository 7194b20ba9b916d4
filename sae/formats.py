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

import json
import math
import re
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor, nn

from hooks.errors import UserError
from hooks.paths import atomic_write_bytes, atomic_write_json
from hooks.sites import canonical_site, layout, resolve_site
from sae.model import ARCHITECTURES, BATCH_KINDS, SAE, SAEConfig

NATIVE, NATIVE_VERSION = "saewb", 1
CFG = "cfg.json"
WEIGHTS = "sae.safetensors"  # ours and sparsify's
SAELENS_WEIGHTS, SAELENS_SPARSITY = "sae_weights.safetensors", "sparsity.safetensors"
SAELENS_VERSION = "6.54.12"  # the version we verified against; >= 6 skips its legacy-config path
SPARSIFY_NAMES = dict(W_enc="encoder.weight", b_enc="encoder.bias", W_dec="W_dec", b_dec="b_dec")
SPARSIFY_NAMES_SKIP = SPARSIFY_NAMES | dict(W_skip="W_skip")
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
# a sparsify hookpoint on an MLP module (relative to base_model: layers.3.mlp, h.3.mlp)
_SPARSIFY_MLP = re.compile(r"^(?:.+\.)?(?:layers|h|blocks|layer)\.(\d+)\.(?:mlp|feed_forward)$")


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
    _write_tensors(out_dir / SAELENS_WEIGHTS, state)
    if sparsity is not None:
        _write_tensors(out_dir / SAELENS_SPARSITY, {"sparsity": log10_density(sparsity)})
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
    _write_tensors(out_dir / WEIGHTS, {theirs: state[ours] for ours, theirs in names.items()})
    # true only if the folded rows really are unit norm: sparsify renormalises them while
    # training an SAE (and ignores the flag while transcoding)
    unit_rows = torch.allclose(state["W_dec"].norm(dim=1), torch.ones(()), atol=1e-4)
    out = dict(activation="topk", expansion_factor=cfg.n_latents // cfg.d_in)
    out |= dict(normalize_decoder=unit_rows, num_latents=cfg.n_latents, k=cfg.k)
    out |= dict(multi_topk=cfg.multi_topk, skip_connection=cfg.skip)
    out |= dict(transcode=cfg.is_transcoder, d_in=cfg.d_in)
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
            d_out = f", d_out={cfg.d_out}" if cfg.is_transcoder else ""
            raise UserError(
                f"Tensor {name} in {file} has shape {tuple(tensors[name].shape)}, but {CFG} "
                f"(d_in={cfg.d_in}{d_out}, {cfg.n_latents} latents) needs {shape}."
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
    raw, file = _read_cfg(folder / CFG), folder / SAELENS_WEIGHTS
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
    d_in, n = (_get(raw, key, folder / CFG) for key in ("d_in", "d_sae"))
    d_out = _get(raw, "d_out", folder / CFG) if transcoder else None
    if transcoder and raw.get("apply_b_dec_to_input"):
        raise UserError(
            f"{folder / CFG} sets apply_b_dec_to_input on a transcoder, whose b_dec has the "
            "output's width; SAELens refuses this too."
        )
    t = _read_tensors(file)
    if arch in SAELENS_TRAINING_FORMS:  # the scalar batch threshold of a training checkpoint
        _check(t, {"topk_threshold": ()}, file, SAEConfig(d_in, n, 1))
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
    shapes = _shapes(cfg)
    if skip:
        shapes["W_skip"] = shapes["W_skip"][::-1]  # SAELens's (d_out, d_in)
    _check(t, shapes, file, cfg)
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
    """Our kind for a SAELens file whose architecture reads as `kind` (see _load_saelens)."""
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
        _get(raw, "k", file)  # a TopK SAE is nothing without its k: one sentence
    if k is None:
        l0 = meta.get("l0")
        k = l0 if isinstance(l0, int | float) and l0 > 0 else DEFAULT_K
    if isinstance(k, bool) or not isinstance(k, int | float) or not math.isfinite(k):
        raise UserError(f"{file} has k={k!r}; it must be a number of latents per token.")
    k = math.ceil(k)  # SAELens's BatchTopK k is a mean per token, a float
    return k if kind == "topk" else min(max(k, 1), n)


def _load_sparsify(folder: Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    """A TopK SAE, or with transcode a TopK transcoder from the hookpoint module's input to its
    output (one width). A transcoder's sites come from the folder's name, the hookpoint: an MLP
    module (layers.N.mlp, h.N.mlp) reads as mlp_in.N -> mlp_out.N (on Gemma 2/3 and OLMo 2 our
    mlp_out.N is the post-norm after that module, so relabel those); any other folder name is
    kept as the site, meaning that module's input, and the target says it is its output."""
    raw, file = _read_cfg(folder / CFG), folder / WEIGHTS
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
    d_in = _get(raw, "d_in", folder / CFG)
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
    t, shapes = _read_tensors(file), _shapes(cfg)
    shapes["W_enc"] = shapes["W_enc"][::-1]  # nn.Linear layout
    names = SPARSIFY_NAMES_SKIP if skip else SPARSIFY_NAMES
    _check(t, {names[k]: shape for k, shape in shapes.items()}, file, cfg)
    state = {ours: t[theirs] for ours, theirs in names.items()}
    state["W_enc"] = state["W_enc"].T
    if skip:
        state["W_skip"] = state["W_skip"].T  # sparsify's (d_out, d_in) -> our (d_in, d_out)
    return cfg, state


def load_sae(path: Path, device: str | torch.device = "cpu") -> SAE:
    """An eval-mode SAE or transcoder (scales 1) from a folder in any of the three formats."""
    folder, fmt = _resolve(path)
    loader = {NATIVE: _load_native, "saelens": _load_saelens, "sparsify": _load_sparsify}[fmt]
    cfg, state = loader(folder)
    sae = SAE(cfg, device=device)
    sae.load_folded(state)
    return sae.eval()
