"""Opening a run directory for analysis: its SAE, where its activations came from, and held-out
text from the same source (every 20th document, never seen in training)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hooks.errors import UserError
from hooks.windows import Window, WindowSpec, holdout_split, iter_windows
from sae.formats import load_sae
from sae.model import TopKSAE


@dataclass
class Run:
    path: Path
    sae: TopKSAE
    model: str  # model name as given to load_model
    site: str
    dataset: str
    text_column: str
    context: int
    info: dict  # run.json

    def load_model(self, device: str = "cpu", progress: bool = True):
        from hooks.models import load_model

        return load_model(self.model, device, progress=progress)

    def heldout_windows(self, tokenizer) -> Iterator[Window]:
        from hooks.text import iter_documents

        docs = holdout_split(iter_documents(self.dataset, text_column=self.text_column), "eval")
        return iter_windows(docs, tokenizer, WindowSpec(context_size=self.context))


def open_run(path: Path | str, device: str = "cpu") -> Run:
    """A run directory written by `saewb train` (or any folder with an SAE and a run.json)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"Run directory {path} does not exist.")
    if not (path / "sae.safetensors").exists() and not (path / "sae_weights.safetensors").exists():
        raise UserError(f"{path} holds no SAE yet (no sae.safetensors); run `saewb train` first.")
    sae = load_sae(path, device=device)
    info = json.loads((path / "run.json").read_text()) if (path / "run.json").exists() else {}
    data = info.get("data", {})
    dataset, text_column, context = data.get("dataset"), "text", data.get("context_size")
    if "cache" in data:  # trained from a cache: take the text source the cache was made from
        from hooks.cache import read_manifest

        try:
            manifest = read_manifest(Path(data["cache"]))
            dataset, context = manifest.get("dataset"), manifest.get("context_size")
            text_column = manifest.get("text_column", "text")
        except UserError:
            pass
    config = info.get("config", {})
    return Run(
        path=path,
        sae=sae,
        model=info.get("model") or sae.cfg.model or "smollm2-135m",
        site=info.get("site") or sae.cfg.site,
        dataset=dataset or config.get("dataset") or "builtin",
        text_column=config.get("text_column", text_column),
        context=int(context or config.get("context") or 128),
        info=info,
    )
