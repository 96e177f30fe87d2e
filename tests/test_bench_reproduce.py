"""bench/reproduce.py finds every number it checks in bench/RESULTS.md, and its diff tells a number
inside its noise from one outside it (no benchmark is run here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.reproduce import BY_NAME, RESULTS, TABLES, Check, diff, section, values  # noqa: E402


@pytest.mark.parametrize("name", list(BY_NAME))
def test_every_check_finds_its_published_numbers(name):
    table = BY_NAME[name]
    published = section(open(RESULTS).read(), *table.section)
    for check in table.checks:
        pattern = Check(check.label, check.published, block=check.block) if check.published else check
        assert values(published, pattern), f"{name}: {check.label}: nothing published matches {pattern.pattern!r}"
        if not check.published:  # the published output diffed with itself agrees
            assert all(line.startswith("ok") for line in diff(table, published, published))


def test_the_diff_flags_a_number_outside_its_noise():
    table = BY_NAME["memory"]
    published = section(open(RESULTS).read(), *table.section)
    inside = published.replace("weights: 0.5180", "weights: 0.5185")
    outside = published.replace("weights: 0.5180", "weights: 0.5300")
    assert all(line.startswith("ok") for line in diff(table, published, inside))
    assert any(line.startswith("DIFF") and "bytes/param" in line for line in diff(table, published, outside))
    assert any(line.startswith("DIFF") for line in diff(table, published, "no output at all"))


def test_table_names_are_unique_and_commands_exist():
    import os

    assert len({t.name for t in TABLES}) == len(TABLES)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for t in TABLES:
        assert os.path.isfile(os.path.join(root, t.args[0])), t.args[0]
