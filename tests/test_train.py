"""The trainer: planted-feature recovery, AuxK, exact resume, torchrun, and bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hooks.errors import UserError
from hooks.selection import Selection
from sae.optim import OPTIMIZERS
from sae.synthetic import recovery, write_synthetic_cache
from sae.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """d=32, 128 planted unit features, ~4 active per token (Zipf rates), 200k tokens."""
    path = tmp_path_factory.mktemp("planted") / "cache"
    features = write_synthetic_cache(path, d=32, n_features=128, tokens=200_000, mean_active=4)
    return path, features


def _cfg(cache, **kw):
    base = dict(
        cache=str(cache),
        sites=["synthetic"],
        latents=[256],
        ks=[8],
        tokens=200_000,
        batch=1024,
        log_every=20,
        checkpoint_every=10**9,
    )
    return TrainConfig(**{**base, **kw})


def _log(run):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def _kill_fit(trainer: Trainer, method: str, at_call: int) -> None:
    """fit(), killed by a KeyboardInterrupt at the at_call-th call of trainer.<method>."""
    real, calls = getattr(trainer, method), [0]

    def dying(*args):
        calls[0] += 1
        if calls[0] == at_call:
            raise KeyboardInterrupt
        return real(*args)

    setattr(trainer, method, dying)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()


def test_planted_features_are_recovered(planted, tmp_path):
    cache, features = planted
    trainer = Trainer(_cfg(cache), tmp_path / "run", progress=False)
    (run,) = trainer.fit()
    cos = recovery(trainer.members[0].sae.W_dec.detach(), features)
    assert cos.mean() >= 0.9, cos.mean()
    log = _log(run)
    assert log[-1]["fvu"] < 0.5 * log[0]["fvu"]
    assert 7.9 < log[-1]["l0"] <= 8  # ReLU after TopK: a token may have fewer than k positive
    # The saved SAE is the trained one, with the input scale folded in.
    from sae.formats import load_sae

    saved = load_sae(run)
    x = torch.randn(64, 32)
    sae = trainer.members[0].sae.eval()
    torch.testing.assert_close(
        saved.decode(*saved.encode(x)[:2]), sae.decode(*sae.encode(x)[:2]), rtol=1e-4, atol=1e-5
    )


def test_auxk_revives_dead_latents(tmp_path):
    """Half the latents start pointing (almost) outside the data's span: the main loss never
    selects them, so without AuxK they stay dead. With AuxK they learn the residual, find the
    planted features nobody covers yet (2048 uniform features, 256 latents), and fire again."""
    d, rank = 64, 48
    features = write_synthetic_cache(
        tmp_path / "cache", d=d, n_features=2048, tokens=150_000, mean_active=6, rank=rank, zipf=0.0
    )
    basis = torch.linalg.svd(features, full_matrices=True).Vh
    inside, outside = basis[:rank], basis[rank:]
    dead_frac, fvu = {}, {}
    for auxk in (True, False):
        trainer = Trainer(
            _cfg(tmp_path / "cache", tokens=150_000, auxk=auxk),
            tmp_path / f"run-{auxk}",
            progress=False,
        )
        g = torch.Generator().manual_seed(1)
        w = torch.randn(128, d - rank, generator=g) @ outside
        w += 0.1 * torch.randn(128, rank, generator=g) @ inside
        w /= w.norm(dim=1, keepdim=True)
        with torch.no_grad():
            sae = trainer.members[0].sae
            sae.W_dec[:128], sae.W_enc[:, :128] = w, w.T
        (run,) = trainer.fit()
        dead_frac[auxk], fvu[auxk] = _log(run)[-1]["dead_frac"], _log(run)[-1]["fvu"]
    assert dead_frac[False] > 0.45, dead_frac
    assert dead_frac[True] < 0.01, dead_frac
    assert fvu[True] < fvu[False]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_killed_run_resumes_exactly(planted, tmp_path, optimizer):
    """The uninterrupted run writes no checkpoint until the end, so this also shows that writing
    one (a schedule-free optimiser switches to its average and back) leaves training untouched."""
    cache, _ = planted
    cfg = dict(
        tokens=40 * 1024,
        log_every=1,
        checkpoint_every=10 * 1024,
        buffer_tokens=8192,
        optimizer=optimizer,
    )
    no_checkpoints = _cfg(cache, **{**cfg, "checkpoint_every": 10**9})
    Trainer(no_checkpoints, tmp_path / "whole", progress=False).fit()

    killed = Trainer(_cfg(cache, **cfg), tmp_path / "killed", progress=False)
    _kill_fit(killed, "_train_member", at_call=26)
    assert json.loads((tmp_path / "killed/state/latest.json").read_text())["tokens"] == 20 * 1024
    resumed = Trainer(_cfg(cache, **cfg), tmp_path / "killed", resume=True, progress=False)
    assert resumed.step == 20
    resumed.fit()
    a, b = _log(tmp_path / "whole"), _log(tmp_path / "killed")
    assert [r["step"] for r in b] == list(range(1, 41))
    for ra, rb in zip(a, b, strict=True):
        assert ra["tokens"] == rb["tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=1e-7)
    wa, wb = (
        load_file(tmp_path / "whole/sae.safetensors"),
        load_file(tmp_path / "killed/sae.safetensors"),
    )
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


def test_schedule_free_signsgd(planted, tmp_path):
    """The default optimiser, schedule-free sign descent: per token it beats Adam and Signum with
    their schedules by far on planted features, it keeps a constant lr after warm-up, and what it
    saves (and leaves in the trainer) is its average x, not the training point y it steps from."""
    cache, features = planted
    fvu = {}
    for opt in OPTIMIZERS:
        cfg = _cfg(cache, tokens=30 * 1024, optimizer=opt)
        trainer = Trainer(cfg, tmp_path / opt, progress=False)
        (run,) = trainer.fit()
        fvu[opt] = _log(run)[-1]["fvu"]
    assert fvu["sf-signsgd"] < 0.5 * min(fvu["adam"], fvu["signum"]), fvu
    assert recovery(trainer.members[0].sae.W_dec.detach(), features).mean() > 0.9
    lrs = [r["lr"] for r in _log(run)]
    assert lrs[-1] == lrs[0] == trainer.members[0].lr  # no decay
    optimizer = trainer.members[0].optimizer
    assert not optimizer.train_mode and optimizer.param_groups[0]["lr_scale"] == 0.5
    state_dir = next((run / "state").glob("step-*"))
    state = load_file(state_dir / "sae-0.safetensors")
    sae = trainer.members[0].sae
    for pid, name in enumerate(("W_enc", "b_enc", "W_dec", "b_dec")):
        y, z = state[f"param.{name}"], state[f"opt.{pid}.z"]
        x = getattr(sae, name).detach()
        assert (x - y).abs().max() > 1e-3  # the average is not the training point
        torch.testing.assert_close(x, y.lerp(z, 1 - 1 / 0.95), rtol=1e-5, atol=1e-6)
    from sae.formats import load_sae

    saved, probe = load_sae(run), torch.randn(64, 32)
    torch.testing.assert_close(
        saved.decode(*saved.encode(probe)[:2]),
        sae.decode(*sae.encode(probe)[:2]),
        rtol=1e-4,
        atol=1e-5,
    )


def test_several_saes_from_one_stream(planted, tmp_path):
    cache, _ = planted
    trainer = Trainer(
        _cfg(cache, latents=[64, 128], ks=[4], tokens=25_600), tmp_path / "multi", progress=False
    )
    runs = trainer.fit()
    assert sorted(r.name for r in runs) == ["synthetic-n128-k4", "synthetic-n64-k4"]
    for run in runs:
        cfg = json.loads((run / "cfg.json").read_text())
        assert cfg["n_latents"] == int(run.name.split("-n")[1].split("-")[0])
        assert [r["step"] for r in _log(run)] == [20, 25]  # every 20 steps, and the last


_RANKS_SCRIPT = """
import json, sys
from hooks.selection import Selection
from sae.train import TrainConfig, Trainer
for name, kw in json.loads(sys.argv[1]).items():
    if "selection" in kw:
        kw["selection"] = Selection(**kw["selection"])
    stop = kw.pop("stop_at", None)  # train to here, then resume to the end
    if stop:
        Trainer(TrainConfig(**{**kw, "tokens": stop}), sys.argv[2] + "/" + name, progress=False).fit()
    Trainer(TrainConfig(**kw), sys.argv[2] + "/" + name, resume=bool(stop), progress=False).fit()
