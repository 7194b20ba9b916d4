"""One recorded token selection: what a run was trained on is what eval, analyze and the probe
read back, a cache's selection can't be overridden by flags, and nothing falls back silently."""

import json

import pytest
import torch
from conftest import tiny_train_argv
from safetensors.torch import load_file

from analysis.run import open_run
from hooks.cache import harvest
from hooks.errors import UserError
from hooks.selection import Selection
from sae.config import SAEConfig
from sae.formats import save_sae
from sae.model import SAE
from saewb_cli import main


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n\n".join(f"Story {i}: a cat sat on mat {i % 9}." for i in range(600)))
    return path


def _run_dir(path, model, selection: Selection):
    sae = SAE(SAEConfig(d_in=32, n_latents=16, k=2))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    save_sae(sae, path)
    info = {"model": str(model), "site": "resid_post.1", "selection": selection.to_dict()}
    (path / "run.json").write_text(json.dumps(info))
    return path


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, tiny_dir, text):
    out = tmp_path_factory.mktemp("default") / "run"
    assert main(tiny_train_argv(tiny_dir, text, out, tokens=1024)) == 0
    return out


@pytest.mark.parametrize("flags", [["--keep-first"], ["--bos", "none", "--keep-special"]])
def test_live_training_honours_the_selection_flags(
    default_run, tmp_path, tiny_dir, text, capsys, flags
):
    """These flags used to be accepted and ignored: the weights came out bit for bit the same."""
    default, chosen = default_run, tmp_path / "chosen"
    assert main(tiny_train_argv(tiny_dir, text, chosen, tokens=1024) + flags) == 0, (
        capsys.readouterr().err
    )
    recorded = json.loads((chosen / "run.json").read_text())["selection"]
    assert recorded != json.loads((default / "run.json").read_text())["selection"]
    assert open_run(chosen).selection == Selection.from_dict(recorded, "run.json")
    if "--keep-first" in flags:
        assert recorded["drop_first"] is False
    else:
        assert recorded["bos"] == "none" and recorded["drop_special"] is False
    a, b = load_file(default / "sae.safetensors"), load_file(chosen / "sae.safetensors")
    assert not torch.equal(a["W_dec"], b["W_dec"])


@pytest.fixture(scope="module")
def body_cache(tmp_path_factory, tiny_llama):
    """A cache harvested from a jsonl file whose text is in a 'body' column, keeping position 0."""
    root = tmp_path_factory.mktemp("cache")
    rows = [{"body": f"Story {i}: a dog ran to park {i % 5}."} for i in range(600)]
    (root / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    selection = Selection(
        dataset=str(root / "docs.jsonl"), text_column="body", context_size=16, drop_first=False
    )
    windows = selection.windows(tiny_llama.tokenizer)
    harvest(tiny_llama, ["resid_post.1"], windows, 2048, root / "c", selection, progress=False)
    return root / "c", selection


def test_training_from_a_cache_refuses_selection_flags(body_cache, tmp_path, capsys):
    cache, _ = body_cache
    argv = ["train", "--cache", str(cache), "--latents", "64", "--k", "4", "--tokens", "1024"]
    for flag in (["--keep-first"], ["--text-column", "text"], ["--model-dtype", "bf16"]):
        assert main([*argv, "--out", str(tmp_path / "r"), *flag]) == 2
        err = capsys.readouterr().err
        assert err.count("saewb: error:") == 1 and flag[0] in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_a_run_from_a_cache_keeps_the_cache_selection_after_the_cache_moves(
    body_cache, tmp_path, capsys
):
    """run.py used to let the trainer's default text_column override the manifest's and fell
    back to the built-in corpus when the cache had moved."""
    cache, selection = body_cache
    argv = ["train", "--cache", str(cache), "--latents", "64", "--k", "4", "--tokens", "1024",
            "--batch", "256", "--buffer-tokens", "512", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    moved = cache.parent / "moved"
    cache.rename(moved)
    try:
        run = open_run(tmp_path / "run")
    finally:
        moved.rename(cache)
    assert run.selection == selection and run.selection.text_column == "body"


def test_a_missing_source_is_an_error_that_names_it(tmp_path, tiny_dir, tiny_llama):
    from analysis.evaluation import evaluate

    gone = tmp_path / "gone.txt"
    run = open_run(_run_dir(tmp_path / "run", tiny_dir, Selection(dataset=str(gone))))
    with pytest.raises(UserError, match="gone.txt"):
        evaluate(run, 100, loaded=tiny_llama, progress=False)


def test_the_model_loads_in_the_dtype_the_data_was_captured_in(tmp_path, tiny_dir, text):
    bf16 = Selection(dataset=str(text), context_size=32, model_dtype="bf16")
    run = open_run(_run_dir(tmp_path / "run", tiny_dir, bf16))
    assert next(run.load_model(progress=False).model.parameters()).dtype == torch.bfloat16


def test_the_probe_reads_text_as_the_run_was_trained(tmp_path, tiny_dir, tiny_llama, text):
    from analysis.probe import TextProbe
    from hooks.windows import special_id

    bos = special_id(tiny_llama.tokenizer, "bos")
    default = TextProbe(open_run(_run_dir(tmp_path / "a", tiny_dir, Selection())), tiny_llama)
    codes = default.encode("the cat sat on the mat")
    assert codes.token_ids[0] == bos and codes.kept[0] is False and all(codes.kept[1:])
    raw = Selection(bos="none", drop_first=False)
    probe = TextProbe(open_run(_run_dir(tmp_path / "b", tiny_dir, raw)), tiny_llama)
    codes = probe.encode("the cat sat on the mat")
    assert codes.token_ids[0] != bos and all(codes.kept)
    assert codes.token_ids == default.encode("the cat sat on the mat").token_ids[1:]


def test_a_recorded_selection_with_an_unknown_setting_is_refused():
    with pytest.raises(UserError, match="unknown selection setting 'windowing'"):
        Selection.from_dict({**Selection().to_dict(), "windowing": 3}, "run.json")
    with pytest.raises(UserError, match="older sae-workbench"):
        Selection.from_dict(None, "run.json")


def test_a_relative_dataset_path_is_recorded_absolute(tmp_path, monkeypatch):
    from saewb_cli import build_parser
    from saewb_cli.args import selection_from_args

    (tmp_path / "notes.txt").write_text("some text")
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["train", "--dataset", "notes.txt"])
    assert selection_from_args(args).dataset == str(tmp_path.resolve() / "notes.txt")
    args = build_parser().parse_args(["train", "--dataset", "org/hub-dataset"])
    assert selection_from_args(args).dataset == "org/hub-dataset"
