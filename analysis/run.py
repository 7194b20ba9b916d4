"""Opening a run directory for analysis: its SAE, the token selection its data was made with,
and held-out text from the same source (every 20th document, never seen in training)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hooks.errors import UserError
from hooks.selection import Selection
from hooks.windows import Window
from sae.formats import load_sae, weights_file
from sae.model import SAE


@dataclass
class Run:
    path: Path
    sae: SAE
    model: str  # model name as given to load_model
    site: str
    selection: Selection  # which tokens the SAE was trained on, read back from the run
    info: dict  # run.json
    target: str = ""  # a transcoder's output site (run.site is its input); "" for an SAE

    def load_model(self, device: str = "cpu", progress: bool = True):
        """The run's model, in the dtype its training data was captured in."""
        from hooks.models import load_model

        return load_model(self.model, device, self.selection.model_dtype, progress=progress)

    def heldout_windows(self, tokenizer) -> Iterator[Window]:
        return self.selection.windows(tokenizer, "eval")


def run_selection(path: Path, info: dict) -> Selection:
    """The selection recorded in run.json (a run trained from a cache records the cache's). A
    folder from another tool, with no run.json, gets the defaults, and a warning says so."""
    if "selection" in info and info["selection"] is None:
        raise UserError(
            f"{path} was trained on planted synthetic activations, not on text, so there is no "
            "text to evaluate or analyze it on."
        )
    if "selection" in info:
        return Selection.from_dict(info["selection"], where=f"{path / 'run.json'}")
    if info:
        raise UserError(
            f"{path / 'run.json'} records no token selection; it was written by an older "
            "sae-workbench. Train the run again with this version."
        )
    print(
        f"[saewb] warning: {path} has no run.json, so the default token selection is assumed "
        "(built-in corpus, 128-token windows, position 0 and special tokens dropped).",
        file=sys.stderr,
    )
    return Selection()


def open_run(path: Path | str, device: str = "cpu") -> Run:
    """A run directory written by `saewb train` (or any folder with an SAE, run.json optional)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"Run directory {path} does not exist.")
    if weights_file(path) is None:
        raise UserError(f"{path} holds no SAE yet (no sae.safetensors); run `saewb train` first.")
    sae = load_sae(path, device=device)
    info = json.loads((path / "run.json").read_text()) if (path / "run.json").exists() else {}
    return Run(
        path=path,
        sae=sae,
        model=info.get("model") or sae.cfg.model or "smollm2-135m",
        site=info.get("site") or sae.cfg.site,
        selection=run_selection(path, info),
        info=info,
        target=sae.cfg.target or info.get("target") or "",
    )
