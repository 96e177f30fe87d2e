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


NAMESPACE = "lora_rank_search"  # the one installed name: lora_rank_search.search is the package search


def _package(dotted: str) -> str:
    parts = dotted.split(".")
    return parts[1] if parts[0] == NAMESPACE and len(parts) > 1 else parts[0]


def imported_packages(source: str, package: str) -> list[tuple[int, str]]:
    """(line, package) of every import in the source (lora_rank_search.X counts as X); relative
    imports count as the module's own package."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, _package(alias.name)) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append((node.lineno, package))
            elif node.module == NAMESPACE:  # from lora_rank_search import search
                found += [(node.lineno, alias.name) for alias in node.names]
            else:
                found.append((node.lineno, _package(node.module or "")))
    return found


def violations(package: str, path: Path) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line}: {package} imports {name}"
            for line, name in imported_packages(path.read_text(), package) if name in FORBIDDEN[package]]


def test_the_checker_sees_lazy_and_relative_imports():
    source = "import os\nfrom . import layout\ndef f():\n    from search.runner import run\n    import ray.tune\n"
    assert imported_packages(source, "analysis") == [(1, "os"), (2, "analysis"), (4, "search"), (5, "ray")]
    source = "from lora_rank_search.search.runner import run\nfrom lora_rank_search import trainables\nimport lora_rank_search.analysis.tb\n"
    assert imported_packages(source, "contract") == [(1, "search"), (2, "trainables"), (3, "analysis")]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_one_drawn_above_it(package):
    modules = sorted((ROOT / package).glob("**/*.py"))
    assert modules, f"no modules found in {package}/"
    problems = [line for path in modules for line in violations(package, path)]
    assert not problems, "imports that run up the floors:\n" + "\n".join(problems)


def test_every_package_is_installed():
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert {f"{NAMESPACE}.{p}" for p in PACKAGES} | {NAMESPACE} <= set(packages)
