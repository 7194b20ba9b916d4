"""Our exports against the real peers: SAELens (SAE.load_from_disk) and sparsify
(SparseCoder.load_from_disk), and the peers' own files against load_sae. Needs the bench extra."""

from __future__ import annotations

import pytest
import torch
from test_formats import HOOK, D, K, N, export_lens, make_sae, run

from hooks.models import load_model
from hooks.sites import Splice
from sae.formats import export_saelens, export_sparsify, load_sae
from sae.model import SAE, SAEConfig

pytestmark = pytest.mark.bench
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture
def x():
    return torch.randn(128, D, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


@pytest.fixture
def sae_lens():
    return pytest.importorskip("sae_lens")


@pytest.fixture
def sparsify(monkeypatch):
    sparsify = pytest.importorskip("sparsify")
    # sparsify picks its Triton decoder whenever Triton imports; it only runs on CUDA
    monkeypatch.setattr(sparsify.sparse_coder, "decoder_impl", sparsify.utils.eager_decode)
    return sparsify


def variants():
    """Plain, input scale != 1, and one where many tokens have fewer than k positive latents."""
    few = make_sae(seed=2)
    with torch.no_grad():
        few.b_enc.fill_(-60.0)
    return [make_sae(scale=1.0), make_sae(scale=3.7), few]


# -- our files, their loaders ---------------------------------------------------------------


def test_saelens_loads_our_topk_export(tmp_path, x, sae_lens):
    for i, sae in enumerate(variants()):
        export_lens(sae, tmp_path / str(i), sparsity=torch.rand(N))
        peer = sae_lens.SAE.load_from_disk(tmp_path / str(i))
        assert type(peer).__name__ == "SAE" and peer.cfg.k == K
        assert peer.cfg.metadata.hook_name == HOOK
        acts, recon = run(sae, x)
        with torch.no_grad():
            peer_acts = peer.encode(x)
            torch.testing.assert_close(peer_acts, acts, **TOL)
            torch.testing.assert_close(peer.decode(peer_acts), recon, **TOL)


def test_saelens_loads_our_batchtopk_export_as_jumprelu(tmp_path, x, sae_lens):
    """SAELens runs the BatchTopK threshold (JumpReLU); our model's eval encode is per-token
    top-k and ignores it, so we check SAELens against the threshold rule on our weights."""
    sae = make_sae("batchtopk", scale=3.7)
    with torch.no_grad():
        sae.threshold.fill_(20.0)
    export_lens(sae, tmp_path)
    peer = sae_lens.SAE.load_from_disk(tmp_path)
    assert type(peer).__name__ == "JumpReLUSAE"
    w = sae.folded_state()
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    acts = pre.relu() * (pre > 20.0)
    assert 0 < (acts > 0).sum(1).float().mean() < N / 2
    with torch.no_grad():
        peer_acts = peer.encode(x)
        torch.testing.assert_close(peer_acts, acts, **TOL)
        torch.testing.assert_close(peer.decode(peer_acts), acts @ w["W_dec"] + w["b_dec"], **TOL)


def test_saelens_runs_our_export_on_the_real_module(tmp_path, sae_lens, tiny_dir, tokenizer):
    """SAELens's own loaders take the export as it is: load_model(model_class_name, model_name,
    hook_names=[hook_name]) wraps the HF model, and its evals' splice and zero ablation at
    hook_name give the losses of our Splice at our site."""
    from sae_lens.evals import get_recons_loss
    from sae_lens.load_model import load_model as saelens_load_model
    from sae_lens.training.activation_scaler import ActivationScaler

    loaded = load_model(str(tiny_dir))
    sae = SAE(SAEConfig(32, N, K, model=str(tiny_dir), site="resid_post.2")).eval()
    sae.reset_parameters(torch.Generator().manual_seed(0))
    export_saelens(sae, tmp_path, model=loaded.model)
    peer = sae_lens.SAE.load_from_disk(tmp_path)
    meta = peer.cfg.metadata
    assert (meta.hook_name, meta.model_name) == ("model.layers.2", str(tiny_dir))
    hooked = saelens_load_model(
        meta.model_class_name, meta.model_name, device="cpu", hook_names=[meta.hook_name]
    )
    ids = tokenizer([" The cat sat on the mat. The dog ran in the park."] * 2)["input_ids"]
    ids = torch.tensor(ids)  # (2, T)
    ids = torch.cat([torch.full((2, 1), tokenizer.bos_token_id), ids], dim=1)
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    with torch.no_grad():
        theirs = get_recons_loss(
            peer, hooked, ActivationScaler(), ids, True, True, ignore_tokens=special
        )
    keep = ~torch.isin(ids, torch.tensor(special))  # (B, T)

    def ours(fn):
        with torch.no_grad(), Splice(loaded.model, "resid_post.2", fn):
            logits = loaded.model(ids).logits  # (B, T, V)
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
        )  # (B, T-1)

    def spliced(h):
        out = h.clone()
        out[keep] = sae.decode(*sae.encode(h[keep])[:2])
        return out

    torch.testing.assert_close(theirs["ce_loss_with_sae"], ours(spliced), **TOL)
    torch.testing.assert_close(theirs["ce_loss_with_ablation"], ours(torch.zeros_like), **TOL)
    torch.testing.assert_close(theirs["ce_loss_without_sae"], ours(lambda h: h), **TOL)
    assert (theirs["ce_loss_with_sae"] - theirs["ce_loss_without_sae"]).abs().max() > 1e-3


