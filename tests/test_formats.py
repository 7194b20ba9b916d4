"""Checkpoint formats: native / SAELens / sparsify round trips, layouts, atomicity, bad input."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file, save_file

import hooks.paths
from hooks.errors import UserError
from hooks.sites import Capture
from sae.formats import (
    detect_format,
    export_saelens,
    export_sparsify,
    load_sae,
    saelens_hook_name,
    save_sae,
)
from sae.model import SAE, SAEConfig

D, N, K = 16, 64, 4
HOOK = "model.layers.3"  # resid_post.3 of a Llama, as SAELens's HF wrapper names it
export_lens = partial(export_saelens, hook_module=HOOK)  # make_sae's model "tiny" is no model
WRITERS = {"saewb": save_sae, "saelens": export_lens, "sparsify": export_sparsify}


def make_sae(arch="topk", scale=3.7, seed=0, d=D) -> SAE:
    """Random weights, non-zero biases, an input scale != 1 and a BatchTopK threshold."""
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d, N, K, architecture=arch, model="tiny", site="resid_post.3"))
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g))
        sae.input_scale.fill_(scale)
        sae.threshold.fill_(0.25)
    return sae.eval()


@pytest.fixture
def x():
    return torch.randn(128, D, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


def run(sae: SAE, x):
    """Dense activations (N, n) and the reconstruction."""
    acts, idx = sae.encode(x)[:2]
    return torch.zeros(len(x), sae.cfg.n_latents).scatter_(1, idx, acts), sae.decode(acts, idx)


def assert_same(a: SAE, b: SAE, x):
    (acts_a, rec_a), (acts_b, rec_b) = run(a, x), run(b, x)
    assert ((acts_a > 0) == (acts_b > 0)).all(), "different latents fire"
    torch.testing.assert_close(acts_a, acts_b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rec_a, rec_b, rtol=1e-4, atol=1e-4)


def user_error(fn, *args) -> str:
    with pytest.raises(UserError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith("."), msg  # one sentence
    return msg


# -- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", WRITERS)
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("scale", [1.0, 3.7])
def test_round_trip(tmp_path, x, fmt, arch, scale):
    sae = make_sae(arch, scale)
    if fmt == "sparsify" and arch == "batchtopk":
        with pytest.raises(UserError, match="no thresholded"):
            export_sparsify(sae, tmp_path)
        assert not (tmp_path / "sae.safetensors").exists()
        return
    WRITERS[fmt](sae, tmp_path)
    loaded = load_sae(tmp_path)
    assert detect_format(tmp_path) == fmt
    assert_same(sae, loaded, x)
    assert not loaded.training and float(loaded.input_scale) == 1.0
    assert (loaded.cfg.d_in, loaded.cfg.n_latents, loaded.cfg.k) == (D, N, K)
    if fmt != "sparsify":
        assert loaded.cfg.architecture == arch
        assert (loaded.cfg.model, loaded.cfg.site) == ("tiny", "resid_post.3")
        assert float(loaded.threshold) == (0.25 if arch == "batchtopk" else 0.0)


def test_round_trip_when_few_latents_are_positive(tmp_path, x):
    """Tokens with fewer than k positive pre-activations: the padding slots are zeros."""
    sae = make_sae()
    with torch.no_grad():
        sae.b_enc.fill_(-60.0)
    assert (run(sae, x)[0] > 0).sum(1).min() < K  # the case really occurs
    for fmt, write in WRITERS.items():
        write(sae, tmp_path / fmt)
        assert_same(sae, load_sae(tmp_path / fmt), x)


def test_native_layout(tmp_path):
    sae = make_sae("batchtopk")
    save_sae(sae, tmp_path, extra_cfg={"tokens": 123, "format": "not-this"})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["format"] == "saewb" and cfg["version"] == 1 and cfg["tokens"] == 123
    assert cfg["d_in"] == D and cfg["n_latents"] == N and cfg["architecture"] == "batchtopk"
    w = load_file(tmp_path / "sae.safetensors")
    assert set(w) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    torch.testing.assert_close(w["W_enc"], sae.W_enc.detach() * 3.7)  # folded
    torch.testing.assert_close(w["W_dec"], sae.W_dec.detach() / 3.7)
    torch.testing.assert_close(w["b_dec"], sae.b_dec.detach() / 3.7)
    assert w["threshold"].shape == (N,) and (w["threshold"] == 0.25).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae.safetensors"]


def test_saelens_layout(tmp_path):
    sae = make_sae()
    frac = torch.rand(N, generator=torch.Generator().manual_seed(2))
    frac[0] = 0.0
    llama = make_model("llama", 64)  # the module tree the hook name is read from
    export_saelens(sae, tmp_path, sparsity=frac, model=llama, metadata={"dataset_path": "d"})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == K
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["device"]) == (D, N, "float32", "cpu")
    assert cfg["apply_b_dec_to_input"] is True and cfg["rescale_acts_by_decoder_norm"] is False
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    meta = cfg["metadata"]
    # SAELens's HF wrapper hooks the module named hook_name: the site's module path, not ours
    assert meta["hook_name"] == meta["hf_hook_name"] == HOOK
    assert meta["saewb_site"] == "resid_post.3" and meta["saewb_model"] == "tiny"
    assert meta["model_name"] == "tiny" and meta["hook_head_index"] is None
    assert meta["model_class_name"] == "AutoModelForCausalLM" and meta["dataset_path"] == "d"
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6  # else SAELens rewrites the cfg
    for key in ("context_size", "prepend_bos", "dataset_path", "model_class_name"):
        assert key in meta
    w = load_file(tmp_path / "sae_weights.safetensors")
    assert {k: tuple(v.shape) for k, v in w.items()} == {
        "W_enc": (D, N),
        "b_enc": (N,),
        "W_dec": (N, D),
        "b_dec": (D,),
    }
    sparsity = load_file(tmp_path / "sparsity.safetensors")["sparsity"]
    torch.testing.assert_close(sparsity, torch.log10(frac + 1e-10))
    assert math.isclose(float(sparsity[0]), -10.0)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_saelens_hook_name_is_the_module_whose_output_is_the_site(arch):
    """Checked by value: the named module's output (what SAELens's wrapper hooks, output[0] of
    a tuple) is what our Capture records for the site."""
    model = make_model(arch, 64)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    modules = dict(model.named_modules())
    for site in ("resid_post.2", "resid_pre.2", "mlp_out.1", "attn_out.1", "resid_post.3"):
        name = saelens_hook_name(site, model)
        seen = {}

        def record(module, args, out, seen=seen):
            seen["x"] = out[0] if isinstance(out, tuple) else out

        handle = modules[name].register_forward_hook(record)
        with torch.no_grad():
            model(ids)
        handle.remove()
        with Capture(model, [site]) as capture:
            torch.testing.assert_close(seen["x"], capture(ids)[site], rtol=0, atol=0)
    assert saelens_hook_name("resid_pre.2", model).endswith(".1")  # block 1 feeds block 2
    assert "hook_module=" in user_error(saelens_hook_name, "resid_pre.0", model)


def test_saelens_hook_name_refuses_a_site_no_module_outputs():
    """Bloom's attention adds the residual to its own output: attn_out is that less its input."""
    bloom = make_model("bloom", 64)
    assert saelens_hook_name("resid_post.1", bloom) == "transformer.h.1"
    msg = user_error(saelens_hook_name, "attn_out.1", bloom)
    assert "less its residual input" in msg and "hook_module=" in msg


