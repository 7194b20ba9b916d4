"""First-letter absorption on planted ground truth: a dictionary with one latent per letter
absorbs nothing; one where a quarter of the words have their own latent carrying the letter,
and the letter's latent stays silent on them, absorbs a quarter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.absorption import absorption_scores, spelling_words
from hooks.errors import UserError

D, WORDS_PER_LETTER, LETTERS = 48, 24, 10


def _planted(absorbed_every: int | None):
    """Activations 3 * letter_dir + noise; codes and a decoder that either use the letter's own
    latent for every word, or hand every `absorbed_every`-th word to a word latent whose decoder
    row is its letter direction plus a word-specific part."""
    g = torch.Generator().manual_seed(0)
    letter_dirs = torch.linalg.qr(torch.randn(D, D, generator=g))[0][:LETTERS]  # orthonormal
    letters = np.repeat(np.arange(LETTERS), WORDS_PER_LETTER)
    W = len(letters)
    noise = 0.3 * torch.randn(W, D, generator=g)
    acts = 3 * letter_dirs[letters] + noise
    n = LETTERS + W  # a latent per letter, then one per word
    W_dec = torch.zeros(n, D)
    W_dec[:LETTERS] = letter_dirs
    codes = torch.zeros(W, n)
    for w, c in enumerate(letters):
        word_dir = noise[w] / noise[w].norm()
        if absorbed_every and w % absorbed_every == 0:
            row = letter_dirs[c] + 0.5 * word_dir
            W_dec[LETTERS + w] = row / row.norm()
            codes[w, LETTERS + w] = 3.4
        else:
            W_dec[LETTERS + w] = word_dir
            codes[w, c] = 3.0
            codes[w, LETTERS + w] = 0.3
    return acts, letters, codes, W_dec


def test_one_latent_per_letter_absorbs_nothing():
    scores = absorption_scores(*_planted(None))
    assert scores["probe_accuracy"] > 0.95
    assert scores["mean_full_absorption"] == 0.0
    assert scores["mean_absorption_fraction"] < 0.05
    for c, letter in enumerate("abcdefghij"):
        assert scores["letters"][letter]["main_latents"] == [c]


def test_absorbed_words_are_counted():
    scores = absorption_scores(*_planted(4))
    # words are held out at random, so the share of absorbed ones is a quarter give or take
    assert 0.1 < scores["mean_full_absorption"] < 0.45
    assert scores["mean_absorption_fraction"] == pytest.approx(
        scores["mean_full_absorption"], abs=0.1
    )
    none = absorption_scores(*_planted(None))
    assert scores["mean_absorption_fraction"] > none["mean_absorption_fraction"] + 0.1


def test_spelling_words_are_single_lowercase_tokens():
    class Tokenizer:
        vocab = [" cat", " Dog", "ing", " to", " apple", " naïve", " x1y", " bird"]

        def __len__(self):
            return len(self.vocab)

        def decode(self, ids):
            return self.vocab[ids[0]]

    ids, words = spelling_words(Tokenizer())
    assert words == ["cat", "apple", "bird"] and ids == [0, 4, 7]


def test_too_few_words_is_one_sentence():
    acts, letters, codes, W_dec = _planted(None)
    with pytest.raises(UserError, match="Too few words per first letter"):
        absorption_scores(acts[:6], letters[:6], codes[:6], W_dec)
