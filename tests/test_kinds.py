"""The dictionaries beyond TopK: the threshold kernel against a dense reference and gradcheck,
Matryoshka's prefix losses, transcoders, planted recovery and exact resume for every kind, and
the bad-input sentences."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from hooks.errors import UserError
from sae.config import ARCHITECTURES, SAEConfig
from sae.kernels import threshold_encode
from sae.model import SAE
from sae.synthetic import recovery, write_synthetic_cache
from sae.train import TrainConfig, Trainer

EPS = 0.2  # the STE bandwidth of the kernel tests


def _inputs(N=40, d=12, n=64, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=dtype)
    W = torch.randn(d, n, generator=g, dtype=dtype) / d**0.5
    b = 0.1 * torch.randn(n, generator=g, dtype=dtype)
    b_dec = 0.1 * torch.randn(d, generator=g, dtype=dtype)
    theta = 0.3 + 0.2 * torch.rand(n, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, W, b, b_dec, theta)]


class _DenseJumpReLU(torch.autograd.Function):
    """Rajamanoharan et al.'s JumpReLU with its rectangle-kernel STE, on dense (N, n) tensors."""

    @staticmethod
    def forward(ctx, pre, theta):
        ctx.save_for_backward(pre, theta)
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        rectangle = ((pre - theta) / EPS).abs() < 0.5  # K((pre - theta) / eps)
        return grad * (pre > theta), (-(theta / EPS) * rectangle * grad).sum(0)


class _DenseStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta):
        ctx.save_for_backward(pre, theta)
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        rectangle = ((pre - theta) / EPS).abs() < 0.5
        return None, (-(1 / EPS) * rectangle * grad).sum(0)


def _dense(acts, idx, n):
    return torch.zeros(acts.shape[0], n, dtype=acts.dtype).scatter_add(1, idx, acts)


@pytest.mark.parametrize("chunk", [7, 512])
def test_threshold_encoder_matches_the_dense_ste_reference(chunk):
    x, W, b, b_dec, theta = _inputs()
    n = W.shape[1]
    enc = threshold_encode(x, W, b, theta, EPS, chunk_size=chunk, b_dec=b_dec)
    pre = (x - b_dec) @ W + b
    torch.testing.assert_close(_dense(enc.acts, enc.idx, n), pre * (pre > theta))
    assert torch.equal(enc.step.sum(1), (pre > theta).sum(1).to(enc.step.dtype))  # the L0
    # widths: the widest token's active latents plus those within half a bandwidth below
    assert enc.acts.shape[1] == int((pre > theta - EPS / 2).sum(1).max())
    g = torch.Generator().manual_seed(1)
    upstream = torch.randn(x.shape[0], n, generator=g, dtype=x.dtype)
    ours = (_dense(enc.acts, enc.idx, n) * upstream).sum() + 0.7 * enc.step.sum()
    ref = (_DenseJumpReLU.apply(pre, theta) * upstream).sum()
    ref = ref + 0.7 * _DenseStep.apply(pre, theta).sum()
    params = [x, W, b, b_dec, theta]
    got = torch.autograd.grad(ours, params, retain_graph=True)
    for a, r, name in zip(got, torch.autograd.grad(ref, params), "x W b b_dec theta".split()):
        torch.testing.assert_close(a, r, msg=name)
    assert torch.autograd.grad(enc.step.sum(), theta)[0].abs().sum() > 0  # the band is not empty


def test_threshold_encoder_gradcheck():
    x, W, b, b_dec, theta = _inputs(N=9, d=5, n=16)
    theta = theta.detach()  # a plain ReLU-like cut: autograd's own derivative exists off the cut

    def f(x, W, b, b_dec):
        enc = threshold_encode(x, W, b, theta, 0.0, chunk_size=4, b_dec=b_dec)
        return _dense(enc.acts, enc.idx, W.shape[1])

    assert torch.autograd.gradcheck(f, (x, W, b, b_dec))


def test_threshold_stays_fp32_under_a_bf16_encoder():
    x, W, b, _, theta = _inputs(dtype=torch.float32)
    theta = theta.detach().float().requires_grad_()
    enc = threshold_encode(x, W, b, theta, EPS, encode_dtype=torch.bfloat16)
    (grad,) = torch.autograd.grad(enc.acts.sum() + enc.step.sum(), theta)
    assert enc.acts.dtype == torch.float32 and grad.dtype == torch.float32
    # the kept pre-activations are the bf16 matmul's, compared with the fp32 thresholds
    pre = (x.bfloat16() @ W.bfloat16() + b.bfloat16()).float()
    assert torch.equal(enc.step.sum(1), (pre > theta).sum(1).float())


