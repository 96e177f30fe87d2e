"""Successive halving replayed on full grids of planted tasks: does it keep the grid's verdict, at what cost?

    .venv/bin/python bench/halving_replay.py [--ks 2 4 8] [--lrs 3e-3 1e-2 3e-2] [--steps 500] [--grids DIR]
        [--ranks 1 2 4 8] [--keep-share 0.8] [--grace-fraction 0.25 | --grace-period N]

--ranks replays on a subset of the grid's ranks (the grid itself always trains ranks 1..16);
--keep-share and --grace-fraction override `search.halving.KEEP_SHARE` and
`search.config.GRACE_FRACTION` for the replay only (the search's defaults are unchanged): the
sweeps of grace x KEEP_SHARE in bench/RESULTS.md are these options.

For each planted rank k (2, 3, 4, 6, 8 by default; the tiny 4-bit Llama of `bench/alpha_lr.py`, ranks 1..16, the default
alpha), the full grid ranks x learning rates is trained to the end by the search's own trial loop
(`run_trial`, no Ray), evaluating every 25 steps; with --grids DIR the grids are kept there and read
back on the next run. Successive halving (`search.halving.decide`, the default grace period and
reduction factor, the search's best-so-far score) is then replayed on the same curves: a trial cut
at a rung has, up to that rung, exactly the curve of the full trial (same seed, same schedule), so
the replay makes the search's own decisions. Each setting (every learning rate alone, and the
list) is judged twice by the default rule (`analysis.selection.recommend`): on the grid and on
what halving trained. Printed per setting: both verdicts, the planted k, the ratio of training
steps, and the survivors of each rung. Last: how many settings kept the grid's verdict and the
planted k, and the worst step ratio on the list (target: <= 0.40). With --confirm, each setting is
also judged after the confirmations (`search.confirm`) the search would run in its tail: their
units, the verdict, their extra training steps as a share of the grid's, and which of the
`unopposed` / `judged-early` / `smaller-rank-cut-early` findings remain.
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
from bench.alpha_lr import RANKS, run_grid  # noqa: E402

TARGET = 0.40
EVAL_EVERY = 25


def grid(k: int, lrs: list[float], steps: int, root: str, folder: str | None, workers: int):
    """The full grid's (trials, history), trained or read back from folder."""
    import pandas as pd

    from lora_rank_search.trainables.planted import build_planted_task

    name = f"k{k}-lr{'-'.join(f'{v:g}' for v in lrs)}-{steps}"
    if folder and os.path.exists(os.path.join(folder, f"{name}.trials.csv")):
        return pd.read_csv(os.path.join(folder, f"{name}.trials.csv")), pd.read_csv(os.path.join(folder, f"{name}.history.csv"))
    task = build_planted_task(os.path.join(root, f"task-k{k}"), rank=k)
    trials, history, wall = run_grid(task, 16.0, lrs, steps, root, workers, eval_every=EVAL_EVERY)
    print(f"  trained the grid for k={k} in {wall:.0f} s", flush=True)
    if folder:
        os.makedirs(folder, exist_ok=True)
        trials.to_csv(os.path.join(folder, f"{name}.trials.csv"), index=False)
        history.to_csv(os.path.join(folder, f"{name}.history.csv"), index=False)
    return trials, history


def replay(trials, history, steps: int, grace_period: int | None = None, reduction_factor: float = 3,
           keep_share: float | None = None, grace_fraction: float | None = None):
    """(the trials as halving leaves them, their history, the survivors of each rung, the rungs).
    With a target_choice column, units are (choice, rank), compared as the search does (families,
    and each unit's trainable_params as its cost)."""
    from lora_rank_search.search.config import GRACE_FRACTION
    from lora_rank_search.search.halving import KEEP_SHARE, decide, halving_rungs

    grace = grace_period or max(1, math.ceil((GRACE_FRACTION if grace_fraction is None else grace_fraction) * steps))
    rungs = halving_rungs(grace, steps, reduction_factor)
    ids = list(trials["trial_id"])
    choices = "target_choice" in trials
    groups = {t: (c, r) for t, c, r in zip(ids, trials["target_choice"], trials["r"])} if choices else dict(zip(ids, trials["r"]))
    arms = {t: (groups[t], lr) for t, lr in zip(ids, trials["lr"])}
    families = {t: u[0] for t, u in groups.items()} if choices else None
    costs = dict(zip(ids, trials["trainable_params"])) if "trainable_params" in trials else None
    scores = {}
    for t in ids:
        mine = history[history["trial_id"] == t]
        scores[t] = {rung: float(mine[mine["step"] <= rung]["eval_loss"].min()) for rung in rungs}
    base = dict(zip(ids, trials["base_eval_loss"]))
    d = decide(groups, scores, ended=[], rungs=rungs, reduction_factor=reduction_factor, arms=arms, families=families,
               base=base, costs=costs, keep_share=KEEP_SHARE if keep_share is None else keep_share)
    reach = {t: rungs[d.level[t]] if d.level[t] < len(rungs) else steps for t in ids}
    kept = history[[s <= reach[t] for t, s in zip(history["trial_id"], history["step"])]]
    cut = trials.assign(steps=[reach[t] for t in ids],
                        status=["completed" if reach[t] == steps else "stopped" for t in ids])
    return cut, kept, d.survivors, rungs


