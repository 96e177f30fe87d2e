"""Rank selection as pure functions on the results tables: the smallest adequate rank.

The rule (`RULE` below is what every report prints):

1. **A trial's loss at step s** is the lowest eval loss it reached at or before optimizer step s
   (best so far: the checkpoint Tune keeps by eval_loss). Non-finite evaluations and failed
   trials are left out.
2. **A rank's evidence step** s_r is the last step that *all* of its seeds reached (a trial
   stopped early by the scheduler, or interrupted, ends before max_steps; every trial evaluates on the same grid
   of steps). Its loss L_r is the mean over its seeds at s_r; with n >= 2 seeds its standard error
   is SE_r = sd / sqrt(n) (sample sd), else 0.
3. **The reference at step s** is the best rank among those whose seeds all reached s:
   B(s) = min_q L_q(s), with that rank's standard error SE_B(s).
4. **Rank r is adequate** iff L_r(s_r) <= B(s_r) + max(tolerance * |B(s_r)|, SE_B(s_r)): within the
   (relative, default 1%) tolerance of the best rank *at the same step*, or within one standard
   error of it, whichever is looser (the one-standard-error rule: a difference smaller than the
   seed-to-seed noise does not justify a larger rank).
5. **The recommendation** is the smallest adequate rank. Ties go to the smaller rank.

Why at the same step: the scheduler (successive halving, or ASHA) stops a trial at a rung when its
loss there is not among the best 1/reduction_factor recorded at that rung. A stopped rank's
loss is known only up to that step; comparing it with other ranks after more training would
penalize it for the budget it was denied, not for its rank. Comparing it at its own last step
against every rank that got that far uses all the evidence the search produced and nothing it did
not. Without early stopping (the full grid) every rank is judged at max_steps. The report states the step
each rank was judged at, and the diagnosis flags a recommendation resting on an early stop.

The knee (reported beside the recommendation, not used by it) is where the curve of relative gap
vs log2(r) bends most: among the ranks up to the best one, the point farthest below the chord
from the smallest rank to the best rank, both axes scaled to [0, 1] (the "Kneedle" criterion).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd

DEFAULT_TOLERANCE = 0.01  # relative: 1% of the best eval loss
FAILED_STATUSES = ("error",)
KNEE_MIN_BEND = 0.1  # the knee must sit this far below the chord (in [0, 1] scaled units), else no knee

RULE = (
    "smallest rank r whose mean eval loss (each trial's best so far, at the last step all of r's seeds "
    "reached) is within the tolerance (relative) of the best rank at that same step, or within one "
    "standard error of it, whichever is looser: L_r(s_r) <= B(s_r) + max(tol*|B(s_r)|, SE_B(s_r))"
)


@dataclass
class RankEvidence:
    """How one rank was judged. Losses in nats/token, steps in optimizer steps."""

    r: int
    seeds: list
    trial_ids: list
    evidence_step: int
    loss: float  # mean over seeds of best-so-far eval loss at evidence_step
    se: float  # standard error of that mean (0 with one seed)
    ref_rank: int  # the best rank at evidence_step
    ref_loss: float
    ref_se: float
    threshold: float  # ref_loss + max(tol*|ref_loss|, ref_se)
    gap: float  # loss / ref_loss - 1 (relative)
    adequate: bool
    stopped_early: bool  # at least one seed ended before max_steps (early stop or interruption)
    max_step: int  # the furthest step any seed of this rank reached
    failed_seeds: int = 0


@dataclass
class Recommendation:
    """The answer and its evidence; `rank` is None when nothing could be compared."""

    rank: Optional[int]
    tolerance: float
    reason: str
    evidence_step: Optional[int] = None
    loss: float = math.nan
    ref_rank: Optional[int] = None
    ref_loss: float = math.nan
    threshold: float = math.nan
    gap: float = math.nan
    best_rank: Optional[int] = None  # the best rank at the deepest step any rank reached with all seeds
    best_step: Optional[int] = None
    best_loss: float = math.nan
    knee: Optional[int] = None
    trial_id: Optional[str] = None  # the recommended rank's best seed (what `export` ships)
    lora_alpha: float = math.nan
    alpha_rule: str = ""
    targets: list = field(default_factory=list)
    ranks: list = field(default_factory=list)  # RankEvidence per rank, ascending r
    excluded: list = field(default_factory=list)  # plain-words notes on trials left out
    rule: str = RULE

    def evidence(self, r: int) -> Optional[RankEvidence]:
        return next((e for e in self.ranks if e.r == r), None)

    def to_dict(self) -> dict:
        out = asdict(self)
        return _clean(out)


def _clean(value):
    """JSON-safe: NaN -> None, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    return value


