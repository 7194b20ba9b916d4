"""The training loop: every SAE steps on the same batch, logs, and checkpoints.

Data-parallel (torchrun): gradients are summed over ranks and the FVU denominators and
BatchTopK's cutoff are global, so a step equals one process's step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from hooks.errors import UserError
from hooks.paths import atomic_write_json
from sae.config import THRESHOLD_KINDS, SAEConfig
from sae.optim import clipping_commutes, eval_weights, is_schedule_free, lr_factor
from sae.train.config import Derived, TrainConfig, derive, run_name, total_steps
from sae.train.data import DataStream
from sae.train.distributed import init_world
from sae.train.state import (
    Member,
    checkpoint_name,
    latest_checkpoint,
    make_empty_dir,
    publish_checkpoint,
    read_tensors,
    truncate_log,
    versions,
    write_tensors,
)


class Trainer:
    def __init__(self, cfg: TrainConfig, out: Path, resume: bool = False, progress: bool = True):
        cfg.check()
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.world = init_world(cfg.device)
        self.device = self.world.device
        self.state_dir = self.out / "state"
        self._check_out_dir(resume)
        saved = self._saved_trainer_state() if resume else None  # for its derived values
        loaded = None
        if cfg.cache is None:
            from hooks.models import load_model
            from hooks.sites import resolve_site

            loaded = load_model(
                cfg.model, str(self.device), cfg.selection.model_dtype, progress=progress
            )
            for site in cfg.capture_sites():
                resolve_site(loaded.model, site)
        recorded = Derived.from_dict(saved["derived"]) if saved and "derived" in saved else None
        self.data = DataStream(
            cfg, self.world, loaded, recorded.buffer_tokens if recorded else None
        )
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
                    target=cfg.target or "",
                    skip=cfg.skip,
                    prefixes=cfg.prefixes,
                    bandwidth=cfg.bandwidth,
                    pre_act_loss=cfg.pre_act_loss,
                ),
                cfg,
                self.out
                if len(specs) == 1
                else self.out / run_name(site, n, k, cfg.architecture, cfg.target),
                self.device,
            )
            for i, (site, n, k) in enumerate(specs)
        ]
        # Schedule-free optimisers average their iterates instead of decaying the lr.
        self.derived = recorded or derive(cfg, is_schedule_free(self.members[0].optimizer))
        self.total_steps = total_steps(cfg)
        self.encode_dtype = torch.bfloat16 if cfg.encode_dtype == "bf16" else None
        for m in self.members:
            m.sae.threshold_lr = self.derived.threshold_lr
        multi = self.world.size > 1
        self._reduce = self.world.sum if multi else None
        self._gather = self.world.gather if multi else None
        self.step = self.tokens = self.nonfinite = 0
        self.initialised = False
        self._current: str | None = None  # the published checkpoint's folder
        if resume:
            self._resume()

    @property
    def dead_tokens(self) -> int:
        return self.derived.dead_tokens

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
        data = self.cfg.to_dict()
        data.pop("tokens")  # a resume may extend the run
        data.pop("checkpoint_seconds")  # how often to save is not what is trained
        return data

    def _saved_trainer_state(self) -> dict:
        return json.loads((latest_checkpoint(self.state_dir) / "trainer.json").read_text())

    def _check_same_config(self) -> None:
        saved = json.loads((self.state_dir / "train_config.json").read_text())
        mine = self._config_dict()
        saved.pop("checkpoint_seconds", None)
        diffs = [k for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)]
        if diffs:
            k = diffs[0]
            raise UserError(
                f"Cannot resume {self.out}: it was trained with {k}={saved.get(k)!r}, "
                f"not {mine.get(k)!r}; use the same settings or another --out."
            )

    def _resume(self) -> None:
        self._check_same_config()
        step_dir = latest_checkpoint(self.state_dir)
        self._current = step_dir.name
        trainer = json.loads((step_dir / "trainer.json").read_text())
        self.step, self.tokens = trainer["step"], trainer["tokens"]
        self.nonfinite = trainer["nonfinite"]
        self.initialised = True
        rank = self.world.rank if not self.data.from_cache else 0
        self.data.load(*read_tensors(step_dir / f"data-{rank}"))
        for m in self.members:
            m.load(*read_tensors(step_dir / f"sae-{m.index}", self.device))
            if self.world.main:
                truncate_log(m.run_dir / "train_log.jsonl", self.tokens)
            else:  # rank 0's checkpoint holds every rank's share (see _pool_log_sums)
                m.log_sums = {k: v if k == "steps" else 0.0 for k, v in m.log_sums.items()}

    def _pool_log_sums(self) -> None:
        """Rank 0's checkpoint holds every rank's share of a log line in progress and the other
        ranks keep zeros, so the sums `_log` all-reduces stay the same, and a resume (where
        every rank loads rank 0's member state) zeroes them again on the other ranks."""
        if self.world.size == 1:
            return
        for m in self.members:
            # lambda is the same on every rank: each keeps its own sum
            keys = [k for k in m.log_sums if k not in ("steps", "sparsity_coefficient")]
            if not keys:
                continue
            values = [torch.as_tensor(m.log_sums[k], dtype=torch.float64) for k in keys]
            packed = self.world.sum(torch.stack(values).to(self.device))  # (keys,)
            if not self.world.main:
                packed.zero_()
            m.log_sums.update(zip(keys, packed.unbind(), strict=True))

    def _checkpoint(self) -> None:
        from sae.formats import save_sae

        name = checkpoint_name(self.tokens, self._current)  # the same on every rank
        tmp = self.state_dir / f".{name}.tmp"
        if self.world.main:
            make_empty_dir(tmp)
        self.world.barrier()
        self._pool_log_sums()
        if self.world.main or not self.data.from_cache:
            write_tensors(tmp / f"data-{self.world.rank}", *self.data.state())
        self.world.barrier()
        self._current = name
        if not self.world.main:
            self.world.barrier()
            return
        for m in self.members:
            write_tensors(tmp / f"sae-{m.index}", *m.state())
            with eval_weights(m.optimizer):  # a schedule-free optimiser's average, not its y
                save_sae(m.sae, m.run_dir, extra_cfg={"tokens": self.tokens})
        record = {"step": self.step, "tokens": self.tokens, "nonfinite": self.nonfinite}
        atomic_write_json(tmp / "trainer.json", {**record, "derived": self.derived.to_dict()})
        publish_checkpoint(self.state_dir, tmp, name, self.tokens)
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
                    "architecture": m.sae.cfg.architecture,
                    "target": m.sae.cfg.target or None,
                    "d_in": self.data.d_in,
                    "n_latents": m.sae.cfg.n_latents,
                    "k": m.sae.cfg.k,
                    "data": {"cache": self.cfg.cache} if self.cfg.cache else {"live": True},
                    "selection": self.cfg.selection.to_dict() if self.cfg.selection else None,
                    "tokens_planned": self.cfg.tokens,
                    "tokens": self.tokens,
                    "config": self.cfg.to_dict(),
                    "derived": self.derived.to_dict(),
                    "dead_tokens": self.dead_tokens,
                    "lr": m.lr,
                    "world_size": self.world.size,
                    "versions": versions(),
                },
            )

    # -- the loop -------------------------------------------------------------------------------

    def fit(self) -> list[Path]:
        cfg = self.cfg
        if self.world.main:
            self._write_run_files()
        next_checkpoint = (self.tokens // cfg.checkpoint_every + 1) * cfg.checkpoint_every
        last_checkpoint = time.monotonic()
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
        batches = iter(self.data)
        finished = self.tokens >= cfg.tokens  # a finished run resumed: nothing to train or save
        if finished:  # its checkpoint's line in progress was logged right after it was written
            for m in self.members:
                m.log_sums = {}
        with bar:
            # The check comes before the draw: a batch drawn is a batch trained on, so the last
            # checkpoint's buffer still holds every batch the run did not use.
            while self.tokens < cfg.tokens:
                batch = next(batches, None)
                if batch is None:
                    break
                bar.update(self._step(batch))
                due = self.tokens >= next_checkpoint
                if self.step % cfg.log_every == 0:
                    self._log(bar, started, tokens_at_start)
                    due = due or self._time_is_up(last_checkpoint)
                if due and self.tokens < cfg.tokens:  # the end writes its own
                    self._checkpoint()
                    last_checkpoint = time.monotonic()
                    while next_checkpoint <= self.tokens:
                        next_checkpoint += cfg.checkpoint_every
            if self.tokens < cfg.tokens:
                raise UserError(f"The data ran out after {self.tokens} of {cfg.tokens} tokens.")
            # The checkpoint keeps the sums of a log line in progress (see Member.state), so a
            # run extended from it logs what an uninterrupted one would; then they are logged.
            if not finished:
                self._checkpoint()
            if self.members[0].log_sums:
                self._log(bar, started, tokens_at_start)
        for m in self.members:
            if is_schedule_free(m.optimizer):
                m.optimizer.eval()  # leave the trained SAEs holding the weights that were saved
        if self.world.main:
            self._write_run_files()
        return [m.run_dir for m in self.members]

    def _time_is_up(self, since: float) -> bool:
        """Whether checkpoint_seconds have passed on rank 0's clock (all ranks agree)."""
        late = time.monotonic() - since >= self.cfg.checkpoint_seconds
        if self.world.size == 1:
            return late
        flag = torch.tensor([late and self.world.main], dtype=torch.int32, device=self.device)
        return bool(self.world.max(flag))

    def _first_batch(self, x_by_site: dict[str, torch.Tensor]) -> None:
        """Input scale and b_dec from the first global batch."""
        for m in self.members:
            target = x_by_site[m.sae.cfg.target] if m.sae.cfg.is_transcoder else None
            if target is not None and target.shape[1] != m.sae.cfg.d_out:
                raise UserError(
                    f"The target site {m.sae.cfg.target} is {target.shape[1]} wide, but the "
                    f"transcoder's output is {m.sae.cfg.d_out}; pick a target of the input's "
                    "width, such as mlp_out.L for mlp_in.L."
                )
            m.sae.init_from_sample(x_by_site[m.site], self._reduce, target, self._gather)
        self.initialised = True

    def _step(self, batch) -> int:
        """One training step of every member on one batch; returns the tokens it consumed."""
        x_by_site, dropped, n_dead = self._finite_rows(batch)
        if not self.initialised:
            self._first_batch(x_by_site)
        rows = len(next(iter(x_by_site.values())))
        # One process knows its row count; only ranks need a collective (a device round trip).
        global_rows = (
            rows
            if self.world.size == 1
            else int(self.world.sum(torch.tensor([rows], device=self.device)))
        )
        for m, dead in zip(self.members, n_dead, strict=True):
            target = x_by_site[m.sae.cfg.target] if m.sae.cfg.is_transcoder else None
            self._train_member(m, x_by_site[m.site], global_rows, dead, target)
        self.step += 1
        self.tokens += global_rows + dropped
        return global_rows + dropped

    def _train_member(
        self,
        m: Member,
        x: torch.Tensor,
        global_rows: int,
        n_dead: int | None = None,
        target: torch.Tensor | None = None,
    ) -> None:
        sae, cfg = m.sae, self.cfg
        if sae.cfg.architecture == "jumprelu":
            # JumpReLU trains as TopK through the lr warm-up: from random decoders its
            # thresholds would rise until few latents fire (see docs/dictionaries.md)
            warmup = self.derived.warmup_steps
            if self.step == warmup and warmup > 0:
                sae.cut_like_batch_topk(x, self._reduce, self._gather)
            sae.warm_topk = self.step < warmup
        dead = (m.since_fired >= self.dead_tokens) if cfg.auxk else None
        out = sae(x, dead, self.encode_dtype, self._reduce, n_dead, self._gather, target)
        loss = out.loss
        m.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world.size > 1:
            # JumpReLU's thresholds get no gradient while it warms up as TopK; every rank
            # is at the same step, so all skip the same parameters
            for p in sae.parameters():
                if p.grad is not None:
                    self.world.sum(p.grad)
        sae.remove_gradient_parallel_to_decoder_directions()
        # Where clipping cannot change the update (sign descent without momentum), its pass
        # (~3 bytes moved per parameter byte) is skipped.
        if cfg.grad_clip and not clipping_commutes(m.optimizer):
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        d = self.derived
        factor = lr_factor(self.step, self.total_steps, d.warmup_steps, d.decay_steps)
        for group in m.optimizer.param_groups:
            group["lr"] = m.lr * factor * group.get("lr_scale", 1.0)
        m.optimizer.step()
        sae.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            active = (out.top_acts > 0).sum()
            if sae.cfg.architecture in THRESHOLD_KINDS:  # the global batch's L0, on every rank
                sae.update_sparsity_coefficient(self.world.sum(active.float()) / global_rows)
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
                "l0": active.float() / len(x),
            }
            if sae.cfg.architecture in THRESHOLD_KINDS:
                stats["sparsity_coefficient"] = sae.sparsity_coefficient.clone()
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
                values = [sums[k] for k in keys]
                packed = torch.tensor(values, dtype=torch.float64, device=self.device)
                packed = self.world.sum(packed)
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
            if "sparsity_coefficient" in sums:  # the same on every rank: not summed above
                record["sparsity_coefficient"] = sums["sparsity_coefficient"]
            if self.world.main:
                with open(m.run_dir / "train_log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            if m.index == 0:
                bar.set_postfix(
                    fvu=f"{record['fvu']:.3f}",
                    l0=f"{record['l0']:.1f}",
                    dead=f"{record['dead_frac']:.3f}",
                )

    def _finite_rows(self, batch) -> tuple[dict[str, torch.Tensor], int, list[int | None]]:
        """Drop rows with NaN/inf at any site; abort once too many tokens were bad. Also returns
        each member's dead-latent count (None without AuxK), read in the same host sync: on
        CUDA this is the step's only wait for the GPU."""
        device = self.device
        acts = {
            s: batch.acts[s].to(device, torch.float32, non_blocking=True)
            for s in self.cfg.capture_sites()
        }
        finite = torch.stack([torch.isfinite(a).all(dim=1) for a in acts.values()]).all(dim=0)
        counts = [(~finite).sum()]
        if self.cfg.auxk:
            counts += [(m.since_fired >= self.dead_tokens).sum() for m in self.members]
        counts = torch.stack([c.to(device) for c in counts]).tolist()  # one host sync
        n_dead = counts[1:] if self.cfg.auxk else [None] * len(self.members)
        dropped = counts[0]
        if self.world.size > 1:
            dropped = int(self.world.sum(torch.tensor([dropped], device=device)))
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
