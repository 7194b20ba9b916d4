"""Evaluation: metrics against a brute-force computation, the identity SAE, the exact error-term
splice, the explained-variance formula, the CLI, and bad input."""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model

from analysis.evaluation import ReconstructionStats, evaluate, sae_splice, with_error_term
from analysis.run import open_run
from hooks.errors import UserError
from hooks.models import LoadedModel
from hooks.selection import Selection
from hooks.sites import Capture, Splice, special_token_ids, token_mask
from sae.config import SAEConfig
from sae.formats import save_sae
from sae.model import SAE
from saewb_cli.measure import add_parsers, cmd_eval

SITE, LAYER, CONTEXT, D = "resid_post.1", 1, 32, 32


# -----------------------------------------------------------------------------
# fixtures: a tiny Llama saved to disk, a text file, and hand-made run directories


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """The tiny Llama (in memory and as a directory) and a text file of 1200 short documents,
    60 of which (every 20th) are held out: ~1500 tokens, ~45 windows of 32."""
    root = tmp_path_factory.mktemp("eval")
    model = make_model("llama", len(tokenizer))
    model.save_pretrained(root / "tiny-llama")
    tokenizer.save_pretrained(root / "tiny-llama")
    text = root / "text.txt"
    days = ("Monday", "Tuesday", "Friday")
    text.write_text(
        "\n\n".join(
            f"Story {i}: the cat sat on the mat, {i % 7} dogs ran in the park on {days[i % 3]}."
            for i in range(1200)
        )
    )
    loaded = LoadedModel(name="tiny-llama", model=model, tokenizer=tokenizer)
    return root, loaded, text


def make_run(path, world, sae: SAE, selection: Selection | None = None):
    """A run directory as `saewb train` leaves it: the SAE files and a run.json."""
    root, _, text = world
    save_sae(sae, path)
    selection = selection or Selection(dataset=str(text), context_size=CONTEXT)
    info = {"model": str(root / "tiny-llama"), "site": sae.cfg.site or SITE}
    info |= {"architecture": sae.cfg.architecture, "target": sae.cfg.target or None}
    (path / "run.json").write_text(json.dumps(info | {"selection": selection.to_dict()}))
    return open_run(path)


def random_sae(seed: int = 0, n: int = 64, k: int = 4, n_dead: int = 8) -> SAE:
    """A lossy SAE with some structure: random unit decoder rows, tied encoder, b_dec near the
    site's scale, and the last n_dead latents switched off for good by a huge negative bias."""
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d_in=D, n_latents=n, k=k)).eval()
    sae.reset_parameters(g)
    with torch.no_grad():
        sae.b_dec.copy_(0.1 * torch.randn(D, generator=g))
        sae.b_enc.copy_(0.05 * torch.randn(n, generator=g))
        sae.b_enc[n - n_dead :] = -1e4
    return sae


def identity_sae() -> SAE:
    """x_hat = x exactly, despite the ReLU: latent i carries x_i when positive and latent d+i
    carries -x_i when x_i is negative, so with k = d the top-k is exactly the d positive
    pre-activations (one of each pair), and W_dec = [I; -I] maps both back to x_i."""
    eye = torch.eye(D)
    sae = SAE(SAEConfig(d_in=D, n_latents=2 * D, k=D)).eval()
    sae.load_folded(
        {
            "W_enc": torch.cat([eye, -eye], dim=1),  # (d, 2d)
            "b_enc": torch.zeros(2 * D),
            "W_dec": torch.cat([eye, -eye], dim=0),  # (2d, d)
            "b_dec": torch.zeros(D),
        }
    )
    return sae


# -----------------------------------------------------------------------------
# the brute-force reference: dense SAE, plain loops, an independent hook


def dense_sae(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (N, n) dense latents, x_hat (N, d_out)) with plain matmuls on the saved weights: each
    latent above its threshold (0 for topk and relu, BatchTopK's one value, JumpReLU's own), of
    which a token keeps its `width` largest (k for topk, at most 4k for the other kinds). A
    transcoder's input is not centred, and its skip connection adds x @ W_skip."""
    w = sae.folded_state()
    n = sae.cfg.n_latents
    centre = 0 if sae.cfg.is_transcoder else w["b_dec"]
    pre = (x - centre) @ w["W_enc"] + w["b_enc"]  # (N, n)
    theta = w.get("threshold", torch.zeros(n))
    above = torch.where(pre > theta, pre, torch.zeros(()))  # (N, n)
    width = sae.cfg.k if sae.cfg.architecture == "topk" else min(4 * sae.cfg.k, n)
    top = above.topk(width, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values)
    y_hat = z @ w["W_dec"] + w["b_dec"]
    if sae.cfg.skip:
        y_hat = y_hat + x @ w["W_skip"]
    return z, y_hat


