"""LF-Steering: find the SAE latents behind a model's inconsistent answers to paraphrases, steer
them towards the values they take where it answers consistently, and measure before and after.

    result = lf_steering(model, tokenizer, sae, site, groups, seed=0)   # or lf_steer(run)

The procedure (the paper gives the idea; these are our choices):
1. Split the groups per task, seeded, into a tune half and an eval half. Everything chosen is
   chosen on tune; every reported number is on eval.
2. Read the answer of every paraphrase (NLU: the argmax over the answers' first tokens at the
   prompt's last token; NLG: greedy generation, normalised exact match) and encode the site's
   state at the prompt's last token with the SAE. The last token is where the answer is read, and
   it has seen the whole paraphrase; a mean over the paraphrase's own tokens would mostly measure
   the wording, which differs between paraphrases by construction.
3. Score each latent j on tune, in its activation units:
     flip     mean over inconsistent groups of |a_p - a_q| over pairs answered differently
     wording  mean over consistent groups of |a_p - a_q| over all pairs (wording alone)
     between  mean |m_g - m_h| over pairs of consistent groups with different answers (m the
              group mean): what the latent carries about the answer or the content itself
     score    flip - wording - between
   A latent that only tracks wording, or that is the answer, scores <= 0: pinning it would
   erase the task. What is left varies with the flips and not otherwise.
4. Steer the top-m latents by clamping each (SAE error term kept) at
   off + strength * (consistent - off), where `consistent` is its mean over consistent groups
   and `off` its mean over the paraphrases answered wrongly in inconsistent groups: strength 1
   puts it at the consistent value, below 1 part of the way, above 1 past it. The edit applies
   at the last prompt token and at generated tokens.
5. Pick (m, strength) from a small grid by the consistent-and-correct rate on tune (then accuracy,
   then fewer latents and less strength), so a gain from answering everything alike cannot win.
Baselines on the same splits: CAA, adding the mean of consistent-minus-wrong last-token states
with its strength picked on tune from the same grid (in units of its length), and clamping the
same number of random latents (seeded, from those active on tune, LF's own excluded) by the same
rule at LF's strength. The prompts' KV cache up to the last token is computed once per split, so
each configuration costs one token a prompt (NLU) or a short generation (NLG).
"""

from __future__ import annotations

import inspect
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from analysis.steering.caa import direction_from_differences
from analysis.steering.interventions import Intervention, Steering
from analysis.steering.paraphrases import Group, builtin_groups, locality_groups, normalise
from hooks.errors import UserError
from hooks.sites import Splice

STRENGTHS = (0.5, 1.0, 2.0)
COUNTS = (1, 4, 16)
METRICS = ("consistency", "accuracy", "consistent_correct")


# -- reading answers -----------------------------------------------------------------------------


@dataclass
class _Batch:
    rows: list[int]  # prompt indices, into the runner's flat list
    ids: Tensor  # (B, T) left-padded
    mask: Tensor  # (B, T)
    pos: Tensor  # (B, T) position ids that skip the padding
    cache: object  # the KV cache of ids[:, :-1], unsteered
    answer_ids: Tensor | None  # (B, A) the answers' first tokens (NLU), None for NLG


