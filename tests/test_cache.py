import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hooks import cache as cache_mod
from hooks.cache import ActivationCache, harvest
from hooks.errors import UserError
from hooks.selection import Selection
from hooks.text import Document
from hooks.windows import WindowSpec, iter_windows

SITES = ["resid_post.1", "mlp_out.2"]
SELECTION = Selection(dataset="fixture", context_size=16)


def _windows(tokenizer, interrupt_after=None):
    words = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu " * 3).split()
    docs = [Document(i, "", " ".join(words[i % 7 :] + [str(i)])) for i in range(200)]
    for i, w in enumerate(iter_windows(docs, tokenizer, WindowSpec(context_size=16))):
        if interrupt_after is not None and i == interrupt_after:
            raise KeyboardInterrupt
        yield w


def _harvest(loaded, out, n, interrupt_after=None, sites=SITES, selection=SELECTION, **kw):
    return harvest(
        loaded,
        sites,
        _windows(loaded.tokenizer, interrupt_after),
        n,
        out,
        selection,
        batch_windows=4,
        shard_tokens=100,
        progress=False,
        **kw,
    )


def _all_rows(path):
    cache = ActivationCache(path)
    shards = [cache.read_shard(i) for i in range(len(cache.manifest["shards"]))]
    return {k: torch.cat([s.to_tensors()[k] for s in shards]) for k in shards[0].to_tensors()}


def test_harvest_writes_exact_rows_with_provenance(tiny_llama, tmp_path):
    manifest = _harvest(tiny_llama, tmp_path / "c", 1000)
    assert manifest["tokens"] == 1000 and manifest["complete"]
    assert sum(s["rows"] for s in manifest["shards"]) == 1000
    saved = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert saved["d_model"] == 32 and saved["sites"] == SITES and saved["dtype"] == "float32"
    rows = _all_rows(tmp_path / "c")
    assert rows["resid_post.1"].shape == (1000, 32)
    key = rows["doc"].long() * 100_000 + rows["pos"].long()
    assert key.unique().numel() == 1000  # no duplicate token
    # The stored activation is what a fresh forward of that window gives at that position.
    first = next(_windows(tiny_llama.tokenizer))
    from hooks.sites import Capture

    with Capture(tiny_llama.model, ["resid_post.1"]) as cap:
        acts = cap(first.tokens[None])["resid_post.1"][0]
    in_first = (rows["window"] == 0).nonzero().flatten()
    for r in in_first.tolist():
        t = (first.pos == rows["pos"][r]).nonzero().item()
        assert first.tokens[t] == rows["token"][r]
        torch.testing.assert_close(rows["resid_post.1"][r], acts[t])


@pytest.mark.parametrize("cut", [3, 10, 27])
def test_killed_harvest_resumes_to_the_same_cache(tiny_llama, tmp_path, cut):
    whole = _all_rows(_harvest(tiny_llama, tmp_path / "a", 1000) and tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _harvest(tiny_llama, tmp_path / "b", 1000, interrupt_after=cut)
    _harvest(tiny_llama, tmp_path / "b", 1000)
    resumed = _all_rows(tmp_path / "b")
    assert resumed.keys() == whole.keys()
    for k in whole:
        assert torch.equal(resumed[k], whole[k]), k


def test_sigkilled_harvest_process_resumes(tiny_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(
        "\n\n".join(f"Paragraph {i}: the cat sat on the mat with the dog." for i in range(600))
    )
    out = tmp_path / "cache"
    cmd = [
        sys.executable,
        "-m",
        "saewb_cli",
        "harvest",
        "--model",
        str(tiny_dir),
        "--site",
        "resid_post.1",
        "--tokens",
        "6000",
        "--cache",
        str(out),
        "--dataset",
        str(text),
        "--context",
        "32",
        "--batch",
        "2",
        "--shard-tokens",
        "200",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        manifest = out / "manifest.json"
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = json.loads((out / "manifest.json").read_text())
    assert not before["complete"] and 0 < before["tokens"] < 6000
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = _all_rows(out)
    key = rows["doc"].long() * 100_000 + rows["pos"].long()
    assert rows["token"].numel() == 6000 and key.unique().numel() == 6000


def test_disk_failure_mid_shard_keeps_finished_shards(tiny_llama, tmp_path, monkeypatch):
    real_save = cache_mod.save_file
    calls = {"n": 0}

    def failing_save(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:
            with open(path, "wb") as f:
                f.write(b"half a shard")
            raise OSError(28, "No space left on device")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(cache_mod, "save_file", failing_save)
    with pytest.raises(UserError, match="2 finished shards are intact"):
        _harvest(tiny_llama, tmp_path / "c", 1000)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "manifest.json",
        "shard_00000.safetensors",
        "shard_00001.safetensors",
    ]
    monkeypatch.setattr(cache_mod, "save_file", real_save)
    assert _harvest(tiny_llama, tmp_path / "c", 1000)["tokens"] == 1000


def test_reader_streams_every_row_once_in_seeded_order(tiny_llama, tmp_path):
    _harvest(tiny_llama, tmp_path / "c", 1000)
    cache = ActivationCache(tmp_path / "c")
    cache.check(model="tiny-llama", site="mlp_out.2", d_model=32)
    batches = list(cache.batches(batch_size=50, seed=1, buffer_tokens=300))
    again = list(cache.batches(batch_size=50, seed=1, buffer_tokens=300))
    keys = torch.cat([b.doc.long() * 100_000 + b.pos.long() for b in batches])
    assert keys.numel() == 1000 and keys.unique().numel() == 1000
    assert all(
        torch.equal(a.acts["mlp_out.2"], b.acts["mlp_out.2"]) for a, b in zip(batches, again)
    )
    two = list(cache.batches(batch_size=50, seed=1, buffer_tokens=300, epochs=2))
    assert len(two) == 40


def test_mismatches_and_bad_caches_are_refused(tiny_llama, tmp_path):
    _harvest(tiny_llama, tmp_path / "c", 300)
    cache = ActivationCache(tmp_path / "c")
    with pytest.raises(UserError, match="model 'tiny-llama', not 'smollm2-135m'"):
        cache.check(model="smollm2-135m")
    with pytest.raises(UserError, match="not 'resid_post.3'"):
        cache.check(site="resid_post.3")
    with pytest.raises(UserError, match="width 32, not 576"):
        cache.check(d_model=576)
    with pytest.raises(UserError, match="sites=.*choose another --cache"):
        _harvest(tiny_llama, tmp_path / "c", 600, sites=["resid_post.0"])
    kept_first = Selection(dataset="fixture", context_size=16, drop_first=False)
    with pytest.raises(UserError, match="drop_first=True, not False; choose another --cache"):
        _harvest(tiny_llama, tmp_path / "c", 600, selection=kept_first)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        ActivationCache(tmp_path / "junk")
    with pytest.raises(UserError, match="no manifest.json"):
        ActivationCache(tmp_path)
    (tmp_path / "c" / "shard_00000.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="missing or corrupt"):
        cache.read_shard(0)


def test_transformerlens_site_names_are_stored_as_ours(tiny_llama, tmp_path):
    from sae.train import TrainConfig

    manifest = _harvest(tiny_llama, tmp_path / "c", 100, sites=["blocks.1.hook_resid_post"])
    assert manifest["sites"] == ["resid_post.1"]
    assert ActivationCache(tmp_path / "c").read_shard(0).acts["resid_post.1"].shape[1] == 32
    assert TrainConfig(sites=["blocks.2.hook_mlp_out"]).sites == ["mlp_out.2"]