@torch.no_grad()
def brute_force(run, loaded, n_tokens: int, batch: int) -> dict:
    """The reference of every metric. An SAE at resid_post.1 reads and replaces block 1's
    output; a transcoder from mlp_in.1 to mlp_out.1 reads the input of block 1's MLP and
    replaces the MLP's output, which is then the reference (and the site ablated)."""
    model, tokenizer, sae = loaded.model, loaded.tokenizer, run.sae
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    windows = list(run.heldout_windows(tokenizer))
    transcoder = sae.cfg.is_transcoder
    assert (run.site, run.target) == ((TC_SITE, TC_TARGET) if transcoder else (SITE, ""))
    layer = model.model.layers[LAYER]
    layer = layer.mlp if transcoder else layer  # the module whose output is spliced
    xs, x_hats, zs = [], [], []
    ce = {"clean": [], "spliced": [], "ablated": [], "ablated_kept": []}
    kl = {"spliced": [], "ablated": [], "ablated_kept": []}
    count = n_windows = 0  # kept tokens so far, windows up to the last one with a kept token
    for start in range(0, len(windows), batch):
        if count >= n_tokens:
            break
        ids = torch.stack([w.tokens for w in windows[start : start + batch]])  # (B, T)
        B, T = ids.shape
        keep = torch.zeros(B, T, dtype=torch.bool)
        for b in range(B):  # row-major: the first n_tokens eligible tokens
            for t in range(1, T):
                if int(ids[b, t]) not in special and count < n_tokens:
                    keep[b, t] = True
                    count += 1
                    n_windows = start + b + 1
        recorded = {}
        handles = [layer.register_forward_hook(lambda m, a, out, r=recorded: r.update(y=out))]
        if transcoder:  # the MLP's input: the Llama MLP takes the normed residual by position
            handles.append(
                layer.register_forward_pre_hook(lambda m, a, r=recorded: r.update(x=a[0]))
            )
        clean = model(ids).logits  # (B, T, V)
        for handle in handles:
            handle.remove()
        x = recorded["y"][keep]  # (N, d): the reference, the site that is spliced
        z, x_hat = dense_sae(sae, recorded["x"][keep] if transcoder else x)
        xs.append(x), x_hats.append(x_hat), zs.append(z)
        runs = {"clean": clean}
        runs["ablated"] = ablated_forward(model, layer, ids, None)
        runs["ablated_kept"] = ablated_forward(model, layer, ids, keep)

        def replace(m, a, out, keep=keep, replacement=x_hat):
            out = out.clone()
            out[keep] = replacement
            return out

        handle = layer.register_forward_hook(replace)
        runs["spliced"] = model(ids).logits
        handle.remove()
        for b in range(B):
            for t in range(T):  # SAELens: KL at every kept position, CE where t+1 exists
                if not keep[b, t]:
                    continue
                logp = {name: F.log_softmax(lg[b, t].double(), -1) for name, lg in runs.items()}
                for name in kl:
                    kl[name].append((logp["clean"].exp() * (logp["clean"] - logp[name])).sum())
                if t == T - 1:
                    continue
                for name in ce:
                    ce[name].append(-logp[name][ids[b, t + 1]])
    X = torch.cat(xs).double()
    Xh = torch.cat(x_hats).double()
    Z = torch.cat(zs).double()
    err = (X - Xh).pow(2).sum()
    fvu = err / (X - X.mean(0)).pow(2).sum()
    density = (Z > 0).double().mean(0)
    mean = {name: torch.stack(v).mean().item() for name, v in ce.items()}
    kls = {name: torch.stack(v).mean().item() for name, v in kl.items()}
    return {
        "n_tokens": X.shape[0],
        "n_scored_tokens": len(ce["clean"]),
        "n_kl_tokens": len(kl["spliced"]),
        "n_windows": n_windows,
        "fvu": fvu.item(),
        "explained_variance": 1 - fvu.item(),
        "mse": (X - Xh).pow(2).sum(1).mean().item(),
        "cossim": F.cosine_similarity(X, Xh, dim=1).mean().item(),
        "l2_norm_in": X.norm(dim=1).mean().item(),
        "l2_norm_out": Xh.norm(dim=1).mean().item(),
        "l2_ratio": (Xh.norm(dim=1) / X.norm(dim=1)).mean().item(),
        "relative_reconstruction_bias": (Xh.pow(2).sum(1).mean() / (X * Xh).sum(1).mean()).item(),
        "l0": (Z > 0).double().sum(1).mean().item(),
        "l1": Z.sum(1).mean().item(),
        "dead_fraction": (density == 0).double().mean().item(),
        "frac_over_1_percent": (density > 0.01).double().mean().item(),
        "frac_over_10_percent": (density > 0.10).double().mean().item(),
        "ce_loss_clean": mean["clean"],
        "ce_loss_spliced": mean["spliced"],
        **{
            f"{what}{suffix}": value
            for suffix in ("", "_kept")
            for what, value in (
                ("ce_loss_ablated", mean["ablated" + suffix]),
                ("ce_loss_recovered", recovered(mean, "ablated" + suffix)),
                ("kl_div_ablated", kls["ablated" + suffix]),
                (
                    "kl_div_score",
                    (kls["ablated" + suffix] - kls["spliced"]) / kls["ablated" + suffix],
                ),
            )
        },
        "kl_div_spliced": kls["spliced"],
    }


