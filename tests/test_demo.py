"""`saewb demo`'s stage loop (resume, a killed stage, a changed plan), without the model;
tests/test_smollm2.py runs the whole `--tiny` demo on the real one."""

import json
from dataclasses import replace

import pytest

from hooks.errors import UserError
from saewb_cli import main
from saewb_cli.demo import FULL, TINY, Demo, Stage, run_stages


def _stages(calls: list[str], kill: set[str]):
    def work(name):
        def fn(demo):
            calls.append(name)
            if name in kill:
                kill.discard(name)
                raise KeyboardInterrupt  # killed half-way: no output written
            (demo.out / name).write_text("done")

        return fn

    return tuple(Stage(n, f"stage {n}", n, work(n)) for n in ("a", "b", "c"))


def test_a_rerun_skips_finished_stages_and_redoes_the_killed_one(tmp_path, capsys):
    calls = []
    stages = _stages(calls, kill={"b"})
    with pytest.raises(KeyboardInterrupt):
        run_stages(Demo(tmp_path, TINY), stages, 3)
    assert calls == ["a", "b"]
    record = json.loads((tmp_path / "demo.json").read_text())
    assert list(record["stages"]) == ["a"]  # b was killed: not recorded

    run_stages(Demo(tmp_path, TINY), stages, 3)
    assert calls == ["a", "b", "b", "c"]  # a skipped, b redone, c run
    out = capsys.readouterr().out
    assert "[1/3] a: stage a\n  done already" in out
    assert list(json.loads((tmp_path / "demo.json").read_text())["stages"]) == ["a", "b", "c"]


def test_a_stage_whose_output_was_removed_runs_again(tmp_path):
    calls = []
    stages = _stages(calls, kill=set())
    run_stages(Demo(tmp_path, TINY), stages, 3)
    (tmp_path / "b").unlink()
    run_stages(Demo(tmp_path, TINY), stages, 3)
    assert calls == ["a", "b", "c", "b"]


def test_a_folder_of_another_plan_is_refused(tmp_path, capsys):
    run_stages(Demo(tmp_path, TINY), _stages([], set()), 3)
    with pytest.raises(UserError, match="train_tokens=32768, not 1000"):
        Demo(tmp_path, replace(TINY, train_tokens=1000))
    assert Demo(tmp_path, TINY).record["stages"]  # the same plan reads back
    code = main(["demo", "--out", str(tmp_path), "--no-serve"])  # the full plan, not --tiny
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"site='{TINY.site}', not '{FULL.site}'" in err


def test_a_foreign_demo_record_is_refused(tmp_path):
    (tmp_path / "demo.json").write_text('{"format": "something else"}')
    with pytest.raises(UserError, match="is not a saewb demo record"):
        Demo(tmp_path, TINY)
    (tmp_path / "demo.json").write_text("not json")
    with pytest.raises(UserError, match="is not a saewb demo record"):
        Demo(tmp_path, TINY)


def test_tokens_sets_the_training_tokens_and_caps_the_cache(tmp_path, capsys):
    from saewb_cli import build_parser
    from saewb_cli.demo import plan_from_args

    plan = plan_from_args(build_parser().parse_args(["demo", "--tokens", "100k"]))
    assert plan.train_tokens == 100_000 and plan.harvest_tokens == 100_000
    plan = plan_from_args(build_parser().parse_args(["demo", "--tokens", "5M"]))
    assert plan.train_tokens == 5_000_000 and plan.harvest_tokens == FULL.harvest_tokens


def test_ctrl_c_stops_the_dashboard_cleanly(tmp_path, monkeypatch, capsys):
    import waitress

    def interrupted(app, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(waitress, "serve", interrupted)
    assert main(["dashboard", str(tmp_path)]) == 0
    assert "dashboard stopped" in capsys.readouterr().err
