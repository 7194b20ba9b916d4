"""The feature store: streaming statistics against brute force, planted features end to end,
exact resume, the store's layout and reader, and bad input."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from analysis.run import open_run
from analysis.store.accumulate import FeatureAccumulator, StoreConfig
from analysis.store.build import _save_state, analyze
from analysis.store.encode import encode_codes, logit_effects
from analysis.store.ops import EMPTY_KEY, sample_keys
from analysis.store.read import FeatureStore
from analysis.store.windows import WindowLog
from hooks.errors import UserError
from hooks.paths import sha256_file
from hooks.selection import Selection
from hooks.sites import special_token_ids, token_mask
from sae.config import SAEConfig
from sae.formats import save_sae
from sae.model import SAE
from saewb_cli.measure import add_parsers, cmd_analyze

# -- streaming accumulator vs brute force ---------------------------------------------------------

N, T, K_ACTIVE = 40, 24, 3
CFG = StoreConfig(top_k=4, ctx_before=4, ctx_after=3, cooc_block=6, cooc_slots=8, seed=7)


def synthetic_codes(n_windows: int = 24, seed: int = 0, late_pair: bool = False):
    """Sparse codes (W, T, k) with Zipf-ish latents, zeros among the k slots, masked tokens, a
    scale that grows over the stream (so histogram ranges must double), and latents 0 and 1
    planted to fire together on the same tokens. late_pair: latents 2 and 3 fire apart in the
    first half and together in the second, so each takes the other as a candidate only after both
    have fired (a count that misses blocks and is extrapolated)."""
    g = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, N + 1).float()
    probs[: 4 if late_pair else 2] = 0
    idx = torch.multinomial(probs.expand(n_windows * T, N), K_ACTIVE, generator=g)
    idx = idx.view(n_windows, T, K_ACTIVE)
    scale = torch.linspace(0.3, 40.0, n_windows)[:, None, None]  # later windows fire harder
    acts = torch.rand(n_windows, T, K_ACTIVE, generator=g) * scale
    acts[torch.rand(acts.shape, generator=g) < 0.15] = 0  # ReLU'd slots
    pair = torch.rand(n_windows, T, generator=g) < 0.08
    idx[..., 0][pair], idx[..., 1][pair] = 0, 1
    keep = torch.rand(n_windows, T, generator=g) > 0.1
    keep[:, 0] = False
    if late_pair:
        half, free = n_windows // 2, ~pair  # tokens where slots 1 and 2 are not latents 0 and 1
        apart = free & (torch.arange(T) % 5 < 2)
        apart[half:] = False
        together = free & (torch.arange(T) % 4 == 0)
        together[:half] = False
        idx[..., 2][apart & (torch.arange(T) % 5 == 0)] = 2
        idx[..., 2][apart & (torch.arange(T) % 5 == 1)] = 3
        idx[..., 1][together], idx[..., 2][together] = 2, 3
        acts[..., 1:3] = acts[..., 1:3].clamp(min=0.5)
    return acts, idx, keep


def stream(acts, idx, keep, batch: int, cfg: StoreConfig = CFG) -> FeatureAccumulator:
    acc = FeatureAccumulator(N, T, cfg)
    for lo in range(0, len(acts), batch):
        hi = min(lo + batch, len(acts))
        acc.update(acts[lo:hi], idx[lo:hi], keep[lo:hi], torch.arange(lo, hi))
    return acc


def dense_codes(acts, idx, keep) -> np.ndarray:
    """(W, T, N) activations of every latent at every kept token."""
    dense = torch.zeros(acts.shape[0], T, N)
    dense.scatter_(2, idx, acts * keep[..., None])
    return dense.numpy().astype(np.float64)


def np_ceil_log2(x):
    m, e = np.frexp(x)
    return e - (m == 0.5)


def test_streaming_statistics_match_brute_force():
    acts, idx, keep = synthetic_codes()
    acc = stream(acts, idx, keep, batch=5)
    dense = dense_codes(acts, idx, keep)
    on = dense > 0
    count = on.sum((0, 1))
    assert acc.n_tokens == int(keep.sum())
    np.testing.assert_array_equal(acc.count.numpy(), count)
    sums = dense.sum((0, 1))
    np.testing.assert_allclose(acc.act_sum.numpy(), sums, rtol=1e-6)
    np.testing.assert_array_equal(acc.act_max.numpy(), dense.max((0, 1)).astype(np.float32))
    # Histogram: 50 bins on [0, 2^ceil(log2 max)], built with no knowledge of the final max.
    H = CFG.hist_bins
    alive = count > 0
    exp = np.where(alive, np_ceil_log2(np.where(alive, dense.max((0, 1)), 1.0)), 0)
    early = stream(acts[:5], idx[:5], keep[:5], batch=5)  # the first batch alone
    grew = early.count > 0
    assert (early.exp[grew] < acc.exp[grew]).all() and grew.sum() > 10  # ranges had to double
    hist = np.zeros((N, H), dtype=np.int64)
    w, t, f = np.nonzero(on)
    bins = np.clip(np.floor(np.ldexp(dense[w, t, f], -exp[f]) * H), 0, H - 1).astype(int)
    np.add.at(hist, (f, bins), 1)
    np.testing.assert_array_equal(acc.hist.numpy(), hist)
    np.testing.assert_array_equal(acc.exp.numpy()[alive], exp[alive])


def test_streaming_top_k_matches_brute_force():
    acts, idx, keep = synthetic_codes()
    acc = stream(acts, idx, keep, batch=5)
    dense = dense_codes(acts, idx, keep)
    K, C = CFG.top_k, acc.C
    checked = 0
    for f in range(N):
        best = dense[:, :, f].max(1)  # (W,) each window's best token: one example per window
        where = dense[:, :, f].argmax(1)
        windows = [w for w in np.argsort(-best, kind="stable") if best[w] > 0][:K]
        slots = [
            s
            for s in torch.argsort(-acc.top_val[f], stable=True).tolist()
            if acc.top_win[f, s] >= 0
        ]
        assert acc.top_win[f, slots].tolist() == windows, f  # the state keeps slots unsorted
        np.testing.assert_array_equal(acc.top_val[f, slots], best[windows].astype(np.float32))
        for slot, w in zip(slots, windows):
            pos = int(acc.top_pos[f, slot])
            assert pos == where[w]
            start = min(max(pos - CFG.ctx_before, 0), T - C)
            want = dense[w, start : start + C, f]
            np.testing.assert_allclose(acc.top_ctx[f, slot].float(), want, rtol=1e-3)
            assert acc.top_ctx[f, slot, pos - start] > 0
            checked += 1
    assert checked > 50


def test_interval_samples_are_the_smallest_keys_per_bin():
    acts, idx, keep = synthetic_codes()
    acc = stream(acts, idx, keep, batch=5)
    dense = dense_codes(acts, idx, keep)
    NB, P = CFG.n_intervals, CFG.per_interval
    w, t, f = np.nonzero(dense > 0)
    a = dense[w, t, f]
    exp = np_ceil_log2(dense.max((0, 1)))[f]
    bins = np.clip(np.floor(np.ldexp(a, -exp) * NB), 0, NB - 1).astype(int)
    keys = sample_keys(torch.from_numpy(w * T + t), torch.from_numpy(f), CFG.seed).numpy()
    full = 0
    for latent in range(N):
        for b in range(NB):
            mine = np.nonzero((f == latent) & (bins == b))[0]
            chosen = mine[np.argsort(keys[mine], kind="stable")][:P]
            slots = acc.iv_key[latent, b] != EMPTY_KEY
            assert sorted(zip(w[chosen], t[chosen])) == sorted(
                zip(acc.iv_win[latent, b][slots].tolist(), acc.iv_pos[latent, b][slots].tolist())
            ), (latent, b)
            np.testing.assert_array_equal(
                np.sort(acc.iv_key[latent, b][slots]), np.sort(keys[chosen])
            )
            full += len(chosen) == P
            for s in np.nonzero(slots.numpy())[0]:
                win, pos = int(acc.iv_win[latent, b, s]), int(acc.iv_pos[latent, b, s])
                assert acc.iv_val[latent, b, s] == np.float32(dense[win, pos, latent])
                start = min(max(pos - CFG.ctx_before, 0), T - acc.C)
                want = dense[win, start : start + acc.C, latent]
                np.testing.assert_allclose(acc.iv_ctx[latent, b, s].float(), want, rtol=1e-3)
    assert full > 10  # some reservoirs overflowed, so the smallest-key rule was exercised


def canonical(acc: FeatureAccumulator) -> dict[str, torch.Tensor]:
    """The state with its unsorted slots sorted: top examples by activation, samples by key."""
    top = torch.argsort(-acc.top_val, dim=1, stable=True)
    iv = torch.argsort(acc.iv_key, dim=2, stable=True)
    out = {name: getattr(acc, name) for name in ("count", "act_max", "hist")}
    out["blk_count"] = acc.cooc.blk_count
    for name in ("top_val", "top_win", "top_pos"):
        out[name] = getattr(acc, name).gather(1, top)
    out["top_ctx"] = acc.top_ctx.gather(1, top[..., None].expand_as(acc.top_ctx))
    for name in ("iv_key", "iv_val", "iv_win", "iv_pos"):
        out[name] = getattr(acc, name).gather(2, iv)
    out["iv_ctx"] = acc.iv_ctx.gather(2, iv[..., None].expand_as(acc.iv_ctx))
    return out


def test_statistics_do_not_depend_on_batching():
    acts, idx, keep = synthetic_codes()
    a, b = canonical(stream(acts, idx, keep, batch=2)), canonical(stream(acts, idx, keep, batch=7))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def brute_blocks(acts, idx, keep, size: int) -> np.ndarray:
    """(blocks, N) bool: which latents fire in each block of `size` tokens (brute force)."""
    dense = dense_codes(acts, idx, keep)
    n_blk = -(-T // size)
    padded = np.zeros((len(dense), n_blk * size, N))
    padded[:, :T] = dense
    return (padded > 0).reshape(len(dense), n_blk, size, N).any(2).reshape(-1, N)


def test_cooccurrence_counts_match_brute_force():
    acts, idx, keep = synthetic_codes()
    acc = stream(acts, idx, keep, batch=5)
    size = CFG.cooc_block
    blocks = brute_blocks(acts, idx, keep, size)
    shared = blocks.T.astype(np.int64) @ blocks.astype(np.int64)  # (N, N) brute force
    np.testing.assert_array_equal(acc.cooc.blk_count.numpy(), blocks.sum(0))
    assert acc.cooc.n_blocks == int(keep.reshape(-1, T // size, size).any(2).sum())
    exact = 0
    for i in range(N):
        for slot in range(CFG.cooc_slots):
            j = int(acc.cooc.cand[i, slot])
            if j < 0:
                continue
            assert shared[i, j] > 0  # a candidate shared at least one block when it was added
            if acc.cooc.cand_from[i, slot] == 0:  # added in the latent's first batch: exact counts
                assert acc.cooc.cand_count[i, slot] == shared[i, j]
                exact += 1
    assert exact > 100
    ids, jac, n_shared, is_exact = acc.cooc.partners()
    assert ids[0, 0] == 1 and ids[1, 0] == 0  # the planted pair
    true = shared[0, 1] / (shared[0, 0] + shared[1, 1] - shared[0, 1])
    assert jac[0, 0] == pytest.approx(true) and true > 0.5 and n_shared[0, 0] == shared[0, 1]


def check_every_partner(acc: FeatureAccumulator, blocks: np.ndarray) -> tuple[int, int]:
    """Every stored partner against the brute-force block counts: Jaccard in [0, 1]; an exact
    partner's Jaccard and shared count equal brute force; an extrapolated one's shared count is
    off by no more than the blocks its count did not see. Returns (exact, extrapolated)."""
    shared = blocks.T.astype(np.int64) @ blocks.astype(np.int64)
    ids, jac, n_shared, is_exact = acc.cooc.partners(top=acc.cfg.cooc_slots)
    assert ((jac >= 0) & (jac <= 1)).all()
    counts = [0, 0]
    for i in range(acc.n):
        for col in range(ids.shape[1]):
            j = int(ids[i, col])
            if j < 0:
                continue
            true = shared[i, j] / (shared[i, i] + shared[j, j] - shared[i, j])
            if is_exact[i, col]:
                assert n_shared[i, col] == shared[i, j], (i, j)
                assert jac[i, col] == pytest.approx(true, rel=1e-6), (i, j)
            else:
                slot = int((acc.cooc.cand[i] == j).nonzero())
                gap = min(
                    int(acc.cooc.cand_from[i, slot]), int(acc.cooc.cand_partner_from[i, slot])
                )
                assert abs(int(n_shared[i, col]) - shared[i, j]) <= gap, (i, j)
                assert n_shared[i, col] <= min(shared[i, i], shared[j, j])
            counts[int(not is_exact[i, col])] += 1
    return counts[0], counts[1]


def test_every_stored_jaccard_is_bounded_and_matches_brute_force():
    acts, idx, keep = synthetic_codes(n_windows=40, seed=3, late_pair=True)
    assert (idx.sort(2).values.diff(dim=2) != 0).all()  # a token's k latents stay distinct
    cfg = dataclasses.replace(CFG, cooc_slots=N)  # room for every partner: 2 and 3 always enter
    blocks = brute_blocks(acts, idx, keep, cfg.cooc_block)
    for batch in (3, 8):
        acc = stream(acts, idx, keep, batch=batch, cfg=cfg)
        exact, extrapolated = check_every_partner(acc, blocks)
        assert exact > 100 and extrapolated > 0
        ids, _, _, is_exact = acc.cooc.partners(top=N)
        assert 3 in ids[2].tolist() and not is_exact[2][ids[2] == 3].any()


def test_a_late_rare_partner_gets_its_exact_jaccard():
    """Latent 0 fires in every block; latent 1 only once, with it, in the last batch. The count is
    exact (latent 1 had never fired before), so Jaccard is 1/10, not the count scaled up by
    latent 0's ten blocks to a Jaccard of 10."""
    W = 10
    acts = torch.zeros(W, T, K_ACTIVE)
    idx = torch.arange(K_ACTIVE).expand(W, T, K_ACTIVE).clone() + 2
    idx[..., 0] = 0
    acts[..., 0] = 1.0
    idx[-1, 3, 1], acts[-1, 3, 1] = 1, 2.0
    keep = torch.ones(W, T, dtype=torch.bool)
    cfg = StoreConfig(top_k=2, cooc_block=T, cooc_slots=4)
    acc = stream(acts, idx, keep, batch=1, cfg=cfg)
    ids, jac, n_shared, is_exact = acc.cooc.partners()
    assert ids[0, 0] == 1 and jac[0, 0] == pytest.approx(0.1) and bool(is_exact[0, 0])
    assert ids[1, 0] == 0 and jac[1, 0] == pytest.approx(0.1) and n_shared[1, 0] == 1
    assert check_every_partner(acc, brute_blocks(acts, idx, keep, T))[1] == 0