def recovered(ce: dict, base: str) -> float:
    return (ce[base] - ce["spliced"]) / (ce[base] - ce["clean"])


def ablated_forward(model, layer, ids, keep):
    """Logits with the block's output zeroed: at every position (keep None, SAELens's baseline)
    or at the kept positions only."""

    def zero(m, a, out):
        if keep is None:
            return torch.zeros_like(out)
        out = out.clone()
        out[keep] = 0
        return out

    handle = layer.register_forward_hook(zero)
    try:
        return model(ids).logits
    finally:
        handle.remove()


# -----------------------------------------------------------------------------
# the metrics


def test_metrics_match_brute_force(world, tmp_path):
    _, loaded, _ = world
    run = make_run(tmp_path, world, random_sae())
    # 600 tokens: the budget ends inside a window of the third batch of 8 windows
    record = evaluate(run, 600, batch_windows=8, loaded=loaded, progress=False)
    ref = brute_force(run, loaded, 600, batch=8)
    m = record["metrics"]
    assert record["n_tokens"] == ref["n_tokens"] == 600
    assert record["n_scored_tokens"] == ref["n_scored_tokens"]
    assert record["n_kl_tokens"] == ref["n_kl_tokens"] > ref["n_scored_tokens"]
    assert record["n_windows"] == ref["n_windows"] and 16 < ref["n_windows"] < 24
    for key, expected in ref.items():
        if key.startswith("n_"):
            continue
        assert m[key] == pytest.approx(expected, rel=1e-5, abs=1e-7), key
    # The example is not degenerate: the SAE is lossy, some latents are dead, some rare.
    assert m["fvu"] > 0.1 and m["ce_loss_spliced"] > m["ce_loss_clean"]
    assert m["dead_fraction"] >= 8 / 64 and 0 < m["frac_over_10_percent"] < 1
    assert m["l0"] <= 4 and m["kl_div_spliced"] > 0 and m["kl_div_ablated"] > 0
    # The two baselines differ: zeroing position 0 too changes what every later token sees.
    assert abs(m["ce_loss_ablated"] - m["ce_loss_ablated_kept"]) > 1e-3
    assert abs(m["kl_div_ablated"] - m["kl_div_ablated_kept"]) > 1e-3


def test_identity_sae_recovers_everything(world, tmp_path):
    _, loaded, _ = world
    run = make_run(tmp_path, world, identity_sae())
    m = evaluate(run, 400, loaded=loaded, progress=False)["metrics"]
    assert m["fvu"] < 1e-12 and m["explained_variance"] > 1 - 1e-12
    assert m["cossim"] == pytest.approx(1.0) and m["l2_ratio"] == pytest.approx(1.0)
    assert m["relative_reconstruction_bias"] == pytest.approx(1.0)
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert m["kl_div_spliced"] < 1e-9 and m["kl_div_score"] == pytest.approx(1.0, abs=1e-6)
    # the ratios' denominators are real (zeroing the whole site of a random model hurts less)
    assert m["ce_loss_ablated_kept"] > m["ce_loss_clean"] + 0.01
    assert abs(m["ce_loss_ablated"] - m["ce_loss_clean"]) > 1e-3
    assert m["ce_loss_recovered_kept"] == pytest.approx(1.0, abs=1e-6)
    assert m["kl_div_score_kept"] == pytest.approx(1.0, abs=1e-6)
    assert m["l0"] == D and m["dead_fraction"] == 0.0


def test_error_term_splice_gives_the_clean_loss_exactly(world, tmp_path):
    _, loaded, _ = world
    run = make_run(tmp_path, world, random_sae())
    plain = evaluate(run, 300, loaded=loaded, progress=False)["metrics"]
    exact = evaluate(run, 300, loaded=loaded, progress=False, use_error_term=True)["metrics"]
    assert plain["ce_loss_spliced"] > plain["ce_loss_clean"] + 0.01  # the SAE alone is lossy...
    assert exact["ce_loss_spliced"] == exact["ce_loss_clean"]  # ...and the error term undoes it
    assert exact["kl_div_spliced"] == 0.0 and exact["ce_loss_recovered"] == 1.0
    # The reconstruction metrics describe x_hat itself, with or without the error term.
    assert exact["fvu"] == pytest.approx(plain["fvu"], rel=1e-12)
    # The clean run equals the model without any hooks, and no hook is left behind.
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in loaded.model.modules())
    assert exact["ce_loss_clean"] == pytest.approx(
        brute_force(run, loaded, 300, batch=8)["ce_loss_clean"], rel=1e-6
    )


