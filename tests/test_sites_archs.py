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
# Architecture -> (the MLP module in its block, the norm it reads through, whether it reads the
# block input (parallel attention) rather than resid_pre + attn_out): what mlp_in.L should be,
# written out from each model's source.
MLP_INPUT = {
    "gpt2": ("mlp", "ln_2", False),
    "neox": ("mlp", "post_attention_layernorm", True),
    "neox-seq": ("mlp", "post_attention_layernorm", False),
    "gptj": ("mlp", "ln_1", True),
    "opt": ("fc1", "final_layer_norm", False),  # on (B*T, d) rows
    "bloom": ("mlp", "post_attention_layernorm", False),
    "falcon": ("mlp", "input_layernorm", True),
    "falcon-seq": ("mlp", "post_attention_layernorm", False),
    "phi": ("mlp", "input_layernorm", True),
    "llama": ("mlp", "post_attention_layernorm", False),
    "mistral": ("mlp", "post_attention_layernorm", False),
    "qwen2": ("mlp", "post_attention_layernorm", False),
    "qwen3": ("mlp", "post_attention_layernorm", False),
    "gemma2": ("mlp", "pre_feedforward_layernorm", False),  # not its post_feedforward_layernorm
    "olmo": ("mlp", "post_attention_layernorm", False),
    "olmo2": ("mlp", None, False),  # OLMo 2 norms each branch's output, not its input
    "stablelm": ("mlp", "post_attention_layernorm", False),
}
POST_NORM = {"opt-postnorm": "fc1", "bloom-postln": "mlp"}  # branch sites refused, mlp_in not
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
        for k in ("resid_pre", "resid_post", "mlp_in", "mlp_out", "attn_out")
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
        for branch in ("attn_out", "mlp_in", "mlp_out"):
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
    assert list_sites(model) == [
        f"{k}.{i}" for i in range(N_LAYERS) for k in ("resid_pre", "resid_post", "mlp_in")
    ]
    with pytest.raises(UserError, match=rf"{re.escape(flag)}.*'{re.escape(attn)}'"):
        resolve_site(model, "attn_out.0")
    with pytest.raises(UserError, match=r"raw module path"):
        resolve_site(model, "mlp_out.1")
    hidden = model(ids, output_hidden_states=True).hidden_states
    with Capture(model, resid) as cap:
        a = cap(ids)
    torch.testing.assert_close(a["resid_post.0"], hidden[1])


def _blocks(model: nn.Module) -> nn.ModuleList:
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return obj
    raise AssertionError(type(model).__name__)


def _mlp_inputs(model: nn.Module, child: str, ids: torch.Tensor) -> list[torch.Tensor]:
    """What each block's MLP module gets as its first input, read by a pre-hook of our own."""
    seen: list[torch.Tensor] = []
    handles = [
        getattr(block, child).register_forward_pre_hook(
            lambda m, args: seen.append(args[0].reshape(ids.shape + (32,)).clone())
        )
        for block in _blocks(model)
    ]
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def _mlp(block: nn.Module, arch: str, x: torch.Tensor) -> torch.Tensor:
    """The block's MLP branch recomputed on x: (B, T, d) -> what mlp_out.L records."""
    if arch == "opt":
        rows = x.reshape(-1, x.shape[-1])  # OPT's MLP runs on (B*T, d) rows
        return block.fc2(block.activation_fn(block.fc1(rows))).view(x.shape)
    if arch == "bloom":  # Bloom's MLP adds its residual argument to its output
        return block.mlp(x, torch.zeros_like(x))
    out = block.mlp(x)
    post = getattr(block, "post_feedforward_layernorm", None)  # Gemma 2, OLMo 2
    return out if post is None else post(out)


@pytest.mark.parametrize("arch", MLP_INPUT)
def test_mlp_in_is_what_the_mlp_receives_and_feeds_mlp_out(arch):
    model, ids = tiny(arch), _ids()
    child, norm, parallel = MLP_INPUT[arch]
    expected = _mlp_inputs(model, child, ids)
    names = [f"{k}.{i}" for i in range(N_LAYERS) for k in ("resid_pre", "attn_out", "mlp_in", "mlp_out")]  # fmt: skip
    with Capture(model, names, early_exit=False) as cap:
        a = cap(ids)
    for layer, block in enumerate(_blocks(model)):
        x = a[f"mlp_in.{layer}"]
        assert resolve_site(model, f"mlp_in.{layer}").module_path.endswith(f".{layer}.{child}")
        torch.testing.assert_close(x, expected[layer], rtol=0, atol=0)
        # The same value from the block's own parts: the norm of the residual the MLP reads.
        mid = a[f"resid_pre.{layer}"] + (0 if parallel else a[f"attn_out.{layer}"])
        torch.testing.assert_close(x, mid if norm is None else getattr(block, norm)(mid))
        assert (x - mid).abs().max() > 1e-3 or norm is None  # the norm did something
        torch.testing.assert_close(a[f"mlp_out.{layer}"], _mlp(block, arch, x))
    # A splice replaces what the MLP receives: its output is then the MLP of the new input.
    last = N_LAYERS - 1
    shapes = []

    def double(x):
        shapes.append(tuple(x.shape))
        return 2 * x

    with Splice(model, f"mlp_in.{last}", double), Capture(model, [f"mlp_out.{last}"]) as cap:
        spliced = cap(ids)[f"mlp_out.{last}"]
    assert shapes == [ids.shape + (32,)]
    block = _blocks(model)[last]
    torch.testing.assert_close(spliced, _mlp(block, arch, 2 * a[f"mlp_in.{last}"]))


