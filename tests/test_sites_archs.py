"""Named sites on tiny random models of many architectures, and TransformerLens hook names."""

import json
import re

import pytest
import torch
from torch import nn

from hooks.errors import UserError
from hooks.sites import Capture, Splice, canonical_site, list_sites, resolve_site

# Architecture (conftest.make_model) -> its final norm, which HF applies to hidden_states[-1].
FINAL_NORM = {
    "gpt2": "transformer.ln_f",
    "neox": "gpt_neox.final_layer_norm",
    "neox-seq": "gpt_neox.final_layer_norm",
    "gptj": "transformer.ln_f",
    "opt": "model.decoder.final_layer_norm",
    "bloom": "transformer.ln_f",
    "falcon": "transformer.ln_f",  # parallel attention
    "falcon-seq": "transformer.ln_f",
    "phi": "model.final_layernorm",
    "llama": "model.norm",
    "mistral": "model.norm",
    "qwen2": "model.norm",
    "qwen3": "model.norm",
    "gemma2": "model.norm",
    "olmo": "model.norm",
    "olmo2": "model.norm",
    "stablelm": "model.norm",
}
N_LAYERS = 2
_MODELS: dict[str, nn.Module] = {}


def tiny(arch: str) -> nn.Module:
    from conftest import make_model

    if arch not in _MODELS:
        _MODELS[arch] = make_model(arch, 400, n_layers=N_LAYERS, d=32)
    return _MODELS[arch]


def _ids(batch=2, seq=7):
    return torch.randint(4, 400, (batch, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", FINAL_NORM)
def test_sites_are_hidden_states_and_branches_add_up(arch):
    model, ids = tiny(arch), _ids()
    names = list_sites(model)
    assert names == [
        f"{k}.{i}"
        for i in range(N_LAYERS)
        for k in ("resid_pre", "resid_post", "mlp_out", "attn_out")
    ]
    hidden = model(ids, output_hidden_states=True).hidden_states  # N_LAYERS + 1 entries
    norm = dict(model.named_modules())[FINAL_NORM[arch]]
    seen = {}
    handle = norm.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].clone()))
    try:
        with Capture(model, names, early_exit=False) as cap:
            a = cap(ids)
    finally:
        handle.remove()
    last = N_LAYERS - 1
    for layer in range(N_LAYERS):
        torch.testing.assert_close(a[f"resid_pre.{layer}"], hidden[layer])
        if layer < last:
            torch.testing.assert_close(a[f"resid_post.{layer}"], hidden[layer + 1])
        for branch in ("attn_out", "mlp_out"):
            assert a[f"{branch}.{layer}"].shape == ids.shape + (32,)
            assert a[f"{branch}.{layer}"].abs().max() > 1e-3  # a real branch, not a zero
        update = a[f"resid_post.{layer}"] - a[f"resid_pre.{layer}"]
        torch.testing.assert_close(a[f"attn_out.{layer}"] + a[f"mlp_out.{layer}"], update)
    # The last block's output is what the final norm reads; HF's last entry is after that norm.
    torch.testing.assert_close(a[f"resid_post.{last}"], seen["x"])
    torch.testing.assert_close(norm(a[f"resid_post.{last}"]), hidden[-1])


@pytest.mark.parametrize("arch", ["opt", "bloom", "falcon", "gemma2", "llama"])
def test_splicing_the_last_mlp_shifts_the_block_output(arch):
    """A splice of mlp_out sees (B, T, d) and changes exactly the MLP's residual contribution."""
    model, ids = tiny(arch), _ids()
    site = f"mlp_out.{N_LAYERS - 1}"
    out = f"resid_post.{N_LAYERS - 1}"
    shift = torch.linspace(-1, 1, 32)
    shapes = []

    def fn(x):
        shapes.append(tuple(x.shape))
        return x + shift

    with Capture(model, [out]) as cap:
        clean = cap(ids)[out]
        with Splice(model, site, fn):
            spliced = cap(ids)[out]
        with Splice(model, f"attn_out.{N_LAYERS - 1}", lambda x: x.clone()):
            same = cap(ids)[out]
    assert shapes == [ids.shape + (32,)]
    torch.testing.assert_close(spliced, clean + shift)
    torch.testing.assert_close(same, clean)


@pytest.mark.parametrize(
    "arch, flag, attn",
    [
        ("opt-postnorm", "do_layer_norm_before=False", "model.decoder.layers.0.self_attn"),
        ("bloom-postln", "apply_residual_connection_post_layernorm=True", "transformer.h.0.self_attention"),
    ],
)  # fmt: skip
def test_blocks_whose_branches_do_not_add_up_refuse_branch_sites(arch, flag, attn):
    """attn_out/mlp_out are refused where they are not residual updates, not silently wrong."""
    model, ids = tiny(arch), _ids()
    resid = [f"{k}.{i}" for i in range(N_LAYERS) for k in ("resid_pre", "resid_post")]
    assert list_sites(model) == resid
    with pytest.raises(UserError, match=rf"{re.escape(flag)}.*'{re.escape(attn)}'"):
        resolve_site(model, "attn_out.0")
    with pytest.raises(UserError, match=r"raw module path"):
        resolve_site(model, "mlp_out.1")
    hidden = model(ids, output_hidden_states=True).hidden_states
    with Capture(model, resid) as cap:
        a = cap(ids)
    torch.testing.assert_close(a["resid_post.0"], hidden[1])