@pytest.mark.parametrize("site", ["resid_pre.2", "resid_post.1", "mlp_out.0", "attn_out.3"])
def test_error_term_splice_is_bitwise_on_every_architecture(tiny_model, tokenizer, site):
    ids = tokenizer([" The cat sat on the mat. The dog ran in the park."] * 2, return_tensors="pt")
    ids = ids["input_ids"]  # (2, T)
    keep = token_mask(ids, special_ids=special_token_ids(tokenizer))
    sae = random_sae(n=64, k=4, n_dead=0)
    with torch.no_grad():
        clean = tiny_model(ids).logits
        with Splice(tiny_model, site, sae_splice(sae, keep, use_error_term=True)):
            exact = tiny_model(ids).logits
        with Splice(tiny_model, site, sae_splice(sae, keep)):
            lossy = tiny_model(ids).logits
    assert torch.equal(exact, clean)
    assert not torch.allclose(lossy[:, 1:], clean[:, 1:], atol=1e-4)
    # Masked positions keep their activation: position 0 sees nothing spliced (causal model).
    torch.testing.assert_close(lossy[:, 0], clean[:, 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka", "jumprelu", "relu"])
def test_the_other_kinds_match_brute_force(world, tmp_path, architecture):
    """Thresholds set from the data so that each latent fires on ~8% of tokens: L0 varies by
    token, the code is zero-padded, and L0, densities and the splice follow the dense code."""
    _, loaded, _ = world
    sae = threshold_sae(architecture, sample_site(loaded, world, SITE))
    run = make_run(tmp_path, world, sae)
    record = evaluate(run, 400, batch_windows=8, loaded=loaded, progress=False)
    ref = brute_force(run, loaded, 400, batch=8)
    m = record["metrics"]
    assert record["architecture"] == architecture and record["target"] is None
    for key, expected in ref.items():
        if not key.startswith("n_"):
            assert m[key] == pytest.approx(expected, rel=1e-5, abs=1e-7), key
    assert 2 < m["l0"] < 4 * sae.cfg.k and m["l0"] != round(m["l0"])  # not a fixed k per token
    assert 0 < m["dead_fraction"] < 0.5 and m["kl_div_spliced"] > 1e-6


# -----------------------------------------------------------------------------
# transcoders: from the input of block 1's MLP (after its norm) to the MLP's output

TC_SITE, TC_TARGET = "mlp_in.1", "mlp_out.1"


@pytest.fixture(scope="module")
def tc_world(world, tokenizer):
    """The world with a tiny Llama whose block-1 MLP writes 100x more: a random MLP barely
    moves the logits, and CE loss recovered would divide by almost nothing."""
    root, _, text = world
    model = make_model("llama", len(tokenizer))
    with torch.no_grad():
        model.model.layers[LAYER].mlp.down_proj.weight.mul_(100)
    return root, LoadedModel(name="tiny-llama-mlp", model=model, tokenizer=tokenizer), text


def sample_site(loaded, world, site: str) -> torch.Tensor:
    """(N, d) activations at `site` on a few held-out windows, to set thresholds from."""
    root, _, text = world
    windows = Selection(dataset=str(text), context_size=CONTEXT).windows(loaded.tokenizer, "eval")
    ids = torch.stack([w.tokens for _, w in zip(range(8), windows)])  # (8, T)
    with Capture(loaded.model, [site]) as capture:
        return capture(ids)[site][:, 1:].reshape(-1, D)


def threshold_sae(architecture: str, x: torch.Tensor, **cfg) -> SAE:
    """A random SAE (or transcoder) of a kind whose L0 varies, each latent cut at its 92nd
    percentile on the sample x (N, d_in); the last 8 latents never fire."""
    g = torch.Generator().manual_seed(1)
    n = 64
    sae = SAE(SAEConfig(d_in=D, n_latents=n, k=4, architecture=architecture, **cfg)).eval()
    sae.reset_parameters(g)
    with torch.no_grad():
        sae.b_dec.copy_(0.1 * x.std() * torch.randn(sae.cfg.d_out, generator=g))
        if sae.cfg.skip:
            sae.W_skip.copy_(torch.randn(D, sae.cfg.d_out, generator=g) / D)
        centre = 0 if sae.cfg.is_transcoder else sae.b_dec
        pre = (x - centre) @ sae.W_enc  # (N, n)
        cut = pre.quantile(0.92, dim=0)  # (n,)
        cut[n - 8 :] = pre.max() + 1.0
        # pre + b_enc > theta exactly where pre > cut: b_enc = theta - cut, theta > 0
        theta = float(pre.std()) * (1 + torch.rand(n, generator=g))  # (n,)
        if architecture == "jumprelu":
            sae.b_enc.copy_(theta - cut)
            sae.log_threshold.copy_(theta.log())
        elif architecture == "relu":
            sae.b_enc.copy_(-cut)
        else:  # batchtopk, matryoshka: one threshold at inference
            sae.b_enc.copy_(theta[0] - cut)
            sae.threshold.fill_(float(theta[0]))
    return sae


def random_transcoder(x: torch.Tensor, **cfg) -> SAE:
    """A lossy topk transcoder mlp_in.1 -> mlp_out.1 with a skip connection, its output on the
    scale of the target's sample (N, d_out)."""
    g = torch.Generator().manual_seed(2)
    cfg = dict(site=TC_SITE, target=TC_TARGET, skip=True) | cfg
    sae = SAE(SAEConfig(d_in=D, n_latents=64, k=4, **cfg)).eval()
    sae.reset_parameters(g)
    with torch.no_grad():
        scale = float(x.norm(dim=1).mean())
        sae.W_dec.mul_(0.3 * scale)
        sae.W_skip.copy_(0.3 * scale * torch.randn(D, sae.cfg.d_out, generator=g) / D)
        sae.b_dec.copy_(x.mean(0) if x.shape[1] == sae.cfg.d_out else 0)
        sae.b_enc.copy_(0.05 * torch.randn(64, generator=g))
        sae.b_enc[-8:] = -1e4
    return sae


def test_transcoder_metrics_match_brute_force(tc_world, tmp_path):
    """The splice puts y_hat = reconstruct(MLP input) in place of the MLP's output; the reference
    hooks the Llama MLP by hand, and every metric is measured against the MLP's output."""
    _, loaded, _ = tc_world
    sae = random_transcoder(sample_site(loaded, tc_world, TC_TARGET))
    run = make_run(tmp_path, tc_world, sae)
    assert (run.site, run.target) == (TC_SITE, TC_TARGET)
    record = evaluate(run, 600, batch_windows=8, loaded=loaded, progress=False)
    ref = brute_force(run, loaded, 600, batch=8)
    m = record["metrics"]
    assert record["architecture"] == "topk" and record["target"] == TC_TARGET
    assert record["n_tokens"] == ref["n_tokens"] == 600
    for key, expected in ref.items():
        if key.startswith("n_"):
            assert record[key] == expected, key
        else:
            assert m[key] == pytest.approx(expected, rel=1e-5, abs=1e-7), key
    # Not degenerate: zeroing the MLP costs loss, and the lossy transcoder changes the logits.
    assert m["ce_loss_ablated_kept"] > m["ce_loss_clean"] + 1e-3 and m["kl_div_spliced"] > 1e-6
    assert m["fvu"] > 0.05 and m["ce_loss_spliced"] != m["ce_loss_clean"]
    assert m["l0"] <= 4 and m["dead_fraction"] >= 8 / 64


def test_transcoder_error_term_gives_the_clean_loss_exactly(tc_world, tmp_path):
    _, loaded, _ = tc_world
    for architecture in ("topk", "jumprelu"):
        if architecture == "topk":
            sae = random_transcoder(sample_site(loaded, tc_world, TC_TARGET))
        else:
            x = sample_site(loaded, tc_world, TC_SITE)
            sae = threshold_sae("jumprelu", x, site=TC_SITE, target=TC_TARGET, skip=True)
        run = make_run(tmp_path / architecture, tc_world, sae)
        plain = evaluate(run, 300, loaded=loaded, progress=False)["metrics"]
        exact = evaluate(run, 300, loaded=loaded, progress=False, use_error_term=True)["metrics"]
        assert plain["ce_loss_spliced"] != plain["ce_loss_clean"], architecture
        assert exact["ce_loss_spliced"] == exact["ce_loss_clean"], architecture
        assert exact["kl_div_spliced"] == 0.0 and exact["ce_loss_recovered"] == 1.0
        assert exact["fvu"] == pytest.approx(plain["fvu"], rel=1e-12) and exact["fvu"] > 0.05
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in loaded.model.modules())


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_transcoder_error_term_splice_is_bitwise_on_every_architecture(tokenizer, arch):
    """Capture records mlp_in.1 and, later in the same forward, the Splice at mlp_out.1 reads it."""
    from analysis.evaluation import recorded_input
    from hooks.sites import Capture, resolve_site

    model = make_model(arch, len(tokenizer))
    ids = tokenizer([" The cat sat on the mat. The dog ran in the park."] * 2, return_tensors="pt")
    ids = ids["input_ids"]  # (2, T)
    keep = token_mask(ids, special_ids=special_token_ids(tokenizer))
    site, target = resolve_site(model, TC_SITE), resolve_site(model, TC_TARGET)
    with torch.no_grad(), Capture(model, [TC_SITE, TC_TARGET]) as capture:
        clean = model(ids).logits
        y = capture.acts[TC_TARGET]  # (2, T, d)
        sae = random_transcoder(y[keep])
        source = recorded_input(capture, site, target)
        with Splice(model, target, sae_splice(sae, keep, use_error_term=True, source=source)):
            capture.acts.clear()
            exact = model(ids).logits
        with Splice(model, target, sae_splice(sae, keep, source=source)):
            capture.acts.clear()
            lossy = model(ids).logits
    assert torch.equal(exact, clean)
    assert not torch.equal(lossy[:, 1:], clean[:, 1:])
    torch.testing.assert_close(lossy[:, 0], clean[:, 0], rtol=0, atol=1e-6)


def test_an_exact_transcoder_recovers_everything(world, tokenizer, tmp_path):
    """On a GPT-2 whose block-1 MLP is linear (identity activation), a transcoder with no active
    latents and skip W_fc @ W_proj, b_dec = b_fc @ W_proj + b_proj, is the MLP itself."""
    import transformers as tf
    from conftest import CONFIGS

    torch.manual_seed(0)
    config = CONFIGS["gpt2"](tf, len(tokenizer), 4, D, activation_function="linear")
    model = tf.AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    mlp = model.transformer.h[LAYER].mlp
    with torch.no_grad():
        mlp.c_proj.weight.mul_(30)  # so that zeroing the MLP costs loss
    W_fc, b_fc, W_proj, b_proj = (
        p.detach().double()
        for p in (mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias)
    )  # GPT-2's Conv1D: x @ W + b
    sae = SAE(SAEConfig(d_in=D, n_latents=16, k=2, site=TC_SITE, target=TC_TARGET, skip=True))
    state = sae.folded_state()
    state |= {"W_skip": (W_fc @ W_proj).float(), "b_dec": (b_fc @ W_proj + b_proj).float()}
    state["b_enc"] = torch.full((16,), -1e4)  # no latent ever fires
    sae.load_folded(state)
    run = make_run(tmp_path, world, sae)
    loaded = LoadedModel(name="tiny-gpt2-linear", model=model, tokenizer=tokenizer)
    m = evaluate(run, 400, loaded=loaded, progress=False)["metrics"]
    assert m["fvu"] < 1e-10 and m["cossim"] == pytest.approx(1.0, abs=1e-6)
    assert m["ce_loss_ablated_kept"] > m["ce_loss_clean"] + 0.01  # the MLP matters
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert m["ce_loss_recovered_kept"] == pytest.approx(1.0, abs=1e-4)
    assert m["kl_div_spliced"] < 1e-9 and m["l0"] == 0 and m["dead_fraction"] == 1.0


def test_transcoder_bad_widths_and_order(tc_world, tmp_path):
    _, loaded, _ = tc_world
    y = sample_site(loaded, tc_world, TC_TARGET)
    wide = random_transcoder(torch.randn(10, 48), d_out=48)
    run = make_run(tmp_path / "wide", tc_world, wide)
    with pytest.raises(UserError) as exc:
        evaluate(run, 100, loaded=loaded, progress=False)
    message = _one_sentence(exc)
    assert "d_out=48" in message and "mlp_out.1" in message and "width 32" in message
    # the input site comes after the target in the forward pass: no input where y_hat goes
    backwards = random_transcoder(y, site="mlp_in.2", target="mlp_out.1")
    run = make_run(tmp_path / "backwards", tc_world, backwards)
    with pytest.raises(UserError) as exc:
        evaluate(run, 100, loaded=loaded, progress=False)
    assert "mlp_in.2" in _one_sentence(exc) and "after its target mlp_out.1" in str(exc.value)


def test_with_error_term_is_exact_where_float32_is_not():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, generator=g) * 10.0 ** torch.randint(-3, 4, (20_000,), generator=g)
    x_hat = x + torch.randn(20_000, generator=g) * 7.0
    assert not torch.equal(x_hat + (x - x_hat), x)  # the naive sum rounds
    assert torch.equal(with_error_term(x, x_hat), x)
    xb, xhb = x.bfloat16(), x_hat.bfloat16()
    assert torch.equal(with_error_term(xb, xhb), xb)


