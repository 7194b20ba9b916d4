"""Contrastive activation addition (CAA): a steering vector from pairs of prompts that differ in
the concept, as the mean difference of their hidden states at the site (or the first principal
component of the differences), taken at each prompt's last token.

A pairs file is jsonl, one pair a line: {"positive": "...", "negative": "..."}.

A saved vector is RUN/steering/vectors/NAME.safetensors (key "vector", (d,) float32, its
provenance in the header's metadata as well) beside NAME.json, the same provenance to read:
  {"format": "saewb-steering-vector", "version": 1, "name", "site", "model", "method",
   "n_pairs", "norm", "pairs_file", "pairs_sha256"}
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from hooks.errors import UserError
from hooks.paths import atomic_write, atomic_write_json
from hooks.sites import Capture, canonical_site

METHODS = ("mean", "pca")
VECTOR_FORMAT, VECTOR_VERSION = "saewb-steering-vector", 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def read_pairs(path: Path | str) -> list[tuple[str, str]]:
    """The (positive, negative) prompts of a pairs file; a bad line is named in the error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"The pairs file {path} does not exist.")
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pair = (row["positive"], row["negative"])
        except (json.JSONDecodeError, TypeError, KeyError):
            raise UserError(
                f'{path} line {number} is not {{"positive": "...", "negative": "..."}}.'
            ) from None
        if not all(isinstance(p, str) and p.strip() for p in pair):
            raise UserError(f"{path} line {number} has an empty or non-text prompt.")
        pairs.append(pair)
    if not pairs:
        raise UserError(f"The pairs file {path} holds no pair.")
    return pairs


@torch.no_grad()
def last_token_states(model, tokenizer, site: str, prompts: list[str]) -> Tensor:
    """(P, d) the site's activation at each prompt's last token, one prompt per forward (no
    padding to get wrong)."""
    device = next(model.parameters()).device
    rows = []
    with Capture(model, [site]) as capture:
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)  # (1, T)
            rows.append(capture(ids)[site][0, -1].float())
    return torch.stack(rows)


def direction_from_differences(diffs: Tensor, method: str = "mean") -> Tensor:
    """(d,) the steering vector of (P, d) positive-minus-negative differences. `pca` is the first
    principal component (scikit-learn), signed along the mean and scaled to the mean's length
    along it, so both methods give vectors of comparable size."""
    if method not in METHODS:
        raise UserError(f"Unknown CAA method '{method}'; use one of {', '.join(METHODS)}.")
    mean = diffs.mean(0)
    if method == "mean":
        return mean
    if diffs.shape[0] < 2:
        raise UserError("The PCA of differences needs at least 2 pairs.")
    from sklearn.decomposition import PCA

    component = torch.from_numpy(PCA(n_components=1).fit(diffs.double().numpy()).components_[0])
    component = component.to(diffs.dtype)
    along = float(mean @ component)
    return component * (along if along else 1.0)


def caa_vector(model, tokenizer, site: str, pairs: list[tuple[str, str]], method: str = "mean"):
    """(d,) the CAA steering vector of the pairs at `site`."""
    positive = last_token_states(model, tokenizer, site, [p for p, _ in pairs])
    negative = last_token_states(model, tokenizer, site, [n for _, n in pairs])
    return direction_from_differences(positive - negative, method)


def vectors_dir(run_path: Path | str) -> Path:
    return Path(run_path) / "steering" / "vectors"


def save_vector(run_path: Path | str, name: str, vector: Tensor, provenance: dict) -> Path:
    """Write RUN/steering/vectors/NAME.safetensors, then NAME.json, each atomically; returns the
    safetensors path. `provenance` gives site, method, n_pairs and the like."""
    import safetensors.torch

    if not _NAME.fullmatch(name) or name.endswith(".safetensors"):
        raise UserError(
            f"Vector name '{name}' must be letters, digits, '_', '-' or '.', starting with a "
            "letter or digit."
        )
    vector = vector.detach().float().cpu().contiguous()
    meta = {
        "format": VECTOR_FORMAT,
        "version": VECTOR_VERSION,
        "name": name,
        **provenance,
        "norm": float(vector.norm()),
    }
    path = vectors_dir(run_path) / f"{name}.safetensors"
    header = {key: json.dumps(value) for key, value in meta.items()}
    atomic_write(path, lambda tmp: safetensors.torch.save_file({"vector": vector}, tmp, header))
    atomic_write_json(path.with_suffix(".json"), meta)
    return path


def load_vector(run_path: Path | str, spec: str, site: str | None = None) -> tuple[Tensor, dict]:
    """(d,) a saved steering vector and its provenance. `spec` is a name under the run's
    steering/vectors/ or a path to a .safetensors file; a vector made at another site than
    `site` is refused."""
    from safetensors import SafetensorError, safe_open

    path = Path(spec)
    if not (path.suffix == ".safetensors" and path.is_file()):
        path = vectors_dir(run_path) / f"{spec}.safetensors"
    if not path.is_file():
        saved = sorted(p.stem for p in vectors_dir(run_path).glob("*.safetensors"))
        raise UserError(
            f"No steering vector '{spec}': not a .safetensors file, nor a name under "
            f"{vectors_dir(run_path)} (saved: {', '.join(saved) or 'none'}; make one with "
            "`saewb caa`)."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            vector = f.get_tensor("vector")
    except (SafetensorError, OSError, KeyError) as exc:
        raise UserError(f"{path} is not a steering vector file ({exc}).") from None
    meta = {key: json.loads(value) for key, value in header.items()}
    if vector.ndim != 1:
        raise UserError(f"{path} holds a tensor of shape {tuple(vector.shape)}, not a vector.")
    made_at = meta.get("site")
    if site and made_at and canonical_site(made_at) != canonical_site(site):
        raise UserError(f"The vector {path.name} was made at {made_at}, not {site}.")
    return vector.float(), meta