def test_opt_post_norm_branches_really_do_not_add_up():
    """The premise of the refusal: OPT-350m-style blocks normalise after each residual add."""
    model, ids = tiny("opt-postnorm"), _ids()
    raw = ["model.decoder.layers.0.self_attn", "model.decoder.layers.0.fc2"]
    with Capture(model, ["resid_pre.0", "resid_post.0", *raw]) as cap:
        a = cap(ids)
    update = a["resid_post.0"] - a["resid_pre.0"]
    parts = a[raw[0]] + a[raw[1]].view(update.shape)
    assert (parts - update).abs().max() > 0.1


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer, self.mlp = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return x + self.mlp(self.mixer(x))


class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def test_unresolvable_architectures_get_one_sentence():
    with pytest.raises(UserError, match=r"Sequential has no block list.*raw module path"):
        resolve_site(nn.Sequential(nn.Linear(4, 4)), "resid_post.0")
    odd = _Odd()
    assert resolve_site(odd, "resid_post.1").module_path == "layers.1"
    assert resolve_site(odd, "mlp_out.0").module_path == "layers.0.mlp"
    with pytest.raises(
        UserError, match=r"_Odd: its blocks have no attn module.*mixer, mlp.*'layers\.0\.<child>'"
    ):
        resolve_site(odd, "attn_out.0")
    assert "attn_out.0" not in list_sites(odd) and "mlp_out.1" in list_sites(odd)
    assert resolve_site(odd, "layers.0.mixer").depth == 0


def test_transformerlens_names_are_aliases():
    model, ids = tiny("llama"), _ids()
    for kind in ("resid_pre", "resid_post", "mlp_out", "attn_out"):
        assert canonical_site(f"blocks.1.hook_{kind}") == f"{kind}.1"
        site = resolve_site(model, f"blocks.1.hook_{kind}")
        assert site == resolve_site(model, f"{kind}.1") and site.name == f"{kind}.1"
    assert (
        canonical_site("model.layers.1")
        == "model.layers.1"
        == resolve_site(model, "model.layers.1").name
    )
    with pytest.raises(UserError, match=r"'blocks\.1\.hook_resid_mid'.*no saewb counterpart"):
        resolve_site(model, "blocks.1.hook_resid_mid")
    names = ["blocks.1.hook_resid_post", "resid_post.1", "model.layers.1"]
    with Capture(model, names) as cap:
        a = cap(ids)
    assert list(a) == names
    torch.testing.assert_close(a[names[0]], a[names[1]])
    torch.testing.assert_close(a[names[0]], a[names[2]])


def test_saelens_folder_with_a_transformerlens_hook_name_loads_and_resolves(tmp_path):
    from sae.formats import export_saelens, load_sae
    from sae.model import SAEConfig, TopKSAE

    model = tiny("llama")
    sae = TopKSAE(SAEConfig(32, 64, 4, model="tiny", site="resid_post.1"))
    export_saelens(sae, tmp_path, model=model)
    cfg_file = tmp_path / "cfg.json"
    cfg = json.loads(cfg_file.read_text())
    for ours in ("saewb_site", "saewb_model"):  # a folder from SAELens itself has neither
        del cfg["metadata"][ours]
    cfg["metadata"]["hook_name"] = "blocks.1.hook_resid_post"
    cfg_file.write_text(json.dumps(cfg))
    sae = load_sae(tmp_path)
    assert sae.cfg.site == "resid_post.1"
    assert resolve_site(model, sae.cfg.site).module_path == "model.layers.1"
    cfg["metadata"]["hook_name"] = "model.layers.1"  # SAELens's HF wrapper's name stays as it is
    cfg_file.write_text(json.dumps(cfg))
    assert load_sae(tmp_path).cfg.site == "model.layers.1"


def test_cache_check_accepts_transformerlens_names(tiny_llama, tmp_path):
    from hooks.cache import ActivationCache, harvest
    from hooks.selection import Selection
    from hooks.text import Document
    from hooks.windows import WindowSpec, iter_windows

    docs = [Document(i, "", f"the cat sat on the mat {i} " * 3) for i in range(40)]
    windows = iter_windows(docs, tiny_llama.tokenizer, WindowSpec(context_size=16))
    selection = Selection(dataset="fixture", context_size=16)
    harvest(tiny_llama, ["resid_post.1"], windows, 64, tmp_path, selection, progress=False)
    cache = ActivationCache(tmp_path)
    cache.check(site="blocks.1.hook_resid_post")
    with pytest.raises(UserError, match="not 'blocks.2.hook_resid_post'"):
        cache.check(site="blocks.2.hook_resid_post")


@pytest.mark.parametrize("arch", ["bloom", "falcon"])
def test_saewb_sites_lists_and_captures_every_site(arch, tmp_path, tokenizer, capsys):
    """`saewb sites` ended in KeyError: 'transformer.h.0.attn' on these two."""
    from saewb_cli import main

    tiny(arch).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert main(["sites", "--model", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"attn_out.{N_LAYERS - 1}" in out and "(batch, seq, 32)" in out