def test_explained_variance_uses_the_mean_not_zero():
    """Data far from the origin: the legacy 1 - E||x-x_hat||^2 / E||x||^2 gives ~1; the correct
    formula subtracts ||E x||^2. The mean of 1e4 also needs float64 sums (float32 cancels)."""
    g = torch.Generator().manual_seed(0)
    x = (1e4 + torch.randn(3000, 8, generator=g)).float()  # (N, d)
    x_hat = x + 0.5 * torch.randn(3000, 8, generator=g)
    X, Xh = x.double(), x_hat.double()
    correct = 1 - (X - Xh).pow(2).sum() / (X - X.mean(0)).pow(2).sum()  # two-pass, ~0.75
    legacy = 1 - (X - Xh).pow(2).sum(1).mean() / X.pow(2).sum(1).mean()
    acts, idx = torch.ones(3000, 2), torch.zeros(3000, 2, dtype=torch.long)
    stats = ReconstructionStats(8, 4)
    for chunk in torch.arange(3000).split(701):  # streamed in uneven chunks
        stats.update(x[chunk], x_hat[chunk], acts[chunk], idx[chunk])
    m = stats.metrics()
    assert m["explained_variance"] == pytest.approx(correct.item(), abs=1e-6)
    assert 0.7 < m["explained_variance"] < 0.8 and legacy > 0.9999
    assert m["fvu"] == pytest.approx(1 - correct.item(), abs=1e-6)
    assert m["mse"] == pytest.approx((X - Xh).pow(2).sum(1).mean().item(), rel=1e-9)
    # one latent fires on every token, the others never
    assert m["dead_fraction"] == 0.75 and m["frac_over_10_percent"] == 0.25 and m["l0"] == 2


