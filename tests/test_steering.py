"""Feature steering on a tiny Llama: each edit against its definition, exact identities where the
maths gives one, the KV cache, the positions, and no hook left behind."""

import pytest
import torch
from conftest import make_model

from analysis.steering.interventions import Intervention, Steering
from hooks.errors import UserError
from hooks.sites import Capture
from sae.config import SAEConfig
from sae.model import SAE

SITE = "resid_post.1"


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model("llama", len(tokenizer)).eval()


@pytest.fixture(scope="module")
def sae():
    sae = SAE(SAEConfig(d_in=32, n_latents=64, k=4, site=SITE))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc[-1] = -1e4  # latent 63 never fires
        sae.input_scale.fill_(0.5)
    return sae.eval()


@pytest.fixture(scope="module")
def ids(tokenizer):
    return tokenizer("the cat sat on the mat and the dog ran", return_tensors="pt")["input_ids"]


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@torch.no_grad()
def _site(model, ids, steering=None) -> torch.Tensor:
    """The site's activation as the next layer sees it (after the edit)."""
    with Capture(model, ["resid_pre.2"], early_exit=False) as capture:
        if steering is None:
            return capture(ids)["resid_pre.2"]
        with steering:
            return capture(ids)["resid_pre.2"]


def test_clamping_a_silent_latent_to_zero_keeps_the_logits_exactly(model, sae, ids):
    with torch.no_grad():
        clean = model(ids).logits
        with Steering(model, SITE, [Intervention("clamp", feature=63, value=0.0)], sae):
            steered = model(ids).logits
    assert torch.equal(clean, steered)


def test_clamp_moves_exactly_the_latents_share_and_keeps_the_error_term(model, sae, ids):
    h = _site(model, ids)  # (1, T, 32)
    acts, idx = sae.encode(h[0])[:2]
    f = int(idx[3, 0])  # a latent active at position 3
    a = (acts * (idx == f)).sum(-1)  # (T,)
    steered = _site(model, ids, Steering(model, SITE, [Intervention("clamp", f, value=5.0)], sae))
    expect = h[0] + (5.0 - a)[:, None] * sae.W_dec[f].detach() / 0.5
    torch.testing.assert_close(steered[0], expect, rtol=1e-5, atol=1e-5)
    ablated = _site(model, ids, Steering(model, SITE, [Intervention("ablate", f)], sae))
    torch.testing.assert_close(ablated[0], h[0] - a[:, None] * sae.W_dec[f].detach() / 0.5)


def test_add_after_the_last_block_shifts_the_logits_by_the_unembedded_direction(tokenizer, ids):
    model = make_model("llama", len(tokenizer), n_layers=2).eval()
    model.model.norm = torch.nn.Identity()  # the final norm out of the way: logits = h W_U^T
    u = torch.randn(32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        clean = model(ids).logits
        with Steering(model, "resid_post.1", [Intervention("add", vector=u, value=3.0)]):
            steered = model(ids).logits
    shift = 3.0 * (u / u.norm()) @ model.lm_head.weight.detach().T  # (V,)
    torch.testing.assert_close(steered - clean, shift.expand_as(clean), rtol=1e-4, atol=1e-4)


def test_cap_and_replace_set_the_component_along_the_direction(model, ids):
    u = torch.randn(32, generator=torch.Generator().manual_seed(2))
    unit = u / u.norm()
    h = _site(model, ids)[0]
    capped = _site(model, ids, Steering(model, SITE, [Intervention("cap", vector=u, value=0.1)]))[0]
    assert (capped @ unit <= 0.1 + 1e-5).all()
    below = h @ unit <= 0.1
    torch.testing.assert_close(capped[below], h[below])  # already under the cap: untouched
    replaced = _site(
        model, ids, Steering(model, SITE, [Intervention("replace", vector=u, value=2.0)])
    )[0]
    torch.testing.assert_close(
        replaced @ unit, torch.full((h.shape[0],), 2.0), rtol=1e-5, atol=1e-5
    )
    orthogonal = lambda x: x - (x @ unit)[:, None] * unit  # noqa: E731
    torch.testing.assert_close(orthogonal(replaced), orthogonal(h), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_steered_generation_with_the_kv_cache_equals_it_without(model, sae, ids, positions):
    edits = [Intervention("add", feature=5, value=40.0), Intervention("clamp", feature=7, value=3)]
    out = {}
    for cache in (True, False):
        steering = Steering(model, SITE, edits, sae, positions=positions, prompt_len=ids.shape[1])
        with torch.no_grad(), steering:
            out[cache] = model.generate(
                ids, max_new_tokens=6, do_sample=False, use_cache=cache, pad_token_id=0
            )
        if cache:  # the positions it edited, once each: the prompt's, the generated ones, or all
            P, total = ids.shape[1], out[cache].shape[1] - 1  # the last token is never fed back
            want = {"all": range(total), "prompt": range(P), "generated": range(P, total)}
            assert steering.steered == list(want[positions])
    assert torch.equal(out[True], out[False])
    if positions == "all":  # and the edit did something
        with torch.no_grad():
            clean = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert not torch.equal(clean, out[True])


def test_no_hook_is_left_behind_even_after_an_exception(model, sae, ids):
    before = _hooks(model)
    with pytest.raises(RuntimeError, match="inside"):
        with Steering(model, SITE, [Intervention("add", feature=1, value=1.0)], sae):
            assert _hooks(model) > before
            raise RuntimeError("inside the block")
    assert _hooks(model) == before


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(mode="add", feature=64, value=1.0), "out of range; this SAE has 0..63"),
        (dict(mode="boost", feature=1, value=1.0), "Unknown steering mode 'boost'"),
        (dict(mode="add", feature=1, value=float("nan")), "finite"),
        (dict(mode="clamp", vector=torch.ones(32), value=1.0), "acts on an SAE latent"),
        (dict(mode="add", vector=torch.ones(7), value=1.0), "must be 32 finite numbers"),
    ],
)
def test_bad_interventions_get_one_sentence(model, sae, kwargs, needle):
    with pytest.raises(UserError, match=needle):
        Steering(model, SITE, [Intervention(**kwargs)], sae)


