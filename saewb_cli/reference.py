"""The README's command-line reference, generated from the parser so that it cannot drift:
`python -m saewb_cli.reference` prints it, and tests/test_readme.py checks the README holds it."""

from __future__ import annotations

import argparse

BEGIN, END = "<!-- cli-reference: begin -->", "<!-- cli-reference: end -->"


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of every subcommand and sub-subcommand, in `saewb --help` order."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                nested = _subcommands(sub)
                if nested:
                    out += [(f"{name} {n}", h, p) for n, h, p in nested]
                else:
                    out.append((name, helps.get(name, ""), sub))
    return out


def _argument(action: argparse.Action) -> str:
    name = ", ".join(action.option_strings) or action.metavar or action.dest.upper()
    if action.option_strings and action.nargs != 0:
        name += f" {action.metavar or action.dest.upper()}"
    text = (action.help or "").replace("|", "\\|")
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        text += f" (one of {', '.join(map(str, action.choices))})"
    default = action.default
    if action.option_strings and action.nargs != 0 and default not in (None, [], argparse.SUPPRESS):
        text += f" [default: {default}]"
    return f"| `{name}` | {text.strip()} |"


def reference() -> str:
    """Markdown: a section per subcommand with its one-line help and a table of its arguments."""
    from saewb_cli import build_parser

    lines = [BEGIN]
    for name, help_text, sub in _subcommands(build_parser()):
        lines += ["", f"#### `saewb {name}`", "", f"{help_text[:1].upper()}{help_text[1:]}."]
        rows = [_argument(a) for a in sub._actions if not isinstance(a, argparse._HelpAction)]
        if rows:
            lines += ["", "| argument | meaning |", "|---|---|", *rows]
    lines += ["", END]
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference())
