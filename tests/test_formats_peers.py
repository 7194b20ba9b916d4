"""Our exports against the real peers: SAELens (SAE.load_from_disk) and sparsify
(SparseCoder.load_from_disk), and the peers' own files against load_sae, for every kind, SAE and
transcoder. Needs the bench extra."""

from __future__ import annotations

import pytest
import torch
from test_formats import (
    D_OUT,
    HOOK,
    HOOK_IN,
    HOOK_OUT,
    SAELENS_ARCH,
    D,
    K,
    N,
    export_lens,
    inputs,
    make_sae,
    run,
)

from hooks.models import load_model
from hooks.sites import Splice
from sae.config import SAEConfig
from sae.formats import export_saelens, export_sparsify, load_sae
from sae.model import SAE

pytestmark = pytest.mark.bench
TOL = dict(rtol=1e-4, atol=1e-4)
# SAELens's inference class for each architecture load_from_disk reads
SAELENS_CLASS = {
    "topk": "TopKSAE", "jumprelu": "JumpReLUSAE", "standard": "StandardSAE",
    "transcoder": "Transcoder", "skip_transcoder": "SkipTranscoder",
    "jumprelu_transcoder": "JumpReLUTranscoder",
    "jumprelu_skip_transcoder": "JumpReLUSkipTranscoder",
}  # fmt: skip
# TransformerLens names, as SAELens's own transcoders record their sites
TL_IN, TL_OUT = "blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out"


@pytest.fixture
def x():
    return inputs()


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


def dense(acts: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(acts), N).scatter_add_(1, idx, acts)


def assert_matches_saelens(ours: SAE, peer, x):
    """Same feature activations and outputs. SAELens's decode() has no skip term (only
    forward() adds x @ W_skip.T, and HookedSAETransformer's splice calls encode then decode), so
    a skip transcoder's output is compared against forward()."""
    acts, recon = run(ours, x)
    with torch.no_grad():
        peer_acts = peer.encode(x)
        torch.testing.assert_close(peer_acts, acts, **TOL)
        torch.testing.assert_close(peer(x), recon, **TOL)
        if not ours.cfg.skip:
            torch.testing.assert_close(peer.decode(peer_acts), recon, **TOL)


# -- our files, their loaders ---------------------------------------------------------------


def test_saelens_loads_our_topk_export(tmp_path, x, sae_lens):
    for i, sae in enumerate(variants()):
        export_lens(sae, tmp_path / str(i), sparsity=torch.rand(N))
        peer = sae_lens.SAE.load_from_disk(tmp_path / str(i))
        assert type(peer).__name__ == "TopKSAE" and peer.cfg.k == K
        assert peer.cfg.metadata.hook_name == HOOK
        assert_matches_saelens(sae, peer, x)


@pytest.mark.parametrize("arch, shape", SAELENS_ARCH)
def test_saelens_loads_our_export_of_each_kind(tmp_path, x, sae_lens, arch, shape):
    """SAELens runs every latent above its threshold, we at most 4k a token: make_sae's cuts
    (about k a token) keep every token below that, which this checks, so the two must agree."""
    sae = make_sae(arch, shape=shape)
    acts = run(sae, x)[0]
    if arch != "topk":  # for topk, k a token is the rule in both
        assert (acts > 0).sum(1).max() < sae.cfg.inference_width, "a token is at the 4k cap"
    assert (acts > 0).sum(1).float().mean() > 1
    export_lens(sae, tmp_path)
    peer = sae_lens.SAE.load_from_disk(tmp_path)
    assert type(peer).__name__ == SAELENS_CLASS[SAELENS_ARCH[arch, shape]]
    if sae.cfg.is_transcoder:
        assert (peer.cfg.d_in, peer.cfg.d_out, peer.cfg.apply_b_dec_to_input) == (D, D_OUT, False)
        meta = peer.cfg.metadata
        assert (meta.hook_name, meta.hook_name_out) == (HOOK_IN, HOOK_OUT)
    assert_matches_saelens(sae, peer, x)


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
            torch.testing.assert_close(dense(out.top_acts, out.top_indices), acts, **TOL)
            torch.testing.assert_close(peer.decode(out.top_acts, out.top_indices), recon, **TOL)


