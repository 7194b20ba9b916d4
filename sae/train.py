"""Training TopK SAEs from a live model or an activation cache, resumable, optionally under torchrun.

One data stream feeds every SAE being trained (several sites, widths or k from one model pass).
Each SAE gets its own run directory; the shared training state lives in `<out>/state/`:

  state/latest.json           which checkpoint is current (rewritten atomically, last)
  state/step-<tokens>/        data-<rank>.safetensors + .json   mixing buffer, RNG, data cursor
                              sae-<i>.safetensors + .json        weights (unfolded), optimiser,
                                                                 dead-latent counters, step
  state/train_config.json     the config a resume must match

Data-parallel (torchrun): from a cache every rank reads the same global batch and trains on its
slice; from a live model every rank captures its own share of the windows. Gradients are summed
over ranks, and the FVU denominators are global, so a step equals one process's step.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from hooks.errors import UserError
from hooks.paths import atomic_write_json
from hooks.selection import Selection
from sae.model import SAEConfig, TopKSAE
from sae.optim import (
    default_lr,
    eval_weights,
    is_schedule_free,
    is_sign_descent,
    lr_factor,
    make_optimizer,
)


@dataclass
class TrainConfig:
    model: str = "smollm2-135m"
    sites: list[str] = field(default_factory=lambda: ["resid_post.9"])
    latents: list[int] = field(default_factory=lambda: [9216])
    ks: list[int] = field(default_factory=lambda: [32])
    architecture: str = "topk"
    multi_topk: bool = False
    tokens: int = 2_000_000
    batch: int = 4096
    optimizer: str = "sf-signsgd"  # or adam, signum; measured best per token: see BENCHMARKS.md
    lr: float | None = None  # None: the 1/sqrt(n) rule for the optimizer
    warmup_steps: int | None = None  # None: 5% of the steps, at most 1000
    decay_frac: float = 0.2  # linear decay to zero over the last 20% of steps
    grad_clip: float = 1.0
    dtype: str = "fp32"  # bf16: the encoder's matmul and top-k in bf16 (all else stays fp32)
    seed: int = 0
    auxk: bool = True
    aux_alpha: float = 1 / 32
    k_aux: int | None = None
    dead_tokens: int | None = None  # None: 10M, scaled down for short runs (dead_tokens_for)
    log_every: int = 10  # steps
    checkpoint_every: int = 500_000  # tokens
    cache: str | None = None
    # Which tokens a live run trains on; a cache brings its own (Trainer reads it from there).
    selection: Selection = field(default_factory=Selection)
    model_batch: int = 8  # windows per model forward
    buffer_tokens: int | None = None  # None: 64k tokens or a quarter of the run, >= 8 batches
    device: str = "cpu"
    max_nonfinite: float = 0.01  # abort once this fraction of tokens was NaN/inf

    def specs(self) -> list[tuple[str, int, int]]:
        return list(itertools.product(self.sites, self.latents, self.ks))

    def check(self) -> None:
        for _, n, k in self.specs():
            if not 0 < k <= n:
                raise UserError(f"k must be between 1 and the number of latents ({n}), got {k}.")
        if self.batch <= 0 or self.tokens <= 0:
            raise UserError(
                f"--batch and --tokens must be positive, got {self.batch} and {self.tokens}."
            )
        if self.dtype not in ("fp32", "bf16"):
            raise UserError(f"Unknown --dtype '{self.dtype}'; use fp32 or bf16.")


def dead_tokens_for(cfg: TrainConfig) -> int:
    """Gao et al. call a latent dead after 10M tokens without firing. A run of a few hundred
    thousand tokens would then never see a dead latent, so short runs use a tenth of the run,
    but never less than 4 batches (a latent at density 1e-4 fires within that on average)."""
    if cfg.dead_tokens is not None:
        return cfg.dead_tokens
    return min(10_000_000, max(cfg.tokens // 10, 4 * cfg.batch))


def run_name(site: str, n: int, k: int) -> str:
    return f"{site}-n{n}-k{k}"


# -- distributed ---------------------------------------------------------------------------


@dataclass
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init_world(device: str) -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size())


# -- data ------------------------------------------------------------------------------------


class DataStream:
    """Batches of activations for this rank, with a state that resumes the stream exactly."""

    def __init__(self, cfg: TrainConfig, world: World, loaded=None):
        from hooks.buffer import MixingBuffer

        self.cfg, self.world = cfg, world
        self.from_cache = cfg.cache is not None
        # 64k tokens mixes well, but a short run should not capture far more than it trains on
        # (the buffer fills before the first step): a quarter of the run, at least 8 batches.
        self.buffer_tokens = cfg.buffer_tokens or max(min(1 << 16, cfg.tokens // 4), 8 * cfg.batch)
        if self.from_cache:
            from hooks.cache import ActivationCache

            self.cache = ActivationCache(Path(cfg.cache))
            for site in cfg.sites:
                self.cache.check(site=site)
            self.d_in = int(self.cache.manifest["d_model"])
            self.local_batch = cfg.batch  # every rank draws the global batch and keeps a slice
        else:
            self.loaded = loaded
            self.d_in = loaded.d_model
            if cfg.batch % world.size:
                raise UserError(f"--batch {cfg.batch} must divide evenly over {world.size} ranks.")
            self.local_batch = cfg.batch // world.size
        # A live run captures only the rows it will train on: once they are all in the buffer
        # the model stops and the buffer serves what it holds, instead of capturing a last
        # buffer-full that is never used (a cache is cheap to read, so it keeps streaming).
        self.rows_needed = math.ceil(cfg.tokens / cfg.batch) * self.local_batch
        self.captured = 0  # live rows handed to the buffer so far
        # From a cache all ranks draw the same global batches; live ranks mix their own rows.
        seed = cfg.seed if self.from_cache else cfg.seed + 7919 * world.rank
        self.buffer = MixingBuffer(self._source(0), self.buffer_tokens, self.local_batch, seed)

    def _source(self, cursor: int):
        if self.from_cache:
            return self.cache.iter_shards(
                self.cfg.seed, start=cursor, epochs=None, sites=self.cfg.sites
            )
        return self._live(cursor)

    def _live(self, cursor: int):
        from hooks.activations import live_rows

        cfg, world = self.cfg, self.world

        def epochs():
            for epoch in itertools.count():
                if epoch:
                    print(
                        f"[saewb] the text ran out; starting pass {epoch + 1} over it",
                        file=sys.stderr,
                    )
                yield from cfg.selection.windows(self.loaded.tokenizer, "train")

        mine = itertools.islice(epochs(), world.rank, None, world.size)  # this rank's share
        rows = live_rows(
            self.loaded,
            cfg.sites,
            itertools.islice(mine, cursor, None),
            cfg.model_batch,
            cfg.selection.capture,
        )
        if self.captured >= self.rows_needed:
            return
        for consumed, batch in rows:
            self.captured += len(batch)
            yield cursor + consumed, batch
            if self.captured >= self.rows_needed:
                return

    def __iter__(self):
        for batch in self.buffer:
            if self.from_cache and self.world.size > 1:
                share = self.cfg.batch // self.world.size
                lo = self.world.rank * share
                hi = len(batch) if self.world.rank == self.world.size - 1 else lo + share
                batch = batch.select(slice(lo, hi))
            yield batch

    def state(self) -> tuple[dict, dict]:
        state = self.buffer.state_dict()
        tensors = {f"pool.{k}": v.contiguous() for k, v in state.pop("pool").items()}
        tensors["rng"] = state.pop("rng")
        state["captured"] = self.captured
        return tensors, state

    def load(self, tensors: dict, meta: dict) -> None:
        pool = {k.removeprefix("pool."): v for k, v in tensors.items() if k.startswith("pool.")}
        self.buffer.load_state_dict({**meta, "pool": pool, "rng": tensors["rng"]}, self.cfg.sites)
        self.captured = int(meta.get("captured", 0))
        self.buffer.source = self._source(self.buffer.cursor)


# -- one SAE being trained --------------------------------------------------------------------


class Member:
    """One SAE with its optimiser and dead-latent counter."""

    def __init__(self, index: int, site: str, sae_cfg: SAEConfig, cfg: TrainConfig, run_dir: Path):
        self.index, self.site, self.cfg, self.run_dir = index, site, cfg, run_dir
        device = torch.device(cfg.device)
        self.sae = TopKSAE(sae_cfg, device=device)
        self.sae.reset_parameters(torch.Generator().manual_seed(cfg.seed + 1000 * index))
        self.lr = cfg.lr or default_lr(cfg.optimizer, sae_cfg.n_latents)
        self.optimizer = make_optimizer(cfg.optimizer, self.sae, self.lr)
        self.since_fired = torch.zeros(sae_cfg.n_latents, dtype=torch.int64, device=device)
        self.log_sums: dict[str, float] = {}

    def state(self) -> tuple[dict, dict]:
        tensors = {f"param.{k}": v.detach().contiguous() for k, v in self.sae.state_dict().items()}
        tensors["since_fired"] = self.since_fired
        opt = self.optimizer.state_dict()
        meta = {"param_groups": opt["param_groups"], "scalars": {}}
        for pid, entries in opt["state"].items():
            for key, value in entries.items():
                if torch.is_tensor(value):
                    tensors[f"opt.{pid}.{key}"] = value.contiguous()
                else:
                    meta["scalars"][f"{pid}.{key}"] = value
        return tensors, meta

    def load(self, tensors: dict, meta: dict) -> None:
        self.sae.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("param.")})
        self.since_fired.copy_(tensors["since_fired"])
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = value
        for key, value in meta["scalars"].items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# -- the trainer ----------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: TrainConfig, out: Path, resume: bool = False, progress: bool = True):
        cfg.check()
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.world = init_world(cfg.device)
        self.state_dir = self.out / "state"
        self._check_out_dir(resume)
        loaded = None
        if cfg.cache is None:
            from hooks.models import load_model

            loaded = load_model(cfg.model, cfg.device, cfg.selection.model_dtype, progress=progress)
            from hooks.sites import resolve_site

            for site in cfg.sites:
                resolve_site(loaded.model, site)
        self.data = DataStream(cfg, self.world, loaded)
        if cfg.cache is not None:
            cfg.model = self.data.cache.manifest["model"]
            cfg.selection = self.data.cache.selection  # None for planted, synthetic rows
        specs = cfg.specs()
        self.members = [
            Member(
                i,
                site,
                SAEConfig(
                    d_in=self.data.d_in,
                    n_latents=n,
                    k=k,
                    architecture=cfg.architecture,
                    k_aux=cfg.k_aux,
                    aux_alpha=cfg.aux_alpha,
                    multi_topk=cfg.multi_topk,
                    model=cfg.model,
                    site=site,
                ),
                cfg,
                self.out if len(specs) == 1 else self.out / run_name(site, n, k),
            )
            for i, (site, n, k) in enumerate(specs)
        ]
        self.dead_tokens = dead_tokens_for(cfg)
        self.total_steps = math.ceil(cfg.tokens / cfg.batch)
        self.warmup = (
            cfg.warmup_steps
            if cfg.warmup_steps is not None
            else min(1000, max(1, self.total_steps // 20))
        )
        # Schedule-free optimisers average their iterates instead of decaying the lr.
        schedule_free = is_schedule_free(self.members[0].optimizer)
        self.decay = 0 if schedule_free else int(cfg.decay_frac * self.total_steps)
        self.kernel_dtype = torch.bfloat16 if cfg.dtype == "bf16" else None
        for m in self.members:  # BatchTopK's threshold EMA spans at most a fifth of the run
            m.sae.threshold_lr = max(0.01, 5 / self.total_steps)
        self._reduce = self.world.sum if self.world.size > 1 else None
        self.step = self.tokens = self.nonfinite = 0
        self.initialised = False
        if resume:
            self._resume()

    # -- directories, config, resume ------------------------------------------------------------

    def _check_out_dir(self, resume: bool) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / f".write-test-{self.world.rank}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise UserError(
                f"The output directory {self.out} is not writable ({exc.strerror}); "
                "choose another --out."
            ) from None
        has_state = (self.state_dir / "latest.json").exists()
        if resume and not has_state:
            raise UserError(
                f"--resume was given but {self.out} holds no checkpoint to resume from."
            )
        if not resume and has_state:
            raise UserError(
                f"{self.out} already holds a training run; pass --resume to continue "
                "it, or choose another --out."
            )

    def _config_dict(self) -> dict:
        data = asdict(self.cfg)
        data.pop("tokens")  # a resume may extend the run
        return data

    def _resume(self) -> None:
        saved = json.loads((self.state_dir / "train_config.json").read_text())
        mine = self._config_dict()
        diffs = [k for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)]
        if diffs:
            k = diffs[0]
            raise UserError(
                f"Cannot resume {self.out}: it was trained with {k}={saved.get(k)!r}, "
                f"not {mine.get(k)!r}; use the same settings or another --out."
            )
        latest = json.loads((self.state_dir / "latest.json").read_text())
        step_dir = self.state_dir / latest["dir"]
        trainer = json.loads((step_dir / "trainer.json").read_text())
        self.step, self.tokens, self.nonfinite = (
            trainer["step"],
            trainer["tokens"],
            trainer["nonfinite"],
        )
        self.initialised = True
        rank_file = step_dir / f"data-{self.world.rank if not self.data.from_cache else 0}"
        self.data.load(
            load_file(f"{rank_file}.safetensors"), json.loads(Path(f"{rank_file}.json").read_text())
        )
        for m in self.members:
            m.load(
                load_file(step_dir / f"sae-{m.index}.safetensors"),
                json.loads((step_dir / f"sae-{m.index}.json").read_text()),
            )
            if self.world.main:
                _truncate_log(m.run_dir / "train_log.jsonl", self.tokens)

    def _checkpoint(self) -> None:
        from sae.formats import save_sae

        name = f"step-{self.tokens:012d}"
        tmp = self.state_dir / f".{name}.tmp"
        if self.world.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.world.barrier()
        if self.world.main or not self.data.from_cache:
            tensors, meta = self.data.state()
            rank = self.world.rank
            save_file(tensors, str(tmp / f"data-{rank}.safetensors"))
            (tmp / f"data-{rank}.json").write_text(json.dumps(meta))
        self.world.barrier()
        if not self.world.main:
            self.world.barrier()
            return
        for m in self.members:
            tensors, meta = m.state()
            save_file(tensors, str(tmp / f"sae-{m.index}.safetensors"))
            (tmp / f"sae-{m.index}.json").write_text(json.dumps(meta))
            with eval_weights(m.optimizer):  # a schedule-free optimiser's average, not its y
                save_sae(m.sae, m.run_dir, extra_cfg={"tokens": self.tokens})
        (tmp / "trainer.json").write_text(
            json.dumps({"step": self.step, "tokens": self.tokens, "nonfinite": self.nonfinite})
        )
        for f in tmp.iterdir():  # make the files durable before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        final = self.state_dir / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_json(self.state_dir / "latest.json", {"dir": name, "tokens": self.tokens})
        for old in self.state_dir.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        self.world.barrier()

    def _write_run_files(self) -> None:
        atomic_write_json(self.state_dir / "train_config.json", self._config_dict())
        for m in self.members:
            m.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(
                m.run_dir / "run.json",
                {
                    "model": self.cfg.model,
                    "site": m.site,
                    "d_in": self.data.d_in,
                    "n_latents": m.sae.cfg.n_latents,
                    "k": m.sae.cfg.k,
                    "data": {"cache": self.cfg.cache} if self.cfg.cache else {"live": True},
                    "selection": self.cfg.selection.to_dict() if self.cfg.selection else None,
                    "tokens_planned": self.cfg.tokens,
                    "tokens": self.tokens,
                    "config": asdict(self.cfg),
                    "dead_tokens": self.dead_tokens,
                    "lr": m.lr,
                    "world_size": self.world.size,
                    "versions": _versions(),
                },
            )

    # -- the loop -------------------------------------------------------------------------------

    def _first_batch(self, x_by_site: dict[str, torch.Tensor]) -> None:
        """Input scale and b_dec from the first global batch."""
        for m in self.members:
            m.sae.init_from_sample(x_by_site[m.site], self._reduce)
        self.initialised = True

    def _train_member(
        self, m: Member, x: torch.Tensor, global_rows: int, n_dead: int | None = None
    ) -> None:
        sae, cfg = m.sae, self.cfg
        dead = (m.since_fired >= self.dead_tokens) if cfg.auxk else None
        out = sae(x, dead, dtype=self.kernel_dtype, reduce=self._reduce, n_dead=n_dead)
        loss = out.fvu + cfg.aux_alpha * out.aux_loss + out.multi_topk_fvu / 8
        m.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world.size > 1:
            for p in sae.parameters():
                self.world.sum(p.grad)
        sae.remove_gradient_parallel_to_decoder_directions()
        # Clipping scales every gradient by one positive factor, which sign descent ignores: the
        # pass (~3 bytes moved per parameter byte) is skipped for it.
        if cfg.grad_clip and not is_sign_descent(m.optimizer):
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        factor = lr_factor(self.step, self.total_steps, self.warmup, self.decay)
        for group in m.optimizer.param_groups:
            group["lr"] = m.lr * factor * group.get("lr_scale", 1.0)
        m.optimizer.step()
        sae.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            # counts of positive activations per latent; no boolean indexing, so no host sync
            fired = torch.zeros_like(m.since_fired)
            fired.scatter_add_(0, out.top_idx.reshape(-1), (out.top_acts > 0).reshape(-1).long())
            fired = self.world.max(fired)
            m.since_fired += global_rows
            m.since_fired.masked_fill_(fired > 0, 0)
            stats = {
                "loss": loss.detach(),
                "fvu": out.fvu.detach(),
                "aux": out.aux_loss.detach(),
                "l0": (out.top_acts > 0).sum(1).float().mean(),
            }
            stats["steps"] = 1
            for key, value in stats.items():
                m.log_sums[key] = m.log_sums.get(key, 0.0) + value  # tensors: no host sync here

    def _log(self, bar, started: float, tokens_at_start: int) -> None:
        """Append the means over the steps since the last log line to train_log.jsonl."""
        rate = (self.tokens - tokens_at_start) / max(time.perf_counter() - started, 1e-9)
        for m in self.members:
            steps = m.log_sums.pop("steps")
            sums = {k: float(v) / steps for k, v in m.log_sums.items()}
            if self.world.size > 1:
                # Each rank's loss terms are its share of the global sums; L0 is a per-rank mean.
                keys = ("loss", "fvu", "aux", "l0")
                packed = self.world.sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
                packed[-1] /= self.world.size
                sums.update(zip(keys, packed.tolist(), strict=True))
            m.log_sums = {}
            record = {
                "step": self.step,
                "tokens": self.tokens,
                "loss": sums["loss"],
                "fvu": sums["fvu"],
                "l0": sums["l0"],
                "dead_frac": float((m.since_fired >= self.dead_tokens).float().mean()),
                "aux": sums["aux"],
                "lr": m.optimizer.param_groups[-1]["lr"],  # the unscaled group
                "tokens_per_s": rate,
            }
            if self.world.main:
                with open(m.run_dir / "train_log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            if m.index == 0:
                bar.set_postfix(
                    fvu=f"{record['fvu']:.3f}",
                    l0=f"{record['l0']:.1f}",
                    dead=f"{record['dead_frac']:.3f}",
                )

    def fit(self) -> list[Path]:
        cfg = self.cfg
        if self.world.main:
            self._write_run_files()
        next_checkpoint = (self.tokens // cfg.checkpoint_every + 1) * cfg.checkpoint_every
        for m in self.members:
            if is_schedule_free(m.optimizer):
                m.optimizer.train()  # the training point y (a no-op unless fit ran before)
        started, tokens_at_start = time.perf_counter(), self.tokens
        bar = tqdm(
            total=cfg.tokens,
            initial=self.tokens,
            unit="tok",
            unit_scale=True,
            disable=not (self.progress and self.world.main),
            desc="train",
            dynamic_ncols=True,
        )
        with bar:
            for batch in self.data:
                if self.tokens >= cfg.tokens:
                    break
                bar.update(self._step(batch))
                if self.step % cfg.log_every == 0:
                    self._log(bar, started, tokens_at_start)
                if self.tokens >= next_checkpoint:
                    self._checkpoint()
                    next_checkpoint += cfg.checkpoint_every
            if self.step % cfg.log_every and self.members[0].log_sums:
                self._log(bar, started, tokens_at_start)
        if self.tokens < cfg.tokens:
            raise UserError(f"The data ran out after {self.tokens} of {cfg.tokens} tokens.")
        self._checkpoint()
        for m in self.members:
            if is_schedule_free(m.optimizer):
                m.optimizer.eval()  # leave the trained SAEs holding the weights that were saved
        if self.world.main:
            self._write_run_files()
        return [m.run_dir for m in self.members]

    def _step(self, batch) -> int:
        """One training step of every member on one batch; returns the tokens it consumed."""
        x_by_site, dropped, n_dead = self._finite_rows(batch)
        if not self.initialised:
            self._first_batch(x_by_site)
        global_rows = int(self.world.sum(torch.tensor(len(next(iter(x_by_site.values()))))))
        for m, dead in zip(self.members, n_dead, strict=True):
            self._train_member(m, x_by_site[m.site], global_rows, dead)
        self.step += 1
        self.tokens += global_rows + dropped
        return global_rows + dropped

    def _finite_rows(self, batch) -> tuple[dict[str, torch.Tensor], int, list[int | None]]:
        """Drop rows with NaN/inf at any site; abort once too many tokens were bad. Also returns
        each member's dead-latent count (None without AuxK), read in the same host sync: on
        CUDA this is the step's only wait for the GPU."""
        device = torch.device(self.cfg.device)
        acts = {
            s: batch.acts[s].to(device, torch.float32, non_blocking=True) for s in self.cfg.sites
        }
        finite = torch.stack([torch.isfinite(a).all(dim=1) for a in acts.values()]).all(dim=0)
        counts = [(~finite).sum()]
        if self.cfg.auxk:
            counts += [(m.since_fired >= self.dead_tokens).sum() for m in self.members]
        counts = torch.stack([c.to(device) for c in counts]).tolist()  # one host sync
        n_dead = counts[1:] if self.cfg.auxk else [None] * len(self.members)
        dropped = int(self.world.sum(torch.tensor(counts[0])))
        if dropped:
            self.nonfinite += dropped
            seen = self.tokens + self.cfg.batch
            if self.nonfinite > self.cfg.max_nonfinite * seen:
                raise UserError(
                    f"{self.nonfinite} of the {seen} tokens so far had NaN/inf activations, over "
                    f"the limit of {self.cfg.max_nonfinite:.1%}; check the model's dtype and input."
                )
            acts = {s: a[finite] for s, a in acts.items()}
        return acts, dropped, n_dead


def _truncate_log(path: Path, tokens: int) -> None:
    """Drop log lines written after the checkpoint a resume starts from."""
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line and json.loads(line)["tokens"] <= tokens
    ]
    from hooks.paths import atomic_write_bytes

    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())


def _versions() -> dict:
    import transformers

    from sae import __version__

    return {
        "sae-workbench": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }
