"""Target choices x ranks: successive halving against the full grid, on a task planted in the MLP.

    .venv/bin/python bench/target_choices.py [--k 4] [--ranks 2 4 8] [--steps 200] [--lr 2e-2] [--n-train 3000]

Trains every (target choice, rank) arm of the grid to max_steps in this process (no Ray, one
thread), then replays successive halving (`search.halving.decide`, the default grace period and
reduction factor) on the same curves: a trial cut at a rung has, up to that rung, exactly the curve
of the full trial (same seed, same schedule), so the replay is the search's own decisions. Prints
each arm's trainable parameters and best loss, the verdict of both (`analysis.selection.recommend`)
and the ratio of training steps last.
Targets: halving spends <= 40% of the grid's training steps and gives the same verdict; the
verdict adapts the MLP at the planted rank (or the next).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import header  # noqa: E402

TARGET = 0.40
CHOICES = ["attention", "mlp", "all-linear"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--grids", default=None, help="keep the trained grid here and read it back")
    args = parser.parse_args()
    import pandas as pd

    from lora_rank_search.analysis.selection import recommend
    from lora_rank_search.search.config import parse_config
    from bench.halving_replay import replay
    from lora_rank_search.search.runner import prepare
    from lora_rank_search.search.space import trial_settings
    from lora_rank_search.trainables.planted import MLP_TARGETS, build_planted_task, planted_config
    from lora_rank_search.trainables.trial import quiet_libraries, run_trial

    quiet_libraries()
    header("target_choices: successive halving vs the full grid over target choices x ranks (MLP-planted task)")
    root = tempfile.mkdtemp(prefix="target-choices-")
    task = build_planted_task(os.path.join(root, "task"), rank=args.k, targets=MLP_TARGETS, n_train=args.n_train)
    raw = planted_config(task, args.ranks, os.path.join(root, "runs"), lora={"target_modules": CHOICES},
                         train={"max_steps": args.steps, "learning_rate": args.lr, "eval_every": 10}, scheduler={"type": "sha"})
    cfg = parse_config(raw)
    prepared = prepare(cfg, log=lambda _: None)
    settings = trial_settings(cfg, prepared.model_path, prepared.choices)
    rows, history = [], []
    saved = args.grids and os.path.join(args.grids, f"choices-k{args.k}-{args.steps}-lr{args.lr:g}-n{args.n_train}")
    if saved and os.path.exists(f"{saved}.trials.csv"):
        rows, history = pd.read_csv(f"{saved}.trials.csv").to_dict("records"), pd.read_csv(f"{saved}.history.csv").to_dict("records")
    for choice in CHOICES if not rows else []:
        for r in args.ranks:
            trial_id, reports, started = f"{choice}_r{r}", [], time.time()
            run_trial({"r": r, "lr": args.lr, "seed": 0, "target_choice": choice}, settings, prepared.data,
                      lambda metrics, _folder: reports.append(dict(metrics)), threads=1)
            rows.append({"trial_id": trial_id, "target_choice": choice, "r": r, "lr": args.lr, "seed": 0, "status": "completed",
                         "steps": args.steps, "max_steps": args.steps, "base_eval_loss": reports[0]["base_eval_loss"],
                         "unstable": False, "trainable_params": reports[-1]["trainable_params"],
                         "adapter_bytes": reports[-1]["adapter_bytes"], "targets": reports[-1]["target_modules"]})
            history += [{"trial_id": trial_id, "step": m["step"], "eval_loss": m["eval_loss"]} for m in reports]
            print(f"  {choice:>10} r={r:<3} {reports[-1]['trainable_params']:>7,} params  best eval loss "
                  f"{min(m['eval_loss'] for m in reports):.4f}  ({time.time() - started:.0f} s)", flush=True)
    trials, hist = pd.DataFrame(rows), pd.DataFrame(history)
    if saved:
        os.makedirs(args.grids, exist_ok=True)
        trials.to_csv(f"{saved}.trials.csv", index=False)
        hist.to_csv(f"{saved}.history.csv", index=False)
    grid = recommend(trials, hist)
    cut, cut_hist, survivors, rungs = replay(trials, hist, args.steps, reduction_factor=cfg.scheduler.reduction_factor)
    sha = recommend(cut, cut_hist)
    print(f"\nbase {task.base_loss:.4f}, teacher {task.teacher_loss:.4f}; rungs {rungs}; survivors {survivors}")
    for name, rec in (("grid", grid), ("halving", sha)):
        print(f"{name}: {rec.target_choice} r={rec.rank} ({rec.trainable_params:,.0f} params): {rec.reason}")
        for note in rec.close:
            print(f"  close call: {note}")
    ratio = cut["steps"].sum() / (len(cut) * args.steps)
    same = (grid.target_choice, grid.rank) == (sha.target_choice, sha.rank)
    print(f"\ntraining steps, halving / grid: {ratio:.2f} (target <= {TARGET:.2f}); same verdict: {'yes' if same else 'no'}")


if __name__ == "__main__":
    main()
