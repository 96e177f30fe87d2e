"""Which alpha rule and which learning rates make the verdict hold up, on tasks whose answer is known.

    .venv/bin/python bench/alpha_lr.py [--ks 2 4 8] [--steps 300] [--rules 2r 16 rslora] [--lrs 3e-3 1e-2 3e-2]

For each planted rank k (a tiny 4-bit Llama whose teacher adds an exact rank-k update on o_proj
and down_proj) and each alpha rule, one full grid (no early stopping) over ranks 1..16 and the
learning rates (spanning 10x) is trained, each arm by the search's own trial loop (`run_trial`) in
a process pool, without Ray (what is measured is the verdict, not the harness). The verdict (the default gain-share rule) is then
computed from the same trials as a user would get it with each learning rate alone and with the
whole list. Printed per (k, rule): the verdict at each single learning rate and for the list,
each rank's best learning rate, the gain shares (at the list's verdict), and the ranks that turned
unstable (ended worse than the untouched base). Last: per rule, on how many settings the verdict
was the planted k and how many arms were unstable; the default alpha rule is the one with the
verdict k everywhere and no unstable rank.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import header  # noqa: E402

RANKS = [1, 2, 4, 8, 16]


def parse_rule(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _arm(job: tuple) -> list[dict]:
    """Train one (rank, learning rate) arm to the end in this process; returns its reports."""
    raw, r, lr = job
    import torch

    from lora_rank_search.search.config import parse_config
    from lora_rank_search.search.runner import prepare
    from lora_rank_search.search.space import trial_settings
    from lora_rank_search.trainables.trial import quiet_libraries, run_trial

    quiet_libraries()
    torch.set_num_threads(1)
    cfg = parse_config(raw)
    prepared = _PREPARED.get(id(raw)) or prepare(cfg, log=lambda _: None)
    reports: list[dict] = []
    run_trial({"r": r, "lr": lr, "seed": 0}, trial_settings(cfg, prepared.model_path, prepared.targets), prepared.data,
              lambda metrics, _folder: reports.append(dict(metrics)), threads=1)
    return reports


_PREPARED: dict = {}


def run_grid(task, rule, lrs: list[float], steps: int, root: str, workers: int, eval_every: int | None = None) -> tuple:
    """The full grid ranks x learning rates, each arm trained to `steps` by `run_trial` itself (the
    trial loop of every search, without Ray: this measures the verdict, not the harness)."""
    from multiprocessing import get_context

    import pandas as pd

    from lora_rank_search.trainables.planted import planted_config

    raw = planted_config(task, RANKS, os.path.join(root, "runs"), name=f"k{task.rank}-alpha{rule}",
                         lora={"alpha": rule}, train={"max_steps": steps, "eval_every": eval_every or max(10, steps // 10), "learning_rate": lrs},
                         scheduler={"type": "none"})
    jobs = [(raw, r, lr) for r in RANKS for lr in lrs]
    start = time.time()
    with get_context("fork").Pool(workers) as pool:
        results = pool.map(_arm, jobs, chunksize=1)
    trials, history = [], []
    for (_, r, lr), reports in zip(jobs, results):
        trial_id = f"r{r}-lr{lr:g}"
        losses = [m["eval_loss"] for m in reports if math.isfinite(m["eval_loss"])]
        base = reports[0]["base_eval_loss"]
        failed = any(m.get("trial_status") not in (None, "ok") for m in reports)
        trials.append({"trial_id": trial_id, "r": r, "lr": lr, "seed": 0, "status": "diverged" if failed else "completed",
                       "steps": reports[-1]["step"], "max_steps": steps, "base_eval_loss": base,
                       "unstable": failed or bool(losses and losses[-1] > base)})
        history += [{"trial_id": trial_id, "step": m["step"], "eval_loss": m["eval_loss"]} for m in reports]
    return pd.DataFrame(trials), pd.DataFrame(history), time.time() - start


def verdicts(trials, history, lrs: list[float]) -> dict:
    """{'lr=X': Recommendation for that learning rate alone, ..., 'list': for all of them}."""
    from lora_rank_search.analysis.selection import recommend
    from lora_rank_search.contract.arms import format_lr

    out = {}
    for lr in lrs:
        keep = trials[trials["lr"] == lr]
        out[format_lr(lr)] = recommend(keep, history[history["trial_id"].isin(keep["trial_id"])])
    out["list"] = recommend(trials, history)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8], help="planted ranks")
    parser.add_argument("--rules", nargs="+", default=["2r", "16", "rslora"], help="alpha rules (a number = fixed alpha)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2], help="learning rates (span 10x)")
    parser.add_argument("--steps", type=int, default=300, help="train.max_steps of every trial")
    parser.add_argument("--task-dir", default=None, help="keep the planted tasks here (built if missing)")
    parser.add_argument("--workers", type=int, default=2, help="arms trained at once (one core each)")
    args = parser.parse_args()

    from lora_rank_search.contract.arms import format_lr
    from lora_rank_search.trainables.planted import build_planted_task
    from lora_rank_search.trainables.trial import quiet_libraries

    quiet_libraries()
    header("alpha rule x learning rate on planted-rank tasks (full grids, gain-share verdict)")
    rules = [parse_rule(r) for r in args.rules]
    lrs = sorted(args.lrs)
    print(f"ranks {RANKS}, learning rates {[format_lr(v) for v in lrs]}, {args.steps} steps, one seed, targets o_proj+down_proj")
    tally: dict = {str(rule): {"right": 0, "settings": 0, "unstable": 0, "arms": 0} for rule in rules}
    started = time.time()
    with tempfile.TemporaryDirectory() as root:
        os.environ.setdefault("LORA_RANK_SEARCH_CACHE", os.path.join(root, "cache"))
        for k in args.ks:
            task = build_planted_task(os.path.join(args.task_dir or root, f"task-k{k}"), rank=k)
            print(f"\n## planted k={k}: base {task.base_loss:.3f}, teacher {task.teacher_loss:.3f} nats/token")
            for rule in rules:
                trials, history, wall = run_grid(task, rule, lrs, args.steps, root, args.workers)
                found = verdicts(trials, history, lrs)
                unstable = trials[trials["unstable"]]
                t = tally[str(rule)]
                t["settings"] += len(found)
                t["right"] += sum(rec.rank == k for rec in found.values())
                t["unstable"] += len(unstable)
                t["arms"] += len(trials)
                listed = found["list"]
                cells = "  ".join(f"{name}: r={rec.rank}" for name, rec in found.items())
                print(f"alpha {str(rule):>6}  {cells}  ({wall:.0f} s)")
                best = " ".join(f"r{e.r}:{format_lr(e.lr)}" for e in listed.ranks)
                shares = " ".join(f"r{e.r}:{e.gain_share:.1%}" for e in listed.ranks)
                print(f"              best lr per rank: {best}")
                print(f"              gain share (list): {shares}")
                for name, rec in found.items():
                    if name != "list":
                        print(f"              gain share at {name}: " + " ".join(f"r{e.r}:{e.gain_share:.1%}" for e in rec.ranks))
                if len(unstable):
                    print("              unstable: " + ", ".join(f"r={u.r} lr={format_lr(u.lr)}" for u in unstable.itertuples()))
    print(f"\n## summary ({time.time() - started:.0f} s)")
    print(f"{'alpha rule':>10}  {'verdict = planted k':>20}  {'unstable arms':>14}")
    for rule, t in tally.items():
        print(f"{rule:>10}  {t['right']:>9} of {t['settings']:<8}  {t['unstable']:>5} of {t['arms']:<6}")
    winners = [rule for rule, t in tally.items() if t["right"] == t["settings"] and t["unstable"] == 0]
    print("RESULT rules with the planted verdict everywhere and no unstable rank: " + (", ".join(winners) or "none"))


if __name__ == "__main__":
    main()
