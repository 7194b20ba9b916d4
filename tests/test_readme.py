"""The README cannot rot: its two opening commands are what CI runs, its command-line reference is
the parser's, and its Python walkthrough runs exactly as printed."""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
INSTALL = "pip install torch==2.13.0 && pip install -e . && saewb demo"
TESTS = 'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest'


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_the_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    first = _blocks("bash")[0]
    commands = [line for line in first.splitlines() if line and not line.startswith("#")]
    assert commands == [INSTALL, TESTS]
    assert README.index(first) < README.index("\n## ")  # before any section
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert TESTS in ci  # verbatim, as its own line


def test_the_command_line_reference_is_the_parsers():
    from saewb_cli.reference import BEGIN, END, reference

    start, end = README.index(BEGIN), README.index(END) + len(END)
    assert README[start:end] == reference(), "run `python -m saewb_cli.reference` into the README"


def test_the_reference_names_every_subcommand_and_option():
    from saewb_cli import build_parser
    from saewb_cli.reference import reference

    text = reference()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert f"`saewb {name}" in text, name
        for action in p._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}" in text or f", {option}" in text, (name, option)


def walkthrough() -> str:
    section = README[README.index("## From Python: a walkthrough") :]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_the_walkthrough_uses_the_public_names():
    code = walkthrough()
    imports = [line for line in code.splitlines() if line.startswith(("from ", "import "))]
    assert imports and all(re.match(r"from (sae|hooks|analysis) import ", i) for i in imports)
    assert 15 <= len([line for line in code.splitlines() if line.strip()]) <= 25


@pytest.mark.slow
def test_the_walkthrough_runs_as_printed(tmp_path, monkeypatch, capsys):
    from test_smollm2 import user_cache

    monkeypatch.chdir(tmp_path)
    with user_cache():
        exec(compile(walkthrough(), "README.md walkthrough", "exec"), {"__name__": "walkthrough"})
    out = capsys.readouterr().out
    assert "'fvu':" in out and "'ce_loss_recovered':" in out
    assert (tmp_path / "walk" / "run" / "features" / "manifest.json").exists()
    baseline, steered = out.strip().splitlines()[-2:]
    assert baseline.startswith("Yesterday I went") and steered.startswith("Yesterday I went")
    assert steered != baseline  # the feature moved the generation
    assert os.listdir(tmp_path) == ["walk"]  # it writes where it says, nowhere else
