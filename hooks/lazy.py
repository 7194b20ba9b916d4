"""Package names that load on first use, so importing a package stays cheap for the CLI."""

from __future__ import annotations

from collections.abc import Callable


def lazy_exports(package: str, names: dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` that imports `names[attr]` (a module path) when `attr` is asked."""

    def __getattr__(attr: str) -> object:
        if attr not in names:
            raise AttributeError(f"module {package!r} has no attribute {attr!r}")
        return getattr(__import__(names[attr], fromlist=[attr]), attr)

    return __getattr__
