"""LF-Steering on a planted toy whose cause of inconsistency is known, its input format, and the
built-in paraphrase set.

The toy: a tiny Llama whose blocks add nothing (o_proj and down_proj zeroed), so every residual
site holds the token embedding and the answer at the last prompt token is the sign of
x0 - 3 x1 there (the head reads only those coordinates). Paraphrases end in words that set
x0 = +1 (answer ' dog') or -1 (' cat'); one word also sets x1 = 1, the trigger, and flips a
' dog' paraphrase to ' cat'. The SAE has a latent on each planted direction: 0 (+x0, the
content), 1 (-x0), 2 (x1, the trigger: the truth), 3 (x2, wording that changes no answer), 4
(along the answer direction itself), 5-7 random in the other coordinates.
"""

import json
import math

import pytest
import torch
from conftest import make_model

from analysis.steering.lf import Runner, dense_codes, lf_steering, rank_latents
from analysis.steering.paraphrases import Group, builtin_groups, normalise, read_groups
from hooks.errors import UserError
from sae.config import SAEConfig
from sae.model import SAE

SITE = "resid_post.0"
WORDS = dict(a=" mat", a2=" park", a_wording=" Paris", trigger=" France", b=" Monday",
             b2=" Tuesday", b_wording=" January")  # fmt: skip