def test_the_training_token_selection_is_used(world, tmp_path):
    """A run trained on special tokens and position 0 is evaluated on them."""
    root, loaded, _ = world
    text = tmp_path / "short.txt"  # 15 held-out documents: ~11 windows
    text.write_text("\n\n".join(f"Story {i}: the cat sat on the mat." for i in range(300)))
    kept = Selection(dataset=str(text), context_size=CONTEXT, drop_special=False, drop_first=False)
    run = make_run(tmp_path / "run", world, random_sae(), kept)
    record = evaluate(run, 10**6, loaded=loaded, progress=False)
    assert record["selection"]["drop_special"] is False and record["n_windows"] >= 5
    assert record["n_tokens"] == record["n_windows"] * CONTEXT  # every token, BOS included
    assert record["n_scored_tokens"] == record["n_windows"] * (CONTEXT - 1)
    assert record["n_tokens"] < 10**6  # the held-out text ran out before the budget
    default = Selection(dataset=str(text), context_size=CONTEXT)
    default = make_run(tmp_path / "default", world, random_sae(), default)
    default = evaluate(default, 10**6, loaded=loaded, progress=False)
    assert default["n_windows"] == record["n_windows"]
    assert default["n_tokens"] < record["n_tokens"] - record["n_windows"]  # BOS and EOS dropped


