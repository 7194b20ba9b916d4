"""The CLI: each bad input gets one sentence on stderr, exit status 2, and no traceback."""

import pytest

from hooks.errors import UserError
from saewb_cli import main, parse_count


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_sentence_error(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("saewb: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "text,value",
    [
        ("1000", 1000),
        ("2_000", 2000),
        ("20k", 20000),
        ("2M", 2_000_000),
        ("1.5k", 1500),
        ("2e3", 2000),
    ],
)
def test_parse_count_accepts_common_spellings(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["abc", "1.5", "-3", "0", "", "10 tokens"])
def test_parse_count_rejects_non_integers(text):
    with pytest.raises(UserError, match="must be a positive whole number"):
        parse_count(text)


def _text_file(tmp_path, blocks=300):
    path = tmp_path / "text.txt"
    path.write_text(
        "\n\n".join(f"Story {i}: the cat sat on the mat near the dog." for i in range(blocks))
    )
    return path


def test_harvest_and_cache_info(capsys, tmp_path, tiny_dir):
    text = _text_file(tmp_path)
    code, out, err = _run(
        capsys,
        "harvest",
        "--model",
        str(tiny_dir),
        "--site",
        "resid_post.1",
        "--site",
        "mlp_out.0",
        "--tokens",
        "1k",
        "--cache",
        str(tmp_path / "c"),
        "--dataset",
        str(text),
        "--context",
        "32",
        "--batch",
        "4",
    )
    assert code == 0, err
    assert "1,000 of 1,000" in out and "resid_post.1, mlp_out.0" in out
    code, out, _ = _run(capsys, "cache", "info", str(tmp_path / "c"))
    assert code == 0 and "d_model 32" in out and "complete" in out


def test_corpus_info_on_a_user_file(capsys, tmp_path, tiny_dir):
    code, out, err = _run(
        capsys,
        "corpus",
        "info",
        "--dataset",
        str(_text_file(tmp_path, 5)),
        "--model",
        str(tiny_dir),
    )
    assert code == 0, err
    assert "documents  5" in out and "Story 0" in out


HARVEST = "harvest --model TINY --site resid_post.1 --tokens 100 --cache X"


@pytest.mark.parametrize(
    "argv,needles",
    [
        (
            HARVEST.replace("TINY", "no-such-org/no-such-model"),
            ["no-such-org/no-such-model", "smollm2-135m"],
        ),
        (HARVEST.replace("resid_post.1", "resid_pots.1"), ["resid_pots.1", "valid sites"]),
        (HARVEST.replace("100", "many"), ["--tokens", "'many'"]),
        (HARVEST + " --dataset missing/notes.jsonl", ["missing/notes.jsonl"]),
        (HARVEST + " --dataset EMPTY", ["contains no text"]),
        ("cache info NOWHERE", ["not an activation cache"]),
    ],
)
def test_bad_input_gets_one_sentence(capsys, tmp_path, tiny_dir, argv, needles):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    subs = {
        "TINY": str(tiny_dir),
        "X": str(tmp_path / "c"),
        "EMPTY": str(tmp_path / "empty.txt"),
        "NOWHERE": str(tmp_path / "nowhere"),
    }
    code, _, err = _run(capsys, *[subs.get(a, a) for a in argv.split()])
    _one_sentence_error(code, err, *needles)


def test_cache_of_another_model_is_refused(capsys, tmp_path, tiny_dir):
    text = str(_text_file(tmp_path))
    args = [
        "--site",
        "resid_post.1",
        "--tokens",
        "200",
        "--cache",
        str(tmp_path / "c"),
        "--dataset",
        text,
        "--context",
        "32",
    ]
    assert _run(capsys, "harvest", "--model", str(tiny_dir), *args)[0] == 0
    other = tmp_path / "other"
    import shutil

    shutil.copytree(tiny_dir, other)
    code, _, err = _run(capsys, "harvest", "--model", str(other), *args)
    _one_sentence_error(code, err, "model=", "choose another --cache")


@pytest.mark.parametrize(
    "architecture,site,target",
    [
        ("jumprelu", "mlp_in.1", "mlp_out.1"),
        ("relu", "resid_post.1", None),
        ("batchtopk", "resid_post.1", None),
        ("matryoshka", "resid_post.1", None),
    ],
)
def test_train_eval_and_analyze_every_kind(capsys, tmp_path, tiny_dir, architecture, site, target):
    """`saewb train`, `saewb eval` and `saewb analyze` on a run of each kind whose L0 is not a
    fixed k per token, a transcoder among them: each records and prints what it evaluated."""
    import json

    from conftest import tiny_train_argv

    run = tmp_path / "run"
    argv = tiny_train_argv(tiny_dir, _text_file(tmp_path, 600), run)
    argv[argv.index("resid_post.1")] = site
    argv += ["--architecture", architecture] + (["--target", target] if target else [])
    assert _run(capsys, *argv)[0] == 0
    code, out, err = _run(capsys, "eval", str(run), "--tokens", "300", "--batch", "4")
    assert code == 0, err
    record = json.loads((run / "eval.json").read_text())
    assert record["architecture"] == architecture and record["target"] == target
    kind = f"{architecture} {'transcoder' if target else 'SAE'}"
    where = f"{site} -> {target}" if target else site
    assert f"{kind} on " in out and f"at {where}," in out
    m = record["metrics"]
    assert 0 <= m["l0"] <= 16 and record["sae"]["target"] == (target or "")
    assert m["ce_loss_clean"] > 0 and m["fvu"] == pytest.approx(1 - m["explained_variance"])
    code, out, err = _run(capsys, "analyze", str(run), "--tokens", "500", "--batch", "4")
    assert code == 0, err
    manifest = json.loads((run / "features" / "manifest.json").read_text())
    assert manifest["architecture"] == architecture and manifest["target"] == target
    assert manifest["site"] == site and manifest["n_tokens"] >= 500