def confirm_replay(trials, history, steps: int, cut, kept, survivors: dict, rungs: list):
    """Confirmations (`search.confirm`, `scheduler.confirm: full`) replayed after `replay`: the
    challengers chosen from the rung table train on to `steps` (their grid curves past the rung).
    Assumes a slot is free for each (the tail of a search on 2+ slots). Returns (trials, history,
    the challengers, the extra training steps)."""
    import pandas as pd

    from lora_rank_search.search.confirm import choose_challengers

    ids = list(trials["trial_id"])
    choices = "target_choice" in trials
    unit = {t: (c, r) for t, c, r in zip(ids, trials["target_choice"], trials["r"])} if choices else dict(zip(ids, trials["r"]))
    arm = {t: (unit[t], lr) for t, lr in zip(ids, trials["lr"])}
    table = {}
    for k, rung in enumerate(rungs):
        if k not in survivors:
            break
        members = None if k == 0 else set(survivors[k - 1])
        losses: dict = {}
        for t in ids:
            if members is None or arm[t] in members:
                mine = history[(history["trial_id"] == t) & (history["step"] <= rung)]["eval_loss"]
                if len(mine):
                    losses.setdefault(arm[t], []).append(float(mine.min()))
        table[k] = {a: sum(v) / len(v) for a, v in losses.items()}
    cost = {unit[t]: c for t, c in zip(ids, trials["trainable_params"])} if "trainable_params" in trials else None
    base = float(pd.to_numeric(trials["base_eval_loss"], errors="coerce").median())
    picks = choose_challengers(table, survivors, {a: a[0] for a in arm.values()}, free=2, cost=cost,
                               base=base if math.isfinite(base) else None)
    chosen = {t for t in ids if any(arm[t] == p.arm for p in picks)}
    reach = dict(zip(cut["trial_id"], cut["steps"]))
    extra = sum(steps - reach[t] for t in chosen)
    for t in chosen:
        reach[t] = steps
    more = history[[s <= reach[t] for t, s in zip(history["trial_id"], history["step"])]]
    out = cut.assign(steps=[reach[t] for t in cut["trial_id"]],
                     status=["completed" if reach[t] == steps else "stopped" for t in cut["trial_id"]])
    return out, more, picks, extra