def test_an_sae_of_another_site_is_refused(model, sae):
    with pytest.raises(UserError, match="trained on resid_post.1, not resid_post.2"):
        Steering(model, "resid_post.2", [Intervention("add", feature=1, value=1.0)], sae)


# -- CAA -----------------------------------------------------------------------------------------


def test_caa_is_the_mean_difference_of_last_token_states(model, tokenizer):
    from analysis.steering.caa import caa_vector

    pairs = [("the cat is happy", "the cat is sad"), ("a good dog ran", "a bad dog ran")]
    expect = []
    with torch.no_grad():
        for pos, neg in pairs:  # independent: HF's own hidden states, hidden_states[L+1]
            h = [model(**tokenizer(p, return_tensors="pt"), output_hidden_states=True)
                 .hidden_states[2][0, -1] for p in (pos, neg)]  # fmt: skip
            expect.append(h[0] - h[1])
    vector = caa_vector(model, tokenizer, SITE, pairs)
    torch.testing.assert_close(vector, torch.stack(expect).mean(0), rtol=1e-5, atol=1e-6)


def test_pca_of_differences_finds_the_planted_direction():
    from analysis.steering.caa import direction_from_differences

    g = torch.Generator().manual_seed(3)
    v = torch.randn(32, generator=g)
    v /= v.norm()
    scale = 1 + 4 * torch.rand(50, 1, generator=g)  # the concept at varied strengths
    diffs = scale * v + 0.05 * torch.randn(50, 32, generator=g)
    pca = direction_from_differences(diffs, "pca")
    assert float(pca @ v) / float(pca.norm()) > 0.99  # the direction, signed along the mean
    assert float(pca.norm()) == pytest.approx(float(diffs.mean(0) @ v), rel=0.05)
    with pytest.raises(UserError, match="Unknown CAA method 'median'"):
        direction_from_differences(diffs, "median")


def test_a_bad_pairs_file_names_its_line(tmp_path):
    from analysis.steering.caa import read_pairs

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"positive": "yes", "negative": "no"}\n\n{"positive": "only one"}\n')
    with pytest.raises(UserError, match="line 3 is not"):
        read_pairs(path)
    path.write_text('{"positive": "yes", "negative": "  "}\n')
    with pytest.raises(UserError, match="line 1 has an empty"):
        read_pairs(path)
    path.write_text("\n")
    with pytest.raises(UserError, match="holds no pair"):
        read_pairs(path)
    path.write_text('{"positive": "yes", "negative": "no"}\n')
    assert read_pairs(path) == [("yes", "no")]


# -- metrics and the command -------------------------------------------------------------------


