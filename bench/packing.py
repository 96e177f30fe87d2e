"""The same search packed (arms sharing one 4-bit base) and one arm per worker, side by side.

    .venv/bin/python bench/packing.py [--quickstart] [--planted] [--steps N] [--train-examples N]

Each search runs through the CLI (`lora-rank search`) in its own process, with
`resources.arms_per_worker` N (packed: a pack per core, the arms split between them) and 1 (one arm
per worker); nothing else differs. (`auto` does not pack on CPU: these runs are why.) While
it runs, the process tree is sampled every 0.5 s: the proportional set size (PSS: shared library
pages split between the processes that map them) of every Ray worker process (trials, pack
servers), and how many trial processes (arms) are alive. It prints per mode: the search's wall
time, the peak memory held at once by the workers divided by the number of arms training at that
moment (memory per concurrent arm), arm-steps per second, and the verdict; then every report
of an arm at a step that both searches reached, paired (packed arms train as alone: the largest
relative difference of their eval losses), and the ratios packed / one arm per worker. Targets (issue 19, 2 CPU cores): wall <= 0.6, memory per concurrent
arm <= 0.35, the same verdict.

--quickstart: configs/quickstart.yaml (what `make demo` runs). --planted: a planted rank-4 task on
the tiny 4-bit Llama (ranks 1-8 x two learning rates, successive halving); --steps and
--train-examples size it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import header  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WALL_TARGET, MEMORY_TARGET = 0.6, 0.35
# Ray's processes that are not the search's: idle workers and the per-node agents (the agents,
# about 130 MiB PSS together, were counted before commit 3d0ad5f, which flattered the packed ratio)
NOT_THE_SEARCHS = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _sample(pid: int, stop: threading.Event, samples: list) -> None:
    """(seconds, worker PSS bytes, trial processes alive) every 0.5 s of the process tree under pid."""
    import psutil

    start = time.time()
    root = psutil.Process(pid)
    while not stop.is_set():
        total, arms = 0, 0
        try:
            procs = root.children(recursive=True)
        except psutil.Error:
            break
        for proc in procs:
            try:
                title = " ".join(proc.cmdline())[:80]
                if not title.startswith("ray::") or title.startswith(NOT_THE_SEARCHS):
                    continue  # idle workers and Ray's per-node agents are not the search's workers
                total += proc.memory_full_info().pss
                arms += "ImplicitFunc" in title or "lora_trial" in title or "packed_trial" in title
            except psutil.Error:
                continue
        samples.append((time.time() - start, total, arms))
        stop.wait(0.5)


def run(config: Path, name: str, arms_per_worker: str, storage: str) -> dict:
    """One search through the CLI; its wall time, memory samples, steps and verdict."""
    cmd = [sys.executable, "-m", "lora_rank_search.search.cli", "search", str(config), "--set", f"name={name}",
           "--set", f"storage_path={storage}", "--set", f"resources.arms_per_worker={arms_per_worker}"]
    samples: list = []
    stop = threading.Event()
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = threading.Thread(target=_sample, args=(proc.pid, stop, samples), daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    wall = time.time() - start
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        print(out[-4000:])
        raise SystemExit(f"{name}: the search exited {proc.returncode}")
    rec, steps = outcome(Path(storage) / name)
    losses = arm_losses(Path(storage) / name)
    peak = max(samples, key=lambda s: s[1]) if samples else (0, 0, 0)
    packing = next((line for line in out.splitlines() if line.startswith("packing:")), "packing: one arm per worker")
    opposed = sorted({(c.get("unit"), c.get("step")) for c in rec.get("confirmations") or []
                      if rec.get("evidence_step") is not None and c.get("step", 0) >= rec["evidence_step"]
                      and (c.get("r"), c.get("target_choice")) != (rec.get("rank"), rec.get("target_choice"))})
    return {"name": name, "wall": wall, "opposed": opposed, "peak_bytes": peak[1], "arms_at_peak": max(1, peak[2]),
            "per_arm": peak[1] / max(1, peak[2]), "max_arms": max((s[2] for s in samples), default=0),
            "steps": steps, "rank": rec.get("rank"), "lr": rec.get("learning_rate"),
            "targets": rec.get("target_choice") or "", "packing": packing, "losses": losses}


def arm_losses(experiment: Path) -> dict:
    """{(arm name, step): eval loss} of every report of a finished search (arms named as Tune's
    trials are, without their trial ids, so two searches' reports pair up)."""
    from lora_rank_search.contract.arms import Arm

    out = {}
    for result in experiment.glob("*/result.json"):
        parsed = Arm.parse_dirname(result.parent.name)
        if parsed is None:
            continue
        for line in result.read_text().splitlines():
            report = json.loads(line)
            out[(parsed[0].name(), report["step"])] = report["eval_loss"]
    return out


def outcome(experiment: Path) -> tuple[dict, int]:
    """(recommendation.json, the arm-steps every trial trained) of a finished search."""
    rec = json.loads((experiment / "analysis" / "recommendation.json").read_text())
    steps = 0
    for result in experiment.glob("*/result.json"):
        lines = result.read_text().splitlines()
        steps += json.loads(lines[-1])["step"] if lines else 0
    return rec, steps


def planted_search(root: str, storage: str, steps: int, train_examples: int = 3000) -> Path:
    """A search config file for a planted rank-4 task on the tiny 4-bit Llama (built under root):
    ranks 1-8 x learning rates 3e-3 and 1e-2, successive halving, `steps` steps, `train_examples`
    training sequences of 24 tokens."""
    import yaml

    from lora_rank_search.trainables.planted import build_planted_task, planted_config

    os.environ.setdefault("LORA_RANK_SEARCH_CACHE", os.path.join(root, "cache"))
    task = build_planted_task(os.path.join(root, "task"), rank=4, n_train=train_examples)
    raw = planted_config(task, [1, 2, 4, 8], storage, name="planted", lora={"alpha": 16},
                         train={"max_steps": steps, "learning_rate": [3e-3, 1e-2]}, scheduler={"type": "sha"},
                         resources={"gpus_per_trial": 0, "cpus_per_trial": 1})
    config = Path(root) / "planted.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config


def compare(title: str, config: Path, storage: str, packed: str) -> None:
    """`packed`: resources.arms_per_worker of the packed run."""
    print(f"\n## {title}: {config.name}")
    results = {}
    for mode, arms in (("one arm per worker", "1"), ("packed", packed)):
        res = run(config, f"{config.stem}-{'single' if arms == '1' else 'packed'}-{int(time.time())}", arms, storage)
        results[mode] = res
        print(f"{mode:>19}: wall {res['wall']:7.1f} s, peak worker memory {res['peak_bytes'] / 2**30:5.2f} GiB with "
              f"{res['arms_at_peak']} arm(s) training -> {res['per_arm'] / 2**30:5.2f} GiB per concurrent arm "
              f"(at most {res['max_arms']} at once); {res['steps']} arm-steps, {res['steps'] / res['wall']:.2f} arm-steps/s; "
              f"verdict r={res['rank']} lr={res['lr']} {res['targets']}; confirmed against "
              f"{', '.join(f'{u} at step {s}' for u, s in res['opposed']) or 'nothing'}")
        print(f"{'':>19}  {res['packing']}")
    one, packed = results["one arm per worker"], results["packed"]
    same = (one["rank"], one["lr"], one["targets"]) == (packed["rank"], packed["lr"], packed["targets"])
    shared = sorted(set(one["losses"]) & set(packed["losses"]))
    worst = max((abs(packed["losses"][k] - one["losses"][k]) / abs(one["losses"][k]) for k in shared), default=float("nan"))
    print(f"per-arm eval losses, packed vs one arm per worker: {len(shared)} reports at the same (arm, step) "
          f"({len(one['losses'])} and {len(packed['losses'])} in all), largest relative difference {worst:.1e}")
    for mode, mine, other in (("packed", packed, one), ("one arm per worker", one, packed)):
        extra = sorted(set(mine["losses"]) - set(other["losses"]))  # arms trained further in one search (confirmations)
        if extra:
            print(f"reports only {mode}: " + ", ".join(f"{arm} at step {step}" for arm, step in extra))
    print(f"RATIO packed / one arm per worker ({title}): wall {packed['wall'] / one['wall']:.2f} (target <= {WALL_TARGET}), "
          f"memory per concurrent arm {packed['per_arm'] / one['per_arm']:.2f} (target <= {MEMORY_TARGET}), "
          f"arm-steps/s {(packed['steps'] / packed['wall']) / (one['steps'] / one['wall']):.2f}x; "
          f"verdict {'the same' if same else 'DIFFERENT'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quickstart", action="store_true", help="compare on configs/quickstart.yaml")
    parser.add_argument("--planted", action="store_true", help="compare on a planted rank-4 task (tiny model)")
    parser.add_argument("--steps", type=int, default=120, help="train.max_steps of the planted task's search")
    parser.add_argument("--train-examples", type=int, default=3000,
                        help="training sequences of the planted task (more: what holding the dataset costs each process)")
    args = parser.parse_args()
    if not (args.quickstart or args.planted):
        args.quickstart = args.planted = True
    header("packing: arms sharing one base vs one arm per worker")
    with tempfile.TemporaryDirectory() as root:
        storage = os.path.join(root, "runs")
        if args.planted:
            config = planted_search(root, storage, args.steps, args.train_examples)
            compare("planted rank-4 task", config, storage, packed="4")  # 8 arms: a pack of 4 per core
        if args.quickstart:
            compare("make demo's search", ROOT / "configs" / "quickstart.yaml", storage, packed="8")  # 15 arms: 2 packs


if __name__ == "__main__":
    main()