PREFIXES = ("the cat sat on the", "a dog ran in the", "Numbers count up to", "The dog sat on")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The toy's matmuls are tiny; on a shared machine torch's thread hand-offs cost more than
    the work, so this module runs on one thread and gives the setting back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tok(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, word
    return ids[0]


@pytest.fixture(scope="module")
def toy(tokenizer):
    return make_toy(tokenizer)


def make_toy(tokenizer):
    model = make_model("llama", len(tokenizer), n_layers=2).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.get_input_embeddings().weight
        emb[:, :4] = 0
        planted = dict(a=(1, 0, 0), a2=(1, 0, 0), a_wording=(1, 0, 1), trigger=(1, 1, 0),
                       b=(-1, 0, 0), b2=(-1, 0, 0), b_wording=(-1, 0, 1))  # fmt: skip
        for name, (x0, x1, x2) in planted.items():
            emb[_tok(tokenizer, WORDS[name]), :3] = torch.tensor([x0, x1, x2], dtype=emb.dtype)
        head = model.get_output_embeddings().weight
        dog, cat = _tok(tokenizer, " dog"), _tok(tokenizer, " cat")
        head[[dog, cat]] = 0
        head[dog, 0], head[dog, 1] = 10.0, -30.0
        head[cat] = -head[dog]  # every other token's logit sits between the two
    sae = SAE(SAEConfig(d_in=32, n_latents=8, k=4, site=SITE))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        W = torch.zeros(8, 32)
        W[0, 0], W[1, 0], W[2, 1], W[3, 2] = 1, -1, 1, 1
        W[4, 0], W[4, 1] = 1, -3
        W[5:, 4:] = torch.randn(3, 28, generator=g)
        W /= W.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return model, sae.eval()


def _groups(task: str, n: int, nlu: bool) -> list[Group]:
    """n groups of each kind: consistent ' dog', consistent ' cat', and ' dog' groups one of whose
    paraphrases ends in the trigger."""
    kinds = dict(dog=("a", "a2", "a_wording", "a"), cat=("b", "b2", "b_wording", "b"),
                 flip=("trigger", "a", "a_wording", "a2"))  # fmt: skip
    answers = (" dog", " cat") if nlu else None
    groups = []
    for i in range(n):
        for kind, words in kinds.items():
            texts = tuple(f"{PREFIXES[(i + j) % 4]}{WORDS[w]}" for j, w in enumerate(words))
            gold = " cat" if kind == "cat" else " dog"
            groups.append(Group(task, gold, texts, answers))
    return groups


def _locality() -> list[Group]:
    return [
        Group("local", " dog" if w[0] == "a" else " cat", (f"{p}{WORDS[w]}",), (" dog", " cat"))
        for p in PREFIXES
        for w in ("a", "a2", "b", "b2")
    ]


def test_the_toy_is_what_it_claims(toy, tokenizer):
    model, sae = toy
    groups = _groups("nlu", 1, True)
    runner = Runner(model, tokenizer, groups)
    answers, states, _ = runner.run(site=SITE)
    assert answers[8] == " cat" and answers[9:12] == [" dog"] * 3  # the trigger flips
    assert runner.table(answers)["consistency"].tolist() == [1, 1, 0]
    codes = dense_codes(sae, states)
    assert codes[8, 2] == pytest.approx(1.0) and codes[9:, 2].abs().max() == 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_cached_answers_equal_one_prompt_at_a_time(tokenizer, arch):
    """The runner's left padding, position ids and reused KV cache against plain forwards."""
    model = make_model(arch, len(tokenizer), n_layers=2).eval()
    texts = ("the cat", "the dog ran in the park and", "Paris is the capital of", "Monday comes")
    groups = [Group("t", " dog", texts, (" dog", " cat", " mat")), Group("t", " cat", texts[:2])]
    runner = Runner(model, tokenizer, groups, batch=3, max_new=3)
    for _ in range(2):  # a second pass finds the caches as the first left them
        answers, _, log_probs = runner.run(keep=True)
        ids = [tokenizer(t, return_tensors="pt")["input_ids"] for t in texts]
        with torch.no_grad():
            expect = [model(i).logits[0, -1].log_softmax(-1) for i in ids]
            generated = [model.generate(i, max_new_tokens=3, do_sample=False, pad_token_id=0)
                         for i in ids[:2]]  # fmt: skip
        torch.testing.assert_close(log_probs[:4], torch.stack(expect), atol=1e-4, rtol=1e-4)
        choice = [
            [" dog", " cat", " mat"][
                int(e[[_tok(tokenizer, w) for w in (" dog", " cat", " mat")]].argmax())
            ]
            for e in expect
        ]
        assert answers[:4] == choice
        words = [normalise(tokenizer.decode(g[0, i.shape[1] :])) for g, i in zip(generated, ids)]
        assert answers[4:] == words


def test_lf_steering_finds_the_planted_latent_and_makes_answers_consistent(toy, tokenizer):
    model, sae = toy
    groups = _groups("nlu", 8, True) + _groups("nlg", 4, False)
    kw = dict(locality=_locality(), seed=0, counts=(1, 2, 4), max_new=1, n_boot=200)
    result = lf_steering(model, tokenizer, sae, SITE, groups, progress=False, **kw)
    assert [row["id"] for row in result["latents"]] == [2]  # the trigger, and only it
    assert result["search"]["chosen"] == dict(
        latents=1, strength=1.0, consistency=1.0, accuracy=1.0, consistent_correct=1.0
    )
    none, lf, rand = (result["methods"][m] for m in ("none", "lf", "random"))
    assert none["consistency"] < 1 and lf["consistency"] == 1.0 and lf["accuracy"] == 1.0
    assert lf["consistency_delta"] == pytest.approx(1.0 - none["consistency"])
    assert lf["consistency_delta_ci"][0] > 0
    assert lf["by_task"]["nlg"]["consistent_correct"] == 1.0  # generation steered as well
    assert lf["locality"]["kl"] == 0.0 and lf["locality"]["accuracy"] == 1.0  # trigger silent
    assert 2 not in result["random_latents"] and rand["consistency"] < 1
    assert set(result["split"]["tune"]).isdisjoint(result["split"]["eval"])
    again = lf_steering(model, tokenizer, sae, SITE, groups, progress=False, **kw)
    assert {**again, "seconds": 0} == {**result, "seconds": 0}  # seeded: identical twice


def test_rank_latents_scores_wording_and_answer_latents_below_the_cause(toy, tokenizer):
    model, sae = toy
    runner = Runner(model, tokenizer, _groups("nlu", 3, True))
    answers, states, _ = runner.run(site=SITE)
    ranking = rank_latents(dense_codes(sae, states), runner.group_of, answers, runner.gold)
    score = ranking["score"]
    assert int(score.argmax()) == 2 and score[2] == pytest.approx(1.0, abs=0.05)
    assert score[0] < 0 and score[1] < 0 and score[3] < 0  # content and wording
    assert score[4] <= 1e-3  # the answer direction: it flips, but it is the answer itself
    assert ranking["off"][2] == pytest.approx(1.0) and ranking["consistent"][2] == 0


def test_nothing_to_contrast_or_answers_alike_get_one_sentence(toy, tokenizer):
    model, sae = toy
    consistent = [g for g in _groups("nlu", 3, True) if g.paraphrases[0].endswith(WORDS["a"])]
    with pytest.raises(UserError, match="No tune group is answered inconsistently"):
        lf_steering(model, tokenizer, sae, SITE, consistent, _locality(), progress=False)
    alike = [Group("t", " dog", ("the cat sat on the mat", "a dog ran"), (" dog", " dogs"))] * 2
    with pytest.raises(UserError, match=r"answers \[' dog', ' dogs'\] of task 't' do not start"):
        lf_steering(model, tokenizer, sae, SITE, alike, _locality(), progress=False)


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_paraphrase_files_name_their_bad_line(tmp_path):
    path = tmp_path / "groups.jsonl"
    good = {"task": "t", "answers": [" yes", " no"], "gold": " yes", "paraphrases": ["a", "b"]}
    _write(path, [good, "", "{not json"])
    with pytest.raises(UserError, match=r"groups.jsonl line 3 is not valid JSON"):
        read_groups(path)
    bad = [
        ({**good, "paraphrases": ["a"]}, "at least 2 non-empty"),
        ({**good, "paraphrases": ["a", "a"]}, "repeats a paraphrase"),
        ({**good, "gold": " maybe"}, "not one of its answers"),
        ({**good, "answers": [" yes"]}, "bad 'answers'"),
        ({**good, "template": "no slot"}, "exactly one {text}"),
        ({k: v for k, v in good.items() if k != "task"}, "no task name"),
        ([1, 2], "not a JSON object"),
    ]
    for row, needle in bad:
        _write(path, [good, row])
        with pytest.raises(UserError, match=f"line 2 .*{needle}|line 2 {needle}"):
            read_groups(path)
    path.write_text("\n\n")
    with pytest.raises(UserError, match="holds no group"):
        read_groups(path)
    with pytest.raises(UserError, match="does not exist"):
        read_groups(tmp_path / "missing.jsonl")
    _write(path, [good, {**good, "answers": None, "gold": "Paris", "template": "Q: {text}\nA:"}])
    nlu, nlg = read_groups(path)
    assert nlu.answers == (" yes", " no") and nlg.answers is None
    assert nlg.prompts() == ["Q: a\nA:", "Q: b\nA:"]


def test_normalised_exact_match():
    assert normalise(" The Paris.\nQuestion: next") == "paris"
    assert normalise("  Buenos   Aires!") == "buenos aires"
    assert normalise("\n") == "" and normalise("Rome") != normalise("Roma")


def test_the_built_in_set_is_large_varied_and_well_formed():
    groups = builtin_groups()
    assert len(groups) >= 60 and all(len(g.paraphrases) >= 4 for g in groups)
    tasks = {g.task for g in groups}
    assert len(tasks) >= 2 and any(g.answers is None for g in groups)  # an NLG task as well
    texts = [p for g in groups for p in g.paraphrases]
    assert len(set(texts)) == len(texts)  # no paraphrase twice, within or across groups
    for task in tasks:  # every NLU answer is some group's gold: no class is missing
        members = [g for g in groups if g.task == task]
        if members[0].answers:
            assert {g.gold for g in members} == set(members[0].answers)
    assert all(math.isfinite(len(g.template)) and "{text}" not in g.prompts()[0] for g in groups)


def test_saewb_lf_steer_writes_its_json(toy, tokenizer, tmp_path, capsys):
    from hooks.selection import Selection
    from sae.formats import save_sae
    from saewb_cli import main

    model, sae = toy
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    save_sae(sae, tmp_path / "run")
    (tmp_path / "text.txt").write_text("the cat sat on the mat.\n\n" * 50)
    selection = Selection(dataset=str(tmp_path / "text.txt"), context_size=16).to_dict()
    info = {"model": str(tmp_path / "model"), "site": SITE, "selection": selection}
    (tmp_path / "run" / "run.json").write_text(json.dumps(info))
    data, local = tmp_path / "groups.jsonl", tmp_path / "local.jsonl"
    rows = lambda groups: [dict(task=g.task, answers=g.answers, gold=g.gold,  # noqa: E731
                                paraphrases=g.paraphrases) for g in groups]  # fmt: skip
    _write(data, rows(_groups("nlu", 4, True)))
    _write(local, [{**r, "paraphrases": [r["paraphrases"][0], "x" + r["paraphrases"][0]]}
                   for r in rows(_locality())[:4]])  # fmt: skip
    argv = ["lf-steer", str(tmp_path / "run"), "--data", str(data), "--locality", str(local)]
    assert main([*argv, "--counts", "1,2", "--boot", "50"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "1 latents at strength 1 (2)" in out and "random" in out
    written = json.loads((tmp_path / "run" / "steering" / "lf_steering.json").read_text())
    assert written["latents"][0]["id"] == 2 and written["data"]["source"] == "user"
    assert written["methods"]["lf"]["consistency"] == 1.0
    assert main([*argv, "--counts", "0"]) == 2
    assert "--counts must be comma-separated positive whole numbers" in capsys.readouterr().err
    data.write_text('{"task": "t"}\n')
    assert main(argv) == 2
    assert "groups.jsonl line 1 has no gold answer" in capsys.readouterr().err
