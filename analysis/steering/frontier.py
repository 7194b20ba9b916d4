"""The steering frontier: effect on a target against side effect, over a sweep of strength.

    curve = frontier(model, tokenizer, site, lambda s: [Intervention("add", 123, s)],
                     [0, 1, 2, 4, 8], targets=[" cat"], prompts=["I saw a"], neutral=ids, sae=sae)
    matched_side_effect({"sae": curve, "caa": other})   # which moves the target more at equal KL

At each strength s the interventions `edits_at(s)` are applied and three numbers recorded:
  target_shift  mean over prompts of the steered minus unsteered total probability of the target
                tokens (each target's first token) at the prompt's last position
  contains      the share of generations (greedy, or `samples` seeded samples per prompt) whose
                new text holds a target word; `baseline.contains` is the unsteered share
  kl            mean KL(unsteered || steered) of the next-token distribution over every position
                of the neutral ids: the side effect
The probability shift and the KL steer every position; `positions` applies to the generations.
A set `cancel` event (threading.Event) stops the sweep with Cancelled, between strengths and
during each generation; `report(done, total)` hears the strengths finished so far.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from analysis.steering.interventions import Intervention, Steering
from analysis.steering.metrics import check_cancel, contains, generate, log_probs
from hooks.errors import UserError

# Plain prose with no one topic: the side effect is measured where nothing should change.
NEUTRAL_TEXT = (
    "The meeting was moved to Thursday afternoon because several people were travelling. "
    "After lunch she walked to the station, bought a ticket and waited on the platform. "
    "The report lists the results of the survey in three tables and a short summary. "
    "He opened the window, made a cup of tea and read the first chapter of the book."
)


def target_ids(tokenizer, targets: list[str]) -> list[int]:
    """The first token of each target string, e.g. ' cat' (the leading space matters)."""
    if not targets:
        raise UserError("The frontier needs at least one target, e.g. --target ' cat'.")
    ids = []
    for text in targets:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not text.strip() or not tokens:
            raise UserError(f"Target {text!r} is empty; give a word such as ' cat'.")
        ids.append(int(tokens[0]))
    return sorted(set(ids))


def check_strengths(strengths: list[float]) -> list[float]:
    strengths = [float(s) for s in strengths]
    if not strengths:
        raise UserError("The sweep needs at least one strength.")
    for s in strengths:
        if not np.isfinite(s):
            raise UserError(f"The steering strength must be a finite number, got {s}.")
    return strengths


@torch.no_grad()
def frontier(
    model,
    tokenizer,
    site: str,
    edits_at: Callable[[float], list[Intervention]],
    strengths: list[float],
    targets: list[str],
    prompts: list[str],
    neutral: Tensor,
    sae=None,
    positions: str = "all",
    max_new: int = 20,
    sample: bool = False,
    samples: int = 1,
    seed: int = 0,
    progress: bool = False,
    cancel=None,
    report: Callable[[int, int], None] | None = None,
) -> dict:
    """The curve of one steering method over `strengths` (see the module's docstring). `neutral`
    is (B, T) token ids. Greedy decoding makes one generation a prompt; sampling makes
    `samples`, with seeds seed, seed + 1, ..."""
    from tqdm import tqdm

    strengths = check_strengths(strengths)
    if not prompts:
        raise UserError("The frontier needs at least one prompt.")
    if samples < 1:
        raise UserError(f"samples must be at least 1, got {samples}.")
    device = next(model.parameters()).device
    wanted = target_ids(tokenizer, targets)
    encoded = [tokenizer(p, return_tensors="pt")["input_ids"].to(device) for p in prompts]
    neutral = neutral.to(device)
    seeds = [seed + j for j in range(samples if sample else 1)]

    def target_prob(steering) -> float:
        probs = [log_probs(model, ids, steering)[0, -1, wanted].exp().sum() for ids in encoded]
        return float(torch.stack(probs).mean())

    def generations(make_steering) -> list[str]:
        texts = []
        for ids in encoded:
            for s in seeds:
                out = generate(model, ids, make_steering(ids), max_new, sample, s, cancel=cancel)
                texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        return texts

    clean_neutral = log_probs(model, neutral)  # (B, T, V)
    base_prob = target_prob(None)
    base_texts = generations(lambda ids: None)
    curve = dict(strengths=strengths, target_prob=[], target_shift=[], contains=[], kl=[])
    curve["examples"] = []
    for i, s in enumerate(tqdm(strengths, desc="sweep", disable=not progress)):
        check_cancel(cancel)
        if report is not None:
            report(i, len(strengths))
        edits = edits_at(s)
        steering = Steering(model, site, edits, sae)
        prob = target_prob(steering)
        steered = log_probs(model, neutral, steering)
        kl = F.kl_div(steered, clean_neutral, log_target=True, reduction="none").sum(-1).mean()
        texts = generations(
            lambda ids, edits=edits: Steering(model, site, edits, sae, positions, ids.shape[1])
        )
        curve["target_prob"].append(prob)
        curve["target_shift"].append(prob - base_prob)
        curve["contains"].append(float(np.mean([contains(t, targets) for t in texts])))
        curve["kl"].append(float(kl))
        curve["examples"].append(texts[0])
    if report is not None:
        report(len(strengths), len(strengths))
    curve["baseline"] = dict(
        target_prob=base_prob,
        contains=float(np.mean([contains(t, targets) for t in base_texts])),
        example=base_texts[0],
    )
    curve["targets"], curve["target_ids"] = list(targets), wanted
    curve["generations"] = dict(
        prompts=len(prompts), per_prompt=len(seeds), sample=sample, max_new=max_new
    )
    return curve


def matched_side_effect(curves: dict[str, dict], effect: str = "target_shift", points: int = 11):
    """Each curve's effect interpolated at the same KL values, on the KL range every curve
    covers. A curve's points are sorted by KL and joined by straight lines. Returns
    {"kl": [...], "effect": {name: [...]}, "best": [name per KL point], "better": the name with
    the larger mean effect over the shared range (None on a tie), "mean_effect": {name: float},
    "measured": {name: its points inside the shared range}}: a curve with few points there is
    mostly interpolated, and a finer sweep of strength is the cure.
    Larger effect is better; sweep negative strengths and negate to compare suppression."""
    if len(curves) < 2:
        raise UserError("A matched-side-effect comparison needs at least two curves.")
    if effect not in ("target_shift", "target_prob", "contains"):
        raise UserError(f"Unknown effect '{effect}'; use target_shift, target_prob or contains.")
    lines = {}
    for name, curve in curves.items():
        kl, y = np.asarray(curve["kl"], float), np.asarray(curve[effect], float)
        order = np.argsort(kl, kind="stable")
        lines[name] = kl[order], y[order]
    lo = max(kl[0] for kl, _ in lines.values())
    hi = min(kl[-1] for kl, _ in lines.values())
    if hi < lo:
        empty = {n: [] for n in curves}
        return dict(kl=[], effect=empty, best=[], better=None, mean_effect={}, measured={})
    grid = np.linspace(lo, hi, points) if hi > lo else np.array([lo])
    at = {name: np.interp(grid, kl, y) for name, (kl, y) in lines.items()}
    names = list(at)
    stacked = np.stack([at[n] for n in names])  # (curves, points)
    best = [names[int(np.argmax(col))] if np.ptp(col) > 1e-12 else None for col in stacked.T]
    means = {n: float(at[n].mean()) for n in names}
    top = sorted(means.values())
    better = max(means, key=means.get) if top[-1] - top[-2] > 1e-12 else None
    return dict(
        kl=grid.tolist(),
        effect={n: at[n].tolist() for n in names},
        best=best,
        better=better,
        mean_effect=means,
        measured={n: int(((kl >= lo) & (kl <= hi)).sum()) for n, (kl, _) in lines.items()},
    )


def figure(curves: dict[str, dict], title: str = "Steering frontier"):
    """A plotly figure: target probability shift and the share of generations holding a target,
    each against the KL side effect, one trace per method, strengths on hover."""
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("probability shift of the targets", "share of generations with a target"),
    )
    for i, (name, curve) in enumerate(curves.items()):
        hover = [f"strength {s:g}" for s in curve["strengths"]]
        for col, key in ((1, "target_shift"), (2, "contains")):
            fig.add_scatter(
                x=curve["kl"],
                y=curve[key],
                mode="lines+markers",
                name=name,
                legendgroup=name,
                showlegend=col == 1,
                text=hover,
                marker_color=f"hsl({(i * 137) % 360}, 60%, 45%)",
                row=1,
                col=col,
            )
    for col in (1, 2):
        fig.update_xaxes(title_text="KL from the unsteered model on neutral text", row=1, col=col)
    fig.update_layout(title=title, template="plotly_white")
    return fig
