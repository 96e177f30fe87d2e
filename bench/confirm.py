"""The same search with confirmations off and on (`scheduler.confirm`), side by side.

    .venv/bin/python bench/confirm.py [--quickstart] [--planted] [--mode tail|full] [--arms-per-worker auto|N]

Each search runs through the CLI (`lora-rank search`) in its own process on this machine, one after
the other; nothing differs but `scheduler.confirm`. It prints per mode: the search's wall time, the
training steps all trials took (and the confirmations' share of the full grid's steps), the verdict
(unit, learning rate, the step it was judged at) and how many other units were judged at that step
(0 = unopposed), the confirmation line of the verdict; then the wall ratio on / off. Targets (issue
21): wall <= 1.1x, the verdict opposed, and the same verdict as the full grid (`--grid` adds a
`scheduler.type: none` run to compare with; on the quickstart that is ~25 minutes on 2 cores).

--quickstart: configs/quickstart.yaml (what `make demo` runs). --planted: a planted rank-4 task on
the tiny 4-bit Llama (ranks 1-8 x two learning rates, successive halving).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import header  # noqa: E402
from bench.packing import outcome, planted_search  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WALL_TARGET = 1.1


def run(config: Path, name: str, storage: str, sets: list[str]) -> dict:
    """One search through the CLI: wall time, steps, verdict, the confirmation line."""
    cmd = [sys.executable, "-m", "lora_rank_search.search.cli", "search", str(config), "--set", f"name={name}",
           "--set", f"storage_path={storage}", *[a for s in sets for a in ("--set", s)]]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        print(proc.stdout[-4000:])
        raise SystemExit(f"{name}: the search exited {proc.returncode}")
    rec, steps = outcome(Path(storage) / name)
    extra = sum(c["step"] - c["from_step"] for c in rec.get("confirmations") or [])
    step = rec.get("evidence_step")
    opponents = [u for u in rec.get("units") or []
                 if u["evidence_step"] == step and (u["target_choice"], u["r"]) != (rec.get("target_choice"), rec.get("rank"))]
    lines = proc.stdout.strip().splitlines()
    verdict = "\n".join(lines[next((i for i, l in enumerate(lines) if l.startswith(("recommended", "no recommendation"))), len(lines)):])
    return {"wall": wall, "steps": steps, "extra": extra, "rank": rec.get("rank"), "lr": rec.get("learning_rate"),
            "choice": rec.get("target_choice") or "", "step": step, "opponents": len(opponents), "verdict": verdict}


def grid_steps(config: Path) -> int:
    from lora_rank_search.search.config import load_config, learning_rates, target_choices

    cfg = load_config(str(config), [])
    return len(cfg.lora.ranks) * len(learning_rates(cfg)) * len(target_choices(cfg)) * len(cfg.train.seeds) * cfg.train.max_steps


def compare(title: str, config: Path, storage: str, mode: str, arms: str, grid: bool) -> None:
    print(f"\n## {title}: {config.name}")
    full = grid_steps(config)
    results = {}
    stamp = int(time.time())
    runs = [("off", ["scheduler.confirm=off"]), (mode, [f"scheduler.confirm={mode}"])]
    if grid:
        runs.append(("full grid", ["scheduler.type=none"]))
    for label, sets in runs:
        res = run(config, f"{config.stem}-{label.replace(' ', '-')}-{stamp}", storage, sets + [f"resources.arms_per_worker={arms}"])
        results[label] = res
        print(f"{label:>9}: wall {res['wall']:7.1f} s, {res['steps']} steps ({res['steps'] / full:.0%} of the grid's {full}), "
              f"confirmations {res['extra']} steps ({res['extra'] / full:.1%} of the grid's); verdict {res['choice']} r={res['rank']} "
              f"lr={res['lr']} judged at step {res['step']} beside {res['opponents']} other unit(s)")
        print("\n".join(f"{'':>11}{line}" for line in res["verdict"].splitlines()))
    off, on = results["off"], results[mode]
    same = (off["rank"], off["lr"], off["choice"]) == (on["rank"], on["lr"], on["choice"])
    line = (f"RATIO confirm {mode} / off ({title}): wall {on['wall'] / off['wall']:.2f} (target <= {WALL_TARGET}); verdict "
            f"{'the same' if same else 'DIFFERENT'}; opposed: off {off['opponents'] > 0}, {mode} {on['opponents'] > 0}")
    if grid:
        g = results["full grid"]
        line += f"; equals the full grid's: {(g['rank'], g['lr'], g['choice']) == (on['rank'], on['lr'], on['choice'])}"
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quickstart", action="store_true", help="compare on configs/quickstart.yaml")
    parser.add_argument("--planted", action="store_true", help="compare on a planted rank-4 task (tiny model)")
    parser.add_argument("--mode", default="tail", choices=["tail", "full"], help="the confirm mode compared with off")
    parser.add_argument("--arms-per-worker", default="auto", help="resources.arms_per_worker of every run")
    parser.add_argument("--grid", action="store_true", help="also run the full grid (scheduler.type: none)")
    parser.add_argument("--steps", type=int, default=120, help="train.max_steps of the planted task's search")
    args = parser.parse_args()
    if not (args.quickstart or args.planted):
        args.quickstart = args.planted = True
    header(f"confirmations: scheduler.confirm {args.mode} vs off")
    with tempfile.TemporaryDirectory() as root:
        storage = os.path.join(root, "runs")
        if args.planted:
            config = planted_search(root, storage, args.steps)
            compare("planted rank-4 task", config, storage, args.mode, args.arms_per_worker, args.grid)
        if args.quickstart:
            compare("make demo's search", ROOT / "configs" / "quickstart.yaml", storage, args.mode, args.arms_per_worker, args.grid)


if __name__ == "__main__":
    main()