class Runner:
    """The prompts of some groups, batched by length, with their KV caches up to the last token,
    so that a pass under any steering re-runs only the last prompt token (and the generation)."""

    def __init__(
        self,
        model,
        tokenizer,
        groups: list[Group],
        batch: int = 16,
        max_new: int = 6,
        progress: bool = False,
    ):
        self.model, self.tokenizer, self.groups, self.max_new = model, tokenizer, groups, max_new
        self.texts, self.group_of, self.gold = [], [], []
        for g, group in enumerate(groups):
            for text in group.prompts():
                self.texts.append(text)
                self.group_of.append(g)
                self.gold.append(group.gold if group.answers else normalise(group.gold))
        self.group_of = np.array(self.group_of)
        self.pad = _pad_id(tokenizer)
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        device = next(model.parameters()).device
        encoded = [tokenizer(t)["input_ids"] for t in self.texts]
        # A batch holds one answer set (None: NLG), so that its answers' logits stack; within
        # a set, prompts of similar length go together and padding stays short.
        kind = [groups[g].answers for g in self.group_of]
        chunks = []
        for answers in dict.fromkeys(kind):
            rows = sorted((r for r in range(len(kind)) if kind[r] == answers),
                          key=lambda r: len(encoded[r]))  # fmt: skip
            chunks += [
                (rows[i : i + batch], answers is not None) for i in range(0, len(rows), batch)
            ]
        self.batches = [
            self._prefill(chunk, [encoded[r] for r in chunk], nlu, device)
            for chunk, nlu in tqdm(chunks, desc="prompt caches", disable=not progress)
        ]

    @torch.no_grad()
    def _prefill(self, rows, encoded, nlu, device) -> _Batch:
        T = max(len(e) for e in encoded)
        if T < 2:
            raise UserError(
                f"The prompt {self.texts[rows[0]]!r} is a single token; give more text."
            )
        ids = torch.full((len(rows), T), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, T - len(e) :], mask[i, T - len(e) :] = torch.tensor(e), 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                         position_ids=pos[:, :-1], use_cache=True, **self.keep_last)  # fmt: skip
        cache = getattr(out, "cache", None) or out.past_key_values
        answer_ids = None
        if nlu:
            answer_ids = torch.tensor(
                [_answer_tokens(self.tokenizer, self.groups[self.group_of[r]]) for r in rows]
            ).to(device)  # (B, A)
        return _Batch(rows, ids, mask, pos, cache, answer_ids)

    @torch.no_grad()
    def run(self, steering: Steering | None = None, site: str | None = None, keep: bool = False):
        """(answers, states, log_probs): each prompt's answer; with `site`, the site's unsteered
        state at the last prompt token (P, d); with `keep`, the NLU prompts' next-token
        log-probabilities there (P, V), NaN rows for NLG."""
        answers: list[str] = [""] * len(self.texts)
        states, log_probs = {}, {}
        for b in self.batches:
            seen = []
            record = nullcontext()
            if site:
                record = Splice(
                    self.model, site, lambda h, seen=seen: seen.append(h[:, -1].float()) or h
                )
            with record, steering if steering is not None else nullcontext():
                if b.answer_ids is not None:
                    out = self.model(input_ids=b.ids[:, -1:], attention_mask=b.mask,
                                     position_ids=b.pos[:, -1:], use_cache=True,
                                     **{self.cache_kw: b.cache})  # fmt: skip
                    lp = out.logits[:, -1].float().log_softmax(-1)  # (B, V)
                    pick = lp.gather(1, b.answer_ids).argmax(1).tolist()  # (B,)
                    for i, r in enumerate(b.rows):
                        answers[r] = self.groups[self.group_of[r]].answers[pick[i]]
                        if keep:
                            log_probs[r] = lp[i]
                else:
                    out = self.model.generate(
                        input_ids=b.ids, attention_mask=b.mask, max_new_tokens=self.max_new,
                        do_sample=False, temperature=None, top_p=None, top_k=None,
                        pad_token_id=self.pad, **{self.cache_kw: b.cache},
                    )  # fmt: skip
                    for i, r in enumerate(b.rows):
                        text = self.tokenizer.decode(
                            out[i, b.ids.shape[1] :], skip_special_tokens=True
                        )
                        answers[r] = normalise(text)
            extra = b.cache.get_seq_length() - (b.ids.shape[1] - 1)
            if extra <= 0:  # the forward ignored the cache and saw (and steered) every token
                raise RuntimeError(f"The model did not use the prompt cache ({self.cache_kw}=).")
            b.cache.crop(-extra)  # back to the prompt minus its last token
            for i, r in enumerate(b.rows):
                if seen:
                    states[r] = seen[0][i]
        stacked = torch.stack([states[r].cpu() for r in range(len(self.texts))]) if site else None
        lp = None
        if keep:
            V = next(iter(log_probs.values())).shape[0] if log_probs else 0
            nan = torch.full((V,), float("nan"))
            lp = torch.stack([log_probs.get(r, nan).cpu() for r in range(len(self.texts))])
        return answers, stacked, lp

    def table(self, answers: list[str]) -> dict[str, np.ndarray]:
        """Per group (G,): consistent (all answers equal), accuracy (share right) and
        consistent_correct (all right)."""
        right = np.array([a == g for a, g in zip(answers, self.gold)])
        out = {m: np.zeros(len(self.groups)) for m in METRICS}
        for g in range(len(self.groups)):
            rows = np.flatnonzero(self.group_of == g)
            out["consistency"][g] = len({answers[r] for r in rows}) == 1
            out["accuracy"][g] = right[rows].mean()
            out["consistent_correct"][g] = right[rows].all()
        return out


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def _answer_tokens(tokenizer, group: Group) -> list[int]:
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"][:1] for a in group.answers]
    firsts = [i[0] if i else None for i in ids]
    if None in firsts or len(set(firsts)) < len(firsts):
        raise UserError(
            f"The answers {list(group.answers)} of task '{group.task}' do not start with distinct "
            "tokens, so their logits cannot tell them apart; reword them."
        )
    return firsts