def test_metrics_against_their_definitions(model, sae, ids):
    import torch.nn.functional as F

    from analysis.steering.metrics import generate, next_token_kl, perplexity, target_shift

    silent = Steering(model, SITE, [Intervention("clamp", feature=63, value=0.0)], sae)
    loud = Steering(model, SITE, [Intervention("add", feature=5, value=40.0)], sae)
    assert next_token_kl(model, ids, silent) == 0.0 and next_token_kl(model, ids, loud) > 0
    assert target_shift(model, ids, silent, [3, 4]) == 0.0
    out = generate(model, ids, max_new=5)
    with torch.no_grad():  # brute force: the mean NLL of the generated tokens
        logits = model(out).logits[0, ids.shape[1] - 1 : -1]
    nll = F.cross_entropy(logits, out[0, ids.shape[1] :])
    assert perplexity(model, out, ids.shape[1]) == pytest.approx(float(nll.exp()), rel=1e-5)
    a, b = (generate(model, ids, loud, max_new=5, sample=True, seed=7) for _ in range(2))
    assert torch.equal(a, b)  # sampling is seeded


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_dir):
    """A run of the tiny Llama with a random SAE at SITE, and a pairs file."""
    import json

    from hooks.selection import Selection
    from sae.formats import save_sae

    root = tmp_path_factory.mktemp("steer-run")
    text = root / "text.txt"
    text.write_text("\n\n".join(f"Story {i}: a cat sat on mat {i % 9}." for i in range(200)))
    sae = SAE(SAEConfig(d_in=32, n_latents=64, k=4, site=SITE))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    save_sae(sae, root / "run")
    selection = Selection(dataset=str(text), context_size=16).to_dict()
    info = {"model": str(tiny_dir), "site": SITE, "selection": selection}
    (root / "run" / "run.json").write_text(json.dumps(info))
    pairs = root / "happy.jsonl"
    rows = [("the cat is happy", "the cat is sad"), ("a good dog ran", "a bad dog ran")]
    pairs.write_text("".join(json.dumps({"positive": p, "negative": n}) + "\n" for p, n in rows))
    return root / "run", pairs


def test_saewb_steer_prints_both_generations_and_saves_the_run(tiny_run, capsys):
    import json

    from saewb_cli import main

    run, _ = tiny_run
    argv = ["steer", str(run), "--prompt", "the cat", "--max-new", "4"]
    assert main([*argv, "--feature", "5:30", "--feature", "9:-3", "--target", " cat",
                 "--name", "two"]) == 0, capsys.readouterr().err  # fmt: skip
    out = capsys.readouterr().out
    assert "baseline" in out and "steered" in out and "KL on 4 held-out windows" in out
    record = json.loads((run / "steering" / "runs" / "two.json").read_text())
    assert record["format"] == "saewb-steering-run" and record["prompt"] == "the cat"
    assert record["settings"]["methods"]["sae"] == [
        dict(feature=5, value=30.0, raw_value=30.0),
        dict(feature=9, value=-3.0, raw_value=-3.0),
    ]
    assert record["baseline"]["text"] in out and record["steered"]["text"] in out
    assert record["metrics"]["kl"] > 0 and "target_shift" in record["metrics"]
    for bad, needle in [
        (["--feature", "64:1"], "out of range"),
        (["--feature", "five"], "must look like 123:8"),
        (["--feature", "5:nan"], "finite number, got '5:nan'"),
        (["--feature", "5:inf"], "finite number, got '5:inf'"),
        (["--vector", "nothing:1"], "No steering vector 'nothing'"),
        ([], "Give at least one --feature"),
        (["--feature", "5:1", "--sweep"], "--sweep needs the target"),
        (["--feature", "5:1", "--sweep", "--target", " cat", "--strengths", "0,x"], "commas"),
        (["--feature", "5:1", "--units", "max"], f"run `saewb analyze {run}` first"),
    ]:
        assert main([*argv, *bad]) == 2, bad
        assert needle in capsys.readouterr().err, bad
    with pytest.raises(SystemExit):  # argparse's own sentence for a mode it does not know
        main([*argv, "--feature", "5:1", "--mode", "boost"])
    assert "invalid choice: 'boost'" in capsys.readouterr().err