# -----------------------------------------------------------------------------
# the command line, on a run trained by the trainer


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="saewb")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


def test_cli_on_a_trained_run_writes_eval_json(world, tmp_path, capsys):
    from sae.train import TrainConfig, Trainer

    root, _, text = world
    cfg = TrainConfig(
        model=str(root / "tiny-llama"),
        sites=[SITE],
        latents=[64],
        ks=[4],
        tokens=1024,
        batch=256,
        selection=Selection(dataset=str(text), context_size=CONTEXT),
        log_every=2,
        checkpoint_every=10**9,
        buffer_tokens=512,
    )
    (run_dir,) = Trainer(cfg, tmp_path / "run", progress=False).fit()
    cmd_eval(_args(str(run_dir), "--tokens", "256", "--batch", "4"))
    record = json.loads((run_dir / "eval.json").read_text())
    assert record["n_tokens"] == 256 and record["selection"]["dataset"] == str(text)
    assert record["sae"]["n_latents"] == 64 and record["sae"]["k"] == 4
    assert record["site"] == SITE and record["selection"]["drop_first"] is True
    m = record["metrics"]
    assert m["l0"] <= 4 and m["ce_loss_ablated_kept"] > m["ce_loss_clean"]
    assert m["fvu"] == pytest.approx(1 - m["explained_variance"])
    assert not list(run_dir.glob(".eval.json.*"))  # no temp file left from the atomic write
    out = capsys.readouterr().out
    assert "ce_loss_recovered" in out and "eval.json" in out


# -----------------------------------------------------------------------------
# bad input