"""


def _parity_configs(cache, tiny_dir, text):
    # SAEWB_TEST_DEVICE=cuda:0 runs both ranks on one GPU under gloo, where NCCL refuses two.
    device = os.environ.get("SAEWB_TEST_DEVICE", "cpu")
    common = dict(latents=[128], ks=[8], tokens=4096, batch=1024, log_every=2,
                  buffer_tokens=4096, checkpoint_every=10**9, device=device)  # fmt: skip
    return {
        "topk": dict(common, cache=str(cache), sites=["synthetic"]),
        "batchtopk": dict(common, cache=str(cache), sites=["synthetic"], architecture="batchtopk"),
        # the threshold kinds' first-batch cut and L0 controller are global over ranks too
        "jumprelu": dict(common, cache=str(cache), sites=["synthetic"], architecture="jumprelu"),
        "relu": dict(common, cache=str(cache), sites=["synthetic"], architecture="relu"),
        "matryoshka": dict(common, cache=str(cache), sites=["synthetic"], architecture="matryoshka"),
        # killed after 3 of 4 steps, inside a log line: rank 0's checkpoint must hold every
        # rank's share of it, so the line after the resume equals the uninterrupted one
        "resumed": dict(common, cache=str(cache), sites=["synthetic"], stop_at=3072),
        "live": dict(common, model=str(tiny_dir), sites=["resid_post.1"], latents=[64], ks=[4],
                     tokens=3072, batch=512, buffer_tokens=2048,
                     selection=dict(dataset=str(text), context_size=32)),
    }  # fmt: skip


def test_torchrun_two_ranks_match_one_process(planted, tmp_path, tiny_dir):
    """2 gloo ranks against one process, all three configs in one torchrun launch. From a cache
    both see the same global batches, so they differ only in float summation order (the summed
    gradients and the global FVU denominators): rtol 1e-4 on weights and FVU is far below what
    a wrong reduction gives (a per-rank BatchTopK cutoff moved the weights by ~1e-2). From a live
    model each rank captures its own windows into its own buffer, so the batches differ: the
    same model, text and steps must reach a final FVU within 25% of one process's."""
    cache, _ = planted
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Story {i}: a cat sat on mat {i % 9}." for i in range(300)))
    configs = _parity_configs(cache, tiny_dir, text)
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", "29517", str(script), json.dumps(configs), str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    for name, kw in configs.items():
        if "selection" in kw:
            kw = {**kw, "selection": Selection(**kw["selection"])}
        stop = kw.pop("stop_at", None)
        Trainer(TrainConfig(**kw), tmp_path / "one" / name, progress=False).fit()
        one, two_dir = tmp_path / "one" / name, tmp_path / "two" / name
        assert json.loads((two_dir / "run.json").read_text())["world_size"] == 2
        la, lb = _log(one), _log(two_dir)
        if stop:  # the killed run's own last line
            lb = [r for r in lb if r["tokens"] != stop]
        assert [r["tokens"] for r in la] == [r["tokens"] for r in lb]
        if name == "live":
            assert lb[-1]["fvu"] == pytest.approx(la[-1]["fvu"], rel=0.25)
            assert lb[-1]["fvu"] < lb[0]["fvu"]
            continue
        wa, wb = load_file(one / "sae.safetensors"), load_file(two_dir / "sae.safetensors")
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)
        assert [r["fvu"] for r in la] == pytest.approx([r["fvu"] for r in lb], rel=1e-4)