def test_bf16_search_keeps_exact_fp32_values():
    sae = SAE(SAEConfig(d_in=32, n_latents=256, k=8))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(256, generator=torch.Generator().manual_seed(1)))
        sae.b_dec.copy_(0.1 * torch.randn(32, generator=torch.Generator().manual_seed(2)))
    x = torch.randn(1024, 32, generator=torch.Generator().manual_seed(3))
    acts32, idx32 = encode_codes(sae, x)
    acts16, idx16 = encode_codes(sae, x, torch.bfloat16)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # (N, n) in fp32
    torch.testing.assert_close(acts16, pre.gather(1, idx16).relu(), rtol=1e-5, atol=1e-6)
    same = (idx16.sort(1).values == idx32.sort(1).values).all(1).float().mean()
    assert 0.9 < same < 1.0  # bf16 only swaps near-ties at the k-th place (and it does, here)


@pytest.mark.parametrize("architecture", ["jumprelu", "relu"])
def test_bf16_search_leaves_the_padding_of_threshold_kinds_empty(architecture):
    """jumprelu and relu pad each token's code with act 0 at latent 0. Recomputing the padding
    slots in fp32 gave them latent 0's pre-activation: here latent 0 fires on every token, so it
    was counted once per slot instead of once per token."""
    sae = SAE(SAEConfig(d_in=32, n_latents=256, k=8, architecture=architecture)).eval()
    sae.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(256, generator=torch.Generator().manual_seed(1)) - 0.9)
        sae.b_enc[0] = 5.0
        if architecture == "jumprelu":
            sae.log_threshold.fill_(-1.0)
    x = torch.randn(1024, 32, generator=torch.Generator().manual_seed(3))
    acts32, idx32 = encode_codes(sae, x)
    acts16, idx16 = encode_codes(sae, x, torch.bfloat16)
    on32, on16 = acts32 > 0, acts16 > 0  # (N, K)
    assert on32.sum(1).float().std() > 0  # L0 varies by token, so there is padding
    assert ((idx16 == 0) & on16).sum(1).max() == 1 and ((idx16 == 0) & on16).sum() == 1024
    # the same latents fire but for bf16 near-ties with a threshold
    dense32 = torch.zeros(1024, 256).scatter_add_(1, idx32, on32.float())
    dense16 = torch.zeros(1024, 256).scatter_add_(1, idx16, on16.float())
    assert dense16.max() == 1 and (dense16 != dense32).float().mean() < 1e-3


