"""An SAE's shape and kind: the five kinds, their checks, and SAEConfig, which a checkpoint's
cfg.json holds."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from hooks.errors import UserError

ARCHITECTURES = ("topk", "batchtopk", "matryoshka", "jumprelu", "relu")
BATCH_KINDS = ("batchtopk", "matryoshka")  # a cutoff over the batch; one threshold at inference
THRESHOLD_KINDS = ("jumprelu", "relu")  # L0 varies by token; k is the target L0


def default_prefixes(n: int) -> list[int]:
    """Bussmann et al.'s group sizes n/16, n/16, n/8, n/4, n/2 + n/16 as prefix sizes."""
    sizes = [n // 16, n // 8, n // 4, n // 2, n]
    return sorted({s for s in sizes if s > 0})


def check_kind(arch: str, n: int, k: int, prefixes: list[int] | None) -> list[int] | None:
    """One sentence for a bad kind, k or prefix list; returns matryoshka's prefix sizes (the
    default, or the given ones with n appended where the last is smaller)."""
    if arch not in ARCHITECTURES:
        raise UserError(f"Unknown SAE architecture '{arch}'; use one of {ARCHITECTURES}.")
    if arch in THRESHOLD_KINDS and k <= 0:
        raise UserError(f"The target L0 (--k) of a {arch} SAE must be positive, got {k}.")
    if not 0 < k <= n:
        raise UserError(f"k must be between 1 and the number of latents ({n}), got {k}.")
    if arch != "matryoshka":
        if prefixes is not None:
            raise UserError(f"Prefix sizes belong to a matryoshka SAE, not a {arch} one.")
        return None
    sizes = default_prefixes(n) if prefixes is None else list(prefixes)
    if not sizes or sizes[0] <= 0 or any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise UserError(f"Matryoshka prefix sizes must be positive and increasing, got {sizes}.")
    if sizes[-1] > n:
        raise UserError(
            f"Matryoshka prefix size {sizes[-1]} exceeds the {n} latents; every prefix must be "
            "at most the dictionary's width."
        )
    return sizes if sizes[-1] == n else [*sizes, n]


@dataclass
class SAEConfig:
    d_in: int
    n_latents: int
    k: int  # active latents per token; the target L0 for jumprelu and relu
    architecture: str = "topk"
    k_aux: int | None = None  # latents in the AuxK loss; None: d_in // 2, as in Gao et al.
    aux_alpha: float = 1 / 32
    multi_topk: bool = False  # add FVU(4k) / 8 to the loss
    model: str = ""  # where the activations came from
    site: str = ""
    target: str = ""  # a transcoder's output site; "" for an SAE, which reconstructs its input
    d_out: int | None = None  # the target's width; None: d_in
    skip: bool = False  # a transcoder's linear skip connection
    prefixes: list[int] | None = None  # matryoshka's nested dictionary sizes; None: the default
    bandwidth: float = 0.05  # jumprelu's STE kernel width, in the scaled pre-activation's units
    pre_act_loss: float = 0.0  # jumprelu: coefficient on relu(theta - pre) of dead latents

    def __post_init__(self) -> None:
        if self.d_in <= 0 or self.n_latents <= 0:
            raise UserError(
                f"d_in and n_latents must be positive, got {self.d_in} and {self.n_latents}."
            )
        self.prefixes = check_kind(self.architecture, self.n_latents, self.k, self.prefixes)
        if self.k_aux is None:
            self.k_aux = min(self.d_in // 2, self.n_latents)
        if self.d_out is None:
            self.d_out = self.d_in
        if self.skip and not self.target:
            raise UserError("A skip connection belongs to a transcoder; give --target SITE too.")
        if self.architecture == "jumprelu" and not self.bandwidth > 0:
            raise UserError(f"The JumpReLU bandwidth must be positive, got {self.bandwidth}.")

    @property
    def is_transcoder(self) -> bool:
        return bool(self.target)

    @property
    def inference_width(self) -> int:
        """Latents per token in the (N, width) code at inference: k, or at most 4k."""
        return self.k if self.architecture == "topk" else min(4 * self.k, self.n_latents)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SAEConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
