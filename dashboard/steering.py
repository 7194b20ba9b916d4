"""The steering playground's work: the form's input checked into a Request before any model
runs, and the background job that steers one prompt (or sweeps the strength) on the model the
Workspace loaded once. Cancellable: a set cancel event stops it within a token."""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, replace

from analysis.steering.interventions import MODES, POSITIONS, UNITS
from analysis.steering.metrics import Cancelled, check_cancel
from dashboard.data import Workspace
from hooks.errors import UserError

VECTOR_MODES = ("add", "cap", "replace")  # clamp and ablate act on an SAE latent
MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS = 2000, 256
MAX_NEW, MAX_SWEEP, MAX_TARGETS = 200, 12, 8


@dataclass(frozen=True)
class FeatureEdit:
    """One feature row of the form, its strength in `units`."""

    feature: int
    value: float
    mode: str
    units: str


@dataclass(frozen=True)
class Request:
    """One checked playground request; `strengths` makes it a sweep."""

    run: str
    prompt: str
    features: tuple[FeatureEdit, ...]
    vector: str | None
    vector_value: float | None  # None: the vector's own norm
    vector_mode: str
    max_new: int
    sample: bool
    seed: int
    positions: str
    targets: tuple[str, ...]
    strengths: tuple[float, ...] | None