@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_loads_our_topk_transcoder(tmp_path, x, sparsify, skip):
    sae = make_sae("topk", shape="tc_skip" if skip else "tc")
    export_sparsify(sae, tmp_path / "layers.3.mlp")
    peer = sparsify.SparseCoder.load_from_disk(tmp_path / "layers.3.mlp")
    assert peer.cfg.transcode and peer.cfg.skip_connection == skip and peer.cfg.k == K
    acts, recon = run(sae, x)
    with torch.no_grad():
        out = peer.encode(x)  # no b_dec subtracted while transcoding
        torch.testing.assert_close(dense(out.top_acts, out.top_indices), acts, **TOL)
        torch.testing.assert_close(peer(x).sae_out, recon, **TOL)  # the skip term included


# -- their files, our loader ----------------------------------------------------------------


@pytest.mark.parametrize("rescale", [False, True])
def test_load_sae_reads_saelens_files(tmp_path, x, sae_lens, rescale):
    cfg = sae_lens.TopKSAEConfig(
        d_in=D, d_sae=N, k=K, rescale_acts_by_decoder_norm=rescale, apply_b_dec_to_input=rescale
    )
    peer = sae_lens.TopKSAE(cfg)  # SAE itself is abstract in SAELens 6
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


def saelens_training_sae(sae_lens, kind: str):
    """A TrainingSAE of SAELens's `kind`. BatchTopK's k is n / 4, so that our inference width
    (4k latents a token) is the whole dictionary: this compares the formats, not that cap (the
    short run leaves the batch threshold low, so tokens keep far more than k)."""
    base = dict(d_in=D, d_sae=N, dtype="float32", device="cpu")
    if kind == "standard":
        return sae_lens.StandardTrainingSAE(
            sae_lens.StandardTrainingSAEConfig(**base, l1_coefficient=5.0)
        )
    if kind == "topk":
        return sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(**base, k=K))
    if kind == "jumprelu":
        return sae_lens.JumpReLUTrainingSAE(
            sae_lens.JumpReLUTrainingSAEConfig(**base, jumprelu_init_threshold=0.05)
        )
    if kind == "batchtopk":
        return sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(**base, k=N / 4))
    cfg = sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
        **base, k=N / 4, matryoshka_widths=[8, 16, 32, N]
    )
    return sae_lens.MatryoshkaBatchTopKTrainingSAE(cfg)