def check_tolerance(tolerance: float) -> float:
    """The tolerance as a float, or ValueError naming the bad value."""
    try:
        tol = float(tolerance)
    except (TypeError, ValueError):
        raise ValueError(f"tolerance: must be a number >= 0 (relative, e.g. 0.01 for 1%), got {tolerance!r}") from None
    if not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tolerance: must be a number >= 0 (relative, e.g. 0.01 for 1%), got {tolerance!r}")
    return tol


def trial_curves(trials: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """Usable evaluations with each trial's best-so-far loss.

    Returns columns trial_id, r, seed, step, eval_loss, best_loss (one row per finite evaluation of
    a trial that did not fail), sorted by r, seed, step.
    """
    columns = ["trial_id", "r", "seed", "step", "eval_loss", "best_loss"]
    if trials is None or trials.empty or history is None or history.empty or "eval_loss" not in history:
        return pd.DataFrame(columns=columns)
    ok = trials[~trials["status"].isin(FAILED_STATUSES)] if "status" in trials else trials
    keep = ok[["trial_id", "r", "seed"]]
    hist = history[["trial_id", "step", "eval_loss"]].copy()
    hist["eval_loss"] = pd.to_numeric(hist["eval_loss"], errors="coerce")
    hist = hist[np.isfinite(hist["eval_loss"].to_numpy(dtype=float))]
    merged = hist.merge(keep, on="trial_id", how="inner")
    if merged.empty:
        return pd.DataFrame(columns=columns)
    merged = merged.sort_values(["r", "seed", "trial_id", "step"]).reset_index(drop=True)
    merged["best_loss"] = merged.groupby("trial_id")["eval_loss"].cummin()
    merged["r"] = merged["r"].astype(int)
    merged["step"] = merged["step"].astype(int)
    return merged[columns]


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    mean = float(np.mean(values))
    se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) >= 2 else 0.0
    return mean, se


def _rank_table(curves: pd.DataFrame) -> dict[int, dict]:
    """Per rank: its trials, evidence step, and {step: (mean, se)} at steps all its seeds reached."""
    table: dict[int, dict] = {}
    for r, group in curves.groupby("r"):
        last = group.groupby("trial_id")["step"].max()
        by_step = {}
        for step, at in group.groupby("step"):
            if at["trial_id"].nunique() == len(last):
                by_step[int(step)] = _mean_se(at["best_loss"].to_numpy(dtype=float))
        shared = [s for s in by_step if s <= int(last.min())]
        if not shared:
            continue  # its seeds share no evaluated step: nothing to compare
        evidence_step = max(shared)
        seeds = group.drop_duplicates("trial_id").sort_values("seed")
        table[int(r)] = {
            "trial_ids": [str(t) for t in seeds["trial_id"]],
            "seeds": [int(s) for s in seeds["seed"]],
            "evidence_step": evidence_step,
            "max_step": int(last.max()),
            "by_step": by_step,
        }
    return table


def _reference(table: dict[int, dict], step: int) -> tuple[int, float, float]:
    """(best rank, its mean, its se) among ranks whose seeds all reached `step`; ties -> smaller r."""
    candidates = [(stats["by_step"][step][0], r, stats["by_step"][step][1]) for r, stats in sorted(table.items()) if step in stats["by_step"]]
    loss, r, se = min(candidates, key=lambda c: (c[0], c[1]))
    return r, loss, se


def knee_rank(ranks: Sequence[int], gaps: Sequence[float]) -> Optional[int]:
    """The Kneedle knee of gap vs log2(r) over the ranks up to the one with the smallest gap.

    Needs at least three ranks up to the best; returns None otherwise, or when no point lies at
    least KNEE_MIN_BEND below the chord (a straight or concave curve has no knee).
    """
    pairs = sorted((int(r), float(g)) for r, g in zip(ranks, gaps) if math.isfinite(float(g)))
    if len(pairs) < 3:
        return None
    best = min(range(len(pairs)), key=lambda i: (pairs[i][1], pairs[i][0]))
    pairs = pairs[: best + 1]
    if len(pairs) < 3:
        return None
    x = np.log2([p[0] for p in pairs])
    y = np.array([p[1] for p in pairs])
    if y[0] - y[-1] <= 0 or x[-1] == x[0]:
        return None
    xn = (x - x[0]) / (x[-1] - x[0])
    yn = (y - y[-1]) / (y[0] - y[-1])
    below = (1.0 - xn) - yn  # the chord from (0, 1) to (1, 0), minus the curve
    i = int(np.argmax(below))
    return pairs[i][0] if below[i] >= KNEE_MIN_BEND else None


def _excluded(trials: pd.DataFrame, curves: pd.DataFrame) -> tuple[list[str], dict[int, int]]:
    notes, failed_by_rank = [], {}
    if trials is None or trials.empty:
        return notes, failed_by_rank
    usable = set(curves["trial_id"]) if not curves.empty else set()
    for row in trials.itertuples():
        if str(row.trial_id) in usable:
            continue
        status = getattr(row, "status", "")
        if status in FAILED_STATUSES:
            failed_by_rank[int(row.r)] = failed_by_rank.get(int(row.r), 0) + 1
            notes.append(f"r={row.r} seed {row.seed}: the trial failed; left out")
        else:
            notes.append(f"r={row.r} seed {row.seed}: no finite eval loss ({status or 'no status'}); left out")
    return notes, failed_by_rank


