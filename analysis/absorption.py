"""First-letter feature absorption (Chanin et al. 2024), measured the way SAEBench does.

A model that can spell holds "starts with L" in the activation of a word's token. A linear probe
finds that direction (the ground truth). An SAE should have a latent for it, but sparsity
rewards a latent for a frequent word (" short") that also carries "starts with S": on that word
the S latent stays silent, and the letter is *absorbed* into the word's latent.

  words       single-token lowercase alphabetic words of the tokenizer (' word', 3+ letters)
  activation  the site's activation at the word, after a short in-context spelling prompt
  probe       logistic regression on the activations, one direction p_L per first letter
  main        each letter's main latents, by k-sparse probing (as SAEBench): latents ranked
              by the difference of their mean activation on the letter's words and the rest,
              added while the F1 of a probe on them rises by more than 0.03 (at most 5)
  absorption  on held-out words whose letter the probe gets right, with c_j = a_j <W_dec_j, p_L>:
              fraction  the share of the positive projection sum_j c_j carried by latents that
                        are not main but point along the probe (cos >= 0.025)
              full      the main latents are silent and one such latent carries >= 40% of it

Absorption is averaged per letter, then over letters. Lower is better; a Matryoshka SAE should
absorb less than a BatchTopK one of the same width and L0 (Bussmann et al. 2025).
"""

from __future__ import annotations

import string

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from hooks.errors import UserError

PROMPT = "tape has the first letter: T\nbook has the first letter: B\n"
COSINE = 0.025  # SAEBench's threshold for a latent that points along the probe
FULL_SHARE = 0.4  # the share of the projection one absorbing latent must carry
SPLIT_F1 = 0.03  # k-sparse probing adds a latent while F1 rises by more than this
MAX_MAIN = 5


def spelling_words(tokenizer, min_letters: int = 3) -> tuple[list[int], list[str]]:
    """(token ids, words) of the vocabulary's single-token words: a leading space, then only
    lowercase ASCII letters."""
    ids, words = [], []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        word = text[1:]
        if text.startswith(" ") and len(word) >= min_letters and word.isascii() and word.isalpha():
            if word.islower():
                ids.append(token_id)
                words.append(word)
    if not ids:
        raise UserError("The tokenizer has no single-token lowercase words to spell.")
    return ids, words


@torch.no_grad()
def word_activations(
    loaded, site: str, token_ids: list[int], batch: int = 128, progress: bool = True
) -> Tensor:
    """(W, d) activations at `site` of each word token after the spelling prompt. Every prompt
    has the same length (the prompt's tokens, then the word), so batches need no padding."""
    from hooks.sites import Capture

    model, tokenizer = loaded.model, loaded.tokenizer
    prefix = tokenizer(PROMPT, add_special_tokens=True)["input_ids"]
    device = next(model.parameters()).device
    out = []
    with Capture(model, [site]) as capture:
        for start in tqdm(range(0, len(token_ids), batch), desc="spelling", disable=not progress):
            words = torch.tensor(token_ids[start : start + batch])[:, None]
            ids = torch.cat([torch.tensor(prefix).expand(len(words), -1), words], 1)
            acts = capture(ids.to(device))[site]  # (B, T, d)
            out.append(acts[:, -1].float().cpu())
    return torch.cat(out)


def _f1(pred: np.ndarray, truth: np.ndarray) -> float:
    tp = float((pred & truth).sum())
    return 2 * tp / max(float(pred.sum() + truth.sum()), 1.0)


def _main_latents(codes: np.ndarray, is_letter: np.ndarray, train: np.ndarray) -> list[int]:
    """k-sparse probing on the train words, scored on the held-out ones."""
    from sklearn.linear_model import LogisticRegression

    diff = codes[train & is_letter].mean(0) - codes[train & ~is_letter].mean(0)
    ranked = np.argsort(-diff)[:MAX_MAIN]
    chosen, best = [], -1.0
    for latent in ranked:
        trial = [*chosen, int(latent)]
        probe = LogisticRegression(max_iter=500, class_weight="balanced")
        probe.fit(codes[train][:, trial], is_letter[train])
        f1 = _f1(probe.predict(codes[~train][:, trial]).astype(bool), is_letter[~train])
        if chosen and f1 - best <= SPLIT_F1:
            break
        chosen, best = trial, f1
    return chosen