# -- end to end: a hand-set SAE on a tiny Llama whose latents fire on known tokens ----------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tokenizer):
    from conftest import build_planted_run

    path, ids = build_planted_run(tmp_path_factory.mktemp("planted"), tokenizer)
    run = open_run(path)
    out = analyze(run, 100_000, batch_windows=4, progress=False)
    return dict(run=run, out=out, ids=ids)


def _heldout(run, tokenizer):
    """The held-out windows and their kept-token masks, as analyze sees them."""
    windows = list(run.heldout_windows(tokenizer))
    tokens = torch.stack([w.tokens for w in windows])
    keep = token_mask(tokens, special_ids=special_token_ids(tokenizer), drop_first=True)
    return windows, tokens, keep


def test_planted_latents_have_the_known_top_contexts(planted, tokenizer):
    store, ids = FeatureStore(planted["out"]), planted["ids"]
    windows, tokens, keep = _heldout(planted["run"], tokenizer)
    is_paris = (tokens == ids["paris"]) & keep
    is_france = (tokens == ids["france"]) & keep
    paris_windows = {windows[i].index for i in torch.nonzero(is_paris.any(1)).squeeze(1).tolist()}
    france_only = {
        windows[i].index
        for i in torch.nonzero(is_france.any(1) & ~is_paris.any(1)).squeeze(1).tolist()
    }
    assert 0 < len(paris_windows) < 20 and len(france_only) > 20  # the text was made so
    page = store.feature(0)
    top = page["top_examples"]
    assert len(top) == 20
    acts = [e["act"] for e in top]
    assert acts == [10.0] * len(paris_windows) + [6.0] * (20 - len(paris_windows))
    assert {e["window"] for e in top[: len(paris_windows)]} == paris_windows
    assert {e["window"] for e in top[len(paris_windows) :]} <= france_only
    for e in top:
        want = {10.0: ids["paris"], 6.0: ids["france"]}[e["act"]]
        assert e["token_ids"][e["index"]] == want
        expected = [
            10.0 if t == ids["paris"] else 6.0 if t == ids["france"] else 0.0
            for t in e["token_ids"]
        ]
        assert e["acts"] == expected
    n_fire = int((is_paris | is_france).sum())
    assert page["n_active"] == n_fire
    assert page["density"] == pytest.approx(n_fire / int(keep.sum()))
    assert page["mean_act"] == pytest.approx(
        (10 * is_paris.sum() + 6 * is_france.sum()).item() / n_fire
    )
    assert page["max_act"] == 10.0
    # Intervals on [0, 16]: width 1.6, so 6 lands in bin 3 and 10 in bin 6; nothing else fires.
    counts = [iv["count"] for iv in page["intervals"]]
    assert counts == [0, 0, 0, int(is_france.sum()), 0, 0, int(is_paris.sum())]
    assert len(page["intervals"][3]["examples"]) == 5
    assert all(e["act"] == 6.0 for e in page["intervals"][3]["examples"])
    assert set(page["label"].split(" · ")) <= {"Paris", "France"}
    # Logit effects through the unembedding, neighbours by decoder cosine, co-occurrence.
    assert (
        page["logits"]["top"][0]["id"] == ids["up"] and page["logits"]["top"][0]["token"] == " dog"
    )
    assert page["logits"]["bottom"][0]["id"] == ids["down"]
    assert store.feature(1)["neighbors"][0]["feature"] == 3
    co = store.feature(1)["cooccurring"][0]
    assert co["feature"] == 2 and co["jaccard"] == pytest.approx(1.0)
    blocks = store.features["n_blocks_active"].to_pylist()
    assert co["shared_blocks"] == blocks[1] == blocks[2] > 0 and co["exact"] is True
    jaccard = store.features["cooc_jaccard"].combine_chunks().flatten().to_numpy()
    assert ((jaccard >= 0) & (jaccard <= 1)).all()
    assert 0 < store.manifest["cooc_exact_partners"] <= store.manifest["cooc_partners"]
    assert store.feature(5)["top_examples"] == [] and store.feature(5)["density"] == 0


