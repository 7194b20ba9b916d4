"""Checkpoint formats: native / SAELens / sparsify round trips of every kind, SAE and
transcoder, layouts, atomicity, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import CONFIGS, make_model
from safetensors.torch import load_file, save_file

import hooks.paths
from hooks.errors import UserError
from hooks.sites import Capture
from sae.config import ARCHITECTURES, BATCH_KINDS, SAEConfig
from sae.formats import (
    detect_format,
    export_saelens,
    export_sparsify,
    load_sae,
    saelens_hook_name,
    save_sae,
)
from sae.model import SAE

D, N, K, D_OUT = 16, 64, 4, 24
HOOK = "model.layers.3"  # resid_post.3 of a Llama, as SAELens's HF wrapper names it
HOOK_IN, HOOK_OUT = "model.layers.3.post_attention_layernorm", "model.layers.3.mlp"  # mlp_in/out
# SAE, and transcoders mlp_in.3 -> mlp_out.3 of one width (sparsify's) or two, with a skip or not
SHAPES = {
    "sae": {},
    "tc": dict(target="mlp_out.3"),
    "tc_skip": dict(target="mlp_out.3", skip=True),
    "tc_wide": dict(target="mlp_out.3", d_out=D_OUT),
    "tc_wide_skip": dict(target="mlp_out.3", d_out=D_OUT, skip=True),
}


def export_lens(sae: SAE, out_dir, *args, **kwargs) -> None:
    """export_saelens with the module paths given: make_sae's model "tiny" is no model."""
    hooks = dict(hook_module=HOOK_IN, hook_module_out=HOOK_OUT) if sae.cfg.is_transcoder else {}
    export_saelens(sae, out_dir, *args, **{"hook_module": HOOK, **hooks, **kwargs})


WRITERS = {"saewb": save_sae, "saelens": export_lens, "sparsify": export_sparsify}


