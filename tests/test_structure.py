"""The packages are floors and imports only run down: contract <- trainables <- search, contract <- analysis.

Every import statement of every module is read (ast, including imports inside functions), so a
lazy import cannot hide a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("contract", "trainables", "analysis", "search")
# package -> top-level names it must never import (the packages above it; Ray for the analysis side)
FORBIDDEN = {
    "contract": {"search", "trainables", "analysis", "bench", "ray"},
    "trainables": {"search", "analysis", "bench"},
    "analysis": {"search", "trainables", "bench", "ray"},
    "search": {"bench"},
}


def imported_packages(source: str, package: str) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in the source; relative imports count as the
    module's own package."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, package if node.level else (node.module or "").split(".")[0]))
    return found


def violations(package: str, path: Path) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line}: {package} imports {name}"
            for line, name in imported_packages(path.read_text(), package) if name in FORBIDDEN[package]]


def test_the_checker_sees_lazy_and_relative_imports():
    source = "import os\nfrom . import layout\ndef f():\n    from search.runner import run\n    import ray.tune\n"
    assert imported_packages(source, "analysis") == [(1, "os"), (2, "analysis"), (4, "search"), (5, "ray")]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_one_drawn_above_it(package):
    modules = sorted((ROOT / package).glob("**/*.py"))
    assert modules, f"no modules found in {package}/"
    problems = [line for path in modules for line in violations(package, path)]
    assert not problems, "imports that run up the floors:\n" + "\n".join(problems)


def test_every_package_is_installed():
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert set(PACKAGES) <= set(packages)
