"""The calendar probe: built-in sentences naming weekdays, months and years, the SAE's codes at
the token that ends each name, the cluster that carries each set, and the circle fit of its
principal components against the cyclic index (weekday 0-6, month 0-11)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import scipy.sparse as sp
import torch
from tqdm import tqdm

from analysis.store.encode import encode_codes

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip
YEARS = tuple(str(y) for y in range(1990, 2021, 2))

# Twelve frames per set, written for this workbench: different syntax and context around the
# name, so that a cluster is found by the name rather than by one sentence pattern.
FRAMES = {
    "weekday": (
        "The meeting was moved to {} afternoon.",
        "On {} we usually go swimming after work.",
        "She was born on a {} in late spring.",
        "Every {}, the market opens early.",
        "I will call you back on {}.",
        "The shop is closed on {} and on public holidays.",
        "He said the package should arrive by {}.",
        "Last {} it rained all day long.",
        "Our team plays football each {} evening.",
        "Was the concert on {} or the day after?",
        "The report is due next {} at noon.",
        "They left town quietly on {} morning.",
    ),
    "month": (
        "The festival takes place every year in {}.",
        "She started her new job in {}.",
        "We are planning a trip for early {}.",
        "The rent goes up at the end of {}.",
        "His birthday falls in the middle of {}.",
        "Sales were strong throughout {} last year.",
        "The school term ends in {}.",
        "By {}, the garden was full of flowers.",
        "The book will be published next {}.",
        "It snowed once in {}, which surprised everyone.",
        "Applications close on the first of {}.",
        "Nothing much happened in {} that year.",
    ),
    "year": (
        "The company was founded in {}.",
        "In {} the city opened a new bridge.",
        "She graduated from university in {}.",
        "The record stood from {} for a long time.",
        "Prices were much lower back in {}.",
        "The film first came out in {}.",
        "They moved to the coast in the summer of {}.",
        "By {}, most homes had a computer.",
        "The law was changed in {} after a long debate.",
        "He still remembers the winter of {}.",
        "The census of {} counted more people than expected.",
        "Our first album was recorded in {}.",
    ),
}
SETS = {"weekday": (WEEKDAYS, 7), "month": (MONTHS, 12), "year": (YEARS, None)}


@dataclass
class ProbeCodes:
    acts: sp.csr_matrix  # (P, n_latents) the code at the last token of each probe's name
    set: np.ndarray  # (P,) str: weekday, month or year
    item: np.ndarray  # (P,) int: position of the name in its set (weekday 0-6, month 0-11, ...)
    token: np.ndarray  # (P,) int64 token id
    text: np.ndarray  # (P,) str display string of that token


def probe_texts() -> list[tuple[str, int, str, int]]:
    """(set, item, text, character end of the name) for every built-in probe sentence."""
    out = []
    for name, (items, _) in SETS.items():
        for i, item in enumerate(items):
            for frame in FRAMES[name]:
                text = frame.format(item)
                out.append((name, i, text, frame.index("{}") + len(item)))
    return out


def last_token_of(tokenizer, text: str, end: int) -> int:
    """Index (in the text's own tokens, no BOS) of the token holding character end - 1."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    hits = [j for j, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b >= end]
    return (
        hits[-1] if hits else len(tokenizer(text[:end], add_special_tokens=False)["input_ids"]) - 1
    )


@torch.no_grad()
def encode_probes(run, loaded, device: str = "cpu", batch: int = 32, progress: bool = True):
    """The SAE's code at the token that ends the name, for every probe sentence.

    Sentences are tokenised as analysis.probe.TextProbe does (BOS first where the run's windows
    have it) and run in right-padded batches: the model is causal, so the padding after a
    sentence never reaches its tokens."""
    from hooks.sites import Capture, resolve_site
    from hooks.windows import special_id

    tokenizer, sae = loaded.tokenizer, run.sae.to(device).eval()
    site = resolve_site(loaded.model, run.site).name
    bos = special_id(tokenizer, "bos") if run.selection.bos == "prepend" else None
    head = [bos] if bos is not None else []
    texts = probe_texts()
    ids = [head + tokenizer(t, add_special_tokens=False)["input_ids"] for _, _, t, _ in texts]
    at = [len(head) + last_token_of(tokenizer, t, end) for _, _, t, end in texts]
    states = []
    with Capture(loaded.model, [site]) as capture:
        starts = range(0, len(ids), batch)
        for s in tqdm(starts, desc="calendar", disable=not progress):
            chunk = ids[s : s + batch]
            width = max(map(len, chunk))
            tokens = torch.tensor([c + [c[-1]] * (width - len(c)) for c in chunk])  # (B, T)
            x = capture(tokens.to(device))[site]  # (B, T, d)
            states.append(x[torch.arange(len(chunk)), torch.tensor(at[s : s + batch])].float())
    acts, idx = encode_codes(sae, torch.cat(states))  # (P, k) each
    acts, idx = acts.cpu().numpy(), idx.cpu().numpy()
    rows = np.repeat(np.arange(len(texts)), acts.shape[1])
    on = acts.ravel() > 0
    codes = sp.csr_matrix(
        (acts.ravel()[on], (rows[on], idx.ravel()[on])),
        shape=(len(texts), sae.cfg.n_latents), dtype=np.float32,
    )  # fmt: skip
    token = np.array([c[a] for c, a in zip(ids, at)], dtype=np.int64)
    shown = np.array(tokenizer.batch_decode([[t] for t in token]))
    names, items = (np.array([t[j] for t in texts]) for j in (0, 1))
    return ProbeCodes(codes, names, items, token, shown)


def carrying_cluster(probe_mass: np.ndarray, baseline: np.ndarray) -> tuple[int, float, float]:
    """(cluster, coverage, lift) of the cluster that carries a set.

    probe_mass (P, K) is each cluster's summed activation on each of the set's probe tokens,
    baseline (K,) its mean summed activation per held-out token. Coverage is the share of the
    set's tokens on which the cluster fires; lift is its mean mass on them over its baseline.
    The rule: among clusters that fire on at least half the tokens (else those with the highest
    coverage), the one with the highest lift, so a cluster that fires everywhere does not win.
    Returns (-1, 0, 0) when no cluster fires on any of the tokens."""
    coverage = (probe_mass > 0).mean(0)  # (K,)
    if len(coverage) == 0 or coverage.max() == 0:
        return -1, 0.0, 0.0
    eligible = coverage >= 0.5 if coverage.max() >= 0.5 else coverage == coverage.max()
    lift = probe_mass.mean(0) / (baseline + 1e-9)
    best = int(np.flatnonzero(eligible)[np.argmax(lift[eligible])])
    return best, float(coverage[best]), float(lift[best])


def neighbour_share(angles: np.ndarray, index: np.ndarray, period: int) -> float:
    """Share of items whose next item going round the circle is index +- 1 (mod period)."""
    order = index[np.argsort(angles, kind="stable")]
    step = (np.roll(order, -1) - order) % period
    return float(np.isin(step, (1, period - 1)).mean())


def circle_fit(points: np.ndarray, index: np.ndarray, period: int) -> dict:
    """Least squares of each pair of columns of points (n, P) onto [cos, sin, 1] of 2 pi i / N.

    Returns the best pair's R^2 (both columns together, about their means), the pair (0-based),
    the neighbour share of the items' mean positions around the fitted centre, and the angle of
    each item present."""
    index = np.asarray(index)
    phase = 2 * np.pi * index / period
    X = np.stack([np.cos(phase), np.sin(phase), np.ones_like(phase)], 1)  # (n, 3)
    best = dict(r2=float("nan"), pair=None, neighbour_share=float("nan"), items=[], angles=[])
    for p, q in combinations(range(points.shape[1]), 2):
        Y = points[:, [p, q]].astype(np.float64)  # (n, 2)
        coef, *_ = np.linalg.lstsq(X, Y, rcond=None)  # (3, 2)
        total = ((Y - Y.mean(0)) ** 2).sum()
        r2 = 1 - ((Y - X @ coef) ** 2).sum() / total if total > 0 else float("nan")
        if np.isfinite(r2) and not r2 <= best["r2"]:
            items = np.unique(index)
            centroids = np.stack([Y[index == i].mean(0) for i in items]) - coef[2]  # (m, 2)
            angles = np.arctan2(centroids[:, 1], centroids[:, 0])
            share = neighbour_share(angles, items, period) if len(items) >= 3 else float("nan")
            best = dict(
                r2=float(r2), pair=(p, q), neighbour_share=share, items=items.tolist(),
                angles=angles.tolist(),
            )  # fmt: skip
    return best