def test_each_rank_picks_its_own_gpu():
    from sae.train.distributed import backend_for, init_world, pick_device

    two = {"WORLD_SIZE": "2", "LOCAL_RANK": "1", "RANK": "3"}
    assert pick_device("cuda", two) == torch.device("cuda", 1)  # LOCAL_RANK, not RANK
    assert pick_device("cuda", {"WORLD_SIZE": "2", "LOCAL_RANK": "0"}) == torch.device("cuda", 0)
    assert pick_device("cuda", {}) == torch.device("cuda", 0)  # set_device needs an index
    with pytest.raises(UserError, match="Unknown device 'gpu'"):
        init_world("gpu")
    assert pick_device("cuda:0", two) == torch.device("cuda", 0)  # explicit: every rank there
    assert pick_device("cpu", two) == torch.device("cpu")
    assert backend_for("cuda", {}) == "nccl"
    assert backend_for("cuda:0", {}) == "gloo"  # NCCL refuses two ranks on one GPU
    assert backend_for("cpu", {}) == "gloo"
    assert backend_for("cuda", {"SAEWB_DIST_BACKEND": "gloo"}) == "gloo"


def test_collectives_refuse_tensors_off_the_training_device():
    from sae.train import World

    world = World(rank=0, size=2, device=torch.device("meta"))
    for collective in (world.sum, world.max, world.gather):
        with pytest.raises(AssertionError, match="on cpu, but training runs on meta"):
            collective(torch.zeros(3))


