"""What a steering run did: generations with and without it, and the numbers every run reports.

kl          mean KL(unsteered || steered) of the next-token distribution on neutral text
target      the shift of the target tokens' total probability at the prompt's last position
perplexity  of a generation under the unsteered model: a fluency proxy
contains    whether a generated text holds any of the target words

Long steps take an optional `cancel` (a threading.Event): generation checks it after every
token and a set event raises Cancelled.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from hooks.errors import UserError


class Cancelled(UserError):
    """Steering work stopped because its caller set the cancel event."""


def check_cancel(cancel) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("The steering run was cancelled.")


def _watch(cancel, on_token):
    """A transformers StoppingCriteria, called after every generated token: it stops the
    generation once `cancel` is set, and reports the count of new tokens to `on_token`."""
    from transformers import StoppingCriteria

    class Watch(StoppingCriteria):
        def __init__(self):
            self.start = None

        def __call__(self, input_ids: Tensor, scores, **kwargs) -> Tensor:
            if self.start is None:  # the first call follows the first new token
                self.start = input_ids.shape[1] - 1
            if on_token is not None:
                on_token(input_ids.shape[1] - self.start)
            stop = cancel is not None and cancel.is_set()
            return torch.full(
                (input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device
            )

    return Watch()


@torch.no_grad()
def generate(
    model,
    ids: Tensor,
    steering=None,
    max_new: int = 40,
    sample: bool = False,
    seed: int = 0,
    temperature: float = 1.0,
    cancel=None,
    on_token=None,
) -> Tensor:
    """(1, T + new) greedy or seeded sampled continuation of (1, T) ids, steered if given.
    A set `cancel` event raises Cancelled (checked after every token); `on_token(n)` hears the
    number of new tokens so far."""
    check_cancel(cancel)
    watch = {}
    if cancel is not None or on_token is not None:
        watch = dict(stopping_criteria=[_watch(cancel, on_token)])
    torch.manual_seed(seed)
    with steering if steering is not None else contextlib.nullcontext():
        out = model.generate(
            ids,
            max_new_tokens=max_new,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=None,
            top_k=None,
            pad_token_id=getattr(model.config, "pad_token_id", None) or 0,
            **watch,
        )
    check_cancel(cancel)
    return out


@torch.no_grad()
def log_probs(model, ids: Tensor, steering=None) -> Tensor:
    """(B, T, V) next-token log-probabilities of (B, T) ids, steered if given."""
    with steering if steering is not None else contextlib.nullcontext():
        return F.log_softmax(model(ids).logits.float(), dim=-1)  # (B, T, V)


def next_token_kl(model, ids: Tensor, steering) -> float:
    """Mean over every position of (B, T) neutral ids of KL(unsteered || steered)."""
    clean, steered = log_probs(model, ids), log_probs(model, ids, steering)
    return float(F.kl_div(steered, clean, log_target=True, reduction="none").sum(-1).mean())


def target_shift(model, ids: Tensor, steering, targets: list[int]) -> float:
    """Steered minus unsteered probability of the target tokens after (1, T) prompt ids."""
    clean = log_probs(model, ids)[0, -1, targets].exp().sum()
    steered = log_probs(model, ids, steering)[0, -1, targets].exp().sum()
    return float(steered - clean)


def perplexity(model, ids: Tensor, start: int) -> float:
    """exp(mean CE) of the tokens ids[0, start:] under the unsteered model."""
    if ids.shape[1] <= start:
        return float("nan")
    predicted = log_probs(model, ids)[0, start - 1 : -1]  # (new, V): the predictions of them
    nll = -predicted.gather(1, ids[0, start:, None]).squeeze(1)
    return float(nll.mean().exp())


def contains(text: str, targets: list[str]) -> bool:
    """Whether `text` holds any target word (stripped of its leading space, any case)."""
    text = text.lower()
    return any(t.strip().lower() in text for t in targets if t.strip())
