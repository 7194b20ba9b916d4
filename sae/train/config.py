"""What a training run is asked to do (TrainConfig), and the values derived from it (Derived).

TrainConfig is the one place the trainer's defaults live. Derived holds what follows from
`tokens` unless given: it is recorded with every checkpoint, and a resume keeps it, so extending
a run with more tokens does not change its buffer, dead threshold, warm-up, decay or EMA rate.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

from hooks.errors import UserError
from hooks.selection import Selection
from hooks.sites import canonical_site
from sae.config import check_kind


@dataclass
class TrainConfig:
    model: str = "smollm2-135m"
    sites: list[str] = field(default_factory=lambda: ["resid_post.9"])
    latents: list[int] = field(default_factory=lambda: [9216])
    ks: list[int] = field(default_factory=lambda: [32])
    architecture: str = "topk"  # topk, batchtopk, matryoshka, jumprelu or relu (sae.config)
    multi_topk: bool = False
    target: str | None = None  # a transcoder's output site; the one --site is its input
    skip: bool = False  # a transcoder's linear skip connection
    prefixes: list[int] | None = None  # matryoshka's prefix sizes; None: n/16, n/8, n/4, n/2, n
    bandwidth: float = 0.05  # jumprelu's straight-through kernel width
    pre_act_loss: float = 0.0  # jumprelu's pull on dead latents towards their threshold
    tokens: int = 2_000_000
    batch: int = 4096
    optimizer: str = "sf-signsgd"  # or adam, signum; measured best per token: see BENCHMARKS.md
    lr: float | None = None  # None: the 1/sqrt(n) rule for the optimizer
    warmup_steps: int | None = None  # None: 5% of the steps, at most 1000
    decay_frac: float = 0.2  # linear decay to zero over the last 20% of steps
    grad_clip: float = 1.0
    encode_dtype: str = "fp32"  # bf16: the encoder's matmul and top-k in bf16 (all else stays fp32)
    seed: int = 0
    auxk: bool = True
    aux_alpha: float = 1 / 32
    k_aux: int | None = None
    dead_tokens: int | None = None  # None: 10M, scaled down for short runs (dead_tokens_for)
    log_every: int = 10  # steps
    checkpoint_every: int = 500_000  # tokens
    checkpoint_seconds: float = 600.0  # and at least this often (checked at each log line)
    cache: str | None = None
    # Which tokens a live run trains on; a cache brings its own (Trainer reads it from there).
    selection: Selection = field(default_factory=Selection)
    model_batch: int = 8  # windows per model forward
    buffer_tokens: int | None = None  # None: 64k tokens or a quarter of the run, >= 8 batches
    device: str = "cpu"
    max_nonfinite: float = 0.01  # abort once this fraction of tokens was NaN/inf

    def __post_init__(self) -> None:
        self.sites = [canonical_site(s) for s in self.sites]  # TransformerLens names as ours
        if self.target is not None:
            self.target = canonical_site(self.target)

    def capture_sites(self) -> list[str]:
        """Every site the data stream reads: the inputs, and a transcoder's target."""
        extra = [self.target] if self.target and self.target not in self.sites else []
        return [*self.sites, *extra]

    def specs(self) -> list[tuple[str, int, int]]:
        return list(itertools.product(self.sites, self.latents, self.ks))

    def check(self) -> None:
        for _, n, k in self.specs():  # before any model or cache is opened
            check_kind(self.architecture, n, k, self.prefixes)
        if self.batch <= 0 or self.tokens <= 0:
            raise UserError(
                f"--batch and --tokens must be positive, got {self.batch} and {self.tokens}."
            )
        if self.encode_dtype not in ("fp32", "bf16"):
            raise UserError(f"Unknown --dtype '{self.encode_dtype}'; use fp32 or bf16.")
        if self.target is not None and len(self.sites) != 1:
            raise UserError(
                f"A transcoder reads one input site; --target {self.target} was given with "
                f"{len(self.sites)} sites ({', '.join(self.sites)})."
            )
        if self.target is not None and self.target == self.sites[0]:
            raise UserError(
                f"--target {self.target} is the input site itself; a transcoder maps one site "
                "to another (for an SAE, leave --target out)."
            )
        if self.skip and self.target is None:
            raise UserError("--skip adds a transcoder's skip connection; give --target SITE too.")
        if self.checkpoint_seconds <= 0:
            raise UserError(f"checkpoint_seconds must be positive, got {self.checkpoint_seconds}.")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Derived:
    """Settings that follow from the run's length unless given, fixed when the run starts."""

    buffer_tokens: int
    dead_tokens: int
    warmup_steps: int
    decay_steps: int  # 0 for schedule-free optimisers, which average instead of decaying
    threshold_lr: float  # BatchTopK's threshold EMA rate

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Derived:
        return cls(**data)


def total_steps(cfg: TrainConfig) -> int:
    return math.ceil(cfg.tokens / cfg.batch)


def dead_tokens_for(cfg: TrainConfig) -> int:
    """Gao et al. call a latent dead after 10M tokens without firing. A run of a few hundred
    thousand tokens would then never see a dead latent, so short runs use a tenth of the run,
    but never less than 4 batches (a latent at density 1e-4 fires within that on average)."""
    if cfg.dead_tokens is not None:
        return cfg.dead_tokens
    return min(10_000_000, max(cfg.tokens // 10, 4 * cfg.batch))


def derive(cfg: TrainConfig, schedule_free: bool) -> Derived:
    steps = total_steps(cfg)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(1000, max(1, steps // 20))
    return Derived(
        # 64k tokens mixes well, but a short run should not capture far more than it trains on
        # (the buffer fills before the first step): a quarter of the run, at least 8 batches.
        buffer_tokens=cfg.buffer_tokens or max(min(1 << 16, cfg.tokens // 4), 8 * cfg.batch),
        dead_tokens=dead_tokens_for(cfg),
        warmup_steps=warmup,
        decay_steps=0 if schedule_free else int(cfg.decay_frac * steps),
        # the EMA spans at most a fifth of the run
        threshold_lr=max(0.01, 5 / steps),
    )


def run_name(
    site: str, n: int, k: int, architecture: str = "topk", target: str | None = None
) -> str:
    """resid_post.9-n9216-k32, with the kind unless topk and a transcoder's target:
    mlp_in.6-to-mlp_out.6-n9216-k32-jumprelu."""
    name = f"{site}-to-{target}" if target else site
    return f"{name}-n{n}-k{k}" + ("" if architecture == "topk" else f"-{architecture}")
