"""The SAE's sparse codes of text tokens: the one activation pass that lobes, multi-dimensional
features and dictionary comparison share, cached in RUN/geometry/codes.safetensors.

Geometry describes the dictionary, not how well it generalises, so the pass reads the whole text
source (part "all"), held-out documents first: the built-in corpus's held-out twentieth is only
about 41k tokens, too few for co-occurrence blocks. A pass streams the run's windows through the model (early exit at the site) and the SAE
and keeps, per kept token, its k active latents and their values as one CSR matrix (tokens x
latents), with each token's id, document and offset in the document (for co-occurrence blocks
and for showing contexts). The cache is reused while the SAE weights are the same and it holds
enough tokens; a longer request makes it again.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy
import scipy.sparse as sp
import torch
from tqdm import tqdm

from analysis.run import Run
from analysis.store.encode import encode_codes
from hooks.errors import UserError
from hooks.paths import atomic_write_bytes, sha256_file
from hooks.sites import Capture, resolve_site, special_token_ids
from hooks.windows import batched, stack
from sae.formats import weights_file

CODES_FILE = "codes.safetensors"
DEFAULT_TOKENS = 262_144


@dataclass
class Codes:
    acts: sp.csr_matrix  # (N, n_latents) float32: each row holds one token's active latents
    tokens: np.ndarray  # (N,) int64 token ids
    doc: np.ndarray  # (N,) int32 document of each token
    pos: np.ndarray  # (N,) int32 offset of each token in its document
    window: np.ndarray  # (N,) int64 index of the token's window in the pass's stream
    offset: np.ndarray  # (N,) int32 position of the token in its window

    @property
    def n_tokens(self) -> int:
        return self.acts.shape[0]

    def head(self, n: int) -> Codes:
        """The first n tokens (the stream is deterministic, so a prefix is a shorter pass)."""
        return Codes(
            self.acts[:n], self.tokens[:n], self.doc[:n], self.pos[:n], self.window[:n],
            self.offset[:n],
        )  # fmt: skip

    def blocks(self, size: int) -> np.ndarray:
        """(N,) block id of each token: `size` consecutive tokens of one document form a block."""
        if size < 1:
            raise UserError(f"--block must be at least 1 token, got {size}.")
        key = self.doc.astype(np.int64) * (1 << 32) + self.pos.astype(np.int64) // size
        return np.unique(key, return_inverse=True)[1]


def _arrays(codes: Codes) -> dict[str, np.ndarray]:
    a = codes.acts
    return dict(
        indptr=a.indptr.astype(np.int64), latents=a.indices.astype(np.int32),
        values=a.data.astype(np.float32), tokens=codes.tokens, doc=codes.doc, pos=codes.pos,
        window=codes.window, offset=codes.offset,
    )  # fmt: skip


def load_codes(path: Path, sha: str, part: str) -> Codes | None:
    """The cached codes at path if they were made from the SAE with weights `sha` on the same
    part of the text, else None."""
    if not path.exists():
        return None
    try:
        with safetensors.safe_open(path, framework="np") as f:
            meta = json.loads(f.metadata()["meta"])
        arrays = safetensors.numpy.load_file(path)
        n, n_latents = meta["n_tokens"], meta["n_latents"]
    except Exception:  # a foreign or torn file: the pass makes it again
        return None
    if meta.get("sae_sha256") != sha or meta.get("part") != part:
        return None
    acts = sp.csr_matrix(
        (arrays["values"], arrays["latents"], arrays["indptr"]), shape=(n, n_latents)
    )
    return Codes(acts, *(arrays[k] for k in ("tokens", "doc", "pos", "window", "offset")))


def _windows(run: Run, tokenizer, part: str):
    if part != "all":
        return run.selection.windows(tokenizer, part)
    return itertools.chain(
        run.selection.windows(tokenizer, "eval"), run.selection.windows(tokenizer, "train")
    )


@torch.no_grad()
def collect_codes(
    run: Run,
    n_tokens: int = DEFAULT_TOKENS,
    batch_windows: int = 16,
    loaded=None,
    device: str = "cpu",
    cache: bool = True,
    progress: bool = True,
    part: str = "all",
) -> Codes:
    """The SAE's codes of the first `n_tokens` kept tokens of the run's text source: the held-out
    documents, then the rest (part "all"), or only one split (part "eval" or "train")."""
    if n_tokens <= 0:
        raise UserError(f"--tokens must be a positive number of tokens, got {n_tokens}.")
    weights = weights_file(run.path)
    sha = sha256_file(weights) if weights is not None else "none"
    path = run.path / "geometry" / CODES_FILE
    saved = load_codes(path, sha, part) if cache else None
    if saved is not None and saved.n_tokens >= n_tokens:
        return saved.head(n_tokens)

    sae = run.sae.to(device).eval()
    loaded = loaded() if callable(loaded) else loaded  # a loader: the model only on a cache miss
    loaded = loaded or run.load_model(device, progress=progress)
    site = resolve_site(loaded.model, run.site).name
    special = special_token_ids(loaded.tokenizer)
    T = run.selection.context_size
    keys = ("b", "f", "v", "tok", "doc", "pos", "window", "offset")
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    kept = n_windows = 0
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="codes", disable=not progress)
    with bar, Capture(loaded.model, [site]) as capture:
        for batch in batched(_windows(run, loaded.tokenizer, part), batch_windows):
            tokens, doc, pos = stack(batch)  # (B, T)
            x = capture(tokens.to(device))[site]  # (B, T, d)
            keep = run.selection.capture.keep(tokens, special, [x]).cpu()  # (B, T)
            rows = keep.reshape(-1).nonzero().squeeze(1)[: n_tokens - kept]  # (M,)
            acts, idx = encode_codes(sae, x.reshape(-1, x.shape[-1])[rows.to(device)].float())
            on = acts > 0  # (M, k): a top-k slot may hold a zero after the ReLU
            parts["b"].append((kept + torch.arange(len(rows)))[:, None].expand_as(on)[on.cpu()])
            parts["f"].append(idx[on].cpu())
            parts["v"].append(acts[on].cpu())
            window_ids = (n_windows + torch.arange(len(batch))).repeat_interleave(T)
            for key, value in (("tok", tokens), ("doc", doc), ("pos", pos)):
                parts[key].append(value.reshape(-1)[rows])
            parts["window"].append(window_ids[rows])
            parts["offset"].append((rows % T).int())
            kept += len(rows)
            n_windows += len(batch)
            bar.update(len(rows))
            if kept >= n_tokens:
                break
    if kept == 0:
        raise UserError(
            f"The text of {run.path} ({run.selection.dataset}, part '{part}') gave no tokens to encode; "
            "use a run trained on more text."
        )
    cat = {k: torch.cat(v).numpy() for k, v in parts.items()}
    acts = sp.csr_matrix(
        (cat["v"].astype(np.float32), (cat["b"], cat["f"].astype(np.int32))),
        shape=(kept, sae.cfg.n_latents),
    )
    acts.sort_indices()
    codes = Codes(
        acts, cat["tok"].astype(np.int64), cat["doc"].astype(np.int32),
        cat["pos"].astype(np.int32), cat["window"].astype(np.int64), cat["offset"].astype(np.int32),
    )  # fmt: skip
    if cache:
        meta = dict(
            sae_sha256=sha, n_tokens=kept, n_latents=sae.cfg.n_latents, site=run.site, part=part
        )
        data = safetensors.numpy.save(_arrays(codes), metadata={"meta": json.dumps(meta)})
        atomic_write_bytes(path, data)
    return codes


class Inputs:
    """What the analyses of one run share, each made once on first use: the model and the codes."""

    def __init__(
        self, run: Run, n_tokens: int = DEFAULT_TOKENS, device: str = "cpu", progress: bool = True
    ):
        self.run, self.n_tokens, self.device, self.progress = run, n_tokens, device, progress
        self._loaded = self._codes = None
        self._model_from: Inputs | None = None

    def share_model(self, other: Inputs) -> None:
        """Use another run's model (loaded when first needed) rather than a second copy."""
        self._model_from = other

    @property
    def loaded(self):
        if self._model_from is not None:
            return self._model_from.loaded
        if self._loaded is None:
            self._loaded = self.run.load_model(self.device, progress=self.progress)
        return self._loaded

    @property
    def codes(self) -> Codes:
        if self._codes is None:
            self._codes = collect_codes(
                self.run,
                self.n_tokens,
                loaded=lambda: self.loaded,
                device=self.device,
                progress=self.progress,
            )
        return self._codes
