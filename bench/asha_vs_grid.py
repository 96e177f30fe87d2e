"""Early stopping against the full grid on a task whose answer is known (the planted-rank task).

    .venv/bin/python bench/asha_vs_grid.py [--k 4] [--ranks 1 2 4 8 16] [--lrs 3e-3 1e-2 3e-2]
                                           [--alpha 16] [--steps 200] [--sweep]

The same search, over (rank, learning rate) arms, runs with `scheduler.type: none` (every arm to
max_steps), `asha` (Ray's asynchronous ASHA) and `sha` (synchronous successive halving, the
default), each with the default grace period and reduction factor unless --sweep also tries other
settings. For each it prints the training steps all trials took together, the trials' summed wall
time, the search's own wall time and the verdict (rank and learning rate, by the default rule);
the ratios to the grid come last.
Targets: the default early-stopping scheduler uses <= 40% of the grid's training steps and at most
half its wall time, and recommends the same rank.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import header  # noqa: E402

TARGET = 0.40  # training steps, default scheduler / grid
WALL_TARGET = 0.50  # search wall time, default scheduler / grid
# (scheduler, grace_period or None for the default, reduction_factor or None for the default)
SWEEP = [
    ("asha", 20, 2), ("asha", None, 2), ("asha", 60, 3),
    ("sha", 20, 3), ("sha", 40, 3), ("sha", None, 2), ("sha", None, 4), ("sha", 40, 5),
]


def run(task, ranks: list[int], lrs: list[float], alpha, steps: int, root: str, scheduler: str, grace: Optional[int],
        rf: Optional[float]) -> dict:
    from lora_rank_search.analysis.results import load_experiment
    from lora_rank_search.analysis.selection import recommend
    from lora_rank_search.search.config import parse_config
    from lora_rank_search.search.runner import run_search
    from lora_rank_search.search.space import grace_steps, rung_steps
    from lora_rank_search.trainables.planted import planted_config

    sched: dict = {"type": scheduler}
    if grace is not None:
        sched["grace_period"] = grace
    if rf is not None:
        sched["reduction_factor"] = rf
    name = f"{scheduler}-g{grace or 'default'}-rf{rf or 'default'}"
    raw = planted_config(task, ranks, os.path.join(root, "runs"), name=name, lora={"alpha": alpha},
                         train={"max_steps": steps, "learning_rate": lrs}, scheduler=sched)
    cfg = parse_config(raw)
    start = time.time()
    experiment = run_search(cfg, log=lambda _: None)
    wall = time.time() - start
    trials, history = load_experiment(experiment)
    rec = recommend(trials, history)
    return {
        "scheduler": scheduler,
        "settings": "-" if scheduler == "none" else f"grace {grace_steps(cfg)}, rf {cfg.scheduler.reduction_factor:g}",
        "default": grace is None and rf is None,
        "rungs": rung_steps(cfg),
        "steps": int(trials["steps"].sum()),
        "per_rank": {(int(t.r), float(t.lr)): int(t.steps) for t in trials.itertuples()},
        "trial_s": float(trials["wall_time_s"].sum()),
        "wall_s": wall,
        "rank": rec.rank,
        "lr": rec.learning_rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=4, help="rank of the planted update")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2], help="learning rates (arms: rank x lr)")
    parser.add_argument("--alpha", default="16", help="lora.alpha (a number, r, 2r or rslora)")
    parser.add_argument("--steps", type=int, default=200, help="train.max_steps (an evaluation every 20 steps and at the rungs)")
    parser.add_argument("--sweep", action="store_true", help="also try other grace periods and reduction factors")
    parser.add_argument("--task-dir", default=None, help="reuse a planted task folder (built if missing)")
    args = parser.parse_args()

    import ray

    from lora_rank_search.contract.arms import format_lr
    from lora_rank_search.trainables.planted import build_planted_task
    from lora_rank_search.trainables.trial import quiet_libraries

    quiet_libraries()
    header("early stopping vs the full grid on a planted-rank task")
    with tempfile.TemporaryDirectory() as root:
        os.environ.setdefault("LORA_RANK_SEARCH_CACHE", os.path.join(root, "cache"))
        task = build_planted_task(args.task_dir or os.path.join(root, "task"), rank=args.k)
        print(f"task: tiny 4-bit Llama + a planted rank-{task.rank} update on {', '.join(task.targets)}; "
              f"KL(teacher||base) {task.kl_estimate:.3f} nats/token; ranks {args.ranks} x learning rates {args.lrs}, "
              f"alpha {args.alpha}, {args.steps} steps")
        runs = [(s, None, None) for s in ("none", "asha", "sha")] + (SWEEP if args.sweep else [])
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
        try:
            alpha = float(args.alpha) if args.alpha.replace(".", "", 1).isdigit() else args.alpha
            results = [run(task, args.ranks, args.lrs, alpha, args.steps, root, *spec) for spec in runs]
        finally:
            ray.shutdown()

    grid = results[0]
    print(f"\n{'scheduler':>9}  {'settings':<16} {'rungs':<14} {'steps':>6} {'of grid':>8} {'trial s':>8} "
          f"{'search s':>9}  {'rank':>4}  {'lr':>5}  steps per arm (rank/lr) that went past the first rung")
    for res in results:
        mark = " (default)" if res["default"] and res["scheduler"] != "none" else ""
        first = min(res["rungs"]) if res["rungs"] else 0
        per_arm = " ".join(f"r{r}/{format_lr(lr)}:{s}" for (r, lr), s in sorted(res["per_rank"].items()) if s > first)
        print(f"{res['scheduler'] + mark:>9}  {res['settings']:<16} {str(res['rungs']):<14} {res['steps']:>6} "
              f"{res['steps'] / grid['steps']:>8.0%} {res['trial_s']:>8.1f} {res['wall_s']:>9.1f}  {str(res['rank']):>4}  "
              f"{format_lr(res['lr']):>5}  {per_arm}")
    print(f"\nthe full grid recommends r={grid['rank']} at lr {format_lr(grid['lr'])} (planted rank {task.rank})")
    for res in results[1:3]:
        same = "same rank" if res["rank"] == grid["rank"] else f"a different rank (r={res['rank']})"
        print(f"RATIO {res['scheduler']} / grid: training steps {res['steps'] / grid['steps']:.2f}, "
              f"trial time {res['trial_s'] / grid['trial_s']:.2f}, search wall time {res['wall_s'] / grid['wall_s']:.2f}; {same}"
              + (f"  (targets: steps <= {TARGET:.2f}, wall time <= {WALL_TARGET:.2f}, the same rank)" if res["scheduler"] == "sha" else ""))


if __name__ == "__main__":
    main()