# -- finding the latents -------------------------------------------------------------------------


@torch.no_grad()
def dense_codes(sae, states: Tensor) -> Tensor:
    """(P, n) every latent's activation on (P, d) states."""
    acts, idx = sae.encode(states.to(sae.W_enc.device))[:2]  # (P, k) each
    codes = torch.zeros(states.shape[0], sae.cfg.n_latents, device=acts.device)
    return codes.scatter_add_(1, idx, acts.float()).cpu()


def rank_latents(codes: Tensor, group_of: np.ndarray, answers: list[str], gold: list[str]) -> dict:
    """Each latent's score and its pieces (see the module docstring), all (n,), from (P, n)
    codes; `gold` is per prompt. Also `consistent` and `off`, the two means the clamp uses."""
    n = codes.shape[1]
    flip, wording, n_inc = torch.zeros(n), torch.zeros(n), 0
    means, group_answer, off_rows, inc_rows = [], [], [], []
    for g in np.unique(group_of):
        rows = np.flatnonzero(group_of == g)
        A = codes[rows]  # (m, n)
        said = [answers[r] for r in rows]
        diff = (A[:, None] - A[None]).abs()  # (m, m, n)
        if len(set(said)) == 1:
            m = len(rows)
            wording += diff.sum((0, 1)) / max(m * (m - 1), 1)
            means.append(A.mean(0))
            group_answer.append(said[0])
        else:
            cross = torch.tensor([[a != b for b in said] for a in said])  # (m, m)
            flip += (diff * cross[..., None]).sum((0, 1)) / cross.sum()
            n_inc += 1
            inc_rows += rows.tolist()
            off_rows += [r for r in rows if answers[r] != gold[r]]
    if not n_inc or not means:
        kind = "inconsistently" if not n_inc else "consistently"
        raise UserError(
            f"No tune group is answered {kind}, so there is nothing to contrast; use more or "
            "harder paraphrase groups, or another --seed for the split."
        )
    M = torch.stack(means)  # (G_c, n)
    between, pairs = torch.zeros(n), 0
    group_answer = np.array(group_answer)
    for g in range(len(M)):
        other = torch.from_numpy(group_answer != group_answer[g])
        between += ((M - M[g]).abs() * other[:, None]).sum(0)
        pairs += int(other.sum())
    between = between / max(pairs, 1)
    flip, wording = flip / n_inc, wording / len(M)
    return dict(
        score=flip - wording - between,
        flip=flip,
        wording=wording,
        between=between,
        consistent=M.mean(0),
        off=codes[off_rows or inc_rows].mean(0),
        groups_consistent=len(M),
        groups_inconsistent=n_inc,
    )


def clamp_edits(latents, ranking: dict, strength: float) -> list[Intervention]:
    off, con = ranking["off"], ranking["consistent"]
    return [
        Intervention("clamp", feature=int(j), value=float(off[j] + strength * (con[j] - off[j])))
        for j in latents
    ]


# -- the whole procedure -------------------------------------------------------------------------


def split_groups(groups: list[Group], seed: int) -> tuple[list[int], list[int]]:
    """(tune, eval) group indices: each task's groups shuffled with `seed` and halved."""
    rng = np.random.default_rng(seed)
    tune, held = [], []
    for task in dict.fromkeys(g.task for g in groups):
        members = [i for i, g in enumerate(groups) if g.task == task]
        members = [members[i] for i in rng.permutation(len(members))]
        cut = len(members) // 2
        tune += members[:cut]
        held += members[cut:]
    if not tune or not held:
        raise UserError(
            "LF-Steering needs at least 2 paraphrase groups to split into tune and eval."
        )
    return sorted(tune), sorted(held)


