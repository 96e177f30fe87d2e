"""Every environment variable the product code reads or sets is documented in the README."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRODUCT = ("search", "trainables", "analysis")
PATTERNS = [
    re.compile(r"""environ(?:\.get|\.setdefault|\.pop)?\(\s*["']([A-Z][A-Z0-9_]*)["']"""),
    re.compile(r"""environ\[\s*["']([A-Z][A-Z0-9_]*)["']\s*\]"""),
    re.compile(r"""getenv\(\s*["']([A-Z][A-Z0-9_]*)["']"""),
    re.compile(r"""^[A-Z_]*ENV\s*=\s*["']([A-Z][A-Z0-9_]*)["']""", re.M),  # FAULT_ENV = "...", read via the name
]


def product_env_vars() -> set[str]:
    found = set()
    for package in PRODUCT:
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            for pattern in PATTERNS:
                found.update(pattern.findall(text))
    return found


def test_the_scan_finds_the_variables_it_is_meant_to_find():
    names = product_env_vars()
    assert {"LORA_RANK_SEARCH_CACHE", "LORA_RANK_SEARCH_AUTOSCALING", "LORA_RANK_SEARCH_FAULT", "RAY_ADDRESS"} <= names, names


def test_every_environment_variable_the_code_reads_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Environment variables", 1)[-1].split("\n## ", 1)[0]
    missing = sorted(n for n in product_env_vars() if f"`{n}" not in section)
    assert not missing, f"not documented in the README's 'Environment variables' section: {missing}"