def test_saelens_export_reads_the_module_tree_from_the_models_folder(tmp_path, tiny_dir):
    """No model passed: the hook name comes from the run's model folder, built without weights;
    a model that cannot be read is one sentence naming the way out."""
    sae = SAE(SAEConfig(D, N, K, model=str(tiny_dir), site="mlp_out.2"))
    export_saelens(sae, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "model.layers.2.mlp" and meta["model_name"] == str(tiny_dir)
    assert load_sae(tmp_path / "a").cfg.site == "mlp_out.2"  # our name comes back
    gone = SAE(SAEConfig(D, N, K, model=str(tmp_path / "gone"), site="resid_post.3"))
    msg = user_error(export_saelens, gone, tmp_path / "b")  # a path: no hub lookup either
    assert "gone'" in msg and "hook_module=" in msg and not (tmp_path / "b").exists()


def test_third_party_saelens_hook_name_is_the_site(tmp_path):
    export_lens(make_sae(), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    for key in ("saewb_site", "saewb_model"):
        del cfg["metadata"][key]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert (load_sae(tmp_path).cfg.site, load_sae(tmp_path).cfg.model) == (HOOK, "tiny")


def test_saelens_batchtopk_is_jumprelu(tmp_path):
    export_lens(make_sae("batchtopk"), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["k"] == K
    assert "rescale_acts_by_decoder_norm" not in cfg
    w = load_file(tmp_path / "sae_weights.safetensors")
    assert w["threshold"].shape == (N,) and (w["threshold"] == 0.25).all()
    assert not (tmp_path / "sparsity.safetensors").exists()


def test_saelens_sparsity_must_be_fractions(tmp_path):
    log10 = torch.full((N,), -3.0)
    assert "[-3, -3]" in user_error(export_lens, make_sae(), tmp_path, log10)
    assert "(3,)" in user_error(export_lens, make_sae(), tmp_path, torch.zeros(3))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_sparsify_layout(tmp_path):
    sae = make_sae(scale=2.0)
    export_sparsify(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg == {
        "activation": "topk", "expansion_factor": N // D, "normalize_decoder": False,
        "num_latents": N, "k": K, "multi_topk": False, "skip_connection": False,
        "transcode": False, "d_in": D,
    }  # fmt: skip
    w = load_file(tmp_path / "sae.safetensors")
    assert set(w) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    torch.testing.assert_close(w["encoder.weight"], (sae.W_enc.detach() * 2.0).T)
    torch.testing.assert_close(w["encoder.bias"], sae.b_enc.detach())
    # unit-norm decoder rows and no input scale: sparsify may keep renormalising them
    sae = make_sae(scale=1.0)
    sae.set_decoder_norm_to_unit_norm()
    export_sparsify(sae, tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["normalize_decoder"] is True


def test_saelens_rescale_and_no_b_dec_input_are_folded(tmp_path, x):
    """Third-party SAELens files: rescale_acts_by_decoder_norm / apply_b_dec_to_input=False."""
    g = torch.Generator().manual_seed(3)
    w = {"W_enc": torch.randn(D, N, generator=g), "b_enc": torch.randn(N, generator=g),
         "W_dec": torch.randn(N, D, generator=g) * 3, "b_dec": torch.randn(D, generator=g)}  # fmt: skip
    cfg = {"d_in": D, "d_sae": N, "k": K, "architecture": "topk", "apply_b_dec_to_input": False,
           "rescale_acts_by_decoder_norm": True, "normalize_activations": "none",
           "metadata": {"sae_lens_version": "6.0.0"}}  # fmt: skip
    save_file(w, tmp_path / "sae_weights.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    # SAELens's SAE.encode / decode, written out
    norms = w["W_dec"].norm(dim=1)
    pre = (x @ w["W_enc"] + w["b_enc"]) * norms
    top = pre.topk(K, dim=1)
    acts = torch.zeros_like(pre).scatter_(1, top.indices, top.values.relu())
    recon = (acts / norms) @ w["W_dec"] + w["b_dec"]
    got_acts, got_recon = run(load_sae(tmp_path), x)
    torch.testing.assert_close(got_acts, acts, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_recon, recon, rtol=1e-4, atol=1e-4)


# -- atomicity ------------------------------------------------------------------------------


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, x, monkeypatch):
    old = make_sae(seed=0)
    save_sae(old, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(fd):  # the data is in the temp file, not yet durable: the "disk" fails
        raise OSError("disk full")

    monkeypatch.setattr(hooks.paths.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        save_sae(make_sae(seed=1, d=32), tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files left
    assert_same(old, load_sae(tmp_path), x)


def test_crash_between_the_two_files_is_reported(tmp_path, monkeypatch):
    """The weights are replaced, cfg.json is not: load_sae names the mismatch, never crashes."""
    save_sae(make_sae(), tmp_path)
    real_write = hooks.paths.atomic_write_bytes

    def write(path, data):
        if path.name == "cfg.json":
            raise OSError("killed")
        real_write(path, data)

    monkeypatch.setattr("sae.formats.atomic_write_bytes", write)
    monkeypatch.setattr(hooks.paths, "atomic_write_bytes", write)
    with pytest.raises(OSError, match="killed"):
        save_sae(make_sae(d=32), tmp_path)
    msg = user_error(load_sae, tmp_path)
    assert "(32, 64)" in msg and "d_in=16" in msg


# -- detection and bad input ----------------------------------------------------------------


def test_file_paths_and_run_folders(tmp_path, x):
    sae = make_sae()
    export_lens(sae, tmp_path / "lens")
    assert detect_format(tmp_path / "lens" / "sae_weights.safetensors") == "saelens"
    assert_same(sae, load_sae(tmp_path / "lens" / "cfg.json"), x)
    run_dir = tmp_path / "run"
    export_sparsify(sae, run_dir / "layers.3")
    (run_dir / "best").mkdir()  # sparsify's best/ folder is not a hookpoint
    assert detect_format(run_dir) == "sparsify"
    assert_same(sae, load_sae(run_dir), x)
    export_sparsify(make_sae(seed=1), run_dir / "layers.5")
    msg = user_error(load_sae, run_dir)
    assert "2 hookpoints" in msg and "layers.3, layers.5" in msg
    assert "layers.5" in user_error(detect_format, run_dir)


def test_missing_and_unknown_folders(tmp_path):
    assert "nope" in user_error(load_sae, tmp_path / "nope")
    assert "nothing" in user_error(detect_format, tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "sae.safetensors").write_bytes(b"")  # sparsify-named but unreadable
    assert "sae.safetensors" in user_error(load_sae, tmp_path)
    (tmp_path / "sae.safetensors").unlink()
    msg = user_error(load_sae, tmp_path)
    assert "notes.txt" in msg and "sae_weights.safetensors" in msg


@pytest.mark.parametrize("fmt", WRITERS)
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tmp_path, fmt, damage):
    WRITERS[fmt](make_sae(), tmp_path)
    file = tmp_path / ("sae_weights.safetensors" if fmt == "saelens" else "sae.safetensors")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    msg = user_error(load_sae, tmp_path)
    assert str(file) in msg and "not a readable safetensors file" in msg


@pytest.mark.parametrize("fmt", WRITERS)
def test_bad_json(tmp_path, fmt):
    WRITERS[fmt](make_sae(), tmp_path)
    (tmp_path / "cfg.json").write_text('{"d_in": 16,')
    assert "cfg.json is not valid JSON" in user_error(load_sae, tmp_path)
    (tmp_path / "cfg.json").write_text("[1, 2]")
    assert "JSON object" in user_error(load_sae, tmp_path)


@pytest.mark.parametrize(
    "fmt, file, key",
    [
        ("saewb", "sae.safetensors", "b_dec"),
        ("saelens", "sae_weights.safetensors", "W_dec"),
        ("sparsify", "sae.safetensors", "encoder.bias"),
    ],
)
def test_missing_tensor(tmp_path, fmt, file, key):
    WRITERS[fmt](make_sae(), tmp_path)
    w = load_file(tmp_path / file)
    del w[key]
    save_file(w, tmp_path / file)
    msg = user_error(load_sae, tmp_path)
    assert f"no tensor '{key}'" in msg and f"(it has: {', '.join(sorted(w))})" in msg


def test_missing_threshold(tmp_path):
    export_lens(make_sae("batchtopk"), tmp_path)
    w = load_file(tmp_path / "sae_weights.safetensors")
    del w["threshold"]
    save_file(w, tmp_path / "sae_weights.safetensors")
    assert "no tensor 'threshold'" in user_error(load_sae, tmp_path)


@pytest.mark.parametrize("fmt", WRITERS)
def test_shape_mismatch(tmp_path, fmt):
    WRITERS[fmt](make_sae(), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["d_in"] = 24
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    msg = user_error(load_sae, tmp_path)
    assert "d_in=24" in msg and "16" in msg


def edit_cfg(path, **changes):
    cfg = json.loads((path / "cfg.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "cfg.json").write_text(json.dumps(cfg))


def test_unsupported_configs(tmp_path):
    lens, sparse, native = tmp_path / "lens", tmp_path / "sparse", tmp_path / "native"
    export_lens(make_sae("batchtopk"), lens)
    export_sparsify(make_sae(), sparse)
    save_sae(make_sae(), native)
    edit_cfg(lens, k=None)
    assert "no 'k' entry" in user_error(load_sae, lens)
    edit_cfg(lens, k=K, architecture="gated")
    msg = user_error(load_sae, lens)
    assert "'gated'" in msg and "'topk'" in msg and "'jumprelu'" in msg
    edit_cfg(lens, architecture="jumprelu", normalize_activations="layer_norm")
    assert "normalize_activations='layer_norm'" in user_error(load_sae, lens)
    edit_cfg(lens, normalize_activations="none")
    w = load_file(lens / "sae_weights.safetensors")
    w["threshold"][3] = 1.0
    save_file(w, lens / "sae_weights.safetensors")
    assert "per-latent JumpReLU thresholds" in user_error(load_sae, lens)
    edit_cfg(sparse, activation="groupmax")
    assert "activation='groupmax'" in user_error(load_sae, sparse)
    edit_cfg(native, version=2)
    assert "version 2" in user_error(load_sae, native)
    edit_cfg(native, version=1, architecture="gated")
    assert "'gated'" in user_error(load_sae, native)
    edit_cfg(native, architecture="topk", d_in=None)
    assert "d_in" in user_error(load_sae, native)