def _bootstrap(values: np.ndarray, rng: np.random.Generator, n_boot: int) -> list[float]:
    """95% percentile CI of the mean of (N,) values, resampling rows."""
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def _summary(table, base, groups, seed, n_boot) -> dict:
    out = {}
    for m in METRICS:
        rng = np.random.default_rng(seed)  # the same resamples for every method: paired deltas
        out[m] = float(table[m].mean())
        out[f"{m}_ci"] = _bootstrap(table[m], rng, n_boot)
        rng = np.random.default_rng(seed)
        out[f"{m}_delta"] = float((table[m] - base[m]).mean())
        out[f"{m}_delta_ci"] = _bootstrap(table[m] - base[m], rng, n_boot)
    tasks = dict.fromkeys(g.task for g in groups)
    out["by_task"] = {
        t: {m: float(table[m][[g.task == t for g in groups]].mean()) for m in METRICS}
        for t in tasks
    }
    return out


def _locality(runner: Runner, answers, lp, base_answers, base_lp, seed, n_boot) -> dict:
    right = np.array([a == g for a, g in zip(answers, runner.gold)], dtype=float)
    kl = (base_lp.exp() * (base_lp - lp)).sum(-1).clamp(min=0).numpy()  # (P,) KL(base || steered)
    return dict(
        accuracy=float(right.mean()),
        accuracy_ci=_bootstrap(right, np.random.default_rng(seed), n_boot),
        kl=float(kl.mean()),
        kl_ci=_bootstrap(kl, np.random.default_rng(seed), n_boot),
        changed=float(np.mean([a != b for a, b in zip(answers, base_answers)])),
    )