def absorption_scores(
    acts: Tensor, letters: np.ndarray, codes: Tensor, W_dec: Tensor, seed: int = 0
) -> dict:
    """Absorption from the words' activations (W, d), their first letters (W,) as 0-25, the
    SAE's dense codes of those activations (W, n) and its decoder (n, d) in raw units."""
    from sklearn.linear_model import LogisticRegression

    X, Z = acts.numpy().astype(np.float64), codes.numpy()
    rng = np.random.default_rng(seed)
    train = rng.random(len(X)) < 0.7
    present = [
        c
        for c in range(26)
        if (letters[train] == c).sum() >= 5 and (letters[~train] == c).sum() >= 2
    ]
    if len(present) < 2:
        raise UserError(f"Too few words per first letter to probe ({len(X)} words in all).")
    keep = np.isin(letters, present)
    mean, std = X[train & keep].mean(0), X[train & keep].std(0) + 1e-8
    probe = LogisticRegression(max_iter=2000, C=1.0)
    probe.fit((X[train & keep] - mean) / std, letters[train & keep])
    predicted = probe.predict((X - mean) / std)
    # the probe's direction in activation space: its weights act on standardised inputs
    directions = probe.coef_ / std  # (letters, d)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    W = W_dec.detach().double().numpy()
    W_unit = W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)
    per_letter = {}
    for row, c in enumerate(probe.classes_):
        is_letter = letters == c
        main = _main_latents(Z, is_letter, train)
        cosines = W_unit @ directions[row]  # (n,)
        along = cosines >= COSINE
        along[main] = False
        test = ~train & is_letter & (predicted == c)
        fractions, full = [], []
        for w in np.flatnonzero(test):
            contrib = Z[w] * (W @ directions[row])  # (n,)
            total = contrib[contrib > 0].sum()
            if total <= 0:
                continue
            other = np.where(along & (contrib > 0), contrib, 0.0)
            fractions.append(other.sum() / total)
            full.append(bool((Z[w, main] <= 0).all() and other.max() >= FULL_SHARE * total))
        per_letter[string.ascii_lowercase[c]] = {
            "words_scored": len(fractions),
            "main_latents": main,
            "absorption_fraction": float(np.mean(fractions)) if fractions else None,
            "full_absorption": float(np.mean(full)) if full else None,
        }
    scored = [v for v in per_letter.values() if v["absorption_fraction"] is not None]
    return {
        "words": int(len(X)),
        "probe_accuracy": float((predicted[~train & keep] == letters[~train & keep]).mean()),
        "mean_absorption_fraction": float(np.mean([v["absorption_fraction"] for v in scored])),
        "mean_full_absorption": float(np.mean([v["full_absorption"] for v in scored])),
        "mean_main_latents": float(np.mean([len(v["main_latents"]) for v in per_letter.values()])),
        "letters": per_letter,
    }


@torch.no_grad()
def dense_codes(sae, x: Tensor, batch: int = 1024) -> Tensor:
    """(N, n) activations of the SAE's latents on raw x (N, d)."""
    out = torch.zeros(len(x), sae.cfg.n_latents)
    for start in range(0, len(x), batch):
        enc = sae.encode(x[start : start + batch])
        out[start : start + batch].scatter_add_(1, enc.top_idx.cpu(), enc.top_acts.float().cpu())
    return out


def first_letter_absorption(
    sae, loaded, site: str, max_words: int = 8000, progress: bool = True, seed: int = 0
) -> dict:
    """Absorption of a loaded SAE at `site` of a loaded model (hooks.models.LoadedModel), on at
    most `max_words` words drawn with `seed`."""
    if sae.cfg.is_transcoder:
        raise UserError("Absorption measures an SAE's own reconstruction; this is a transcoder.")
    ids, words = spelling_words(loaded.tokenizer)
    if len(ids) > max_words:
        pick = np.sort(np.random.default_rng(seed).choice(len(ids), max_words, replace=False))
        ids, words = [ids[i] for i in pick], [words[i] for i in pick]
    acts = word_activations(loaded, site, ids, progress=progress)
    letters = np.array([ord(w[0]) - ord("a") for w in words])
    codes = dense_codes(sae.eval(), acts.to(next(sae.parameters()).device))
    return absorption_scores(acts, letters, codes, sae.W_dec.cpu(), seed) | {"site": site}