def test_jumprelu_module_keeps_its_threshold_in_fp32():
    sae = SAE(SAEConfig(16, 64, 4, "jumprelu")).to(torch.bfloat16)
    sae.log_threshold.data = sae.log_threshold.data.float()  # what .to() may not change
    assert sae.log_threshold.dtype == torch.float32
    assert SAE(SAEConfig(16, 64, 4, "jumprelu")).log_threshold.dtype == torch.float32


def _trained_looking(cfg: SAEConfig, seed: int = 0) -> SAE:
    sae = SAE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        sae.set_decoder_norm_to_unit_norm()
        if cfg.architecture == "jumprelu":
            sae.log_threshold.copy_(torch.full_like(sae.log_threshold, math.log(0.2)))
    return sae


def test_matryoshka_loss_sums_every_prefix_reconstruction():
    cfg = SAEConfig(16, 64, 4, "matryoshka", prefixes=[8, 24])
    assert cfg.prefixes == [8, 24, 64]  # the full dictionary is always the last prefix
    sae = _trained_looking(cfg).train()
    x = torch.randn(32, 16)
    out = sae(x)
    dense = _dense(out.top_acts, out.top_idx, 64)  # (N, n) after the batch cutoff
    assert int((dense > 0).sum()) <= 4 * 32
    xs = x * sae.input_scale
    var = ((xs - xs.mean(0)) ** 2).sum()
    fvus = [
        ((dense[:, :p] @ sae.W_dec[:p] + sae.b_dec - xs) ** 2).sum() / var for p in cfg.prefixes
    ]
    torch.testing.assert_close(out.fvu, fvus[-1])
    torch.testing.assert_close(out.prefix_fvu, fvus[0] + fvus[1])
    torch.testing.assert_close(out.loss, sum(fvus) + cfg.aux_alpha * out.aux_loss)


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
def test_transcoder_forward_and_folding(arch):
    cfg = SAEConfig(12, 48, 4, arch, target="mlp_out.0", d_out=20, skip=True)
    sae = _trained_looking(cfg)
    with torch.no_grad():
        sae.input_scale.fill_(1.7)
        sae.output_scale.fill_(0.6)
    x, y = torch.randn(30, 12), torch.randn(30, 20)
    out = sae.train()(x, target=y)
    xs, ys = x * 1.7, y * 0.6
    dense = _dense(out.top_acts, out.top_idx, 48)
    y_hat = dense @ sae.W_dec + sae.b_dec + xs @ sae.W_skip  # no b_dec subtracted from x
    torch.testing.assert_close(out.recon, y_hat / 0.6)
    torch.testing.assert_close(out.fvu, ((y_hat - ys) ** 2).sum() / ((ys - ys.mean(0)) ** 2).sum())
    pre = xs @ sae.W_enc + sae.b_enc
    active = dense != 0
    torch.testing.assert_close(dense[active], pre[active])
    folded = SAE(cfg)
    folded.load_folded(sae.folded_state())
    for a, b in zip(folded.eval().reconstruct(x), sae.eval().reconstruct(x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_relu_l1_weighs_latents_by_decoder_norm():
    sae = _trained_looking(SAEConfig(16, 64, 4, "relu")).train()
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2, 64)[:, None])  # rows of different norms
    out = sae(torch.randn(32, 16))
    dense = _dense(out.top_acts, out.top_idx, 64)
    l1 = (dense * sae.W_dec.norm(dim=1)).sum() / 32
    torch.testing.assert_close(out.sparsity_loss, sae.sparsity_coefficient * l1)
    norms = sae.W_dec.norm(dim=1).clone()
    sae.set_decoder_norm_to_unit_norm()  # ReLU's decoder is free: nothing to renormalise
    assert torch.equal(sae.W_dec.norm(dim=1), norms)


def test_sparsity_controller_moves_lambda_towards_the_target_l0():
    sae = SAE(SAEConfig(16, 64, 8, "jumprelu"))
    start = float(sae.sparsity_coefficient)
    sae.update_sparsity_coefficient(torch.tensor(16.0))  # too dense: penalise more
    assert float(sae.sparsity_coefficient) > start
    for _ in range(3):  # half the target: three steps of -1/2 undo the one of +1
        sae.update_sparsity_coefficient(torch.tensor(4.0))
    assert float(sae.sparsity_coefficient) < start