def lf_steering(
    model,
    tokenizer,
    sae,
    site: str,
    groups: list[Group],
    locality: list[Group] | None = None,
    seed: int = 0,
    strengths: tuple[float, ...] = STRENGTHS,
    counts: tuple[int, ...] = COUNTS,
    caa_method: str = "mean",
    n_boot: int = 1000,
    batch: int = 16,
    max_new: int = 6,
    progress: bool = True,
) -> dict:
    """Find the latents on a tune split, steer them, and measure LF-Steering and both baselines
    on the eval split and the locality prompts. Returns the result as a JSON-ready dict."""
    started = time.perf_counter()
    locality = locality_groups() if locality is None else locality
    if any(g.answers is None for g in locality):
        raise UserError("Locality prompts must be NLU (with answers), so that KL can be read.")
    model.eval()
    sae = sae.eval()
    tune_idx, eval_idx = split_groups(groups, seed)
    tune = Runner(model, tokenizer, [groups[i] for i in tune_idx], batch, max_new, progress)
    base_answers, states, _ = tune.run(site=site)
    codes = dense_codes(sae, states)  # (P_tune, n)
    ranking = rank_latents(codes, tune.group_of, base_answers, tune.gold)
    order = torch.argsort(ranking["score"], descending=True, stable=True)
    base_tune = tune.table(base_answers)

    def steer(edits):
        return Steering(model, site, edits, sae)

    def score(table):
        return {m: float(table[m].mean()) for m in METRICS}

    grid = []
    configs = [(m, s) for m in counts if m <= sae.cfg.n_latents for s in strengths]
    for m, s in tqdm(configs, desc="LF search", disable=not progress):
        answers = tune.run(steer(clamp_edits(order[:m], ranking, s)))[0]
        grid.append(dict(latents=m, strength=s, **score(tune.table(answers))))

    def best(rows):  # the tune objective, then the smaller change on ties
        return max(rows, key=lambda r: (r["consistent_correct"], r["accuracy"],
                                        -r.get("latents", 0), -r["strength"]))  # fmt: skip

    chosen = best(grid)
    latents = order[: chosen["latents"]].tolist()

    # CAA: consistent-minus-wrong last-token states, scaled in units of its own length.
    consistent_rows = np.flatnonzero(base_tune["consistency"][tune.group_of] == 1)
    wrong = [r for r in range(len(base_answers)) if base_answers[r] != tune.gold[r]]
    wrong = [r for r in wrong if not base_tune["consistency"][tune.group_of[r]]] or wrong
    diffs = states[consistent_rows].mean(0, keepdim=True) - states[wrong]  # (W, d)
    vector = direction_from_differences(diffs, caa_method)
    length = float(vector.norm())
    caa_grid = []
    for s in tqdm(strengths, desc="CAA search", disable=not progress):
        edit = Intervention("add", vector=vector, value=s * length)
        caa_grid.append(dict(strength=s, **score(tune.table(tune.run(steer([edit]))[0]))))
    caa_chosen = best(caa_grid)
    del tune  # its KV caches

    rng = np.random.default_rng(seed)
    pool = sorted(set(torch.nonzero(codes.amax(0) > 0).flatten().tolist()) - set(latents))
    random_latents = sorted(rng.choice(pool, min(len(latents), len(pool)), replace=False).tolist())

    methods = {
        "none": None,
        "lf": steer(clamp_edits(latents, ranking, chosen["strength"])),
        "caa": steer([Intervention("add", vector=vector, value=caa_chosen["strength"] * length)]),
        "random": steer(clamp_edits(random_latents, ranking, chosen["strength"]))
        if random_latents
        else None,
    }
    held = Runner(model, tokenizer, [groups[i] for i in eval_idx], batch, max_new, progress)
    local = Runner(model, tokenizer, locality, batch, max_new, progress)
    tables, results = {}, {}
    base_local = local.run(keep=True)
    for name, steering in tqdm(methods.items(), desc="eval", disable=not progress):
        tables[name] = held.table(held.run(steering)[0])
        answers, _, lp = local.run(steering, keep=True) if name != "none" else base_local
        results[name] = _summary(tables[name], tables["none"], held.groups, seed, n_boot)
        results[name]["locality"] = _locality(
            local, answers, lp, base_local[0], base_local[2], seed, n_boot
        )

    def latent_row(j):
        return dict(
            id=int(j),
            **{k: float(ranking[k][j]) for k in ("score", "flip", "wording", "between")},
            consistent_mean=float(ranking["consistent"][j]),
            off_mean=float(ranking["off"][j]),
        )

    tasks = {}
    for g in groups:
        tasks.setdefault(g.task, dict(kind="nlu" if g.answers else "nlg", groups=0))
        tasks[g.task]["groups"] += 1
    return dict(
        method="lf-steering",
        site=site,
        n_latents=int(sae.cfg.n_latents),
        seed=seed,
        positions="the last prompt token and the generated tokens",
        data=dict(
            groups=len(groups),
            paraphrases=sum(len(g.paraphrases) for g in groups),
            tasks=tasks,
            locality_prompts=len(local.texts),
        ),
        split=dict(tune=tune_idx, eval=eval_idx),
        tune_groups=dict(
            consistent=ranking["groups_consistent"], inconsistent=ranking["groups_inconsistent"]
        ),
        search=dict(
            objective="consistent_correct on tune, then accuracy, fewer latents, less strength",
            none=score(base_tune),
            grid=grid,
            chosen=chosen,
            caa_grid=caa_grid,
            caa_chosen=caa_chosen,
            latents_scoring_positive=int((ranking["score"] > 0).sum()),
        ),
        latents=[latent_row(j) for j in latents],
        random_latents=random_latents,
        caa=dict(method=caa_method, length=length, differences=len(wrong)),
        methods=results,
        n_boot=n_boot,
        seconds=round(time.perf_counter() - started, 2),
    )


def lf_steer(
    run,
    groups: list[Group] | None = None,
    device: str = "cpu",
    write: bool = True,
    **kwargs,
) -> dict:
    """LF-Steering on a run's model and SAE (the built-in paraphrase set unless `groups` is
    given); writes RUN/steering/lf_steering.json atomically when `write`."""
    from hooks.paths import atomic_write_json

    loaded = run.load_model(device, progress=kwargs.get("progress", True))
    sae = run.sae.to(device)
    result = lf_steering(
        loaded.model, loaded.tokenizer, sae, run.site, groups or builtin_groups(), **kwargs
    )
    result["run"] = str(run.path)
    result["data"]["source"] = "built-in" if groups is None else "user"
    if write:
        atomic_write_json(run.path / "steering" / "lf_steering.json", result)
    return result