def test_sparsify_loads_our_export(tmp_path, x, sparsify):
    for i, sae in enumerate(variants()):
        export_sparsify(sae, tmp_path / str(i))
        peer = sparsify.SparseCoder.load_from_disk(tmp_path / str(i))
        assert peer.num_latents == N and peer.cfg.k == K
        acts, recon = run(sae, x)
        with torch.no_grad():
            out = peer.encode(x)
            peer_acts = torch.zeros(len(x), N).scatter_(1, out.top_indices, out.top_acts)
            torch.testing.assert_close(peer_acts, acts, **TOL)
            torch.testing.assert_close(peer.decode(out.top_acts, out.top_indices), recon, **TOL)


# -- their files, our loader ----------------------------------------------------------------


@pytest.mark.parametrize("rescale", [False, True])
def test_load_sae_reads_saelens_files(tmp_path, x, sae_lens, rescale):
    cfg = sae_lens.TopKSAEConfig(
        d_in=D, d_sae=N, k=K, rescale_acts_by_decoder_norm=rescale, apply_b_dec_to_input=rescale
    )
    peer = sae_lens.SAE(cfg)
    with torch.no_grad():
        for p in peer.parameters():
            p.copy_(torch.randn(p.shape))
        peer.W_dec.mul_(torch.rand(N, 1) * 3)  # rows far from unit norm
    peer.save_model(tmp_path)
    ours = load_sae(tmp_path)
    acts, recon = run(ours, x)
    with torch.no_grad():
        torch.testing.assert_close(acts, peer.encode(x), **TOL)
        torch.testing.assert_close(recon, peer(x), **TOL)


def test_load_sae_reads_sparsify_files(tmp_path, x, sparsify):
    peer = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=N, k=K))
    with torch.no_grad():
        for p in peer.parameters():
            p.copy_(torch.randn(p.shape))
    peer.save_to_disk(tmp_path / "run" / "layers.3")  # a one-hookpoint run folder
    ours = load_sae(tmp_path / "run")
    acts, recon = run(ours, x)
    with torch.no_grad():
        out = peer.encode(x)
        peer_acts = torch.zeros(len(x), N).scatter_(1, out.top_indices, out.top_acts)
        torch.testing.assert_close(acts, peer_acts, **TOL)
        torch.testing.assert_close(recon, peer.decode(out.top_acts, out.top_indices), **TOL)
