"""`saewb geometry`'s orchestration: --only, skip-done, --force, typed options, and a kill that
loses only the analysis it happened in. The analyses are stand-ins that count their calls."""

import numpy as np
import pytest

from analysis.geometry import pipeline
from analysis.geometry.results import Result, read_summary
from hooks.errors import UserError


@pytest.fixture()
def planted_run(tmp_path, tokenizer):
    from conftest import build_planted_run

    return build_planted_run(tmp_path, tokenizer, docs=40)[0]


@pytest.fixture()
def fakes(monkeypatch):
    calls = []

    def make(name):
        def analysis(run, inputs=None, *, seed: int = 0, progress: bool = True, size: int = 3,
                     scale: float = 1.0, exact: bool = False):  # fmt: skip
            calls.append((name, size, scale, exact))
            if name == "crystals" and scale < 0:
                raise KeyboardInterrupt  # a kill in the middle of an analysis
            n = run.sae.cfg.n_latents
            cols = {"feature": np.arange(n), "x": np.arange(n) * scale, "y": np.zeros(n),
                    "cluster": np.arange(n) % size, "cooc_lobe": np.arange(n) % 2,
                    "geometric_lobe": np.arange(n) % 2}  # fmt: skip
            table = {"map": "coords", "lobes": "labels", "multidim": "clusters"}.get(name, "t")
            return Result({"name": name, "seed": seed, "size": size}, {table: cols})

        return analysis

    funcs = {name: make(name) for name in pipeline.NAMES}
    monkeypatch.setattr(pipeline, "analyses", lambda names=None: funcs)
    return calls


def test_only_force_and_skipping_what_is_done(planted_run, fakes):
    pipeline.run_geometry([planted_run], only="lobes,map", progress=False)
    assert [c[0] for c in fakes] == ["lobes", "map"]  # in pipeline order, only those asked
    pipeline.run_geometry([planted_run], only="map,lobes", progress=False)
    assert len(fakes) == 2  # both done: skipped
    pipeline.run_geometry([planted_run], only="map", force=True, progress=False,
                          options=["map.size=5", "map.scale=0.5", "map.exact=true"])  # fmt: skip
    assert fakes[-1] == ("map", 5, 0.5, True)
    assert read_summary(planted_run / "geometry" / "map")["size"] == 5
    joined = pipeline.read_table(planted_run / "geometry", "features")
    assert list(joined["map_x"][:3]) == [0.0, 0.5, 1.0] and list(joined["cooc_lobe"][:3]) == [
        0,
        1,
        0,
    ]


def test_a_kill_loses_only_the_analysis_it_was_in(planted_run, fakes):
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_geometry([planted_run], only="galaxy,crystals", progress=False,
                              options=["crystals.scale=-1"])  # fmt: skip
    assert read_summary(planted_run / "geometry" / "galaxy")["name"] == "galaxy"
    assert not (planted_run / "geometry" / "crystals").exists()
    pipeline.run_geometry([planted_run], only="galaxy,crystals", progress=False)
    assert [c[0] for c in fakes] == ["galaxy", "crystals", "crystals"]  # galaxy not redone


@pytest.mark.parametrize(
    "only, options, message",
    [
        ("lobes,maps", [], "--only got unknown analysis 'maps'"),
        (None, ["lobes.n=3"], "lobes has no option 'n'"),
        (None, ["lobes.size=three"], "'three' is not an integer"),
        (None, ["galxy.size=3"], "unknown analysis 'galxy'"),
        (None, ["size=3"], "--option must look like"),
    ],
)
def test_bad_choices_get_one_sentence(planted_run, fakes, only, options, message):
    with pytest.raises(UserError, match=message):
        pipeline.run_geometry([planted_run], only=only, options=options, progress=False)
    assert fakes == []


def test_the_cli_runs_an_analysis_and_refuses_bad_input_in_one_sentence(planted_run, capsys):
    from saewb_cli import main

    argv = ["geometry", str(planted_run), "--only", "galaxy", "--option", "galaxy.rank_min=2",
            "--option", "galaxy.rank_max=10", "--option", "galaxy.n_pca=8"]  # fmt: skip
    assert main(argv) == 0
    summary = read_summary(planted_run / "geometry" / "galaxy")
    assert summary["rank_min"] == 2 and summary["rank_max"] == 10
    assert main(["geometry", str(planted_run), "--only", "lobe"]) == 2
    assert "unknown analysis 'lobe'" in capsys.readouterr().err
    assert main(["compare", str(planted_run), str(planted_run.parent / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