def test_batchtopk_cutoff_is_global_over_ranks():
    """Two ranks (threads exchanging through a barrier) with uneven row counts keep exactly the
    activations, and track exactly the threshold, that one process keeps on the whole batch."""
    import threading

    from sae.sparsity import batch_topk

    torch.manual_seed(0)
    acts = torch.rand(40, 12).relu_() * (torch.rand(40, 12) > 0.3)  # (N, 4k) candidates
    parts = [acts[:15], acts[15:]]
    k, rate = 3, 0.01
    reference = torch.zeros(())  # each one's inference threshold, moved in place
    expected = batch_topk(acts, k, reference, rate)
    ranks = [torch.zeros(()) for _ in parts]
    barrier, slots, got = threading.Barrier(2), [None, None], [None, None]

    def exchange(rank, t, combine):
        barrier.wait()
        slots[rank] = t.clone()
        barrier.wait()
        out = combine(slots)
        barrier.wait()
        return out

    def run(rank):
        reduce = lambda t: exchange(rank, t, lambda s: s[0] + s[1])  # noqa: E731
        gather = lambda t: exchange(rank, t, torch.cat)  # noqa: E731
        got[rank] = batch_topk(parts[rank], k, ranks[rank], rate, reduce, gather)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.testing.assert_close(torch.cat(got), expected, rtol=0, atol=0)
    assert (expected > 0).sum() == 3 * 40  # the cutoff keeps k * N in all
    for threshold in ranks:
        assert float(threshold) == float(reference) > 0
    # each rank's own cutoff would keep 3 * 15 and 3 * 25 of its own: not the same set
    alone = batch_topk(parts[0], k, torch.zeros(()), rate)
    assert not torch.equal(alone, got[0])


def test_clipping_is_skipped_only_where_it_commutes(planted, tmp_path):
    """Signum's momentum sums gradients of several steps, so clipping each by its own factor
    changes the sign it follows; schedule-free sign descent takes the sign of the raw gradient."""
    from sae.config import SAEConfig
    from sae.model import SAE
    from sae.optim import Signum, clipping_commutes, make_optimizer

    sae = SAE(SAEConfig(d_in=8, n_latents=16, k=2))
    assert [clipping_commutes(make_optimizer(o, sae, 1e-3)) for o in OPTIMIZERS] == [
        False,  # adam
        False,  # signum, momentum 0.95
        True,  # sf-signsgd
    ]
    assert clipping_commutes(Signum(sae.parameters(), lr=1e-3, momentum=0.0))

    def steps(name, clip):  # three steps on gradients of different scales
        torch.manual_seed(0)
        model = SAE(SAEConfig(d_in=8, n_latents=16, k=2))
        opt = make_optimizer(name, model, 1e-2)
        for scale in (1.0, 100.0, 0.01):
            for p in model.parameters():
                p.grad = torch.randn_like(p) * scale
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            opt.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(steps("sf-signsgd", True), steps("sf-signsgd", False))
    assert not torch.equal(steps("signum", True), steps("signum", False))
    # and the trainer clips for signum: a tiny clip changes the trained weights
    weights = {}
    for clip in (0.0, 1e-6):
        cfg = _cfg(planted[0], tokens=4096, optimizer="signum", grad_clip=clip, log_every=2)
        trainer = Trainer(cfg, tmp_path / f"clip-{clip}", progress=False)
        trainer.fit()
        weights[clip] = trainer.members[0].sae.W_dec.detach().clone()
    assert not torch.equal(weights[0.0], weights[1e-6])


