"""Running a run's model and SAE on a user's own text: the per-token sparse code behind the
dashboard's "try your own text" (and, later, steering). The model is loaded once per probe."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from analysis.run import Run
from analysis.store.encode import encode_codes
from hooks.errors import UserError
from hooks.windows import special_id

MAX_TEXT_TOKENS = 512


@dataclass
class TextCodes:
    """The SAE's code of each token of one text."""

    tokens: list[str]  # display string per token
    token_ids: list[int]
    acts: Tensor  # (T, k) activations of the active latents
    idx: Tensor  # (T, k) their latent ids
    kept: list[bool]  # False where the SAE never looks (BOS, special tokens, position 0)

    def activation(self, feature: int) -> list[float]:
        """One latent's activation on every token (0 where it is not among the top k)."""
        value = (self.acts * (self.idx == feature)).sum(1)  # (T,)
        return [v if keep else 0.0 for v, keep in zip(value.tolist(), self.kept)]

    def top_features(self, position: int, n: int = 5) -> list[tuple[int, float]]:
        """The strongest latents on one token, strongest first."""
        if not self.kept[position]:
            return []
        acts, idx = self.acts[position], self.idx[position]
        order = torch.argsort(acts, descending=True)[:n]
        return [(int(idx[i]), float(acts[i])) for i in order if acts[i] > 0]


class TextProbe:
    """One run's model and SAE in memory; `encode` may be called from several threads."""

    def __init__(self, run: Run, loaded=None, device: str = "cpu", lock=None):
        from hooks.sites import Capture, resolve_site, special_token_ids

        self.run, self.device = run, device
        self.sae = run.sae.to(device).eval()
        self.loaded = loaded or run.load_model(device, progress=False)
        self.site = resolve_site(self.loaded.model, run.site).name
        self.special = special_token_ids(self.loaded.tokenizer)
        self._capture = Capture(self.loaded.model, [self.site])
        # One forward at a time through the model's hooks; runs that share one loaded model
        # share this lock (pass it), and anything else that hooks the model takes it too.
        self.lock = lock or threading.Lock()

    def encode(self, text: str, max_tokens: int = MAX_TEXT_TOKENS) -> TextCodes:
        """Tokenise as the training windows do (BOS first, if they had it) and encode every
        token; the run's selection says which tokens the SAE was trained on."""
        if not isinstance(text, str) or not text.strip():
            raise UserError("The text is empty; type a sentence to run through the model.")
        tokenizer = self.loaded.tokenizer
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        selection = self.run.selection
        bos = special_id(tokenizer, "bos") if selection.bos == "prepend" else None
        ids = ([bos] if bos is not None else []) + ids
        if len(ids) > max_tokens:
            raise UserError(
                f"The text is {len(ids)} tokens long; the limit here is {max_tokens} tokens."
            )
        tokens = torch.tensor([ids], device=self.device)  # (1, T)
        with self.lock, torch.no_grad(), self._capture as capture:
            x = capture(tokens)[self.site][0].float()  # (T, d)
        acts, idx = encode_codes(self.sae, x)  # (T, k) each
        keep = selection.capture.keep(tokens.cpu(), self.special, [x[None].cpu()])[0]  # (T,)
        display = tokenizer.batch_decode([[i] for i in ids])
        return TextCodes(display, ids, acts.cpu(), idx.cpu(), keep.cpu().tolist())