def test_saewb_caa_saves_a_vector_that_steer_applies_and_sweeps(tiny_run, tokenizer, capsys):
    import json

    from analysis.steering.caa import caa_vector, load_vector, read_pairs
    from saewb_cli import main

    run, pairs = tiny_run
    assert main(["caa", str(run), "--pairs", str(pairs), "--name", "happy"]) == 0
    vector, meta = load_vector(run, "happy", SITE)
    expect = caa_vector(
        make_model("llama", len(tokenizer)).eval(), tokenizer, SITE, read_pairs(pairs)
    )
    torch.testing.assert_close(vector, expect)  # the round trip keeps the vector
    saved = json.loads((run / "steering" / "vectors" / "happy.json").read_text())
    assert saved == meta and saved["n_pairs"] == 2 and saved["method"] == "mean"
    assert saved["site"] == SITE and saved["norm"] == pytest.approx(float(expect.norm()))
    with pytest.raises(UserError, match="made at resid_post.1, not resid_post.2"):
        load_vector(run, "happy", "resid_post.2")
    by_path, _ = load_vector(run, str(run / "steering" / "vectors" / "happy.safetensors"))
    assert torch.equal(by_path, vector)
    capsys.readouterr()

    argv = ["steer", str(run), "--prompt", "the cat", "--max-new", "3", "--target", " cat"]
    assert main([*argv, "--vector", "happy:3", "--name", "v"]) == 0, capsys.readouterr().err
    record = json.loads((run / "steering" / "runs" / "v.json").read_text())
    assert record["settings"]["methods"]["caa:happy"][0]["value"] == 3.0
    assert record["settings"]["methods"]["caa:happy"][0]["provenance"] == meta
    sweep = [*argv, "--sweep", "--feature", "5:10", "--vector", "happy", "--strengths", "0,1,2"]
    assert main([*sweep, "--name", "f"]) == 0, capsys.readouterr().err
    curve = json.loads((run / "steering" / "frontiers" / "f.json").read_text())
    assert curve["format"] == "saewb-steering-frontier" and set(curve["curves"]) == {
        "sae",
        "caa:happy",
    }
    for line in curve["curves"].values():
        assert line["strengths"] == [0.0, 1.0, 2.0] and line["kl"][0] == 0.0
        assert line["target_shift"][0] == 0.0 and len(line["contains"]) == 3
    assert curve["matched"]["better"] in ("sae", "caa:happy", None)
    assert (run / "steering" / "frontiers" / "f.html").stat().st_size > 1000
    path = tiny_run[1].parent / "bad.jsonl"
    path.write_text('{"positive": "a", "negative": "b"}\n[1, 2]\n')
    assert main(["caa", str(run), "--pairs", str(path)]) == 2
    assert "line 2 is not" in capsys.readouterr().err
    path.write_text('{"positive": "the cat", "negative": "the cat"}\n')
    assert main(["caa", str(run), "--pairs", str(path)]) == 2
    assert (
        "CAA vector of" in capsys.readouterr().err
        and not (run / "steering" / "vectors" / "bad.safetensors").exists()
    )


# -- units of max activation (a real feature store, planted) -----------------------------------


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory, tokenizer):
    from conftest import build_planted_run

    from analysis.run import open_run
    from analysis.store.build import analyze

    path, _ = build_planted_run(tmp_path_factory.mktemp("planted"), tokenizer, docs=400)
    analyze(open_run(path), 3000, batch_windows=4, progress=False)
    return path


def test_units_of_max_activation_scale_by_the_stores_max(planted_store, capsys):
    import json

    import pyarrow.parquet as pq

    from analysis.run import open_run
    from analysis.steering.interventions import in_units, max_activations
    from saewb_cli import main

    run = open_run(planted_store)
    top = pq.read_table(planted_store / "features" / "features.parquet").column("max_act")
    top = top.to_numpy()  # the store's own column, read without the code under test
    assert top[0] == pytest.approx(10.0)  # planted: ' Paris' sets coordinate 0 to 11, bias -1
    max_act = max_activations(planted_store)
    with torch.no_grad():  # an SAE whose input_scale is 2: its latent units are not site units
        sae = SAE(run.sae.cfg)
        sae.load_state_dict(run.sae.state_dict())
        sae.input_scale.fill_(2.0)
        sae.W_dec[0] *= 3.0
    add, clamp = in_units(
        [Intervention("add", feature=0, value=0.5), Intervention("clamp", feature=0, value=0.5)],
        "max", sae, max_act,
    )  # fmt: skip
    assert add.value == pytest.approx(0.5 * top[0] * 3.0 / 2.0)  # the write's length at max
    assert clamp.value == pytest.approx(0.5 * top[0])  # a clamp is in latent units
    assert in_units([add], "raw") == [add]
    with pytest.raises(UserError, match="Feature 5 never fired"):
        in_units([Intervention("add", feature=5, value=1.0)], "max", sae, max_act)
    with pytest.raises(UserError, match="belong to SAE features"):
        in_units([Intervention("add", vector=torch.ones(32), value=1.0)], "max", sae, max_act)

    argv = ["steer", str(planted_store), "--prompt", "Paris", "--max-new", "2", "--units", "max"]
    assert main([*argv, "--feature", "0:0.5", "--name", "u"]) == 0, capsys.readouterr().err
    record = json.loads((planted_store / "steering" / "runs" / "u.json").read_text())
    assert record["settings"]["methods"]["sae"][0]["raw_value"] == pytest.approx(0.5 * top[0])


