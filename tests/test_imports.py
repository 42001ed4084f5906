"""Which way the imports point: insight may read the limits' views, the limits read nothing
of insight, and the repository address imports nothing of the gateway."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imports_of(source: Path) -> set[str]:
    """The modules a source imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def imports_under(package: str) -> dict[str, set[str]]:
    directory = ROOT / package.replace(".", "/")
    return {f"{package}.{source.stem}": imports_of(source)
            for source in sorted(directory.glob("*.py"))}


def test_the_limits_import_nothing_of_insight() -> None:
    wrong = {module: sorted(i for i in imported if i.startswith("gateway.insight"))
             for module, imported in imports_under("gateway.limits").items()}
    assert {m: i for m, i in wrong.items() if i} == {}


def test_insight_reads_only_the_limits_views() -> None:
    wrong = {module: sorted(i for i in imported
                            if i.startswith("gateway.limits") and i != "gateway.limits.views")
             for module, imported in imports_under("gateway.insight").items()}
    assert {m: i for m, i in wrong.items() if i} == {}


def test_the_repository_address_stands_alone() -> None:
    imported = imports_of(ROOT / "gateway" / "repository.py")
    assert sorted(i for i in imported if i.startswith(("gateway", "backends"))) == []