def _blank(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _number(value, what: str) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise UserError(f"{what} must be a finite number, got {str(value)[:40]!r}.")
    return number


def whole(value, what: str, lo: int, hi: int) -> int:
    try:
        number = float(str(value).strip()) if not _blank(value) else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number != int(number) or not lo <= number <= hi:
        raise UserError(
            f"{what} must be a whole number from {lo} to {hi}, got {str(value)[:40]!r}."
        )
    return int(number)


def _choice(value, what: str, allowed: tuple) -> str:
    if value not in allowed:
        raise UserError(f"Unknown {what} {str(value)[:40]!r}; use one of {', '.join(allowed)}.")
    return value


def parse_targets(text) -> tuple[str, ...]:
    """'dog, cat' or "' dog', 'Paris'" -> (' dog', ' cat') or (' dog', 'Paris'):
    an unquoted word gets a leading space (a word's own token); a quoted one is kept as is."""
    if _blank(text):
        return ()
    out = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        word = part.strip()
        if len(word) >= 2 and word[0] == word[-1] and word[0] in "'\"":
            word = word[1:-1]
        else:
            word = " " + word  # an unquoted word starts a word: its leading space
        if not word.strip() or len(word) > 50:
            raise UserError(f"Target {part.strip()[:60]!r} must be a word of 1 to 50 characters.")
        out.append(word)
    if len(out) > MAX_TARGETS:
        raise UserError(f"Give at most {MAX_TARGETS} target words, got {len(out)}.")
    return tuple(out)


def check_request(
    ws: Workspace,
    run,
    prompt,
    rows,
    vector=None,
    vector_value=None,
    vector_mode="add",
    max_new=30,
    decoding="greedy",
    seed=0,
    positions="all",
    targets=None,
    sweep=False,
    strengths=None,
) -> Request:
    """The form's values as a Request, or UserError naming the bad value. `rows` holds
    {feature, value, mode, units} dicts; a row without a feature id is unused."""
    run = ws.name(run)
    summary = ws.summary(run)
    if not summary["has_sae"]:
        raise UserError(f"Run {run!r} has no SAE yet, so it has no features to steer with.")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("Type a prompt first.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UserError(
            f"The prompt is {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}."
        )
    n = int(summary["latents"] or 0)
    edits = []
    for i, row in enumerate(rows or [], 1):
        if _blank(row.get("feature")):
            continue
        what = f"feature row {i}"
        feature = whole(row["feature"], f"The feature id of {what}", 0, max(n - 1, 0))
        mode = _choice(row.get("mode"), f"mode of {what}", MODES)
        units = _choice(row.get("units") or "raw", f"units of {what}", UNITS)
        value = 0.0 if mode == "ablate" and _blank(row.get("value")) else row.get("value")
        value = _number(value, f"The strength of {what}")
        if units == "max":
            ws.store(run)  # strengths in max units need the store: its absence names the command
        edits.append(FeatureEdit(feature, value, mode, units))
    if _blank(vector):
        vector, vector_value = None, None
    else:
        if vector not in ws.steering(run)["vectors"]:
            raise UserError(f"Run {run!r} has no saved steering vector named {str(vector)[:80]!r}.")
        vector_mode = _choice(vector_mode, "vector mode", VECTOR_MODES)
        if not _blank(vector_value):
            vector_value = _number(vector_value, "The vector's strength")
        else:
            vector_value = None
    if not edits and vector is None:
        raise UserError("Give at least one feature id (with its strength) or a saved vector.")
    max_new = whole(max_new, "Max new tokens", 1, MAX_NEW)
    decoding = _choice(decoding, "decoding", ("greedy", "sampled"))
    seed = whole(0 if _blank(seed) else seed, "The seed", 0, 2**31 - 1)
    positions = _choice(positions, "positions", POSITIONS)
    words = parse_targets(targets)
    sweep_strengths = None
    if sweep:
        if not words:
            raise UserError("A sweep needs target words to move, e.g. ' dog'.")
        parts = [p for p in str(strengths or "").split(",") if p.strip()]
        if not parts:
            raise UserError("A sweep needs strengths, such as 0,1,2,4.")
        if len(parts) > MAX_SWEEP:
            raise UserError(f"A sweep takes at most {MAX_SWEEP} strengths, got {len(parts)}.")
        sweep_strengths = tuple(_number(p, "Each sweep strength") for p in parts)
    return Request(
        run=run,
        prompt=prompt,
        features=tuple(edits),
        vector=vector,
        vector_value=vector_value,
        vector_mode=vector_mode,
        max_new=max_new,
        sample=decoding == "sampled",
        seed=seed,
        positions=positions,
        targets=words,
        strengths=sweep_strengths,
    )


# -- the job, in a worker thread -------------------------------------------------------------

_NEUTRAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # probe -> (ids, where from)


@contextlib.contextmanager
def _model_turn(probe, cancel):
    """The model's lock while steering: its hooks would otherwise change the live text of every
    run sharing the model (which holds the same lock) and other steering jobs on it."""
    lock = probe.lock
    while not lock.acquire(timeout=0.1):
        if cancel is not None and cancel.is_set():
            raise Cancelled("Cancelled before the model was free.")
    try:
        yield
    finally:
        lock.release()


def _neutral(probe):
    """4 held-out windows of the run (the CLI's default), else the built-in text; once a probe."""
    from analysis.steering.steer_prompt import neutral_ids

    if probe not in _NEUTRAL:
        tokenizer = probe.loaded.tokenizer
        try:
            _NEUTRAL[probe] = neutral_ids(probe.run, tokenizer, probe.device)
        except UserError:  # the run's held-out text is not on this machine
            _NEUTRAL[probe] = neutral_ids(probe.run, tokenizer, probe.device, text="")
    return _NEUTRAL[probe]


def _edits(ws: Workspace, request: Request, probe) -> dict[str, tuple[list, list[dict]]]:
    """method name -> (raw interventions, their settings): "sae" and "caa:NAME"."""
    from analysis.steering.interventions import feature_edits, vector_edit

    methods, path = {}, ws.path(request.run)
    if request.features:
        specs = [(e.feature, e.mode, e.value, e.units) for e in request.features]
        raw = feature_edits(path, probe.sae, specs)
        settings = [
            dict(feature=e.feature, mode=e.mode, value=e.value, units=e.units, raw_value=r.value)
            for e, r in zip(request.features, raw)
        ]
        methods["sae"] = raw, settings
    if request.vector is not None:
        edit, _ = vector_edit(path, request.vector, probe.site, request.vector_mode,
                              request.vector_value)  # fmt: skip
        methods[f"caa:{request.vector}"] = [edit], [dict(vector=request.vector, value=edit.value)]
    return methods


def steer_job(ws: Workspace, request: Request, status: dict, cancel=None) -> dict:
    """Generate (or sweep) as the request says; a set `cancel` raises Cancelled promptly."""

    check_cancel(cancel)
    probe = ws.probe(request.run)  # a first load can take a while: look again after it
    check_cancel(cancel)
    status["text"] = "waiting for the model…"
    with _model_turn(probe, cancel):
        try:
            return _steer(ws, request, probe, status, cancel)
        except Cancelled:
            raise Cancelled("Cancelled: the generation stopped.") from None


def _steer(ws: Workspace, request: Request, probe, status: dict, cancel) -> dict:
    from analysis.steering.frontier import frontier, matched_side_effect
    from analysis.steering.interventions import Steering
    from analysis.steering.steer_prompt import steer_prompt

    model, tokenizer = probe.loaded.model, probe.loaded.tokenizer
    tokens = len(tokenizer(request.prompt)["input_ids"])
    if tokens > MAX_PROMPT_TOKENS:
        raise UserError(f"The prompt is {tokens} tokens; the limit is {MAX_PROMPT_TOKENS}.")
    longest = getattr(model.config, "max_position_embeddings", None)
    if longest and tokens + request.max_new > longest:
        raise UserError(
            f"The prompt's {tokens} tokens and {request.max_new} new ones pass this "
            f"model's {longest} positions; ask for fewer new tokens."
        )
    methods = _edits(ws, request, probe)
    for raw, _ in methods.values():  # every method's bad edit is refused before any forward
        Steering(model, probe.site, raw, probe.sae)
    neutral, neutral_from = _neutral(probe)
    out = dict(
        run=request.run,
        prompt=request.prompt,
        site=probe.site,
        neutral=neutral_from,
        methods={name: s for name, (_, s) in methods.items()},
    )
    kw = dict(
        positions=request.positions,
        max_new=request.max_new,
        sample=request.sample,
        seed=request.seed,
        cancel=cancel,
    )
    if request.strengths is None:
        edits = [e for raw, _ in methods.values() for e in raw]
        report = lambda text: status.update(text=text)  # noqa: E731
        result = steer_prompt(
            model,
            tokenizer,
            probe.sae,
            probe.site,
            edits,
            request.prompt,
            neutral,
            list(request.targets),
            report=report,
            **kw,
        )
        return dict(kind="single", **out, **result)
    curves = {}
    for name, (raw, _) in methods.items():
        tell = lambda i, n, name=name: status.update(text=f"sweep {name}: strength {i} of {n} done")  # noqa: E731
        curves[name] = frontier(
            model,
            tokenizer,
            probe.site,
            lambda s, raw=raw: [replace(e, value=e.value * s) for e in raw],
            list(request.strengths),
            list(request.targets),
            [request.prompt],
            neutral,
            probe.sae,
            report=tell,
            **kw,
        )
    matched = matched_side_effect(curves) if len(curves) > 1 else None
    return dict(
        kind="sweep",
        **out,
        targets=list(request.targets),
        strengths=list(request.strengths),
        curves=curves,
        matched=matched,
    )
