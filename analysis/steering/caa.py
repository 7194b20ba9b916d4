"""Contrastive activation addition (CAA): a steering vector from pairs of prompts that differ in
the concept, as the mean difference of their hidden states at the site (or the first principal
component of the differences), taken at each prompt's last token.

A pairs file is jsonl, one pair a line: {"positive": "...", "negative": "..."}.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from hooks.errors import UserError
from hooks.sites import Capture

METHODS = ("mean", "pca")


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