def test_the_warm_up_cut_keeps_each_latents_firing_rate():
    """JumpReLU leaves its TopK warm-up with one threshold, BatchTopK's cutoff: the batch keeps
    L0 = k and a frequent latent keeps its rate. A cut giving every latent the rate k / n
    silences most of what the frequent latents carry (BENCHMARKS.md, More dictionaries)."""
    from sae.synthetic import firing_probabilities, sample_codes

    n, k, N = 64, 4, 4096
    g = torch.Generator().manual_seed(0)
    codes = sample_codes(firing_probabilities(n, k, zipf=1.0), N, g)  # (N, n), Zipf rates
    sae = SAE(SAEConfig(n, n, k, "jumprelu"))
    with torch.no_grad():  # an encoder that reads the codes exactly: pre = codes
        sae.W_enc.copy_(torch.eye(n))
        sae.b_dec.zero_()
    sae.cut_like_batch_topk(codes)
    theta = sae.latent_threshold()
    assert (theta == theta[0]).all()
    fires = codes > theta  # (N, n)
    assert fires.sum(1).float().mean() == pytest.approx(k, rel=0.05)
    # the most frequent latent fires far above the k / n share a per-latent cut would give it
    assert fires[:, 0].float().mean() > 5 * k / n


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    path = tmp_path_factory.mktemp("planted") / "cache"
    features = write_synthetic_cache(path, d=32, n_features=128, tokens=200_000, mean_active=4)
    return path, features


@pytest.fixture(scope="module")
def planted_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("pair") / "cache"
    pair = write_synthetic_cache(
        path, d=32, n_features=128, tokens=200_000, mean_active=4, transcode=True
    )
    return path, pair


def _cfg(cache, **kw):
    base = dict(cache=str(cache), sites=["synthetic"], latents=[256], ks=[8], tokens=200_000,
                batch=1024, log_every=20, checkpoint_every=10**9)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _log(run):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


# what each kind reaches on the planted stream in 200k tokens (measured: about 0.05 above each)
RECOVERY = {"batchtopk": 0.82, "matryoshka": 0.75, "jumprelu": 0.8, "relu": 0.9}


@pytest.mark.parametrize("arch", list(RECOVERY))
def test_planted_features_are_recovered_by_every_kind(planted, tmp_path, arch):
    cache, features = planted
    trainer = Trainer(_cfg(cache, architecture=arch), tmp_path / "run", progress=False)
    (run,) = trainer.fit()
    sae = trainer.members[0].sae
    cos = recovery(sae.W_dec.detach(), features)
    assert cos.mean() >= RECOVERY[arch], cos.mean()
    log = _log(run)
    # the L1 penalty shrinks ReLU's activations: its FVU falls least
    assert log[-1]["fvu"] < (0.7 if arch == "relu" else 0.5) * log[0]["fvu"]
    if arch in ("jumprelu", "relu"):  # the controller holds the L0 near its target of 8
        assert 4 <= log[-1]["l0"] <= 12, log[-1]["l0"]
        assert "sparsity_coefficient" in log[-1]
    assert json.loads((run / "run.json").read_text())["architecture"] == arch