# -- the frontier ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logit_model(tokenizer):
    """Final norm the identity and unit-norm unembedding rows: adding a token's unembedding row
    after the last block raises that token's logit by the strength and every other's by less,
    so its probability rises strictly with the strength."""
    model = make_model("llama", len(tokenizer), n_layers=2).eval()
    model.model.norm = torch.nn.Identity()
    with torch.no_grad():
        W = model.lm_head.weight
        W /= W.norm(dim=1, keepdim=True)
    return model


def test_frontier_effect_grows_with_strength_and_kl_is_zero_at_zero(logit_model, tokenizer):
    from conftest import single_token

    from analysis.steering.frontier import NEUTRAL_TEXT, frontier

    target = single_token(tokenizer, " cat")
    direction = logit_model.lm_head.weight[target].clone()
    neutral = tokenizer(NEUTRAL_TEXT, return_tensors="pt")["input_ids"][:, :24]
    kw = dict(targets=[" cat"], prompts=["the dog", "Paris is"], neutral=neutral, max_new=4)
    strengths = [0.0, 1.0, 4.0, 16.0]
    curve = frontier(logit_model, tokenizer, "resid_post.1",
                     lambda s: [Intervention("add", vector=direction, value=s)], strengths, **kw)  # fmt: skip
    assert curve["kl"][0] == 0.0 and curve["target_shift"][0] == 0.0
    assert all(b > a for a, b in zip(curve["target_prob"], curve["target_prob"][1:]))
    assert all(b > a for a, b in zip(curve["kl"], curve["kl"][1:]))
    assert curve["contains"][-1] == 1.0 and curve["contains"][0] == curve["baseline"]["contains"]
    with torch.no_grad():  # brute force at strength 4: the logits moved by 4 times W_U u
        ids = tokenizer("the dog", return_tensors="pt")["input_ids"]
        clean = logit_model(ids).logits[0, -1]
        moved = (clean + 4.0 * logit_model.lm_head.weight @ direction).softmax(-1)[target]
        other = tokenizer("Paris is", return_tensors="pt")["input_ids"]
        clean2 = logit_model(other).logits[0, -1]
        moved2 = (clean2 + 4.0 * logit_model.lm_head.weight @ direction).softmax(-1)[target]
    assert curve["target_prob"][2] == pytest.approx(float(moved + moved2) / 2, rel=1e-4)
    sampled = [frontier(logit_model, tokenizer, "resid_post.1",
                        lambda s: [Intervention("add", vector=direction, value=s)], [0, 3],
                        sample=True, samples=2, seed=5, **kw) for _ in range(2)]  # fmt: skip
    assert sampled[0] == sampled[1]  # seeded
    with pytest.raises(UserError, match="finite number, got inf"):
        frontier(logit_model, tokenizer, "resid_post.1", lambda s: [], [0, float("inf")], **kw)


def test_matched_side_effect_picks_the_curve_higher_at_equal_kl():
    from analysis.steering.frontier import matched_side_effect

    a = dict(kl=[0.0, 1.0, 2.0, 3.0], target_shift=[0.0, 2.0, 4.0, 6.0])  # effect 2 KL
    b = dict(kl=[4.0, 0.0, 0.5], target_shift=[4.0, 0.0, 0.5])  # effect KL, points unsorted
    out = matched_side_effect({"a": a, "b": b}, points=7)
    assert out["kl"] == pytest.approx([0, 0.5, 1, 1.5, 2, 2.5, 3])  # the shared range only
    assert out["effect"]["a"] == pytest.approx([2 * k for k in out["kl"]])
    assert out["effect"]["b"] == pytest.approx(out["kl"])
    assert out["best"] == [None] + ["a"] * 6 and out["better"] == "a"
    assert out["measured"] == {"a": 4, "b": 2}
    c = dict(kl=[0.0, 3.0], target_shift=[3.0, 3.0])  # flat at 3: ahead of a until KL 1.5
    out = matched_side_effect({"a": a, "c": c}, points=7)
    assert out["best"] == ["c", "c", "c", None, "a", "a", "a"]
    assert out["better"] is None  # mean effects 3 and 3
    far = dict(kl=[5.0, 6.0], target_shift=[1.0, 2.0])
    assert matched_side_effect({"a": a, "far": far})["kl"] == []
