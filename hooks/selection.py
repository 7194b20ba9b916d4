"""Which tokens become data: the text source, how it is cut into windows, which captured tokens
are kept, and the dtype the model runs in.

One `Selection` is recorded when data is made (in a cache's manifest and in a run's run.json)
and read back by everything that makes data again: training, eval, analyze, the text probe.
A stage never guesses it, so a run is evaluated on the same kind of tokens it was trained on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields

from hooks.activations import CaptureOptions
from hooks.errors import UserError
from hooks.windows import Window, WindowSpec, holdout_split, iter_windows

MODEL_DTYPES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Selection:
    dataset: str = "builtin"  # 'builtin', a file or folder, or a HF dataset name
    text_column: str = "text"
    context_size: int = 128
    bos: str = "prepend"
    separator: str = "eos"
    drop_special: bool = True  # BOS/EOS/PAD tokens
    drop_first: bool = True  # position 0, an attention sink in SmolLM2
    outlier_factor: float | None = None  # drop tokens whose norm exceeds this x the median
    model_dtype: str = "fp32"

    def __post_init__(self) -> None:
        self.window_spec  # noqa: B018  (validates context_size, bos and separator)
        if self.model_dtype not in MODEL_DTYPES:
            raise UserError(
                f"Unknown model dtype '{self.model_dtype}'; use one of {', '.join(MODEL_DTYPES)}."
            )
        if self.outlier_factor is not None and not self.outlier_factor > 1:
            raise UserError(
                f"--drop-outliers must be a factor above 1 (of the median norm), "
                f"got {self.outlier_factor}."
            )

    @property
    def window_spec(self) -> WindowSpec:
        return WindowSpec(context_size=self.context_size, bos=self.bos, separator=self.separator)

    @property
    def capture(self) -> CaptureOptions:
        return CaptureOptions(
            drop_special=self.drop_special,
            drop_first=self.drop_first,
            outlier_factor=self.outlier_factor,
        )

    def documents(self, part: str = "train") -> Iterator:
        """The source's documents of one split (every 20th document is held out for eval)."""
        from hooks.text import iter_documents

        return holdout_split(iter_documents(self.dataset, text_column=self.text_column), part)

    def windows(self, tokenizer, part: str = "train") -> Iterator[Window]:
        """The deterministic window stream of one split; a missing source raises at the call."""
        return iter_windows(self.documents(part), tokenizer, self.window_spec)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> Selection:
        """Read a recorded selection; `where` names the file it came from for the error."""
        if not isinstance(data, dict):
            raise UserError(
                f"{where} records no token selection; it was written by an older sae-workbench. "
                "Make it again (harvest or train) with this version."
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(
                f"{where} records an unknown selection setting '{unknown[0]}'; "
                f"known settings are {', '.join(sorted(known))}."
            )
        return cls(**data)

    def require_same(self, other: Selection, what: str, fix: str) -> None:
        """Raise one sentence naming the first setting, in field order, where `other` differs."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                raise UserError(f"{what} was made with {f.name}={mine!r}, not {theirs!r}; {fix}")
