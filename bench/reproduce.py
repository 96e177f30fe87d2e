"""Rerun the commands behind the published tables and diff their numbers with bench/RESULTS.md.

    .venv/bin/python bench/reproduce.py --list                 # every table: command, cost, checks
    .venv/bin/python bench/reproduce.py memory model_load      # rerun these, diff, keep the raw output
    .venv/bin/python bench/reproduce.py --all                  # every table (hours on the CPU machine)
    .venv/bin/python bench/reproduce.py halving_replay --from-output bench/results/halving_replay.txt

Each table names its command, the section of RESULTS.md that holds its published output, and the
numbers to compare, each with the noise it is allowed (stated beside the check: what repeated runs
of that script on the CPU machine moved by). The published value is read from RESULTS.md itself,
so the published text and this check cannot drift apart. The raw output of every rerun goes to
bench/results/<table>.txt, headed by the command, the commit and the machine.

Exit status: 0 when every number is within its noise, 1 otherwise (the diff says which).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._common import machine  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")
OUT = os.path.join(ROOT, "bench", "results")


@dataclass(frozen=True)
class Check:
    """One published number: `pattern`'s groups, found in the published section and in the fresh
    output (every match, in order). Numbers must agree within abs_tol or rel_tol; text exactly."""

    label: str
    pattern: str
    abs_tol: float = 0.0
    rel_tol: float = 0.0
    block: tuple[str, str] | None = None  # compare only between these two markers (both texts)
    noise: str = "deterministic"  # where the tolerance comes from
    published: str | None = None  # the pattern in RESULTS.md when it publishes a table, not the output


@dataclass(frozen=True)
class Table:
    name: str
    args: list[str]  # the command, after the Python interpreter
    section: tuple[str, str]  # RESULTS.md text between these markers holds the published output
    cost: str
    checks: list[Check] = field(default_factory=list)
    note: str = ""


TABLES = [
    Table("memory", ["bench/memory.py"], ("## memory:", "## model_load:"), "~2 min", [
        Check("bytes/param of NF4 + double-quant", r"RESULT bytes/param of the NF4 \+ double-quant linear weights: ([\d.]+)", abs_tol=0.001),
        Check("base tensor bytes NF4 / fp32", r"RATIO base tensor bytes, NF4 / fp32: ([\d.]+)", abs_tol=0.002),
    ]),
    Table("model_load", ["bench/model_load.py"], ("## model_load:", "## packing:"), "~25 s", [
        Check("per-trial load speed-up", r"RATIO per-trial load speed-up \(quantize / pre-quantized\): ([\d.]+)x", rel_tol=0.5,
              noise="single loads moved 0.34-0.48 s within one run; the ratio moves with the machine's load"),
    ]),
    Table("overhead", ["bench/overhead.py"], ("## overhead:", "## memory:"), "~2 min", [
        Check("per-step time Tune / bare", r"RATIO per-step time, Tune / bare \(median over ranks\): ([\d.]+)", abs_tol=0.15,
              noise="per-rank ratios spread 0.91-1.45 over three runs; the median moved less"),
        Check("per-trial start-up under Tune", r"RESULT per-trial start-up under Tune \(median\): ([\d.]+) s", rel_tol=0.5,
              noise="worker start + imports: machine load"),
    ]),
    Table("halving_replay", ["bench/halving_replay.py"], ("## halving_replay:", "## target_choices:"),
          "5 grids x ~90 s + 3 s of replays (~8 min); with --grids DIR the grids are kept and later runs take seconds", [
        Check("verdicts per setting", r"^\s*(\S+): grid r=(\d+)  halving r=(\d+)  steps ([\d.]+)", abs_tol=0.005,
              noise="the replay is deterministic given the grids; grids trained again moved no verdict"),
        Check("same verdict as the grid", r"same verdict as the grid: (\d+) of (\d+)"),
        Check("worst step ratio on the list", r"RATIO halving / grid training steps on the list: worst ([\d.]+)", abs_tol=0.005),
    ]),
    Table("halving_replay_k4", ["bench/halving_replay.py", "--ks", "4"], ("## halving_replay:", "## target_choices:"),
          "one grid (~90 s on an idle CPU machine): the k = 4 block of halving_replay", [
        Check("k=4 verdicts", r"^\s*(\S+): grid r=(\d+)  halving r=(\d+)  steps ([\d.]+)", abs_tol=0.005,
              block=("## planted k=4", "## "), noise="deterministic given the grid"),
    ], note="a cheap subset of halving_replay"),
    Table("alpha_lr", ["bench/alpha_lr.py", "--steps", "500"], ("## alpha_lr:", "## halving_replay:"), "~56 min", [
        Check("verdict = planted k per rule", r"^\s*(\S+)\s+(\d+) of 12\s+(\d+) of (\d+)"),
        Check("rules that passed", r"RESULT rules with the planted verdict everywhere and no unstable rank: (.*)"),
    ]),
    Table("target_choices", ["bench/target_choices.py"], ("## target_choices:", "## asha_vs_grid:"), "~10 min", [
        Check("steps halving / grid (defaults row)", r"training steps, halving / grid: ([\d.]+)", abs_tol=0.005,
              published=r"\(defaults\) \| \S+ r = \d+ \| \S+ r = \d+ \| ([\d.]+) \|"),
        Check("grid verdict (defaults row)", r"^grid: (\S+) r=(\d+)", published=r"\(defaults\) \| (\S+) r = (\d+) \|"),
        Check("halving verdict (defaults row)", r"^halving: (\S+) r=(\d+)",
              published=r"\(defaults\) \| \S+ r = \d+ \| (\S+) r = (\d+) \|"),
    ], note="RESULTS.md publishes a table, not the output: its defaults row is compared"),
    Table("asha_vs_grid", ["bench/asha_vs_grid.py", "--steps", "500"], ("### 2026-12-02:", "### 2026-11-30:"), "~6 min", [
        Check("ASHA / grid", r"RATIO asha / grid: training steps ([\d.]+), trial time [\d.]+, search wall time [\d.]+; (same|different) rank"),
        Check("SHA / grid steps", r"RATIO sha / grid: training steps ([\d.]+), trial time [\d.]+, search wall time [\d.]+; (same|different) rank"),
        Check("SHA / grid wall time", r"RATIO sha / grid: training steps [\d.]+, trial time [\d.]+, search wall time ([\d.]+)", abs_tol=0.1,
              noise="trial start-up (~4.7 s each) against 164 s of steps: machine load"),
    ], note="published before the leading rank kept its close rates: sha's steps are expected at 0.37, not 0.33"),
]
TABLES.append(Table("packing", ["bench/packing.py"], ("## packing:", "## gpu_packing:"), "~40 min", [
    Check("planted: wall packed / one arm per worker", r"RATIO packed / one arm per worker \(planted rank-4 task\): wall ([\d.]+)",
          abs_tol=0.2, published=r"planted rank-4 task [^|]*\| \*\*([\d.]+)\*\*", noise="trial start-up and the machine's load"),
    Check("planted: verdict", r"RATIO packed / one arm per worker \(planted rank-4 task\):.*verdict (the same|DIFFERENT)",
          published=r"planted rank-4 task [^\n]*\| (the same) \("),
    Check("quickstart: verdict", r"RATIO packed / one arm per worker \(make demo's search\):.*verdict (the same|DIFFERENT)",
          published=r"`make demo`'s search [^\n]*\| (the same) \("),
]))
TABLES.append(Table("confirm_sim", ["bench/confirm_sim.py"], ("## confirm_sim:", "## confirm:"), "~2 s", [
    Check("idle share off -> tail, makespan, confirmation steps",
          r"(\d+) slots: idle share of held slot-time off ([\d.]+)% -> tail ([\d.]+)%; makespan tail/off ([\d.]+); "
          r"confirmation steps ([\d.]+)%", abs_tol=0.05, noise="a simulation: deterministic given its seeds"),
]))
TABLES.append(Table("confirm", ["bench/confirm.py", "--quickstart", "--grid"], ("## confirm:", "<!-- end of confirm -->"), "~45 min", [
    Check("quickstart: wall tail / off", r"RATIO confirm tail / off \(make demo's search\): wall ([\d.]+)", abs_tol=0.1,
          noise="two ~390 s searches one after the other: the machine's load between them"),
    Check("quickstart: verdicts and opposition",
          r"RATIO confirm tail / off \(make demo's search\):.*verdict (the same|DIFFERENT); opposed: off (\w+), tail (\w+)"),
    Check("quickstart: equals the full grid's verdict", r"equals the full grid's: (\w+)"),
]))
BY_NAME = {t.name: t for t in TABLES}
# Published numbers with no command that still produces them: listed so that nobody looks for one.
HISTORY = [
    "README/RESULTS: the quickstart's halving vs full grid (wall 0.32, steps 0.27): two hand-run searches, no log kept",
    "RESULTS halving_replay: the old keep-the-best-third rule's 13/20 and 16/20 (needs the code before KEEP_SHARE)",
    "RESULTS alpha_lr: 89.9% at 200 steps (a variant run, output not kept)",
    "RESULTS asha_vs_grid 2026-11-30: ranks-only sweep (code of that day)",
]


def section(text: str, start: str, end: str) -> str:
    i = text.find(start)
    if i < 0:
        raise SystemExit(f"RESULTS.md has no section {start!r}")
    j = text.find(end, i + len(start))
    return text[i: j if j > 0 else len(text)]


def values(text: str, check: Check) -> list[tuple[str, ...]]:
    if check.block:
        start, end = check.block
        i = text.find(start)
        if i < 0:
            return []
        j = text.find(end, i + len(start))
        text = text[i: j if j > 0 else len(text)]
    return [m if isinstance(m, tuple) else (m,) for m in re.findall(check.pattern, text, re.M)]


def agree(a: str, b: str, check: Check) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return a.strip() == b.strip()
    return math.isclose(x, y, abs_tol=check.abs_tol, rel_tol=check.rel_tol) or x == y


def diff(table: Table, published: str, fresh: str) -> list[str]:
    """Lines of the diff; each starts with 'ok' or 'DIFF'."""
    lines = []
    for check in table.checks:
        want = values(published, Check(check.label, check.published, block=check.block) if check.published else check)
        got = values(fresh, check)
        if not want:
            lines.append(f"DIFF {check.label}: no published value found (pattern {check.pattern!r})")
            continue
        if len(want) != len(got):
            lines.append(f"DIFF {check.label}: published {len(want)} values {want}, got {len(got)}: {got}")
            continue
        for w, g in zip(want, got):
            ok = len(w) == len(g) and all(agree(a, b, check) for a, b in zip(w, g))
            tol = f" (noise: +-{check.abs_tol:g} abs, {check.rel_tol:.0%} rel; {check.noise})" if check.abs_tol or check.rel_tol else f" ({check.noise})"
            lines.append(f"{'ok  ' if ok else 'DIFF'} {check.label}: published {' '.join(w)}, now {' '.join(g)}{tol}")
    return lines


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return sha + (" + uncommitted changes" if dirty else "")
    except OSError:
        return "unknown"


def run(table: Table, python: str) -> str:
    """Run the table's command; write bench/results/<name>.txt (header + output); return the output."""
    started, at, load = time.time(), commit(), os.getloadavg()[0]  # the code and the machine at its start
    done = subprocess.run([python, *table.args], cwd=ROOT, capture_output=True, text=True)
    output = done.stdout + (f"\n[stderr tail]\n{done.stderr[-2000:]}" if done.returncode else "")
    os.makedirs(OUT, exist_ok=True)
    head = (f"# command: {' '.join(['.venv/bin/python', *table.args])}\n# commit: {at}\n# machine: {machine()}\n"
            f"# date: {time.strftime('%Y-%m-%d %H:%M %Z')}; {time.time() - started:.0f} s; exit {done.returncode}; "
            f"load average at the start {load:.1f} on {os.cpu_count()} cores\n")
    with open(os.path.join(OUT, f"{table.name}.txt"), "w") as handle:
        handle.write(head + output)
    return output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", nargs="*", help=f"which: {', '.join(BY_NAME)}")
    parser.add_argument("--all", action="store_true", help="every table")
    parser.add_argument("--list", action="store_true", help="print the tables, their commands and checks; run nothing")
    parser.add_argument("--from-output", default=None, help="diff this saved output instead of rerunning (one table)")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()

    if args.list or not (args.tables or args.all):
        for t in TABLES:
            print(f"{t.name}: {' '.join(['.venv/bin/python', *t.args])}   [{t.cost}]" + (f"  ({t.note})" if t.note else ""))
            for c in t.checks:
                print(f"    {c.label}" + (f"  +-{c.abs_tol:g}" if c.abs_tol else "") + (f"  +-{c.rel_tol:.0%}" if c.rel_tol else ""))
        print("\nmarked as history (no command reproduces them):")
        for line in HISTORY:
            print(f"  - {line}")
        return 0
    names = list(BY_NAME) if args.all else args.tables
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown table(s) {unknown}; known: {', '.join(BY_NAME)}")
    if args.from_output and len(names) != 1:
        parser.error("--from-output diffs one table")
    with open(RESULTS) as handle:
        results = handle.read()
    failed = 0
    for name in names:
        table = BY_NAME[name]
        published = section(results, *table.section)
        if args.from_output:
            with open(args.from_output) as handle:
                fresh = handle.read()
        else:
            print(f"# {name}: {' '.join(table.args)} ({table.cost})", flush=True)
            fresh = run(table, args.python)
        lines = diff(table, published, fresh)
        failed += any(line.startswith("DIFF") for line in lines)
        print(f"## {name}" + (f"  ({table.note})" if table.note else ""))
        for line in lines:
            print(f"  {line}")
    print(f"\n{len(names) - failed} of {len(names)} tables within their noise")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