def _one_sentence(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message.endswith(".") and "\n" not in message and "Traceback" not in message
    return message


def test_bad_input(world, tmp_path):
    _, loaded, _ = world
    run = make_run(tmp_path, world, random_sae())
    with pytest.raises(UserError) as exc:
        evaluate(run, 0, loaded=loaded, progress=False)
    assert "--tokens" in _one_sentence(exc) and "0" in str(exc.value)
    with pytest.raises(UserError) as exc:
        evaluate(run, 100, batch_windows=0, loaded=loaded, progress=False)
    assert "--batch" in _one_sentence(exc)
    with pytest.raises(UserError) as exc:
        cmd_eval(_args(str(tmp_path), "--tokens", "0"))
    assert "--tokens" in _one_sentence(exc) and "'0'" in str(exc.value)
    with pytest.raises(UserError) as exc:
        cmd_eval(_args(str(tmp_path / "missing"), "--tokens", "100"))
    assert "missing" in _one_sentence(exc) and "does not exist" in str(exc.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "run.json").write_text(json.dumps({"model": "x", "site": SITE}))
    with pytest.raises(UserError) as exc:
        cmd_eval(_args(str(empty), "--tokens", "100"))
    assert "no SAE" in _one_sentence(exc)
    assert not (empty / "eval.json").exists()


def test_bad_input_too_little_text_and_wrong_width(world, tmp_path):
    root, loaded, _ = world
    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(f"Doc {i}." for i in range(40)))  # 2 held-out docs, no window
    run = make_run(
        tmp_path / "a", world, random_sae(), Selection(dataset=str(short), context_size=32)
    )
    with pytest.raises(UserError) as exc:
        evaluate(run, 100, loaded=loaded, progress=False)
    assert "held-out" in _one_sentence(exc)
    wide = SAE(SAEConfig(d_in=48, n_latents=64, k=4))
    run = make_run(tmp_path / "b", world, wide)
    with pytest.raises(UserError) as exc:
        evaluate(run, 100, loaded=loaded, progress=False)
    assert "d_in=48" in _one_sentence(exc) and "32" in str(exc.value)


# -----------------------------------------------------------------------------
# against SAELens itself (bench extra)


@pytest.mark.bench
def test_metrics_agree_with_saelens_evals(world, tmp_path):
    """SAELens's own get_downstream_reconstruction_metrics (what run_evals calls), on the same
    held-out windows with exclude_special_tokens, gives our CE, KL and their scores."""
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.evals import get_downstream_reconstruction_metrics
    from sae_lens.load_model import load_model as saelens_load_model
    from sae_lens.training.activation_scaler import ActivationScaler

    from sae.formats import export_saelens, saelens_hook_name

    root, loaded, _ = world
    tokenizer = loaded.tokenizer
    text = tmp_path / "short.txt"  # 20 held-out documents: ~14 windows
    text.write_text(
        "\n\n".join(f"Story {i}: the cat sat on the mat, {i % 7} dogs ran." for i in range(400))
    )
    selection = Selection(dataset=str(text), context_size=CONTEXT)
    run = make_run(tmp_path / "run", world, random_sae(), selection)
    record = evaluate(run, 10**6, batch_windows=8, loaded=loaded, progress=False)
    hook = saelens_hook_name(SITE, loaded.model)
    export_saelens(run.sae, tmp_path / "lens", hook_module=hook)
    peer = sae_lens.SAE.load_from_disk(tmp_path / "lens")
    # a fresh copy: the wrapper leaves hooks on the model it wraps
    hooked = saelens_load_model(
        "AutoModelForCausalLM", str(root / "tiny-llama"), "cpu", None, [hook]
    )
    ids = torch.stack([w.tokens for w in run.heldout_windows(tokenizer)])  # (W, T)
    assert (ids[:, 0] == tokenizer.bos_token_id).all()  # its special-token mask is our keep

    class Windows:  # the one method of an ActivationsStore that the evals call
        def __init__(self):
            self.batches = iter(ids.split(8))

        def get_batch_tokens(self, n):
            return next(self.batches)

    special = sorted(special_token_ids(tokenizer))
    with torch.no_grad():
        theirs = get_downstream_reconstruction_metrics(
            peer, hooked, Windows(), ActivationScaler(), True, True, len(ids.split(8)), 8, special
        )
    m = record["metrics"]
    assert record["n_windows"] == len(ids)
    pairs = {
        "ce_loss_clean": "ce_loss_without_sae",
        "ce_loss_spliced": "ce_loss_with_sae",
        "ce_loss_ablated": "ce_loss_with_ablation",
        "ce_loss_recovered": "ce_loss_score",
        "kl_div_spliced": "kl_div_with_sae",
        "kl_div_ablated": "kl_div_with_ablation",
        "kl_div_score": "kl_div_score",
    }
    for ours, name in pairs.items():
        print(
            f"{ours} {m[ours]:.6f} saelens {theirs[name]:.6f} rel {m[ours] / theirs[name] - 1:.1e}"
        )
        assert m[ours] == pytest.approx(theirs[name], rel=1e-4), ours
    assert abs(m["ce_loss_ablated_kept"] - theirs["ce_loss_with_ablation"]) > 1e-3