def test_extending_a_run_equals_an_uninterrupted_run(planted, tmp_path):
    """--resume with more tokens continues where the run stopped: no batch of the buffer is
    skipped, the values derived from the first --tokens are kept, and the first log line after
    the resume averages the same steps as the uninterrupted run's."""
    cache, _ = planted
    fixed = dict(log_every=3, buffer_tokens=2048, warmup_steps=2, dead_tokens=2048,
                 decay_frac=0.0, optimizer="adam", latents=[64], ks=[4], batch=256)  # fmt: skip
    Trainer(_cfg(cache, tokens=16 * 256, **fixed), tmp_path / "whole", progress=False).fit()
    Trainer(_cfg(cache, tokens=8 * 256, **fixed), tmp_path / "ext", progress=False).fit()
    extended = Trainer(_cfg(cache, tokens=16 * 256, **fixed), tmp_path / "ext", resume=True,
                       progress=False)  # fmt: skip
    extended.fit()
    whole, ext = _log(tmp_path / "whole"), _log(tmp_path / "ext")
    ext = [r for r in ext if r["step"] != 8]  # the first run's own last line
    assert [r["step"] for r in whole] == [r["step"] for r in ext] == [3, 6, 9, 12, 15, 16]
    for ra, rb in zip(whole, ext, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6), ra["step"]
    wa, wb = (load_file(tmp_path / d / "sae.safetensors") for d in ("whole", "ext"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


def test_resuming_a_finished_run_changes_nothing(planted, tmp_path):
    """`saewb demo` resumes its finished run on every rerun: no second last log line, no new
    checkpoint, the same weights."""
    cache, _ = planted
    Trainer(_cfg(cache, tokens=4 * 1024), tmp_path / "run", progress=False).fit()
    files = ("train_log.jsonl", "sae.safetensors")
    before = [(tmp_path / "run" / f).read_bytes() for f in files]
    states = sorted(p.name for p in (tmp_path / "run" / "state").iterdir())
    Trainer(_cfg(cache, tokens=4 * 1024), tmp_path / "run", resume=True, progress=False).fit()
    assert [(tmp_path / "run" / f).read_bytes() for f in files] == before
    assert sorted(p.name for p in (tmp_path / "run" / "state").iterdir()) == states


def test_extending_a_run_keeps_its_derived_values(planted, tmp_path):
    cache, _ = planted
    kw = dict(architecture="batchtopk", tokens=8 * 1024)
    first = Trainer(_cfg(cache, **kw), tmp_path / "run", progress=False)
    first.fit()
    more = Trainer(_cfg(cache, **{**kw, "tokens": 64 * 1024}), tmp_path / "run", resume=True,
                   progress=False)  # fmt: skip
    fresh = Trainer(_cfg(cache, **{**kw, "tokens": 64 * 1024}), tmp_path / "new", progress=False)
    assert fresh.data.buffer_tokens != first.data.buffer_tokens  # so the check below can fail
    assert fresh.dead_tokens != first.dead_tokens
    assert more.data.buffer_tokens == first.data.buffer_tokens
    assert more.dead_tokens == first.dead_tokens
    assert more.members[0].sae.threshold_lr == first.members[0].sae.threshold_lr
    saved = json.loads((tmp_path / "run/run.json").read_text())["derived"]
    assert saved["warmup_steps"] == more.derived.warmup_steps == first.derived.warmup_steps


def test_a_crash_while_publishing_leaves_a_checkpoint(planted, tmp_path, monkeypatch):
    """The run ends on a checkpoint boundary; the final checkpoint's rename fails. latest.json
    must still name a whole checkpoint, and the run resumes from it."""
    cache, _ = planted
    cfg = dict(tokens=4 * 1024, checkpoint_every=2 * 1024, log_every=1)
    real, renames = os.replace, []

    def crash_on_folders(src, dst):
        if os.path.isdir(src):
            renames.append(dst)
            if len(renames) == crash_on_folders.at:
                raise OSError("simulated crash")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_folders)
    crash_on_folders.at = 0
    Trainer(_cfg(cache, **cfg), tmp_path / "count", progress=False).fit()
    crash_on_folders.at, renames[:] = len(renames), []  # crash at the last publication
    with pytest.raises(OSError, match="simulated crash"):
        Trainer(_cfg(cache, **cfg), tmp_path / "run", progress=False).fit()
    state = tmp_path / "run/state"
    latest = json.loads((state / "latest.json").read_text())
    assert (state / latest["dir"] / "trainer.json").exists(), latest
    crash_on_folders.at = 0
    resumed = Trainer(_cfg(cache, **cfg), tmp_path / "run", resume=True, progress=False)
    resumed.fit()
    assert resumed.tokens == 4 * 1024


def test_checkpoints_are_also_bounded_in_time(planted, tmp_path):
    cache, _ = planted
    cfg = _cfg(cache, tokens=10 * 1024, log_every=2, checkpoint_seconds=1e-9)
    _kill_fit(Trainer(cfg, tmp_path / "run", progress=False), "_step", at_call=6)
    latest = json.loads((tmp_path / "run/state/latest.json").read_text())
    assert latest["tokens"] == 4 * 1024  # checkpoint_every is 10**9: time alone saved it


def test_nan_rows_are_skipped_then_abort(tmp_path):
    from hooks.cache import write_cache
    from sae.synthetic import firing_probabilities, planted_features, synthetic_rows

    features = planted_features(16, 32)
    clean = synthetic_rows(features, firing_probabilities(32, 4), chunk=1024)

    def poisoned(rate):
        def rows_after(cursor):
            for c, rows in clean(cursor):
                bad = torch.rand(len(rows), generator=torch.Generator().manual_seed(c)) < rate
                rows.acts["synthetic"][bad] = float("nan")
                yield c, rows

        return rows_after

    wanted = {
        "model": "synthetic",
        "sites": ["synthetic"],
        "d_model": 16,
        "dtype": "float32",
        "selection": None,
        "planted": "poisoned rows",
    }
    write_cache(tmp_path / "few", wanted, poisoned(0.002), 20_480, progress=False)
    write_cache(tmp_path / "many", wanted, poisoned(0.05), 20_480, progress=False)
    trainer = Trainer(
        _cfg(tmp_path / "few", latents=[32], ks=[4], tokens=10_240), tmp_path / "a", progress=False
    )
    trainer.fit()
    assert 0 < trainer.nonfinite < 0.01 * 10_240
    assert all(torch.isfinite(p).all() for p in trainer.members[0].sae.parameters())
    with pytest.raises(UserError, match=r"NaN/inf activations, over the limit of 1\.0%"):
        Trainer(
            _cfg(tmp_path / "many", latents=[32], ks=[4], tokens=10_240),
            tmp_path / "b",
            progress=False,
        ).fit()


def test_bad_training_input(planted, tmp_path):
    cache, _ = planted
    with pytest.raises(
        UserError, match=r"k must be between 1 and the number of latents \(64\), got 65"
    ):
        Trainer(_cfg(cache, latents=[64], ks=[65]), tmp_path / "a", progress=False)
    with pytest.raises(UserError, match="got 0"):
        Trainer(_cfg(cache, ks=[0]), tmp_path / "a", progress=False)
    with pytest.raises(UserError, match=r"holds sites \['synthetic'\], not 'resid_post.3'"):
        Trainer(_cfg(cache, sites=["resid_post.3"]), tmp_path / "a", progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="not writable"):
        Trainer(_cfg(cache), blocker / "run", progress=False)
    Trainer(_cfg(cache, tokens=2048), tmp_path / "done", progress=False).fit()
    with pytest.raises(UserError, match="already holds a training run"):
        Trainer(_cfg(cache, tokens=2048), tmp_path / "done", progress=False)
    with pytest.raises(UserError, match=r"trained with ks=\[8\], not \[4\]"):
        Trainer(_cfg(cache, tokens=2048, ks=[4]), tmp_path / "done", resume=True, progress=False)
    with pytest.raises(UserError, match="holds no checkpoint"):
        Trainer(_cfg(cache), tmp_path / "fresh", resume=True, progress=False)


def test_batchtopk_and_multi_topk_train(planted, tmp_path):
    cache, features = planted
    trainer = Trainer(
        _cfg(cache, architecture="batchtopk", multi_topk=True, tokens=100_000),
        tmp_path / "btk",
        progress=False,
    )
    (run,) = trainer.fit()
    sae = trainer.members[0].sae.eval()
    assert float(sae.threshold) > 0
    assert recovery(sae.W_dec.detach(), features).mean() > 0.8
    x = next(iter(trainer.data)).acts["synthetic"][:512]
    acts, _ = sae.encode(x)[:2]  # inference: JumpReLU at the tracked threshold
    assert 4 < float((acts > 0).sum(1).float().mean()) < 16  # about k = 8 on average
    from sae.formats import load_sae

    saved = load_sae(run)
    torch.testing.assert_close(saved.encode(x)[0], acts, rtol=1e-4, atol=1e-5)


def test_train_from_a_live_model_cli(tmp_path, tiny_dir, capsys):
    from saewb_cli import main

    text = tmp_path / "text.txt"
    text.write_text(
        "\n\n".join(f"Story {i}: the cat sat on the mat, {i % 7} dogs ran." for i in range(400))
    )
    from conftest import tiny_train_argv

    argv = tiny_train_argv(tiny_dir, text, tmp_path / "run", tokens=6144, log_every=2)
    assert main(argv) == 0, capsys.readouterr().err
    log = _log(tmp_path / "run")
    assert log[-1]["tokens"] >= 6144 and log[-1]["fvu"] < log[0]["fvu"]
    run = json.loads((tmp_path / "run/run.json").read_text())
    assert run["model"] == str(tiny_dir) and run["site"] == "resid_post.1"
    assert "tokens" in capsys.readouterr().out


def test_dense_auxk_path_matches_the_sparse_kernel():
    """With no more dead latents than k_aux, AuxK runs as dense GEMMs over the dead columns;
    values and gradients must equal the sparse kernel's selection of all dead latents."""
    import copy

    from sae.config import SAEConfig
    from sae.kernels import sparse_decode, topk_encode
    from sae.model import SAE
    from sae.statistics import variance

    torch.manual_seed(0)
    dense = SAE(SAEConfig(d_in=32, n_latents=256, k=8, k_aux=40))
    x = torch.randn(300, 32) * 3 + 1
    dense.init_from_sample(x)
    dead = torch.zeros(256, dtype=torch.bool)
    dead[torch.randperm(256)[:40]] = True
    sparse = copy.deepcopy(dense)
    out = dense(x, dead)
    out.aux_loss.backward()

    xs = x * sparse.input_scale
    enc = topk_encode(xs - sparse.b_dec, sparse.W_enc, sparse.b_enc, 8, dead, k_aux=40)
    recon = sparse_decode(enc.top_acts, enc.top_idx, sparse.W_dec) + sparse.b_dec
    residual = (xs - recon).detach()
    aux = sparse_decode(enc.aux_acts, enc.aux_idx, sparse.W_dec)
    loss = (residual - aux).pow(2).sum() / variance(residual)
    loss.backward()
    torch.testing.assert_close(out.aux_loss, loss)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(
            getattr(dense, name).grad, getattr(sparse, name).grad, rtol=1e-4, atol=1e-6
        )


def test_live_run_captures_only_what_it_trains_on(tmp_path, tiny_dir):
    """Live data stops once the run's rows are all in the buffer: no last buffer-full is captured
    for nothing, and a killed run resumes with the same count (same weights as uninterrupted)."""
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Story {i}: a cat sat on mat {i % 9}." for i in range(600)))
    base = dict(model=str(tiny_dir), sites=["resid_post.1"], latents=[64], ks=[4],
                tokens=6144, batch=512, selection=Selection(dataset=str(text), context_size=32),
                buffer_tokens=2048,
                log_every=1, checkpoint_every=10**9)  # fmt: skip
    whole = Trainer(TrainConfig(**base), tmp_path / "whole", progress=False)
    whole.fit()
    data = whole.data
    assert data.rows_needed == 6144
    per_forward = TrainConfig().model_batch * 31  # rows of one model forward at most
    assert data.rows_needed <= data.captured < data.rows_needed + per_forward
    killed = Trainer(TrainConfig(**{**base, "checkpoint_every": 2048}), tmp_path / "cut",
                     progress=False)  # fmt: skip
    _kill_fit(killed, "_step", at_call=9)  # after two checkpoints
    resumed = Trainer(TrainConfig(**{**base, "checkpoint_every": 2048}), tmp_path / "cut",
                      resume=True, progress=False)  # fmt: skip
    resumed.fit()
    assert resumed.data.captured == data.captured
    a, b = whole.members[0].sae, resumed.members[0].sae
    torch.testing.assert_close(b.W_dec, a.W_dec, rtol=1e-5, atol=1e-6)