def inputs(n: int = 128, d: int = D, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def pre_activations(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """(N, n) pre-activations in the scaled units the thresholds are in, written out."""
    xs = x * sae.input_scale
    if not sae.cfg.is_transcoder:
        xs = xs - sae.b_dec
    return xs @ sae.W_enc + sae.b_enc


def make_sae(arch="topk", scale=3.7, seed=0, d=D, shape="sae") -> SAE:
    """Trained-looking random weights: non-zero biases, input (and output) scales != 1, and each
    kind's cut set from a sample so that about K of the N latents fire per token: ReLU's b_enc,
    JumpReLU's per-latent thresholds (> 0), the batch kinds' one threshold."""
    opts = SHAPES[shape]
    site = "mlp_in.3" if opts else "resid_post.3"
    sae = SAE(SAEConfig(d, N, K, architecture=arch, model="tiny", site=site, **opts))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip"):
            if hasattr(sae, name):
                p = getattr(sae, name)
                p.copy_(torch.randn(p.shape, generator=g))
        sae.input_scale.fill_(scale)
        if sae.cfg.is_transcoder:
            sae.output_scale.fill_(1.9)
        pre = pre_activations(sae, inputs(512, d, seed + 100))  # (512, N)
        cut = pre.quantile(1 - K / N, dim=0)  # (N,): each latent fires on K / N of the sample
        if arch == "relu":
            sae.b_enc.sub_(cut)
        elif arch == "jumprelu":
            sae.log_threshold.copy_(cut.clamp_min(0.05).log())
        elif arch in BATCH_KINDS:
            sae.threshold.fill_(float(pre.flatten().topk(K * len(pre)).values[-1]))
    return sae.eval()


@pytest.fixture
def x():
    return inputs()


def run(sae: SAE, x):
    """Dense activations (N, n) and the output (N, d_out), the skip connection included.
    scatter_add: a threshold kind's padding slots (act 0 at latent 0) add nothing."""
    recon, acts, idx = sae.reconstruct(x)
    return torch.zeros(len(x), sae.cfg.n_latents).scatter_add_(1, idx, acts), recon


def assert_same(a: SAE, b: SAE, x):
    (acts_a, rec_a), (acts_b, rec_b) = run(a, x), run(b, x)
    assert ((acts_a > 0) == (acts_b > 0)).all(), "different latents fire"
    torch.testing.assert_close(acts_a, acts_b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rec_a, rec_b, rtol=1e-4, atol=1e-4)


def user_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith("."), msg  # one sentence
    return msg


def refusal(fmt: str, cfg: SAEConfig) -> str | None:
    """What the writer says when the format cannot hold this SAE, or None."""
    if fmt == "saelens" and cfg.architecture == "topk" and cfg.is_transcoder:
        return "export it with export_sparsify"
    if fmt == "sparsify" and cfg.architecture != "topk":
        return "sparsify has only TopK activations"
    if fmt == "sparsify" and cfg.d_out != cfg.d_in:
        return "one width for its input and output"
    return None


# -- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", WRITERS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip(tmp_path, x, fmt, arch, shape):
    sae = make_sae(arch, shape=shape)
    out = tmp_path / "layers.3.mlp"  # sparsify's hookpoint name: load_sae reads the sites from it
    if reason := refusal(fmt, sae.cfg):
        assert reason in user_error(WRITERS[fmt], sae, out)
        assert not out.exists()
        return
    WRITERS[fmt](sae, out)
    loaded = load_sae(out)
    assert detect_format(out) == fmt
    acts = run(sae, x)[0]
    assert 0 < (acts > 0).sum(1).float().mean() <= sae.cfg.inference_width  # not degenerate
    assert_same(sae, loaded, x)
    assert not loaded.training and float(loaded.input_scale) == 1.0
    want, got = sae.cfg, loaded.cfg
    assert (got.d_in, got.n_latents, got.k, got.d_out, got.skip) == (D, N, K, want.d_out, want.skip)
    assert (got.site, got.target) == (
        (want.site, want.target) if fmt != "sparsify" or want.is_transcoder else ("", "")
    )
    if fmt == "sparsify":
        return
    assert (got.architecture, got.prefixes, got.model) == (arch, want.prefixes, "tiny")
    torch.testing.assert_close(loaded.latent_threshold(), sae.latent_threshold())
    if want.is_transcoder:
        assert float(loaded.output_scale) == 1.0


def test_round_trip_keeps_an_input_scale_of_one(tmp_path, x):
    for fmt, write in WRITERS.items():
        sae = make_sae("topk", scale=1.0)
        write(sae, tmp_path / fmt)
        assert_same(sae, load_sae(tmp_path / fmt), x)


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
    assert w["threshold"].shape == (N,) and (w["threshold"] == float(sae.threshold)).all()
    assert float(sae.threshold) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae.safetensors"]


def test_native_layout_of_a_skip_transcoder(tmp_path):
    sae = make_sae("jumprelu", shape="tc_wide_skip")
    save_sae(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert (cfg["target"], cfg["d_out"], cfg["skip"]) == ("mlp_out.3", D_OUT, True)
    w = load_file(tmp_path / "sae.safetensors")
    assert {k: tuple(v.shape) for k, v in w.items()} == {
        "W_enc": (D, N), "b_enc": (N,), "W_dec": (N, D_OUT), "b_dec": (D_OUT,),
        "W_skip": (D, D_OUT), "threshold": (N,),
    }  # fmt: skip
    # folded: (x s) W_skip / s_out, the output scale out of the decoder too
    torch.testing.assert_close(w["W_skip"], sae.W_skip.detach() * 3.7 / 1.9)
    torch.testing.assert_close(w["W_dec"], sae.W_dec.detach() / 1.9)
    torch.testing.assert_close(w["threshold"], sae.log_threshold.detach().exp())


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
    for site in (
        "resid_post.2",
        "resid_pre.2",
        "mlp_out.1",
        "attn_out.1",
        "resid_post.3",
        "mlp_in.1",
    ):
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


SAELENS_ARCH = {  # (kind, shape) -> the architecture SAELens reads
    ("topk", "sae"): "topk", ("batchtopk", "sae"): "jumprelu", ("matryoshka", "sae"): "jumprelu",
    ("jumprelu", "sae"): "jumprelu", ("relu", "sae"): "standard",
    ("relu", "tc_wide"): "transcoder", ("relu", "tc_wide_skip"): "skip_transcoder",
    ("jumprelu", "tc_wide"): "jumprelu_transcoder",
    ("batchtopk", "tc_wide_skip"): "jumprelu_skip_transcoder",
    ("matryoshka", "tc_wide"): "jumprelu_transcoder",
    ("jumprelu", "tc_wide_skip"): "jumprelu_skip_transcoder",
}  # fmt: skip


@pytest.mark.parametrize("arch, shape", SAELENS_ARCH)
def test_saelens_layout_of_each_kind(tmp_path, arch, shape):
    sae = make_sae(arch, shape=shape)
    export_lens(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    meta, w = cfg["metadata"], load_file(tmp_path / "sae_weights.safetensors")
    folded = sae.folded_state()
    assert cfg["architecture"] == SAELENS_ARCH[arch, shape] and cfg["k"] == K
    assert meta["saewb_architecture"] == arch and meta["saewb_site"] == sae.cfg.site
    assert ("rescale_acts_by_decoder_norm" in cfg) == (arch == "topk")
    training = dict(topk="topk", batchtopk="batchtopk", matryoshka="matryoshka_batchtopk")
    assert meta["training_architecture"] == training.get(
        arch, "jumprelu" if arch == "jumprelu" else "standard"
    )
    if arch == "matryoshka":  # where SAELens's save_inference_model keeps them
        assert meta["training_architecture_details"]["matryoshka_widths"] == sae.cfg.prefixes
        assert sae.cfg.prefixes[-1] == N and len(sae.cfg.prefixes) > 1
    if arch in BATCH_KINDS:
        assert (w["threshold"] == float(sae.threshold)).all()
    if arch == "jumprelu":  # per latent, raw units
        assert w["threshold"].unique().numel() > 1 and (w["threshold"] > 0).all()
        torch.testing.assert_close(w["threshold"], folded["threshold"])
    assert ("threshold" in w) == (arch != "topk" and arch != "relu")
    if shape == "sae":
        assert cfg["apply_b_dec_to_input"] is True and "d_out" not in cfg
        assert "hook_name_out" not in meta and meta["hook_name"] == HOOK
        return
    assert cfg["apply_b_dec_to_input"] is False and cfg["d_out"] == D_OUT
    assert (meta["hook_name"], meta["hook_name_out"]) == (HOOK_IN, HOOK_OUT)
    assert (meta["saewb_site"], meta["saewb_target"]) == ("mlp_in.3", "mlp_out.3")
    assert w["W_dec"].shape == (N, D_OUT) and w["b_dec"].shape == (D_OUT,)
    if sae.cfg.skip:  # SAELens's nn.Linear orientation
        assert w["W_skip"].shape == (D_OUT, D)
        torch.testing.assert_close(w["W_skip"], folded["W_skip"].T)
    else:
        assert "W_skip" not in w


def test_saelens_transcoder_target_errors_name_hook_module_out(tmp_path):
    llama = make_model("llama", 64)
    tc = SAE(SAEConfig(32, N, K, "relu", model="tiny", site="mlp_in.1", target="resid_pre.0"))
    msg = user_error(export_saelens, tc, tmp_path / "out", model=llama)
    assert "resid_pre.0" in msg and "hook_module_out=" in msg
    export_saelens(tc, tmp_path / "out", model=llama, hook_module_out="model.embed_tokens")
    meta = json.loads((tmp_path / "out" / "cfg.json").read_text())["metadata"]
    assert (meta["hook_name"], meta["hook_name_out"]) == (
        "model.layers.1.post_attention_layernorm",
        "model.embed_tokens",
    )


def test_saelens_has_no_topk_transcoder(tmp_path):
    msg = user_error(export_lens, make_sae("topk", shape="tc"), tmp_path / "out")
    assert "no TopK transcoder" in msg and "export_sparsify" in msg
    assert not (tmp_path / "out").exists()


# Tiny models whose MLP reads no module's output as it is: OPT's fc1 sees (B*T, d) rows, and
# OLMo 2's MLP reads the residual stream itself (its norms close the branches).
NO_MLP_INPUT_MODULE = {"opt", "opt-postnorm", "olmo2"}


@pytest.mark.parametrize("arch", [*CONFIGS, "falcon-ln-mlp"])
def test_saelens_hook_name_of_mlp_in_is_the_norm_before_the_mlp(arch):
    """On every tiny architecture, by value: the norm module found is the one whose output our
    Capture records as mlp_in (the MLP module's input), exactly; else the hook_module= error."""
    if arch == "falcon-ln-mlp":  # Falcon's new decoder: separate ln_attn and ln_mlp
        import transformers as tf

        torch.manual_seed(0)
        config = tf.FalconConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
            new_decoder_architecture=True, num_kv_heads=2,
        )  # fmt: skip
        model = tf.AutoModelForCausalLM.from_config(config).eval()
    else:
        model = make_model(arch, 64)
    if arch in NO_MLP_INPUT_MODULE:
        assert "hook_module=" in user_error(saelens_hook_name, "mlp_in.1", model)
        return
    name = saelens_hook_name("mlp_in.1", model)
    assert saelens_hook_name("blocks.1.ln2.hook_normalized", model) == name  # the TL alias
    modules = dict(model.named_modules())
    assert "norm" in type(modules[name]).__name__.lower()
    expected = {"gpt2": "ln_2", "gptj": "ln_1", "phi": "input_layernorm",
                "falcon": "input_layernorm", "gemma2": "pre_feedforward_layernorm",
                "falcon-ln-mlp": "ln_mlp"}  # fmt: skip
    assert name.endswith("." + expected.get(arch, "post_attention_layernorm"))
    seen = {}
    handle = modules[name].register_forward_hook(lambda m, a, out: seen.setdefault("x", out))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    handle.remove()
    with Capture(model, ["mlp_in.1"]) as capture:
        torch.testing.assert_close(seen["x"], capture(ids)["mlp_in.1"], rtol=0, atol=0)


def test_saelens_export_reads_the_module_tree_from_the_models_folder(tmp_path, tiny_dir):
    """No model passed: the hook name comes from the run's model folder, built without weights;
    a model that cannot be read is one sentence naming the way out."""
    sae = SAE(SAEConfig(D, N, K, model=str(tiny_dir), site="mlp_out.2"))
    export_saelens(sae, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "model.layers.2.mlp" and meta["model_name"] == str(tiny_dir)
    assert load_sae(tmp_path / "a").cfg.site == "mlp_out.2"  # our name comes back
    tc = SAE(SAEConfig(32, N, K, "relu", model=str(tiny_dir), site="mlp_in.2", target="mlp_out.2"))
    export_saelens(tc, tmp_path / "t")
    meta = json.loads((tmp_path / "t" / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "model.layers.2.post_attention_layernorm"
    assert meta["hook_name_out"] == "model.layers.2.mlp"
    gone = SAE(SAEConfig(D, N, K, model=str(tmp_path / "gone"), site="resid_post.3"))
    msg = user_error(export_saelens, gone, tmp_path / "b")  # a path: no hub lookup either
    assert "gone'" in msg and "hook_module=" in msg and not (tmp_path / "b").exists()


def edit_cfg(path, **changes):
    """Change cfg.json's entries (metadata's with meta={...}); None deletes one."""
    cfg = json.loads((path / "cfg.json").read_text())
    for key, value in changes.items():
        target, items = (cfg["metadata"], value.items()) if key == "meta" else (cfg, [(key, value)])
        for name, v in items:
            if v is None:
                target.pop(name, None)
            else:
                target[name] = v
    (path / "cfg.json").write_text(json.dumps(cfg))


def test_third_party_saelens_hook_name_is_the_site(tmp_path):
    export_lens(make_sae(), tmp_path)
    edit_cfg(tmp_path, meta=dict(saewb_site=None, saewb_model=None))
    assert (load_sae(tmp_path).cfg.site, load_sae(tmp_path).cfg.model) == (HOOK, "tiny")


def test_third_party_saelens_transcoder_sites(tmp_path):
    """hook_name -> hook_name_out, TransformerLens's names read as ours; with no hook_name_out
    SAELens splices the output back where it read the input, and so does the target."""
    export_lens(make_sae("relu", shape="tc_wide_skip"), tmp_path)
    edit_cfg(tmp_path, meta=dict(saewb_site=None, saewb_target=None))
    assert (load_sae(tmp_path).cfg.site, load_sae(tmp_path).cfg.target) == (HOOK_IN, HOOK_OUT)
    hooks = dict(hook_name="blocks.3.ln2.hook_normalized", hook_name_out="blocks.3.hook_mlp_out")
    edit_cfg(tmp_path, meta=hooks)
    assert (load_sae(tmp_path).cfg.site, load_sae(tmp_path).cfg.target) == ("mlp_in.3", "mlp_out.3")
    edit_cfg(tmp_path, meta=dict(hook_name_out=None))
    loaded = load_sae(tmp_path)
    assert (loaded.cfg.site, loaded.cfg.target, loaded.cfg.skip) == ("mlp_in.3", "mlp_in.3", True)


def test_saelens_kind_rules(tmp_path, x):
    """Without saewb_architecture: SAELens's training_architecture, then the thresholds."""
    for arch in ("batchtopk", "matryoshka", "jumprelu", "relu"):
        sae = make_sae(arch)
        export_lens(sae, tmp_path / arch)
        edit_cfg(tmp_path / arch, meta=dict(saewb_architecture=None))
        loaded = load_sae(tmp_path / arch)
        assert (loaded.cfg.architecture, loaded.cfg.prefixes) == (arch, sae.cfg.prefixes)
        assert_same(sae, loaded, x)
    # no training_architecture either: one threshold and a k is BatchTopK (our older exports)
    edit_cfg(tmp_path / "batchtopk", meta=dict(training_architecture=None))
    assert load_sae(tmp_path / "batchtopk").cfg.architecture == "batchtopk"
    edit_cfg(tmp_path / "matryoshka", meta=dict(training_architecture=None))
    assert load_sae(tmp_path / "matryoshka").cfg.architecture == "batchtopk"
    edit_cfg(tmp_path / "jumprelu", meta=dict(training_architecture=None))
    assert load_sae(tmp_path / "jumprelu").cfg.architecture == "jumprelu"  # k, but many thresholds
    # no k: one threshold is JumpReLU's, and k (the inference width's) comes from the L0
    edit_cfg(tmp_path / "batchtopk", k=None, meta=dict(training_architecture_details=None))
    loaded = load_sae(tmp_path / "batchtopk")
    assert (loaded.cfg.architecture, loaded.cfg.k) == ("jumprelu", N)  # min(n, 64)
    edit_cfg(tmp_path / "batchtopk", meta=dict(l0=5.2))
    assert load_sae(tmp_path / "batchtopk").cfg.k == 6
    edit_cfg(tmp_path / "relu", k=None, meta=dict(l0=1e6))
    assert load_sae(tmp_path / "relu").cfg.k == N


def test_gemma_scope_style_jumprelu(tmp_path, x):
    """A JumpReLU file as Gemma Scope's loader or SAELens writes it: no k, an L0, thresholds per
    latent; it runs as SAELens's JumpReLUSAE does."""
    g = torch.Generator().manual_seed(4)
    w = {"W_enc": torch.randn(D, N, generator=g), "b_enc": torch.randn(N, generator=g),
         "W_dec": torch.randn(N, D, generator=g), "b_dec": torch.randn(D, generator=g),
         "threshold": torch.rand(N, generator=g) * 20}  # fmt: skip
    save_file(w, tmp_path / "sae_weights.safetensors")
    meta = {"l0": 20.3, "hook_name": "blocks.3.hook_resid_post"}
    cfg = {"d_in": D, "d_sae": N, "architecture": "jumprelu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "metadata": meta}  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    got = load_sae(tmp_path)
    assert (got.cfg.architecture, got.cfg.k, got.cfg.site) == ("jumprelu", 21, "resid_post.3")
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    acts = pre.relu() * (pre > w["threshold"])
    assert (acts > 0).sum(1).max() <= got.cfg.inference_width  # so no token is capped
    got_acts, got_recon = run(got, x)
    torch.testing.assert_close(got_acts, acts, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_recon, acts @ w["W_dec"] + w["b_dec"], rtol=1e-4, atol=1e-4)


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


@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_transcoder_layout(tmp_path, skip):
    sae = make_sae(shape="tc_skip" if skip else "tc")
    export_sparsify(sae, tmp_path / "layers.3.mlp")
    cfg = json.loads((tmp_path / "layers.3.mlp" / "cfg.json").read_text())
    assert (cfg["transcode"], cfg["skip_connection"], cfg["d_in"]) == (True, skip, D)
    w, folded = load_file(tmp_path / "layers.3.mlp" / "sae.safetensors"), sae.folded_state()
    assert ("W_skip" in w) == skip
    if skip:  # sparsify's (d_out, d_in), applied as x @ W_skip.mT
        torch.testing.assert_close(w["W_skip"], folded["W_skip"].T)
    torch.testing.assert_close(w["W_dec"], folded["W_dec"])
    torch.testing.assert_close(w["b_dec"], folded["b_dec"])


def test_sparsify_transcoder_sites_come_from_the_hookpoint(tmp_path, x):
    sae = make_sae(shape="tc_skip")
    for hookpoint, sites in (
        ("h.5.mlp", ("mlp_in.5", "mlp_out.5")),  # GPT-2's base model names
        ("layers.2.feed_forward", ("mlp_in.2", "mlp_out.2")),
        ("layers.2.self_attn", ("layers.2.self_attn", "output of layers.2.self_attn")),
    ):
        export_sparsify(sae, tmp_path / hookpoint)
        loaded = load_sae(tmp_path / hookpoint)
        assert (loaded.cfg.site, loaded.cfg.target) == sites and loaded.cfg.is_transcoder
        assert_same(sae, loaded, x)


def test_sparsify_refusals(tmp_path):
    for arch in ("batchtopk", "jumprelu", "relu"):
        msg = user_error(export_sparsify, make_sae(arch), tmp_path / arch)
        assert f"a {arch} SAE has no sparsify form" in msg and "export_saelens" in msg
    msg = user_error(export_sparsify, make_sae(shape="tc_wide"), tmp_path / "wide")
    assert f"maps {D} to {D_OUT}" in msg
    assert not any(tmp_path.iterdir())
    export_sparsify(make_sae(shape="tc_skip"), tmp_path / "layers.3.mlp")
    edit_cfg(tmp_path / "layers.3.mlp", transcode=False)
    msg = user_error(load_sae, tmp_path / "layers.3.mlp")
    assert "skip_connection" in msg and "transcoders only" in msg


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

    monkeypatch.setattr("sae.formats.common.atomic_write_bytes", write)
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


def test_unsupported_configs(tmp_path):
    lens, topk, sparse, native = (tmp_path / n for n in ("lens", "topk", "sparse", "native"))
    export_lens(make_sae("batchtopk"), lens)
    export_lens(make_sae("topk"), topk)
    export_sparsify(make_sae(), sparse)
    save_sae(make_sae(), native)
    edit_cfg(topk, k=None)  # a TopK SAE needs its k; the other kinds fall back (kind rules)
    assert "no 'k' entry" in user_error(load_sae, topk)
    edit_cfg(topk, k="four")
    assert "k='four'" in user_error(load_sae, topk)
    edit_cfg(lens, architecture="gated")
    msg = user_error(load_sae, lens)
    assert "'gated'" in msg and "'topk'" in msg and "'jumprelu_skip_transcoder'" in msg
    edit_cfg(lens, architecture="jumprelu", normalize_activations="layer_norm")
    assert "normalize_activations='layer_norm'" in user_error(load_sae, lens)
    edit_cfg(lens, normalize_activations="none")
    w = load_file(lens / "sae_weights.safetensors")
    w["threshold"][3] = 1.0
    save_file(w, lens / "sae_weights.safetensors")
    assert "differ from latent to latent" in user_error(load_sae, lens)  # a batchtopk by name
    edit_cfg(lens, meta=dict(saewb_architecture=None))  # SAELens's training_architecture too
    assert "differ from latent to latent" in user_error(load_sae, lens)
    edit_cfg(lens, meta=dict(training_architecture=None))
    assert load_sae(lens).cfg.architecture == "jumprelu"  # an ordinary JumpReLU file
    edit_cfg(lens, meta=dict(saewb_architecture="topk"))
    msg = user_error(load_sae, lens)
    assert "saewb_architecture 'topk' on SAELens architecture 'jumprelu'" in msg
    edit_cfg(lens, meta=dict(saewb_architecture="gated"))
    assert "'gated'" in user_error(load_sae, lens)
    export_lens(make_sae("relu", shape="tc_wide"), lens)
    edit_cfg(lens, apply_b_dec_to_input=True)
    assert "apply_b_dec_to_input on a transcoder" in user_error(load_sae, lens)
    edit_cfg(lens, apply_b_dec_to_input=False, d_out=None)
    assert "no 'd_out' entry" in user_error(load_sae, lens)
    edit_cfg(lens, d_out=D)
    msg = user_error(load_sae, lens)
    assert "d_out=16" in msg and f"({N}, {D_OUT})" in msg
    edit_cfg(sparse, activation="groupmax")
    assert "activation='groupmax'" in user_error(load_sae, sparse)
    edit_cfg(native, version=2)
    assert "version 2" in user_error(load_sae, native)
    edit_cfg(native, version=1, architecture="gated")
    assert "'gated'" in user_error(load_sae, native)
    edit_cfg(native, architecture="topk", d_in=None)
    assert "d_in" in user_error(load_sae, native)
