"""Feature steering: edits of the hidden state at one hook site, during `forward` and `generate`.

    with Steering(model, "resid_post.3", [Intervention("add", feature=123, value=8.0)], sae):
        out = model.generate(ids, max_new_tokens=20)

Each edit moves the hidden state h (B, T, d) along one direction u: an SAE latent's decoder row
(unit norm) or a raw vector (normalised here), at the positions chosen:
  add      h + value * u
  clamp    h + (value - a) * W_dec[f] / input_scale, a the latent's activation in the SAE's code of
           h; the SAE's error term is kept, so the latents left alone reproduce h exactly
  ablate   clamp to 0
  cap      h - max(h.u - value, 0) * u: the component along u is at most `value`
  replace  h - (h.u) u + value * u
Several edits apply in the order given. A Steering never leaves a hook behind, even when the
code inside the block raises.

A feature's value is raw (site units) or, with `in_units(edits, "max", sae, max_act)`, in units
of the feature's typical max activation from the feature store: 1 adds (or caps at, or replaces
with) the length the feature writes at its max, max_act[f] * |W_dec[f]| / input_scale, and a
clamp's 1 is the max activation itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hooks.errors import UserError
from hooks.sites import Splice, canonical_site
from sae.model import SAE

MODES = ("add", "clamp", "ablate", "cap", "replace")
POSITIONS = ("all", "prompt", "generated")
UNITS = ("raw", "max")
_NEEDS_SAE = ("clamp", "ablate")


@dataclass(frozen=True)
class Intervention:
    mode: str
    feature: int | None = None  # an SAE latent, or
    vector: Tensor | None = None  # (d,) a raw direction (a CAA vector, say)
    value: float = 0.0  # add: the length added; clamp: the latent's value; cap, replace: h.u

    def check(self, d: int, sae: SAE | None) -> None:
        if self.mode not in MODES:
            raise UserError(f"Unknown steering mode '{self.mode}'; use one of {', '.join(MODES)}.")
        if not math.isfinite(self.value):
            raise UserError(f"The steering strength must be a finite number, got {self.value}.")
        if (self.feature is None) == (self.vector is None):
            raise UserError("An intervention takes a feature or a vector, exactly one of them.")
        if self.vector is not None:
            if self.mode in _NEEDS_SAE:
                raise UserError(f"Mode '{self.mode}' acts on an SAE latent; give a feature.")
            if tuple(self.vector.shape) != (d,) or not torch.isfinite(self.vector).all():
                raise UserError(
                    f"A steering vector must be {d} finite numbers (the site's width), "
                    f"got shape {tuple(self.vector.shape)}."
                )
            if not self.vector.norm() > 0:
                raise UserError("The steering vector is zero; it has no direction.")
            return
        if sae is None:
            raise UserError(f"Feature {self.feature} needs the run's SAE; pass sae=.")
        n = sae.cfg.n_latents
        if not 0 <= self.feature < n:
            raise UserError(f"Feature {self.feature} is out of range; this SAE has 0..{n - 1}.")


def max_activations(run_path: Path | str) -> np.ndarray:
    """(n_latents,) each latent's max activation over the held-out tokens, from the run's feature
    store (`saewb analyze`)."""
    from analysis.store.read import FeatureStore

    run_path = Path(run_path)
    if not (run_path / "features" / "manifest.json").is_file():
        raise UserError(
            f"Strengths in units of max activation need the run's feature store, and {run_path} "
            f"has none; run `saewb analyze {run_path}` first, or use --units raw."
        )
    store = FeatureStore(run_path / "features")
    return store.features.column("max_act").to_numpy().astype(np.float64)


def in_units(
    edits: list[Intervention],
    units: str,
    sae: SAE | None = None,
    max_act: np.ndarray | None = None,
) -> list[Intervention]:
    """The edits with their values turned into raw site units; `units` says what they are in."""
    if units not in UNITS:
        raise UserError(f"Unknown units '{units}'; use one of {', '.join(UNITS)}.")
    if units == "raw":
        return list(edits)
    out = []
    for edit in edits:
        if edit.vector is not None:
            raise UserError(
                "Units of max activation belong to SAE features; give a vector's strength raw."
            )
        if sae is None or max_act is None:
            raise UserError("Units of max activation need the SAE and its feature store.")
        n = sae.cfg.n_latents
        if len(max_act) != n:
            raise UserError(
                f"The feature store holds {len(max_act)} latents and the SAE {n}; rerun "
                "`saewb analyze` for this SAE."
            )
        if not 0 <= edit.feature < n:
            raise UserError(f"Feature {edit.feature} is out of range; this SAE has 0..{n - 1}.")
        top = float(max_act[edit.feature])
        if edit.mode != "ablate" and not top > 0:
            raise UserError(
                f"Feature {edit.feature} never fired in the feature store (max activation "
                f"{top}), so it has no typical size; give its strength with --units raw."
            )
        if edit.mode in ("add", "cap", "replace"):  # the length of the feature's write at max
            top *= float(sae.W_dec[edit.feature].detach().norm() / sae.input_scale)
        out.append(replace(edit, value=edit.value * top))
    return out


def feature_edits(
    run_path: Path | str, sae: SAE, specs: list[tuple[int, str, float, str]]
) -> list[Intervention]:
    """The raw interventions of (feature, mode, value, units) specs: strengths in units of max
    activation are turned into site units, reading the run's feature store once."""
    max_act = max_activations(run_path) if any(spec[3] == "max" for spec in specs) else None
    return [
        in_units([Intervention(mode, feature=feature, value=value)], units, sae, max_act)[0]
        for feature, mode, value, units in specs
    ]


