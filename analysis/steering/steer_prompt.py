"""One prompt generated with and without steering, side by side, with the numbers of a steering
run: what `saewb steer` prints and saves and what the dashboard's playground shows.

    out = steer_prompt(model, tokenizer, sae, "resid_post.3", edits, "I saw a", neutral)
    out["baseline"]["text"], out["steered"]["text"], out["metrics"]["kl"]

The result is {"baseline": {text, perplexity}, "steered": {text, perplexity}, "metrics": {kl,
[targets, target_ids, target_shift]}} (see metrics.py for each number). The KL and the target
shift steer every position; `positions` applies to the steered generation.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from torch import Tensor

from analysis.steering.frontier import NEUTRAL_TEXT, target_ids
from analysis.steering.interventions import Intervention, Steering
from analysis.steering.metrics import (
    check_cancel,
    generate,
    next_token_kl,
    perplexity,
    target_shift,
)


def neutral_ids(run, tokenizer, device="cpu", text: str | None = None, windows: int = 4):
    """((B, T) ids of neutral text, where it came from): `text`, else `windows` held-out
    windows of the run, else the built-in text."""
    from hooks.windows import stack

    if text is None:
        found = list(itertools.islice(run.heldout_windows(tokenizer), windows))
        if found:
            return stack(found)[0].to(device), f"{len(found)} held-out windows"
    ids = tokenizer(text or NEUTRAL_TEXT, return_tensors="pt")["input_ids"].to(device)
    return ids, "the given neutral text" if text else "the built-in neutral text"


def steer_prompt(
    model,
    tokenizer,
    sae,
    site: str,
    edits: list[Intervention],
    prompt: str,
    neutral: Tensor,
    targets: list[str] | None = None,
    positions: str = "all",
    max_new: int = 40,
    sample: bool = False,
    seed: int = 0,
    cancel=None,
    report: Callable[[str], None] | None = None,
) -> dict:
    """Baseline and steered generation of `prompt` with every edit at once, and the metrics
    (see the module's docstring). `neutral` is (B, T) ids. A set `cancel` event raises
    Cancelled, checked after every token; `report(text)` hears what is being done."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)  # (1, T)
    steering = Steering(model, site, edits, sae, positions, ids.shape[1])  # bad edits: refused
    wanted = target_ids(tokenizer, targets) if targets else None
    result = {}
    for name, steer in (("baseline", None), ("steered", steering)):
        tell = None
        if report is not None:
            tell = lambda n, name=name: report(f"{name} generation: token {n} of {max_new}")  # noqa: E731
        out = generate(model, ids, steer, max_new, sample, seed, cancel=cancel, on_token=tell)
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        result[name] = dict(text=text, perplexity=perplexity(model, out, ids.shape[1]))
        check_cancel(cancel)
    if report is not None:
        report("KL on neutral text")
    every = Steering(model, site, edits, sae)
    metrics = dict(kl=next_token_kl(model, neutral.to(device), every))
    if wanted is not None:
        check_cancel(cancel)
        metrics.update(targets=list(targets), target_ids=wanted)
        metrics["target_shift"] = target_shift(model, ids, every, wanted)
    return dict(**result, metrics=metrics)