EARLY = ("unopposed", "judged-early", "smaller-rank-cut-early")  # the findings confirmations are meant to answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 3, 4, 6, 8], help="planted ranks")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2], help="learning rates (span 10x)")
    parser.add_argument("--steps", type=int, default=500, help="train.max_steps of every trial")
    parser.add_argument("--grace-period", type=int, default=None, help="first rung (default: the search's)")
    parser.add_argument("--grids", default=None, help="keep the trained grids here and read them back")
    parser.add_argument("--workers", type=int, default=2, help="arms trained at once (one core each)")
    parser.add_argument("--ranks", type=int, nargs="+", default=None, help="replay on these of the grid's ranks (default: all)")
    parser.add_argument("--keep-share", type=float, default=None, help="gain share that keeps a rank (default: the search's KEEP_SHARE)")
    parser.add_argument("--grace-fraction", type=float, default=None, help="first rung as a share of --steps (default: the search's)")
    parser.add_argument("--confirm", action="store_true",
                        help="also replay confirmations (search.confirm): the chosen challengers trained on to the end")
    args = parser.parse_args()

    from lora_rank_search.analysis.selection import recommend
    from lora_rank_search.contract.arms import format_lr
    from lora_rank_search.trainables.trial import quiet_libraries

    quiet_libraries()
    header("successive halving replayed on full grids of planted tasks (gain-share verdict)")
    lrs = sorted(args.lrs)
    from lora_rank_search.search.config import GRACE_FRACTION
    from lora_rank_search.search.halving import KEEP_SHARE

    ranks = sorted(args.ranks or RANKS)
    unknown = sorted(set(ranks) - set(RANKS))
    if unknown:
        parser.error(f"--ranks: {unknown} are not in the grid's ranks {RANKS}")
    keep_share = KEEP_SHARE if args.keep_share is None else args.keep_share
    grace_fraction = GRACE_FRACTION if args.grace_fraction is None else args.grace_fraction
    print(f"ranks {ranks}, learning rates {[format_lr(v) for v in lrs]}, {args.steps} steps, alpha 16, one seed; "
          f"keep share {keep_share:g}, first rung " + (f"step {args.grace_period}" if args.grace_period else f"{grace_fraction:g} of the steps"))
    tally = {"settings": 0, "same": 0, "planted": 0, "confirmed_same": 0}
    list_ratios = []
    started = time.time()
    with tempfile.TemporaryDirectory() as root:
        os.environ.setdefault("LORA_RANK_SEARCH_CACHE", os.path.join(root, "cache"))
        for k in args.ks:
            trials, history = grid(k, lrs, args.steps, root, args.grids, args.workers)
            print(f"\n## planted k={k}")
            for name, subset in [(format_lr(v), [v]) for v in lrs] + [("list", lrs)]:
                mine = trials[trials["lr"].isin(subset) & trials["r"].isin(ranks)]
                hist = history[history["trial_id"].isin(mine["trial_id"])]
                full = recommend(mine, hist)
                cut, kept, survivors, rungs = replay(mine, hist, args.steps, args.grace_period, keep_share=keep_share,
                                                     grace_fraction=grace_fraction)
                sha = recommend(cut, kept)
                ratio = cut["steps"].sum() / (len(cut) * args.steps)
                if name == "list":
                    list_ratios.append(ratio)
                tally["settings"] += 1
                tally["same"] += full.rank == sha.rank
                tally["planted"] += sha.rank == min((r for r in ranks if r >= k), default=None)  # the smallest searched rank that holds k
                shares = " ".join(f"r{e.r}:{e.gain_share:.1%}@{e.evidence_step}" for e in sha.ranks)
                print(f"{name:>6}: grid r={full.rank}  halving r={sha.rank}  steps {ratio:.2f}  "
                      f"rungs {rungs}: " + "; ".join(f"{rungs[i]}: {len(v)} arms" for i, v in sorted(survivors.items())))
                print(f"        halving gain shares: {shares}")
                if args.confirm:
                    from lora_rank_search.analysis.diagnosis import diagnose

                    c_trials, c_hist, picks, extra = confirm_replay(mine, hist, args.steps, cut, kept, survivors, rungs)
                    conf = recommend(c_trials, c_hist)
                    before = sorted({f.kind for f in diagnose(sha, cut, kept)} & set(EARLY))
                    after = sorted({f.kind for f in diagnose(conf, c_trials, c_hist)} & set(EARLY))
                    tally["confirmed_same"] += full.rank == conf.rank
                    print(f"        confirmations: {', '.join(f'r={p.unit} ({p.role}, from step {rungs[p.rung]})' for p in picks) or 'none'}"
                          f"; verdict r={conf.rank}; extra steps {extra / (len(cut) * args.steps):.3f} of the grid's; "
                          f"findings {before or 'none'} -> {after or 'none'}")
    print(f"\n## summary ({time.time() - started:.0f} s)")
    print(f"same verdict as the grid: {tally['same']} of {tally['settings']}; halving verdict = the smallest searched rank >= k: "
          f"{tally['planted']} of {tally['settings']}")
    if args.confirm:
        print(f"with confirmations, same verdict as the grid: {tally['confirmed_same']} of {tally['settings']}")
    worst = max(list_ratios) if list_ratios else math.nan
    print(f"RATIO halving / grid training steps on the list: worst {worst:.2f} (target <= {TARGET:.2f})")


if __name__ == "__main__":
    main()