def vector_edit(
    run_path: Path | str, name: str, site: str, mode: str, value: float | None
) -> tuple[Intervention, dict]:
    """(the intervention, the vector's provenance) for a saved CAA vector by name; a missing
    strength is the vector's own norm."""
    from analysis.steering.caa import load_vector

    vector, meta = load_vector(run_path, name, site)
    value = float(vector.norm()) if value is None else value
    return Intervention(mode, vector=vector, value=value), meta


class Steering:
    """Apply interventions at `site` while the block is open. `positions` picks where: every
    position, the prompt's (the first `prompt_len`) or the generated ones (the rest)."""

    def __init__(
        self,
        model: torch.nn.Module,
        site: str,
        interventions: list[Intervention],
        sae: SAE | None = None,
        positions: str = "all",
        prompt_len: int | None = None,
    ):
        if positions not in POSITIONS:
            raise UserError(f"Unknown positions '{positions}'; use one of {', '.join(POSITIONS)}.")
        if positions != "all" and prompt_len is None:
            raise UserError(f"positions='{positions}' needs the prompt's length (prompt_len).")
        if not interventions:
            raise UserError("No intervention was given; pass at least one feature or vector.")
        if sae is not None and sae.cfg.is_transcoder:
            raise UserError(
                f"Steering edits an SAE's latents at the site it reads and writes; this is a "
                f"transcoder from {sae.cfg.site} to {sae.cfg.target}. Steer with an SAE of "
                f"{sae.cfg.target}, or add a raw vector there."
            )
        if (
            sae is not None
            and sae.cfg.site
            and canonical_site(site) != canonical_site(sae.cfg.site)
        ):
            raise UserError(
                f"The SAE was trained on {sae.cfg.site}, not {site}; steer at its own site."
            )
        self.splice = Splice(model, site, self._edit)
        d = _site_width(model, sae)
        for edit in interventions:
            edit.check(d, sae)
        self.interventions, self.sae = list(interventions), sae
        self.positions, self.prompt_len = positions, prompt_len or 0
        self._next = 0  # the absolute position after the last forward's tokens
        self.steered: list[int] = []  # absolute positions edited, in the order edited
        self._units: list[Tensor] | None = None  # each edit's direction, made on first use

    def __enter__(self) -> Steering:
        self._next, self.steered, self._units = 0, [], None
        self.splice.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.splice.__exit__(*exc)

    def _absolute(self, T: int) -> Tensor:
        """(T,) absolute positions of this forward's tokens, on the CPU (no device sync): a
        decoding step with the KV cache brings one token after the ones seen; any other forward
        starts at 0."""
        start = self._next if T == 1 and self._next >= max(self.prompt_len, 1) else 0
        self._next = start + T
        return torch.arange(start, start + T)

    def _edit(self, h: Tensor) -> Tensor:
        pos = self._absolute(h.shape[1])  # (T,)
        keep = None  # (T,) on h's device where only some positions are edited
        if self.positions != "all":
            mask = (pos < self.prompt_len) == (self.positions == "prompt")
            pos = pos[mask]
            if not len(pos):
                return h
            if len(pos) < h.shape[1]:
                keep = mask.to(h.device)[None, :, None]
        self.steered += pos.tolist()
        x = h.float()  # (B, T, d)
        for edit, u in zip(self.interventions, self._directions(x)):
            y = self._apply(edit, u, x)
            x = y if keep is None else torch.where(keep, y, x)
        return x.to(h.dtype)

    def _directions(self, x: Tensor) -> list[Tensor]:
        """(d,) each edit's direction on x's device, made once a block: the unit direction, or
        for clamp and ablate the latent's write per unit of activation, W_dec[f] / input_scale."""
        if self._units is None or self._units[0].device != x.device:
            units = []
            for edit in self.interventions:
                if edit.vector is not None:
                    u = edit.vector.detach().float()
                else:
                    u = self.sae.W_dec[edit.feature].detach().float()
                if edit.mode in _NEEDS_SAE:
                    u = u / self.sae.input_scale.detach().float()
                else:
                    u = u / u.norm()
                units.append(u.to(x.device))
            self._units = units
        return self._units

    def _apply(self, edit: Intervention, u: Tensor, x: Tensor) -> Tensor:
        if edit.mode in _NEEDS_SAE:
            target = 0.0 if edit.mode == "ablate" else edit.value
            acts, idx = self.sae.encode(x.reshape(-1, x.shape[-1]))[:2]  # (B*T, k) each
            a = (acts * (idx == edit.feature)).sum(-1).view(x.shape[:-1])  # (B, T)
            return x + (target - a)[..., None] * u
        if edit.mode == "add":
            return x + edit.value * u
        along = x @ u  # (B, T)
        if edit.mode == "cap":
            return x - (along - edit.value).clamp(min=0)[..., None] * u
        return x + (edit.value - along)[..., None] * u  # replace


def _site_width(model: torch.nn.Module, sae: SAE | None) -> int:
    if sae is not None:
        return sae.cfg.d_in
    config = getattr(model, "config", None)
    return int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