def train_saelens(sae, steps: int = 5, batch: int = 256) -> None:
    """SAETrainer.fit()'s loop body on in-memory batches (/work/notes/saelens_formats.md 1.6)."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    cfg = SAETrainerConfig(
        total_training_samples=steps * batch, train_batch_size_samples=batch, lr=1e-2,
        lr_end=1e-3, device="cpu", logger=LoggingConfig(log_to_wandb=False),
    )  # fmt: skip
    trainer = SAETrainer(cfg, sae, data_provider=None)
    for step in range(steps):
        trainer.maybe_reset_sparsity()
        trainer.step(inputs(batch, seed=10 + step))
        trainer.n_training_steps += 1


@pytest.mark.parametrize(
    "kind, ours",
    [
        ("standard", "relu"),
        ("topk", "topk"),
        ("jumprelu", "jumprelu"),
        ("batchtopk", "batchtopk"),
        ("matryoshka_batchtopk", "matryoshka"),
    ],
)
def test_load_sae_reads_saelens_trained_files(tmp_path, x, sae_lens, kind, ours):
    """save_inference_model after a few SAETrainer steps, as LanguageModelSAETrainingRunner
    writes its final SAE; the batch kinds' training checkpoints (save_model) read the same."""
    sae = saelens_training_sae(sae_lens, kind)
    train_saelens(sae)
    sae.cfg.metadata.hook_name = "blocks.3.hook_resid_post"
    sae.save_inference_model(tmp_path / "inference")
    peer = sae_lens.SAE.load_from_disk(tmp_path / "inference")
    loaded = load_sae(tmp_path / "inference")
    assert (loaded.cfg.architecture, loaded.cfg.site) == (ours, "resid_post.3")
    if ours == "matryoshka":
        assert loaded.cfg.prefixes == [8, 16, 32, N]
    if ours in ("batchtopk", "matryoshka"):
        assert float(loaded.threshold) > 0 and loaded.cfg.k == N // 4
    if ours in ("relu", "jumprelu"):
        assert loaded.cfg.k == N  # no k recorded, no L0: min(n, 64)
    acts = peer.encode(x)
    assert ((acts > 0).sum(1).float().mean() > 1) and (acts > 0).sum(1).max() < N
    assert_matches_saelens(loaded, peer, x)
    if ours in ("batchtopk", "matryoshka"):
        sae.save_model(tmp_path / "checkpoint")  # training form: topk_threshold, unfolded
        checkpoint = load_sae(tmp_path / "checkpoint")
        assert (checkpoint.cfg.architecture, checkpoint.cfg.prefixes) == (ours, loaded.cfg.prefixes)
        assert_matches_saelens(checkpoint, peer, x)


@pytest.mark.parametrize(
    "cls", ["Transcoder", "SkipTranscoder", "JumpReLUTranscoder", "JumpReLUSkipTranscoder"]
)
def test_load_sae_reads_saelens_transcoders(tmp_path, x, sae_lens, cls):
    config = getattr(sae_lens, cls + "Config")
    peer = getattr(sae_lens, cls)(config(d_in=D, d_sae=N, d_out=D_OUT, apply_b_dec_to_input=False))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peer.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
    peer.cfg.metadata.hook_name, peer.cfg.metadata.hook_name_out = TL_IN, TL_OUT
    peer.save_model(tmp_path)
    peer = sae_lens.SAE.load_from_disk(tmp_path).eval()
    loaded = load_sae(tmp_path)
    cfg = loaded.cfg
    assert (cfg.architecture, cfg.site, cfg.target) == (
        "jumprelu" if "JumpReLU" in cls else "relu",
        "mlp_in.3",
        "mlp_out.3",
    )
    assert (cfg.d_in, cfg.d_out, cfg.skip, cfg.k) == (D, D_OUT, "Skip" in cls, N)
    acts = peer.encode(x)
    assert 1 < (acts > 0).sum(1).float().mean() and (acts > 0).sum(1).max() < N
    assert_matches_saelens(loaded, peer, x)


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
        torch.testing.assert_close(acts, dense(out.top_acts, out.top_indices), **TOL)
        torch.testing.assert_close(recon, peer.decode(out.top_acts, out.top_indices), **TOL)


@pytest.mark.parametrize("skip", [False, True])
def test_load_sae_reads_sparsify_transcoders(tmp_path, x, sparsify, skip):
    cfg = sparsify.SparseCoderConfig(num_latents=N, k=K, transcode=True, skip_connection=skip)
    peer = sparsify.SparseCoder(D, cfg)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in peer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    peer.save_to_disk(tmp_path / "run" / "layers.3.mlp")
    ours = load_sae(tmp_path / "run")
    assert (ours.cfg.site, ours.cfg.target, ours.cfg.skip) == ("mlp_in.3", "mlp_out.3", skip)
    acts, recon = run(ours, x)
    with torch.no_grad():
        out = peer.encode(x)
        torch.testing.assert_close(acts, dense(out.top_acts, out.top_indices), **TOL)
        torch.testing.assert_close(recon, peer(x).sae_out, **TOL)