def recommend(trials: pd.DataFrame, history: pd.DataFrame, tolerance: float = DEFAULT_TOLERANCE) -> Recommendation:
    """The smallest adequate rank by the module's rule, with the evidence for every rank.

    Args:
        trials: one row per trial with at least trial_id, r, seed, status (as `load_experiment`
            returns; optional lora_alpha, alpha_rule, targets, max_steps are copied into the answer).
        history: one row per report with at least trial_id, step, eval_loss.
        tolerance: relative tolerance (0.01 = within 1% of the best).
    """
    tol = check_tolerance(tolerance)
    curves = trial_curves(trials, history)
    excluded, failed_by_rank = _excluded(trials, curves)
    if curves.empty:
        return Recommendation(None, tol, "no trial produced a finite eval loss, so no rank can be recommended", excluded=excluded)
    table = _rank_table(curves)
    max_steps = _max_steps(trials)
    evidence = []
    for r, stats in sorted(table.items()):
        step = stats["evidence_step"]
        loss, se = stats["by_step"][step]
        ref_r, ref_loss, ref_se = _reference(table, step)
        threshold = ref_loss + max(tol * abs(ref_loss), ref_se)
        evidence.append(RankEvidence(
            r=r, seeds=stats["seeds"], trial_ids=stats["trial_ids"], evidence_step=step, loss=loss, se=se,
            ref_rank=ref_r, ref_loss=ref_loss, ref_se=ref_se, threshold=threshold,
            gap=loss / ref_loss - 1.0 if ref_loss else math.nan,
            adequate=bool(loss <= threshold + 1e-12 * max(1.0, abs(threshold))),
            stopped_early=bool(max_steps is not None and step < max_steps), max_step=stats["max_step"],
            failed_seeds=failed_by_rank.get(r, 0),
        ))
    deepest = max(e.evidence_step for e in evidence)
    best_r, best_loss, _ = _reference(table, deepest)
    chosen = next(e for e in evidence if e.adequate)  # the reference rank itself always qualifies
    rec = Recommendation(
        rank=chosen.r, tolerance=tol, reason="", evidence_step=chosen.evidence_step, loss=chosen.loss,
        ref_rank=chosen.ref_rank, ref_loss=chosen.ref_loss, threshold=chosen.threshold, gap=chosen.gap,
        best_rank=best_r, best_step=deepest, best_loss=best_loss,
        knee=knee_rank([e.r for e in evidence], [e.gap for e in evidence]), ranks=evidence, excluded=excluded,
    )
    rec.reason = _reason(rec, chosen)
    _attach_trial(rec, trials, curves, chosen)
    return rec


def _max_steps(trials: pd.DataFrame) -> Optional[int]:
    if trials is None or "max_steps" not in trials:
        return None
    values = pd.to_numeric(trials["max_steps"], errors="coerce").dropna()
    return int(values.max()) if len(values) else None


def _reason(rec: Recommendation, chosen: RankEvidence) -> str:
    if chosen.r == chosen.ref_rank:
        head = f"r={chosen.r} is the best rank at step {chosen.evidence_step}"
        smaller = [e for e in rec.ranks if e.r < chosen.r]
        if smaller:
            head += " and every smaller rank is worse than the tolerance allows"
        return head
    noise = " (one standard error)" if chosen.threshold - chosen.ref_loss > rec.tolerance * abs(chosen.ref_loss) else ""
    return (
        f"r={chosen.r} is the smallest rank within {rec.tolerance:.2%}{noise} of the best at step {chosen.evidence_step}: "
        f"{chosen.loss:.4f} vs r={chosen.ref_rank}'s {chosen.ref_loss:.4f} ({chosen.gap:+.2%})"
    )


def _attach_trial(rec: Recommendation, trials: pd.DataFrame, curves: pd.DataFrame, chosen: RankEvidence) -> None:
    """The recommended rank's best seed (lowest best-so-far at the evidence step) and its labels."""
    at = curves[(curves["r"] == chosen.r) & (curves["step"] == chosen.evidence_step)]
    best = at.sort_values(["best_loss", "seed"]).iloc[0]
    rec.trial_id = str(best["trial_id"])
    row = trials[trials["trial_id"].astype(str) == rec.trial_id].iloc[0]
    if "lora_alpha" in row:
        rec.lora_alpha = float(row["lora_alpha"])
    if "alpha_rule" in row:
        rec.alpha_rule = str(row["alpha_rule"])
    if "targets" in row and isinstance(row["targets"], str) and row["targets"]:
        rec.targets = row["targets"].split(",")