@pytest.mark.parametrize("arch", [*MLP_INPUT, *POST_NORM])
def test_splicing_mlp_in_with_itself_keeps_logits_and_zeroing_it_changes_them(arch):
    model, ids = tiny(arch), _ids()
    clean = model(ids).logits
    for layer in range(N_LAYERS):
        with Splice(model, f"mlp_in.{layer}", lambda x: x.clone()):
            same = model(ids).logits
        with Splice(model, f"mlp_in.{layer}", torch.zeros_like):
            ablated = model(ids).logits
        torch.testing.assert_close(same, clean, rtol=0, atol=0)
        assert (ablated - clean).abs().max() > 1e-4


@pytest.mark.parametrize("arch", POST_NORM)
def test_mlp_in_resolves_where_branch_sites_are_refused(arch):
    """mlp_in is the MLP's input whatever the residual does after the branch, so it stays."""
    model, ids = tiny(arch), _ids()
    expected = _mlp_inputs(model, POST_NORM[arch], ids)
    sites = [f"mlp_in.{i}" for i in range(N_LAYERS)]
    with Capture(model, sites) as cap:
        a = cap(ids)
    for layer, site in enumerate(sites):
        torch.testing.assert_close(a[site], expected[layer], rtol=0, atol=0)


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


class _NoMlpBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.ffn = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.ffn(x)


class _Odd(nn.Module):
    def __init__(self, block=_Block):
        super().__init__()
        self.layers = nn.ModuleList([block(), block()])

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
    assert resolve_site(odd, "mlp_in.1").module_path == "layers.1.mlp"
    x = torch.randn(3, 5, 8)
    with Capture(odd, ["mlp_in.0", "layers.0.mixer"]) as cap:
        cap.model(x)  # not a transformers model: a plain forward inside the block records too
    torch.testing.assert_close(cap.acts["mlp_in.0"], cap.acts["layers.0.mixer"])
    no_mlp = _Odd(_NoMlpBlock)
    assert list_sites(no_mlp) == [f"{k}.{i}" for i in range(2) for k in ("resid_pre", "resid_post", "attn_out")]  # fmt: skip
    with pytest.raises(
        UserError,
        match=r"^Site 'mlp_in\.1' does not resolve on _Odd: its blocks have no MLP module .*"
        r"mlp or feed_forward, or fc1 and fc2; children: attn, ffn\).*"
        r"valid sites here are \{resid_pre\|resid_post\|attn_out\}\.L",
    ):
        resolve_site(no_mlp, "mlp_in.1")


def test_transformerlens_names_are_aliases():
    model, ids = tiny("llama"), _ids()
    for kind, theirs in [
        *((k, f"hook_{k}") for k in ("resid_pre", "resid_post", "mlp_out", "attn_out")),
        ("mlp_in", "ln2.hook_normalized"),  # what SAELens transcoders record as their input
    ]:
        assert canonical_site(f"blocks.1.{theirs}") == f"{kind}.1"
        site = resolve_site(model, f"blocks.1.{theirs}")
        assert site == resolve_site(model, f"{kind}.1") and site.name == f"{kind}.1"
    assert resolve_site(model, "blocks.0.ln2.hook_normalized").module_path == "model.layers.0.mlp"
    assert (
        canonical_site("model.layers.1")
        == "model.layers.1"
        == resolve_site(model, "model.layers.1").name
    )
    with pytest.raises(UserError, match=r"'blocks\.1\.hook_resid_mid'.*no saewb counterpart"):
        resolve_site(model, "blocks.1.hook_resid_mid")
    # TransformerLens's hook_mlp_in is the residual before ln2, not the MLP's normed input.
    assert canonical_site("blocks.1.hook_mlp_in") == "blocks.1.hook_mlp_in"
    with pytest.raises(
        UserError, match=r"'blocks\.1\.hook_mlp_in'.*mlp_in\.L.*ln2\.hook_normalized"
    ):
        resolve_site(model, "blocks.1.hook_mlp_in")
    names = ["blocks.1.hook_resid_post", "resid_post.1", "model.layers.1"]
    with Capture(model, names) as cap:
        a = cap(ids)
    assert list(a) == names
    torch.testing.assert_close(a[names[0]], a[names[1]])
    torch.testing.assert_close(a[names[0]], a[names[2]])


def test_saelens_folder_with_a_transformerlens_hook_name_loads_and_resolves(tmp_path):
    from sae.config import SAEConfig
    from sae.formats import export_saelens, load_sae
    from sae.model import SAE

    model = tiny("llama")
    sae = SAE(SAEConfig(32, 64, 4, model="tiny", site="resid_post.1"))
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


@pytest.mark.parametrize("arch", ["bloom", "falcon", "opt"])
def test_saewb_sites_lists_and_captures_every_site(arch, tmp_path, tokenizer, capsys):
    """`saewb sites` ended in KeyError: 'transformer.h.0.attn' on bloom and falcon."""
    from saewb_cli import main

    tiny(arch).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert main(["sites", "--model", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"attn_out.{N_LAYERS - 1}" in out and "(batch, seq, 32)" in out
    assert re.search(rf"mlp_in\.{N_LAYERS - 1} +\(batch, seq, 32\)", out), out
