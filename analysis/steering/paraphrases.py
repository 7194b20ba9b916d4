"""Paraphrase groups for LF-Steering: their jsonl format, the reader, and the built-in set.

A paraphrase file is jsonl, one group (one instance, said several ways) a line:

    {"task": "sentiment", "answers": [" positive", " negative"], "gold": " positive",
     "paraphrases": ["I loved it.", "It was wonderful.", ...], "template": "...{text}..."}

answers     the fixed answer strings of an NLU task, scored from their first tokens' logits at
            the prompt's last token; null (or absent) for an NLG task, scored by greedy
            generation and normalised exact match
gold        the right answer (for NLU one of `answers`)
paraphrases at least two distinct wordings of the instance
template    optional; the prompt, with {text} where the paraphrase goes. Without it a built-in
            task's few-shot template is used (TEMPLATES), otherwise the paraphrase alone.

The built-in set (paraphrases.jsonl beside this file) is written for this project: sentiment and
topic (NLU) and capital cities (NLG), each with a fixed few-shot prompt whose demonstrations are
not eval groups, because zero-shot a 135M model gives nearly the same answer to everything.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

from hooks.errors import UserError

BUILTIN = Path(__file__).with_name("paraphrases.jsonl")

TEMPLATES = {
    "sentiment": (
        "Review: The soup was cold and the waiter ignored us all evening.\nSentiment: negative\n\n"
        "Review: A delightful film with a clever script and warm performances.\n"
        "Sentiment: positive\n\n"
        "Review: The battery died after two days and support never replied.\n"
        "Sentiment: negative\n\n"
        "Review: Our guide was wonderful and I would book this tour again.\nSentiment: positive\n\n"
        "Review: {text}\nSentiment:"
    ),
    "topic": (
        "Text: The striker scored twice in the second half to win the cup.\nTopic: sports\n\n"
        "Text: Heavy rain and strong winds are expected along the coast tonight.\n"
        "Topic: weather\n\n"
        "Text: Knead the dough, let it rise, then bake it for forty minutes.\nTopic: food\n\n"
        "Text: The tennis champion lost the final in straight sets.\nTopic: sports\n\n"
        "Text: Tomorrow will be sunny and warm with a light breeze.\nTopic: weather\n\n"
        "Text: This curry is made with lentils, garlic and fresh coriander.\nTopic: food\n\n"
        "Text: {text}\nTopic:"
    ),
    "capital": (
        "Question: What is the capital of Italy?\nAnswer: Rome\n\n"
        "Question: Which city is the capital of Japan?\nAnswer: Tokyo\n\n"
        "Question: Name the capital city of Egypt.\nAnswer: Cairo\n\n"
        "Question: What city serves as the capital of Canada?\nAnswer: Ottawa\n\n"
        "Question: {text}\nAnswer:"
    ),
    "colour": (
        "The colour of grass is green.\nThe colour of the sky is blue.\n"
        "The colour of snow is white.\nThe colour of {text} is"
    ),
}


@dataclass(frozen=True)
class Group:
    task: str
    gold: str
    paraphrases: tuple[str, ...]
    answers: tuple[str, ...] | None = None  # NLU answer strings; None for NLG
    template: str = "{text}"

    def prompts(self) -> list[str]:
        return [self.template.replace("{text}", p) for p in self.paraphrases]


def normalise(answer: str) -> str:
    """An NLG answer for exact match: its first line, lowercased, without punctuation, articles
    or extra spaces."""
    lines = answer.strip().splitlines()
    text = lines[0].lower() if lines else ""
    text = text.translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def parse_group(row: object, where: str) -> Group:
    """One group from a decoded jsonl line; `where` names the file and line in the error."""
    if not isinstance(row, dict):
        raise UserError(f"{where} is not a JSON object with task, gold and paraphrases.")
    task, gold, paraphrases = row.get("task"), row.get("gold"), row.get("paraphrases")
    answers, template = row.get("answers"), row.get("template")
    if not isinstance(task, str) or not task.strip():
        raise UserError(f"{where} has no task name (a non-empty string).")
    if not isinstance(gold, str) or not gold.strip():
        raise UserError(f"{where} has no gold answer (a non-empty string).")
    if (
        not isinstance(paraphrases, list)
        or len(paraphrases) < 2
        or not all(isinstance(p, str) and p.strip() for p in paraphrases)
    ):
        raise UserError(f"{where} needs 'paraphrases': a list of at least 2 non-empty strings.")
    if len(set(paraphrases)) < len(paraphrases):
        raise UserError(f"{where} repeats a paraphrase; each wording must be distinct.")
    if answers is not None:
        if (
            not isinstance(answers, list)
            or len(answers) < 2
            or not all(isinstance(a, str) and a.strip() for a in answers)
            or len(set(answers)) < len(answers)
        ):
            raise UserError(
                f"{where} has bad 'answers': give at least 2 distinct strings, or null for NLG."
            )
        if gold not in answers:
            raise UserError(
                f"{where} has gold {gold!r}, which is not one of its answers {answers}."
            )
        answers = tuple(answers)
    if template is None:
        template = TEMPLATES.get(task, "{text}")
    if not isinstance(template, str) or template.count("{text}") != 1:
        raise UserError(f"{where} has a template without exactly one {{text}} placeholder.")
    return Group(task, gold, tuple(paraphrases), answers, template)


def read_groups(path: Path | str) -> list[Group]:
    """The groups of a paraphrase file; an empty or malformed line is named in the error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"The paraphrase file {path} does not exist.")
    groups = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path} line {number} is not valid JSON.") from None
        groups.append(parse_group(row, f"{path} line {number}"))
    if not groups:
        raise UserError(f"The paraphrase file {path} holds no group.")
    return groups


def builtin_groups() -> list[Group]:
    return read_groups(BUILTIN)


# Out-of-domain prompts that steering must leave alone: colours of familiar things, an NLU task
# with its own answers. Each is a one-prompt group; its template shows the pattern in three lines.
_COLOURS = (" red", " green", " blue", " white", " yellow", " black", " orange")
_LOCALITY = (
    ("blood", " red"), ("a ripe banana", " yellow"), ("coal", " black"), ("milk", " white"),
    ("a lemon", " yellow"), ("the sea", " blue"), ("a fresh leaf", " green"),
    ("a carrot", " orange"), ("a ripe tomato", " red"), ("fresh snowfall", " white"),
    ("a crow", " black"), ("an orange", " orange"), ("a lime", " green"),
    ("a clear summer sky", " blue"), ("a strawberry", " red"), ("charcoal", " black"),
    ("a cloud", " white"), ("sunflowers", " yellow"), ("a frog", " green"),
    ("a pumpkin", " orange"), ("a fire engine", " red"), ("the night sky", " black"),
    ("a swan", " white"), ("the ocean", " blue"),
)  # fmt: skip


def locality_groups() -> list[Group]:
    return [
        Group("colour", gold, (thing,), _COLOURS, TEMPLATES["colour"]) for thing, gold in _LOCALITY
    ]
