"""Evaluating a trained SAE on held-out text: reconstruction quality, sparsity, and what splicing
it into the model does to the next-token loss (`saewb eval RUN`, writes RUN/eval.json).

Per batch of held-out windows there are four full forward passes:

  clean         the model as it is; the site's activation x (B, T, d) is recorded on the way
  spliced       the site's activation at the kept positions replaced by the SAE reconstruction
  ablated       the site's activation set to zero at every position, position 0 included
  ablated_kept  the site's activation set to zero at the kept positions only

A transcoder reads one site and predicts another (its target): there the spliced, ablated and
reference site is the target. In the spliced pass a Capture hook records the input site's
activation and, later in the same forward, the Splice hook at the target puts
sae.reconstruct(input) in place of the target's value, so FVU, L0 and the rest measure y_hat
against the target's own activation y. With use_error_term the target keeps y - y_hat, and the
spliced run must equal the clean one bit for bit, as for an SAE.

Kept positions are exactly the tokens the SAE was trained on (`Selection.capture.keep`: by
default no special tokens and not position 0; the run's outlier rule if it had one); the splice leaves every
other position's activation as it was. Reconstruction metrics are streamed over the kept tokens
in float64, so nothing but a few (d,) and (n_latents,) sums is held.

What matches SAELens 6.54's `run_evals` (sae_lens/evals.py, `get_recons_loss`) with
exclude_special_tokens=True, whose windows start with BOS as ours do by default:
- the splice: SAELens replaces the activation by the SAE's output where its mask (not a special
  token) is true and keeps it elsewhere; with BOS at position 0 that mask is our kept positions
  (we also drop position 0 whatever its token, and outliers when the run did).
- the scored positions: CE is the loss of the prediction made at each kept position t < T-1
  (logits at t, target token t+1); KL(clean || run), summed over the vocabulary, is taken at
  every kept position, the window's last one included (it needs no target), as SAELens does.
- the baseline: `ce_loss_ablated` and `kl_div_ablated` zero the whole site, as SAELens's
  zero-ablation hook does, and `ce_loss_recovered` (SAELens's `ce_loss_score`) and `kl_div_score`
  are computed from them, so these numbers compare across tools.
The `_kept` variants (`ce_loss_ablated_kept`, `ce_loss_recovered_kept`, `kl_div_ablated_kept`,
`kl_div_score_kept`) zero only the kept positions and leave the others (by default
position 0) intact. In SmolLM2
position 0 is an attention sink that every later token reads, and the SAE never sees it, so
zeroing it measures the loss of the sink rather than of the site: the kept baseline is the fair
one for an SAE trained without position 0.

The formulas follow SAELens >= 6.45 (see ../shared/reference/saelens-saebench.md, section 1.7),
avoiding its old bugs: explained variance is 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2) (not
with E[x^2] in place of (E x)^2), and MSE is the mean over tokens of ||x - x_hat||^2 summed over
dims (not divided again by the tokens per batch).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from analysis.run import Run
from hooks.errors import UserError
from hooks.sites import Capture, Site, Splice, resolve_site, special_token_ids
from hooks.windows import batched, stack
from sae.model import SAE

EVAL_FILE = "eval.json"
SCORED = (
    "CE: predictions made at the kept positions t < T-1 (logits at t, target token t+1); "
    "KL: the logits at every kept position"
)
BASELINES = (
    "ablated: the whole site zeroed at every position, as SAELens; "
    "ablated_kept: only the kept positions zeroed"
)


# -----------------------------------------------------------------------------
# streaming accumulators


class ReconstructionStats:
    """Sums over kept tokens, from which every reconstruction and sparsity metric follows.

    update() takes the reference x and its reconstruction x_hat (N, d) (a transcoder's target y
    and y_hat, d = d_out) and the SAE's (N, K) activations and latent indices, K its inference
    width, with zeros where a token has fewer active latents. Everything is summed in float64
    so that E||x||^2 - ||E x||^2 stays accurate when the mean is large compared with the spread
    (residual streams often are).
    """

    def __init__(self, d: int, n_latents: int, device: torch.device | str = "cpu"):
        f64 = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.sum_x = torch.zeros(d, **f64)  # for ||E x||^2
        self.sum_x_sq = torch.zeros((), **f64)  # sum ||x||^2
        self.sum_err_sq = torch.zeros((), **f64)  # sum ||x - x_hat||^2
        self.sum_xhat_sq = torch.zeros((), **f64)  # sum ||x_hat||^2
        self.sum_dot = torch.zeros((), **f64)  # sum <x, x_hat>
        self.sum_cos = torch.zeros((), **f64)
        self.sum_norm_in = torch.zeros((), **f64)
        self.sum_norm_out = torch.zeros((), **f64)
        self.sum_ratio = torch.zeros((), **f64)  # sum ||x_hat|| / ||x||
        self.sum_l0 = torch.zeros((), **f64)
        self.sum_l1 = torch.zeros((), **f64)
        self.fires = torch.zeros(n_latents, dtype=torch.int64, device=device)  # tokens per latent

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, top_acts: Tensor, top_idx: Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()  # (N, d)
        self.n += x.shape[0]
        self.sum_x += x.sum(0)
        sq_in, sq_out = x.pow(2).sum(1), x_hat.pow(2).sum(1)  # (N,)
        dot = (x * x_hat).sum(1)  # (N,)
        norm_in, norm_out = sq_in.sqrt(), sq_out.sqrt()
        tiny = torch.finfo(torch.float64).tiny  # a zero vector gives ratio/cosine 0, not NaN
        self.sum_x_sq += sq_in.sum()
        self.sum_err_sq += (x - x_hat).pow(2).sum()
        self.sum_xhat_sq += sq_out.sum()
        self.sum_dot += dot.sum()
        self.sum_cos += (dot / (norm_in * norm_out).clamp_min(tiny)).sum()
        self.sum_norm_in += norm_in.sum()
        self.sum_norm_out += norm_out.sum()
        self.sum_ratio += (norm_out / norm_in.clamp_min(tiny)).sum()
        # Zero slots: the ReLU after TopK, BatchTopK's threshold at inference, and the padding of
        # the kinds whose L0 varies by token (jumprelu, relu). L0 counts the nonzero ones.
        active = top_acts != 0  # (N, K)
        self.sum_l0 += active.sum()
        self.sum_l1 += top_acts.double().abs().sum()
        self.fires += torch.bincount(top_idx[active], minlength=self.fires.shape[0])

    def metrics(self) -> dict[str, float | None]:
        n = max(self.n, 1)
        # E||x||^2 - ||E x||^2: the total variance per token, about the mean (not about 0)
        variance = float(self.sum_x_sq / n - (self.sum_x / n).pow(2).sum())
        mse = float(self.sum_err_sq / n)
        density = self.fires.double() / n  # (n_latents,) fraction of tokens each latent fires on
        dot = float(self.sum_dot)
        return {
            "fvu": _ratio(mse, variance),
            "explained_variance": None if variance <= 0 else 1.0 - mse / variance,
            "mse": mse,
            "cossim": float(self.sum_cos / n),
            "l2_norm_in": float(self.sum_norm_in / n),
            "l2_norm_out": float(self.sum_norm_out / n),
            "l2_ratio": float(self.sum_ratio / n),
            # E||x_hat||^2 / E<x, x_hat>: 1 when the SAE does not shrink (arXiv 2404.16014 eq. 10)
            "relative_reconstruction_bias": _ratio(float(self.sum_xhat_sq), dot),
            "l0": float(self.sum_l0 / n),
            "l1": float(self.sum_l1 / n),
            "dead_fraction": float((self.fires == 0).double().mean()),
            "frac_over_1_percent": float((density > 0.01).double().mean()),
            "frac_over_10_percent": float((density > 0.10).double().mean()),
        }


class LossStats:
    """Next-token CE of each run and KL(clean || run), per scored token (see the module doc)."""

    RUNS = ("clean", "spliced", "ablated", "ablated_kept")

    def __init__(self) -> None:
        self.n_ce = 0  # kept positions with a next token
        self.n_kl = 0  # all kept positions
        self.ce = dict.fromkeys(self.RUNS, 0.0)
        self.kl = dict.fromkeys(self.RUNS[1:], 0.0)

    @torch.no_grad()
    def update(
        self, logits: dict[str, Tensor], targets: Tensor, has_target: Tensor, rows: int = 256
    ) -> None:
        """logits: {run: (N, V)} at the kept positions; targets: (N,) the next tokens, which
        count only where has_target (N,) is true (a window's last position has none).

        Log-probabilities are taken in float64: a small KL is a sum of many near-cancelling
        terms, which float32 gets wrong in the third digit. `rows` at a time bound the memory.
        """
        self.n_kl += int(targets.shape[0])
        self.n_ce += int(has_target.sum())
        for start in range(0, targets.shape[0], rows):
            part = slice(start, start + rows)
            scored = has_target[part]  # (n,)
            target = targets[part][scored, None]  # (n_ce, 1)
            logp = {name: F.log_softmax(v[part].double(), dim=-1) for name, v in logits.items()}
            for name, lp in logp.items():
                self.ce[name] -= lp[scored].gather(1, target).sum().item()
            p_clean = logp["clean"].exp()  # (n, V)
            for name in self.kl:
                # KL(clean || other), summed over the vocabulary
                self.kl[name] += (p_clean * (logp["clean"] - logp[name])).sum().item()

    def metrics(self) -> dict[str, float | None]:
        ce = {name: total / max(self.n_ce, 1) for name, total in self.ce.items()}
        kl = {name: total / max(self.n_kl, 1) for name, total in self.kl.items()}

        def recovered(base: str) -> float | None:  # 1: the splice costs nothing; 0: as bad as base
            return _ratio(ce[base] - ce["spliced"], ce[base] - ce["clean"])

        def score(base: str) -> float | None:
            return _ratio(kl[base] - kl["spliced"], kl[base])

        return {
            "ce_loss_clean": ce["clean"],
            "ce_loss_spliced": ce["spliced"],
            "ce_loss_ablated": ce["ablated"],
            "ce_loss_recovered": recovered("ablated"),
            "kl_div_spliced": kl["spliced"],
            "kl_div_ablated": kl["ablated"],
            "kl_div_score": score("ablated"),
            "ce_loss_ablated_kept": ce["ablated_kept"],
            "ce_loss_recovered_kept": recovered("ablated_kept"),
            "kl_div_ablated_kept": kl["ablated_kept"],
            "kl_div_score_kept": score("ablated_kept"),
        }


def _ratio(num: float, den: float) -> float | None:
    """num / den, or None (null in JSON) where it is undefined."""
    return num / den if den != 0 and math.isfinite(den) else None


# -----------------------------------------------------------------------------
# splicing


def with_error_term(x: Tensor, x_hat: Tensor) -> Tensor:
    """x_hat + (x - x_hat), which must give back x bit for bit.

    In float32, x_hat + (x - x_hat) can be off by one ulp. In float64 the difference of two
    float32 (or bf16) numbers is exact (unless their magnitudes differ by more than ~2^29), so
    the sum is exactly x and rounds back to it.
    """
    return (x_hat.double() + (x.double() - x_hat.double())).to(x.dtype)


def sae_splice(
    sae: SAE,
    keep: Tensor,
    stats: ReconstructionStats | None = None,
    use_error_term: bool = False,
    source: Callable[[], Tensor] | None = None,
) -> Callable[[Tensor], Tensor]:
    """A Splice function putting the SAE's reconstruction at the kept (B, T) positions.

    The SAE reads the activation the hook sees; a transcoder, spliced at its target, reads
    `source()`: its input site's (B, T, d_in) activation recorded earlier in the same forward.
    The reconstruction is recorded into `stats` against the value it replaces.
    """

    def fn(h: Tensor) -> Tensor:  # (B, T, d_out), the spliced site's activation in this forward
        y = h[keep]  # (N, d_out), the reference
        x = y if source is None else source()[keep]  # (N, d_in)
        y_hat, top_acts, top_idx = sae.reconstruct(x)
        if stats is not None:
            stats.update(y, y_hat, top_acts, top_idx)
        y_hat = y_hat.to(h.dtype)
        if use_error_term:
            y_hat = with_error_term(y, y_hat)
        out = h.clone()  # masked positions keep their original activation, as in SAELens
        out[keep] = y_hat
        return out

    return fn


def recorded_input(capture: Capture, site: Site, target: Site) -> Callable[[], Tensor]:
    """What a transcoder's splice reads: `site`'s activation that `capture` recorded in the
    current forward. Capture's hooks record in every forward inside its `with` block, not only
    in its own early-exit call, so one Capture and one Splice read and replace in one pass;
    the caller clears capture.acts before each forward."""

    def source() -> Tensor:  # (B, T, d_in)
        if site.name not in capture.acts:
            raise UserError(
                f"The transcoder reads {site.name}, which the forward pass reaches only after its "
                f"target {target.name}, so the input is not known where the output is spliced; "
                "evaluate a transcoder whose input site comes before its target."
            )
        return capture.acts[site.name]

    return source


def zero_splice(keep: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """A Splice function zero-ablating the kept (B, T) positions, or the whole site if None."""

    def fn(h: Tensor) -> Tensor:
        if keep is None:
            return torch.zeros_like(h)
        out = h.clone()
        out[keep] = 0
        return out

    return fn


# -----------------------------------------------------------------------------
# the evaluation


@torch.inference_mode()
def evaluate(
    run: Run,
    n_tokens: int,
    batch_windows: int = 8,
    loaded=None,
    progress: bool = True,
    use_error_term: bool = False,
) -> dict:
    """All metrics over the first n_tokens kept tokens of the run's held-out windows.

    `loaded` is a hooks.models.LoadedModel (loaded from the run's model name when None).
    `use_error_term` adds x - x_hat back in the spliced run, which must then equal the clean run.
    Returns the record that `cmd_eval` writes to eval.json.
    """
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens <= 0:
        raise UserError(f"--tokens must be a positive number of tokens, got {n_tokens!r}.")
    if batch_windows <= 0:
        raise UserError(f"--batch must be a positive number of windows, got {batch_windows}.")
    sae = run.sae.eval()
    device = next(sae.parameters()).device
    if loaded is None:
        loaded = run.load_model(str(device), progress=progress)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    model_device = next(model.parameters()).device
    if model_device != device:
        raise UserError(f"The model is on {model_device} but the SAE on {device}; use one device.")

    options = run.selection.capture
    site = resolve_site(model, run.site)  # once: every batch splices three times
    # The site that is spliced, ablated and reconstructed: the input of an SAE, the target of a
    # transcoder.
    spliced = resolve_site(model, run.target) if run.target else site
    sites = list(dict.fromkeys([site.name, spliced.name]))
    special = special_token_ids(tokenizer)
    recon = ReconstructionStats(sae.cfg.d_out, sae.cfg.n_latents, device)
    losses = LossStats()
    n_windows = 0
    started = time.perf_counter()

    from tqdm import tqdm

    bar = tqdm(
        total=n_tokens,
        unit="tok",
        unit_scale=True,
        disable=not progress,
        desc="eval",
        dynamic_ncols=True,
    )
    with bar, Capture(model, sites) as capture:
        source = recorded_input(capture, site, spliced) if run.target else None
        for batch in batched(run.heldout_windows(tokenizer), batch_windows):
            input_ids = stack(batch)[0].to(device)  # (B, T)
            keep = options.keep(input_ids, special)  # the token rules: outliers need x
            if not options.outlier_factor:  # the last batch: run only the windows still needed
                needed = int((keep.sum(1).cumsum(0) < n_tokens - recon.n).sum()) + 1
                input_ids, keep = input_ids[:needed], keep[:needed]
            # Capture records the sites during our own full forward (it stops early only in
            # its own __call__), so the clean run needs no second pass for x (and y).
            clean = model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
            acts = {name: capture.acts[name] for name in sites}  # {site: (B, T, d)}
            _check_widths(run, sae, acts[site.name], acts[spliced.name])
            if options.outlier_factor:  # depends on the activations: known only now
                keep = options.keep(input_ids, special, list(acts.values()))
            del acts
            keep = _first(keep, n_tokens - recon.n)  # the budget may end inside this batch
            # Score every kept position t: KL of the logits at t, CE of the target t+1 where
            # t < T-1. Only these (N, V) rows are kept, not each run's whole (B, T, V) logits.
            targets = input_ids.roll(-1, dims=1)[keep]  # (N,), the last column wraps: unused
            last = torch.zeros_like(keep)
            last[:, -1] = True
            has_target = ~last[keep]  # (N,)
            logits = {"clean": clean[keep]}
            del clean
            runs = {
                "spliced": sae_splice(sae, keep, recon, use_error_term, source),
                "ablated": zero_splice(),
                "ablated_kept": zero_splice(keep),
            }
            for name, fn in runs.items():
                capture.acts.clear()  # the transcoder's input must come from this forward
                with Splice(model, spliced, fn):
                    logits[name] = model(input_ids=input_ids, use_cache=False).logits[keep]
            losses.update(logits, targets, has_target)
            n_windows += input_ids.shape[0]
            bar.update(int(keep.sum()))
            if recon.n >= n_tokens:
                break
    if recon.n == 0:
        raise UserError(
            f"The held-out split of '{run.selection.dataset}' (every 20th document) gave no "
            f"full window of {run.selection.context_size} tokens; evaluate on more text."
        )
    if recon.n < n_tokens:
        print(
            f"[saewb] the held-out text ran out: evaluated {recon.n:,} of {n_tokens:,} tokens.",
            file=sys.stderr,
        )
    return {
        "run": str(run.path),
        "model": run.model,
        "site": run.site,
        "architecture": sae.cfg.architecture,
        "target": run.target or None,  # a transcoder's output site: the one spliced
        "selection": run.selection.to_dict(),
        "split": "eval (every 20th document, never trained on)",
        "n_tokens": recon.n,
        "n_tokens_requested": n_tokens,
        "n_scored_tokens": losses.n_ce,
        "n_kl_tokens": losses.n_kl,
        "n_windows": n_windows,
        "scored_positions": SCORED,
        "baselines": BASELINES,
        "use_error_term": use_error_term,
        "metrics": {**recon.metrics(), **losses.metrics()},
        "sae": sae.cfg.to_dict(),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _check_widths(run: Run, sae: SAE, x: Tensor, y: Tensor) -> None:
    """The SAE's input and output widths against the model's (B, T, d) activations x at the
    run's site and y at the spliced site (the same for an SAE)."""
    if x.shape[-1] != sae.cfg.d_in:
        raise UserError(
            f"The SAE takes d_in={sae.cfg.d_in} but {run.site} of {run.model} has width "
            f"{x.shape[-1]}; evaluate it with the model it was trained on."
        )
    if run.target and y.shape[-1] != sae.cfg.d_out:
        raise UserError(
            f"The transcoder's output has d_out={sae.cfg.d_out} but its target {run.target} of "
            f"{run.model} has width {y.shape[-1]}; evaluate it with the model it was trained on."
        )


def _first(keep: Tensor, budget: int) -> Tensor:
    """keep (B, T) with only its first `budget` True entries (row-major) left True."""
    if int(keep.sum()) <= budget:
        return keep
    flat = keep.flatten().clone()
    flat[flat.nonzero().squeeze(1)[budget:]] = False
    return flat.view_as(keep)


# -----------------------------------------------------------------------------
# the command line

_TABLE = (
    ("reconstruction", ("fvu", "explained_variance", "mse", "cossim", "l2_ratio")),
    ("", ("relative_reconstruction_bias", "l2_norm_in", "l2_norm_out")),
    ("sparsity", ("l0", "l1", "dead_fraction", "frac_over_1_percent", "frac_over_10_percent")),
    ("spliced model", ("ce_loss_clean", "ce_loss_spliced", "ce_loss_ablated", "ce_loss_recovered")),
    ("", ("kl_div_spliced", "kl_div_ablated", "kl_div_score")),
    ("kept positions", ("ce_loss_ablated_kept", "ce_loss_recovered_kept", "kl_div_score_kept")),
)


def _kind(record: dict) -> str:
    """'topk SAE', 'jumprelu transcoder' (with ' with a skip connection'), from an eval record
    or anything with 'architecture' and 'target' keys (a record from before them: topk SAE)."""
    arch = record.get("architecture") or (record.get("sae") or {}).get("architecture") or "topk"
    if not record.get("target"):
        return f"{arch} SAE"
    skip = " with a skip connection" if (record.get("sae") or {}).get("skip") else ""
    return f"{arch} transcoder{skip}"


def _where(record: dict) -> str:
    """'resid_post.3', or 'mlp_in.3 -> mlp_out.3' for a transcoder."""
    target = record.get("target")
    return f"{record['site']} -> {target}" if target else record["site"]


def format_table(record: dict) -> str:
    m = record["metrics"]
    lines = [
        f"{record['run']}: {_kind(record)} on {record['model']} at {_where(record)}, "
        f"{record['n_tokens']:,} held-out tokens of '{record['selection']['dataset']}' "
        f"({record['n_scored_tokens']:,} scored) in {record['seconds']:.1f} s"
    ]
    for section, keys in _TABLE:
        for i, key in enumerate(keys):
            value = m[key]
            text = (
                "n/a" if value is None else f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
            )
            lines.append(f"  {section if i == 0 else '':15s} {key:30s} {text:>10s}")
    return "\n".join(lines)
