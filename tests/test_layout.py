"""The house: layers import one way, no file imports itself back through another, the CLI loads
only the subcommand that runs, and each file stays small enough to read in one sitting."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("hooks", "sae", "analysis", "dashboard", "saewb_cli")  # each may import only leftwards
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for layer in LAYERS:
        for path in (ROOT / layer).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules a file imports, at any depth of the file (lazy imports count too)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            targets = [node.args[0].value]
        else:
            continue
        found |= {t for t in targets if t in known}
    return found - {name}


MODULES = _modules()
GRAPH = {name: _imports(path, name, set(MODULES)) for name, path in MODULES.items()}


def test_layers_import_one_way():
    bad = []
    for name, targets in GRAPH.items():
        rank = LAYERS.index(name.split(".")[0])
        bad += [f"{name} -> {t}" for t in targets if LAYERS.index(t.split(".")[0]) > rank]
    assert not bad, f"imports that run back up the layers: {bad}"


def test_no_layer_imports_through_importlib():
    for name, path in MODULES.items():
        if not name.startswith("saewb_cli"):
            assert "import_module" not in path.read_text(), name


def test_no_import_cycle_between_files():
    # A package's __init__ that re-exports its submodules is not a cycle with them.
    edges = {n: {t for t in ts if not n.startswith(t + ".")} for n, ts in GRAPH.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                pytest.fail(f"import cycle: {' -> '.join(stack[stack.index(nxt) :] + [nxt])}")
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


def test_each_file_is_small_enough_to_read():
    long = [
        f"{p.relative_to(ROOT)} ({n} lines)"
        for p in MODULES.values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    ]
    assert not long, long


def test_train_help_imports_neither_dash_nor_plotly():
    code = textwrap.dedent(
        """
        import sys
        from saewb_cli import main
        try:
            main(["train", "--help"])
        except SystemExit:
            pass
        heavy = [m for m in ("dash", "plotly", "pyarrow", "analysis", "dashboard") if m in sys.modules]
        print("HEAVY", heavy)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_public_entry_points():
    from hooks import Capture, load_model
    from sae import SAE, load_sae

    assert callable(load_model) and callable(load_sae)
    assert SAE.__name__ == "SAE" and Capture.__name__ == "Capture"


def test_every_package_ships_in_the_wheel():
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for layer in LAYERS
        for p in (ROOT / layer).rglob("__init__.py")
    }
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