def test_logit_effects_use_the_final_norm_gain(planted):
    """sae_vis folds the final norm's weight into W_U: flipping that weight flips the effects."""
    loaded_model = planted["run"].load_model(progress=False).model
    ids = planted["ids"]
    sae = planted["run"].sae
    assert logit_effects(sae.W_dec, loaded_model)["top_ids"][0, 0] == ids["up"]
    with torch.no_grad():
        loaded_model.model.norm.weight[0] = -2.0
    effects = logit_effects(sae.W_dec, loaded_model)
    assert effects["top_ids"][0, 0] == ids["down"] and effects["top_values"][0, 0] == pytest.approx(
        100.0
    )


def test_store_layout_and_sparsity_export(planted):
    out, run = planted["out"], planted["run"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_latents"] == 16 and manifest["n_tokens"] > 0
    assert manifest["sae_sha256"] == sha256_file(run.path / "sae.safetensors")
    examples = pq.ParquetFile(out / "examples.parquet")
    features = pq.read_table(out / "features.parquet")
    assert features.num_rows == 16
    feature_col = pq.read_table(out / "examples.parquet", columns=["feature"])["feature"].to_numpy()
    assert (np.diff(feature_col) >= 0).all()  # sorted by feature
    group = features["ex_group"][0].as_py()
    assert 0 <= group < examples.num_row_groups
    # SAELens sparsity: log10(density + 1e-10), one value per latent
    sparsity = load_file(run.path / "sparsity.safetensors")["sparsity"]
    density = torch.tensor(features["density"].to_numpy())
    torch.testing.assert_close(
        sparsity.double(), torch.log10(density + 1e-10), rtol=1e-5, atol=1e-5
    )
    assert not (out / "partial").exists()


def test_table_and_search(planted):
    store = FeatureStore(planted["out"])
    page = store.table(0, 5, "-density")
    assert page["total"] == 16
    densities = [r["density"] for r in page["rows"]]
    assert densities == sorted(densities, reverse=True) and densities[0] > 0
    alive = store.table(0, 100, "feature", {"dead": False})
    assert [r["feature"] for r in alive["rows"]] == [0, 1, 2]
    assert store.table(0, 100, filters={"density": (None, 0.0)})["total"] == 13
    assert store.search_tokens("paris")[0]["feature"] == 0
    assert store.search_tokens("Monday")[0]["feature"] in (1, 2)
    assert store.search_logits("dog")[0]["feature"] == 0
    with pytest.raises(UserError, match="Unknown filter 'colour'"):
        store.table(filters={"colour": 1})


# -- resume ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_run(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("random-run")
    text = root / "text.txt"
    text.write_text(
        "\n\n".join(
            f"Story {i}: the cat sat on the mat, {i % 7} dogs ran in Paris. The dog ran in the park."
            for i in range(3000)
        )
    )
    sae = SAE(SAEConfig(d_in=32, n_latents=64, k=4))
    sae.reset_parameters(torch.Generator().manual_seed(3))
    save_sae(sae, root / "run")
    info = dict(model=str(tiny_dir), site="resid_post.1")
    info["selection"] = Selection(dataset=str(text), context_size=32).to_dict()
    (root / "run" / "run.json").write_text(json.dumps(info))
    return root / "run"


def test_resumed_analyze_equals_uninterrupted(random_run, tmp_path, monkeypatch):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    shutil.copytree(random_run, whole)
    shutil.copytree(random_run, killed)
    settings = dict(n_tokens=3000, batch_windows=2, checkpoint_tokens=500, progress=False)
    real = FeatureAccumulator.update
    total = {"n": 0}

    def counted(self, *args):
        total["n"] += 1
        return real(self, *args)

    monkeypatch.setattr(FeatureAccumulator, "update", counted)
    analyze(open_run(whole), **settings)

    calls = {"n": 0}

    def dying(self, *args):
        calls["n"] += 1
        if calls["n"] == 14:  # after the checkpoint at 500 tokens (~9 batches), before 1000
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(FeatureAccumulator, "update", dying)
    with pytest.raises(KeyboardInterrupt):
        analyze(open_run(killed), **settings)
    assert not (killed / "features" / "manifest.json").exists()
    with pytest.raises(UserError, match="pass --resume to continue it"):
        analyze(open_run(killed), **settings)
    monkeypatch.setattr(FeatureAccumulator, "update", real)
    resumed = {"n": 0}

    def counting(self, *args):
        resumed["n"] += 1
        return real(self, *args)

    monkeypatch.setattr(FeatureAccumulator, "update", counting)
    analyze(open_run(killed), resume=True, **settings)
    # It continued from the last checkpoint (500 tokens = 9 batches of 2 x 31 kept tokens).
    assert resumed["n"] == total["n"] - 9
    for name in ("features.parquet", "examples.parquet", "vocab.parquet"):
        a, b = pq.read_table(whole / "features" / name), pq.read_table(killed / "features" / name)
        assert a.equals(b), name
    ma = json.loads((whole / "features" / "manifest.json").read_text())
    mb = json.loads((killed / "features" / "manifest.json").read_text())
    assert ma["n_tokens"] == mb["n_tokens"] >= 3000 and ma["n_windows"] == mb["n_windows"]
    assert torch.equal(
        load_file(whole / "sparsity.safetensors")["sparsity"],
        load_file(killed / "sparsity.safetensors")["sparsity"],
    )


# -- the kinds whose L0 varies, and transcoders ----------------------------------------------------


def _cut_sae(x: torch.Tensor, architecture: str, **cfg) -> SAE:
    """A random SAE (or transcoder) over (N, 32) activations x: each latent fires above its 90th
    percentile on x, so L0 varies by token; the last 4 latents never fire."""
    g = torch.Generator().manual_seed(5)
    sae = SAE(SAEConfig(d_in=32, n_latents=64, k=4, architecture=architecture, **cfg)).eval()
    sae.reset_parameters(g)
    with torch.no_grad():
        centre = 0 if sae.cfg.is_transcoder else sae.b_dec
        pre = (x - centre) @ sae.W_enc  # (N, 64)
        cut = pre.quantile(0.9, dim=0)
        cut[-4:] = pre.max() + 1
        theta = float(pre.std()) * (1 + torch.rand(64, generator=g))
        if architecture == "jumprelu":
            sae.b_enc.copy_(theta - cut)
            sae.log_threshold.copy_(theta.log())
        else:
            sae.b_enc.copy_(-cut)
    return sae


def _dense_code(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """(N, n) activations from the saved weights: each latent above its threshold, of which a
    token keeps its top k (topk) or at most 4k (the other kinds)."""
    w = sae.folded_state()
    centre = 0 if sae.cfg.is_transcoder else w["b_dec"]
    pre = (x - centre) @ w["W_enc"] + w["b_enc"]
    above = torch.where(pre > w.get("threshold", torch.zeros(64)), pre, torch.zeros(()))
    top = above.topk(sae.cfg.k if sae.cfg.architecture == "topk" else 4 * sae.cfg.k, dim=1)
    return torch.zeros_like(pre).scatter(1, top.indices, top.values)


@pytest.mark.parametrize(
    "kind", ["jumprelu", "jumprelu-bf16", "relu-transcoder", "transcoder-to-up-proj"]
)
def test_store_of_other_kinds_counts_like_a_dense_code(tmp_path, tiny_dir, tokenizer, kind):
    """The store of a jumprelu SAE at resid_post.1, and of transcoders from mlp_in.1 (whose
    examples are mlp_in.1's activations) to mlp_out.1 and to a raw 64-wide module, is readable,
    and its counts, densities and maxima are those of a dense code of activations taken here
    with a hook of our own."""
    text = tmp_path / "text.txt"
    text.write_text(
        "\n\n".join(
            f"Story {i}: the cat sat on the mat, {i % 7} dogs ran in Paris on Monday."
            for i in range(600)
        )
    )
    transcoder = kind != "jumprelu" and kind != "jumprelu-bf16"
    site = "mlp_in.1" if transcoder else "resid_post.1"
    info = dict(model=str(tiny_dir), site=site)
    info["selection"] = Selection(dataset=str(text), context_size=32).to_dict()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps(info))
    save_sae(SAE(SAEConfig(d_in=32, n_latents=64, k=4)), run_dir)  # replaced below
    loaded = open_run(run_dir).load_model(progress=False)
    windows, tokens, keep = _heldout(open_run(run_dir), tokenizer)
    layer, got = loaded.model.model.layers[1], {}
    if transcoder:  # the Llama MLP's input, by position
        hook = layer.mlp.register_forward_pre_hook(lambda m, a: got.update(x=a[0]))
    else:
        hook = layer.register_forward_hook(lambda m, a, out: got.update(x=out))
    with torch.no_grad():
        loaded.model(tokens)
    hook.remove()
    x = got["x"][keep]  # (N, 32), the kept tokens in the store's order
    targets = {
        "jumprelu": {},
        "jumprelu-bf16": {},
        "relu-transcoder": dict(target="mlp_out.1", architecture="relu"),
        "transcoder-to-up-proj": dict(target="model.layers.1.mlp.up_proj", d_out=64),
    }[kind]
    architecture = targets.pop("architecture", "jumprelu" if not transcoder else "topk")
    if architecture == "topk":
        sae = SAE(SAEConfig(d_in=32, n_latents=64, k=4, site=site, **targets)).eval()
        sae.reset_parameters(torch.Generator().manual_seed(5))
    else:
        sae = _cut_sae(x, architecture, site=site, **targets)
    save_sae(sae, run_dir)
    run = open_run(run_dir)
    assert run.target == targets.get("target", "")
    dtype = torch.bfloat16 if kind.endswith("bf16") else None
    out = analyze(run, 10**6, batch_windows=4, loaded=loaded, encode_dtype=dtype, progress=False)
    store = FeatureStore(out)
    z = _dense_code(run.sae, x)  # (N, 64)
    count = (z > 0).sum(0).numpy()
    assert store.manifest["n_tokens"] == len(x) and store.manifest["site"] == site
    assert store.manifest["architecture"] == architecture
    assert store.manifest["target"] == (targets.get("target") or None)
    assert store.manifest["code_width"] == (4 if architecture == "topk" else 16)
    n_active = store.features["n_active"].to_numpy()
    density = store.features["density"].to_numpy()
    if dtype is None:
        np.testing.assert_array_equal(n_active, count)
        np.testing.assert_allclose(store.features["max_act"].to_numpy(), z.max(0).values, rtol=1e-6)
    else:  # bf16 search: a few near-ties with a threshold may differ, never a latent twice
        assert np.abs(n_active - count).sum() <= 0.01 * count.sum() and n_active.max() <= len(x)
    np.testing.assert_allclose(density, n_active / len(x))
    if architecture != "topk":  # L0 varies by token and the cut leaves some dead latents
        assert (z > 0).sum(1).float().std() > 0.5 and 0 < (count == 0).mean() < 0.2
    busiest = int(count.argmax())
    page = store.feature(busiest)
    assert page["top_examples"][0]["act"] == pytest.approx(page["max_act"])
    assert page["n_active"] == n_active[busiest]
    top_logits = [t["id"] for t in page["logits"]["top"]]
    if kind == "transcoder-to-up-proj":  # W_dec rows are 64 wide, not the model's 32
        assert top_logits == [] and store.manifest["logit_effects"] is None
        assert store.manifest["d_out"] == 64
    else:
        want = logit_effects(run.sae.W_dec, loaded.model)["top_ids"][busiest].tolist()
        assert top_logits == want and len(want) == 10


# -- bad input ---------------------------------------------------------------------------------


def _one_sentence(err: UserError) -> str:
    text = str(err)
    assert "\n" not in text and text.endswith(".") and text.count(". ") <= 1, text
    return text


def _cli(*argv):
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    return parser.parse_args(["analyze", *argv])


def test_a_store_for_another_sae_is_refused(random_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(random_run, run_dir)
    out = analyze(open_run(run_dir), 300, batch_windows=2, progress=False)
    FeatureStore(out)  # fine while the SAE is the same
    other = SAE(SAEConfig(d_in=32, n_latents=64, k=4))
    other.reset_parameters(torch.Generator().manual_seed(99))
    save_sae(other, run_dir)
    with pytest.raises(UserError, match="was built for another SAE") as err:
        FeatureStore(out)
    _one_sentence(err.value)
    # A partial state from the old SAE is refused too.
    state = out / "partial"
    run = open_run(run_dir)
    log = WindowLog(state / "windows.bin", 32)
    _save_state(state, FeatureAccumulator(64, 32), log, dict(sae_sha256="0" * 64))
    log.close()
    with pytest.raises(UserError, match="made for another SAE") as err:
        analyze(run, 300, resume=True, progress=False)
    _one_sentence(err.value)


def test_bad_input_gets_one_sentence(planted, tmp_path):
    store = FeatureStore(planted["out"])
    for bad in (16, -1, 10**9):
        with pytest.raises(UserError, match=rf"Feature {bad} is out of range; .* 0\.\.15") as err:
            store.feature(bad)
        _one_sentence(err.value)
    with pytest.raises(UserError, match="must be a whole number"):
        store.feature("3")
    with pytest.raises(UserError, match="--tokens must be a positive whole number") as err:
        cmd_analyze(_cli(str(planted["run"].path), "--tokens", "0"))
    _one_sentence(err.value)
    with pytest.raises(UserError, match="--tokens must be a positive"):
        analyze(planted["run"], 0, progress=False)
    empty = tmp_path / "no-sae"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no SAE yet") as err:
        cmd_analyze(_cli(str(empty)))
    _one_sentence(err.value)
    with pytest.raises(UserError, match="holds no feature store") as err:
        FeatureStore(tmp_path)
    _one_sentence(err.value)
    with pytest.raises(UserError, match="no partial analysis to resume"):
        analyze(planted["run"], 100, resume=True, progress=False)