def test_planted_transcoder_learns_the_map_between_sites(planted_pair, tmp_path):
    """x = codes @ F_in and y = codes @ F_out: the transcoder's decoder must find F_out, and
    its encoder read the codes from x."""
    cache, (f_in, f_out) = planted_pair
    cfg = _cfg(cache, target="synthetic_out")
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    (run,) = trainer.fit()
    sae = trainer.members[0].sae
    assert sae.cfg.target == "synthetic_out" and sae.cfg.is_transcoder
    assert recovery(sae.W_dec.detach(), f_out).mean() >= 0.85
    assert recovery(sae.W_dec.detach(), f_in).mean() < 0.5  # not the input's features
    assert _log(run)[-1]["fvu"] < 0.2


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "topk"] + ["transcoder"])
def test_every_kind_resumes_exactly(planted_pair, tmp_path, arch):
    cache, _ = planted_pair
    kind = dict(target="synthetic_out", skip=True) if arch == "transcoder" else {}
    kind |= {"architecture": arch} if arch != "transcoder" else {}
    cfg = dict(tokens=24 * 1024, log_every=1, checkpoint_every=8 * 1024, buffer_tokens=8192,
               dead_tokens=4096, **kind)  # fmt: skip
    Trainer(
        _cfg(cache, **{**cfg, "checkpoint_every": 10**9}), tmp_path / "whole", progress=False
    ).fit()
    killed = Trainer(_cfg(cache, **cfg), tmp_path / "killed", progress=False)
    real, calls = killed._train_member, [0]

    def dying(*args):
        calls[0] += 1
        if calls[0] == 14:
            raise KeyboardInterrupt
        return real(*args)

    killed._train_member = dying
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    resumed = Trainer(_cfg(cache, **cfg), tmp_path / "killed", resume=True, progress=False)
    assert resumed.step == 8
    resumed.fit()
    a, b = _log(tmp_path / "whole"), _log(tmp_path / "killed")
    assert [r["step"] for r in b] == list(range(1, 25))
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=1e-7)
    wa = load_file(tmp_path / "whole/sae.safetensors")
    wb = load_file(tmp_path / "killed/sae.safetensors")
    assert set(wa) == set(wb)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


def test_bad_kinds_get_one_sentence(planted_pair, tmp_path):
    cache, _ = planted_pair
    with pytest.raises(UserError, match=r"Unknown SAE architecture 'gated'; use one of"):
        SAEConfig(16, 64, 4, "gated")
    with pytest.raises(UserError, match=r"target L0 \(--k\) of a jumprelu SAE must be positive"):
        SAEConfig(16, 64, 0, "jumprelu")
    with pytest.raises(
        UserError, match=r"prefix sizes must be positive and increasing, got \[8, 8"
    ):
        SAEConfig(16, 64, 4, "matryoshka", prefixes=[8, 8, 64])
    with pytest.raises(UserError, match=r"prefix size 128 exceeds the 64 latents"):
        SAEConfig(16, 64, 4, "matryoshka", prefixes=[8, 128])
    with pytest.raises(UserError, match=r"Prefix sizes belong to a matryoshka SAE"):
        SAEConfig(16, 64, 4, "topk", prefixes=[8])
    with pytest.raises(UserError, match=r"skip connection belongs to a transcoder"):
        SAEConfig(16, 64, 4, skip=True)
    # the trainer's config refuses them before it opens a model or cache
    for bad, message in (
        (dict(architecture="gated"), "Unknown SAE architecture 'gated'"),
        (dict(architecture="relu", ks=[0]), r"target L0 \(--k\) of a relu"),
        (dict(architecture="matryoshka", prefixes=[300]), "exceeds the 256"),
    ):
        with pytest.raises(UserError, match=message):
            TrainConfig(model="no-such-model", latents=[256], **bad).check()
    with pytest.raises(UserError, match=r"--target synthetic is the input site itself"):
        _cfg(cache, target="synthetic").check()
    with pytest.raises(UserError, match=r"holds sites .* not 'resid_post.3'"):
        Trainer(_cfg(cache, target="resid_post.3"), tmp_path / "t", progress=False)


def test_a_target_of_another_width_is_refused(tmp_path):
    from hooks.activations import Rows
    from hooks.cache import write_cache

    def rows_after(cursor):
        for c in range(cursor, 1 << 20):
            yield c + 1, Rows(
                acts={"a": torch.randn(1024, 16), "b": torch.randn(1024, 24)},
                token=torch.zeros(1024, dtype=torch.int32), doc=torch.zeros(1024, dtype=torch.int32),
                pos=torch.arange(1024, dtype=torch.int32), window=torch.full((1024,), c),
            )  # fmt: skip

    wanted = {"model": "synthetic", "sites": ["a", "b"], "d_model": 16, "dtype": "float32",
              "tokenizer": None, "selection": None, "planted": {}}  # fmt: skip
    write_cache(tmp_path / "c", wanted, rows_after, 8192, shard_tokens=4096, progress=False,
                desc="t")  # fmt: skip
    cfg = TrainConfig(cache=str(tmp_path / "c"), sites=["a"], target="b", latents=[64], ks=[4],
                      tokens=4096, batch=1024)  # fmt: skip
    with pytest.raises(
        UserError, match=r"target site b is 24 wide, but the transcoder's output is 16"
    ):
        Trainer(cfg, tmp_path / "run", progress=False).fit()
