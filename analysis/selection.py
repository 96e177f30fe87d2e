"""The verdict as pure functions on the results tables: the smallest adequate rank (with several
target choices, the cheapest adequate adapter: `analysis.cheapest`).

The rule (`rule_text` is what every report prints). Roles are those of `contract.arms`: the rank is
the unit compared, the learning rate a nuisance choice (each rank at its best one), the seed a
replicate (averaged).

Over 400 lines on purpose: the rule, its tables and its reasons are one argument read top to
bottom; the cheapest-adapter part for several target choices is already `analysis.cheapest`.

1. **A trial's loss at step s** is the lowest eval loss it reached at or before optimizer step s
   (best so far: the checkpoint Tune keeps by eval_loss). Non-finite evaluations and failed
   trials are left out.
2. **An arm** (rank, learning rate) has the mean over its seeds at every step all of them reached,
   with a standard error SE = sd / sqrt(n) when n >= 2 seeds (else 0).
3. **An arm that ends worse than the untouched base** (or diverged) is *unstable*: its learning
   rate was too high for that rank. It is left out of its rank's evidence when another learning
   rate of that rank trained normally.
4. **A rank's loss at step s**, L_r(s), is its best arm's mean there; its evidence step s_r is the
   last step any of its arms reached (a rank cut by the scheduler, or interrupted, ends early).
5. **The reference at step s** is the best rank among those that got that far: B(s) = min_q L_q(s).
6. **Rank r is adequate** iff L_r(s_r) <= B(s_r) + max(slack, SE_B(s_r)). With the default rule,
   `gain`, slack = tol * (base - B(s_r)), where base is the untouched model's eval loss (every
   trial's step-0 evaluation: LoRA's B starts at zero): r recovers at least 1 - tol of the best
   rank's gain over the base, at the same step (default tol 0.05: 95%). Other rules:
   `relative` (slack = tol * |B|) and `absolute` (slack = tol nats/token).
7. **The recommendation** is the smallest adequate rank, at its best learning rate. With several
   target choices (`lora.target_modules` as a list) the unit is (target choice, rank): the
   reference is the best unit of any choice, and the recommendation is the **cheapest adequate
   adapter**, the adequate unit with the fewest trainable parameters (ties: the smaller rank);
   each choice's own verdict (its smallest adequate rank, if any) is reported beside it.
8. **No signal**: when the best rank improves on the base by no more than NO_SIGNAL of the base
   loss (or metric: a gain of 0 over a base metric of 0 is none), nothing is recommended:
   fine-tuning did not change the model measurably.

Why a share of the gain: the total loss is dominated by the data's own entropy, which no adapter
can remove; a tolerance relative to it is loose on one task and strict on another. The gain over
the base is what fine-tuning changes, so "95% of the achievable gain" means the same everywhere.

Why at the same step: the scheduler stops a trial at a rung when its loss there is not among the
best; comparing it with other ranks after more training would penalize it for the budget it was
denied. Without early stopping every rank is judged at max_steps.

The knee (reported beside the recommendation, not used by it) is where the curve of the missing
gain share vs log2(r) bends most ("Kneedle").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from lora_rank_search.contract.recommendation import json_safe  # noqa: F401 - also the export's
from lora_rank_search.contract.arms import CHOICE_KEY, LR_KEY, NUISANCE_KEYS, RANK_KEY, REPLICATE_KEY, describe_nuisance, format_lr, show_value

from lora_rank_search.analysis.cheapest import ChoiceVerdict, choice_verdicts, close_calls, cost_key, reason_cheapest, unit_costs  # noqa: F401 (ChoiceVerdict: re-exported)

RULES = {"gain": 0.05, "relative": 0.01, "absolute": 0.01}  # rule -> default tolerance
DEFAULT_RULE = "gain"
NO_SIGNAL = 0.005  # the best rank must improve on the base by at least this share of the base loss
UNUSABLE_STATUSES = ("error", "damaged")  # trials whose evaluations are not used (diverged/oom keep the ones before)
KNEE_MIN_BEND = 0.1  # the knee must sit this far below the chord (in [0, 1] scaled units), else no knee

_SLACK_TEXT = {
    "gain": "tol*(base - B), i.e. it recovers at least 1 - tol of the best rank's gain over the untouched base",
    "relative": "tol*|B| (relative to the best loss)",
    "absolute": "tol nats/token",
}


def rule_text(rule: str = DEFAULT_RULE) -> str:
    return (
        "smallest rank r whose eval loss (best so far, mean over seeds, at its best learning rate; at the last step r "
        "reached) is within the slack of the best rank at that same step, or within one standard error of it: "
        f"L_r(s_r) <= B(s_r) + max(slack, SE_B(s_r)), slack = {_SLACK_TEXT[rule]}; learning rates that left r worse than "
        "the untouched base are left out when another trained normally"
    )


RULE = rule_text()


@dataclass
class ArmEvidence:
    """One arm of a rank (its learning rate, and any further nuisance searched). Losses in nats/token,
    steps in optimizer steps."""

    lr: float
    seeds: list
    trial_ids: list
    step: int  # the last step all its seeds reached
    loss: float  # mean best-so-far there
    unstable: bool  # ended worse than the base (or diverged)
    used: bool  # part of its rank's evidence (False: unstable while another lr trained normally)
    compared_step: int = 0  # the last step every learning rate of its rank reached (where they compete)
    compared_loss: float = math.nan  # its loss there
    nuisance: dict = field(default_factory=dict)  # its nuisance values (`contract.arms`: lr, and any further one searched)


@dataclass
class RankEvidence:
    """How one rank was judged. Losses in nats/token, steps in optimizer steps."""

    r: int
    seeds: list
    trial_ids: list  # the trials of its best arm
    evidence_step: int
    loss: float  # its best arm's mean over seeds of best-so-far eval loss at evidence_step
    se: float  # standard error of that mean (0 with one seed)
    ref_rank: int  # the best rank at evidence_step
    ref_loss: float
    ref_se: float
    threshold: float  # ref_loss + max(slack, ref_se)
    gap: float  # loss / ref_loss - 1 (relative)
    adequate: bool
    stopped_early: bool  # its best arm ended before max_steps (early stop or interruption)
    max_step: int  # the furthest step any of its trials reached
    failed_seeds: int = 0
    lr: float = math.nan  # its best learning rate (at evidence_step)
    gain_share: float = math.nan  # (base - loss) / (base - ref_loss)
    unstable: bool = False  # every learning rate of this rank ended worse than the base
    arms: list = field(default_factory=list)  # ArmEvidence per learning rate, ascending
    target_choice: str = ""  # its target choice's label ('' when unknown)
    ref_choice: str = ""  # the reference unit's target choice
    trainable_params: float = math.nan  # the adapter's trainable parameters (from its trials)
    adapter_bytes: float = math.nan  # its saved adapter's size (bytes)
    nuisance: dict = field(default_factory=dict)  # its best arm's nuisance values (lr, and any further one searched)
    # A unit that costs no more was at least as good at this unit's evidence step, trained further
    # and fell short: this unit's adequacy there is not evidence (the cheaper unit's name; '' if not)
    overtaken_by: str = ""


@dataclass
class Recommendation:
    """The answer and its evidence; `rank` is None when nothing could be compared."""

    rank: Optional[int]
    tolerance: float
    reason: str
    rule_name: str = DEFAULT_RULE
    base_eval_loss: float = math.nan  # the untouched base model's eval loss (nats/token)
    learning_rate: float = math.nan  # the recommended rank's best learning rate
    gain_share: float = math.nan
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
    trial_id: Optional[str] = None  # the recommended arm's best seed (what `export` ships)
    lora_alpha: float = math.nan
    alpha_rule: str = ""
    targets: list = field(default_factory=list)
    learning_rates: list = field(default_factory=list)  # every learning rate searched
    nuisance: dict = field(default_factory=dict)  # the recommended arm's nuisance values (lr, and any further one searched)
    searched: list = field(default_factory=list)  # the nuisance dimensions with several values (each unit is judged at its best arm)
    ranks: list = field(default_factory=list)  # RankEvidence per rank of the recommended target choice, ascending r
    target_choice: str = ""  # the recommended unit's target choice ('' when unknown)
    trainable_params: float = math.nan  # the recommended adapter's trainable parameters
    adapter_bytes: float = math.nan
    best_choice: str = ""  # the best unit's target choice
    units: list = field(default_factory=list)  # RankEvidence of every (target choice, rank), by choice then r
    choices: list = field(default_factory=list)  # ChoiceVerdict per target choice (several choices only)
    close: list = field(default_factory=list)  # plain-words notes on cheaper units that fell just short
    excluded: list = field(default_factory=list)  # plain-words notes on trials left out
    no_signal: bool = False
    rule: str = RULE
    # eval.metric (issue 22): the verdict's quantity. With a metric, every loss field above holds
    # the metric as a loss (-metric for metric_mode max, so lower is better and gains are base - L).
    quantity: str = "eval_loss"  # or 'eval_metric:<name>'
    metric_mode: str = ""
    base_eval_metric: float = math.nan  # the untouched base's metric at step 0
    eval_metric: float = math.nan  # the recommended unit's metric where it was judged
    base_eval_loss_measured: float = math.nan  # the base's eval loss, beside the metric
    metric_errors: list = field(default_factory=list)  # 'N evaluation(s) ...: the function's error', per distinct error
    # confirmations (`analysis.confirmations`): units trained on in the search's idle capacity
    confirm_mode: str = ""  # scheduler.confirm of the search ('' when it kept no record: off, or not sha)
    confirmations: list = field(default_factory=list)  # one dict per confirmed trial: unit, role, from_step, step, ...
    confirm_why_none: str = ""  # why nothing was confirmed
    without_confirmations: Optional[dict] = None  # the verdict on the reports cut where the confirmed trials were cut
    verdict_changed: Optional[bool] = None  # the verdict differs from that one
    unopposed_without_confirmations: Optional[bool] = None  # without them, no other unit was judged at the verdict's step
    curves: Optional[pd.DataFrame] = field(default=None, repr=False, compare=False)  # trial_curves, computed once

    def evidence(self, r: int, choice: Optional[str] = None) -> Optional[RankEvidence]:
        """Rank r of the recommended target choice, or of `choice`."""
        if choice is None:
            return next((e for e in self.ranks if e.r == r), None)
        return next((e for e in self.units if e.r == r and e.target_choice == choice), None)

    @property
    def quantity_name(self) -> str:
        """What the loss columns hold, as reasons name it: 'eval loss', or the metric's name."""
        return "eval loss" if self.quantity == "eval_loss" else self.quantity.split(":", 1)[1]

    @property
    def quantity_sign(self) -> float:
        """-1 where the loss columns hold -metric (metric_mode max): a value times it is the quantity's own."""
        return -1.0 if self.quantity != "eval_loss" and self.metric_mode == "max" else 1.0

    def shown(self, loss: float) -> float:
        """A loss-column value as the quantity's own (the metric, not -metric; never -0.0)."""
        return self.quantity_sign * loss + 0.0

    @property
    def several_choices(self) -> bool:
        """The search compared several target choices (the verdict is the cheapest adequate adapter)."""
        return len({e.target_choice for e in self.units}) > 1

    def unit_name(self, choice: str, r) -> str:
        """'r=8', or 'mlp r=8' when the search compared several target choices."""
        return f"{choice} r={r}" if self.several_choices and choice else f"r={r}"

    @property
    def relative_tolerance(self) -> float:
        """The rule's slack at the best rank as a share of its loss (what "within the tolerance"
        means for a relative change of one curve; 0 when unknown)."""
        if not math.isfinite(self.best_loss) or not self.best_loss:
            return 0.0
        return slack(self.rule_name, self.tolerance, self.best_loss, self.base_eval_loss) / abs(self.best_loss)

    def shortfall(self, e: RankEvidence) -> float:
        """How far rank e falls short of its reference, in the rule's own units (adequate when <=
        tolerance, leaving the standard-error rule aside): missing gain share, relative gap or nats."""
        if self.rule_name == "gain":
            return 1.0 - e.gain_share if math.isfinite(e.gain_share) else math.inf
        return e.gap if self.rule_name == "relative" else e.loss - e.ref_loss

    def to_dict(self) -> dict:
        return json_safe({f.name: _plain_field(getattr(self, f.name)) for f in fields(self) if f.name != "curves"})


def _plain_field(value):
    """A field's value as plain data (dataclasses as dicts, lists of them too)."""
    if is_dataclass(value):
        return asdict(value)
    if isinstance(value, list):
        return [_plain_field(v) for v in value]
    return value


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"rule: must be one of {' | '.join(RULES)}, got {rule!r}")
    return rule


def check_tolerance(tolerance: float, rule: str = DEFAULT_RULE) -> float:
    """The tolerance as a float, or ValueError naming the bad value."""
    meaning = {"gain": "a share of the gain, e.g. 0.05 for 95% of the best gain", "relative": "relative, e.g. 0.01 for 1%",
               "absolute": "nats/token, e.g. 0.01"}[check_rule(rule)]
    try:
        tol = float(tolerance)
    except (TypeError, ValueError):
        raise ValueError(f"tolerance: must be a number >= 0 ({meaning}), got {tolerance!r}") from None
    if not math.isfinite(tol) or tol < 0 or (rule == "gain" and tol >= 1):
        bound = " and < 1" if rule == "gain" else ""
        raise ValueError(f"tolerance: must be a number >= 0{bound} ({meaning}), got {tolerance!r}")
    return tol


def trial_curves(trials: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """Usable evaluations with each trial's best-so-far loss.

    Returns columns trial_id, the arm's (`contract.arms`: target_choice, r, lr, any further nuisance
    searched, seed), step, eval_loss, best_loss (one row per finite evaluation of a trial that did
    not fail), sorted by the arm, then step.
    """
    arm_columns = [CHOICE_KEY, RANK_KEY, *nuisance_columns(trials), REPLICATE_KEY]
    columns = ["trial_id", *arm_columns, "step", "eval_loss", "best_loss"]
    if trials is None or trials.empty or history is None or history.empty or "eval_loss" not in history:
        return pd.DataFrame(columns=columns)
    ok = trials[~trials["status"].isin(UNUSABLE_STATUSES)] if "status" in trials else trials
    keep = ok[["trial_id", RANK_KEY, REPLICATE_KEY]].assign(
        **{k: ok[k] if k in ok else math.nan for k in nuisance_columns(trials)},
        **{CHOICE_KEY: ok[CHOICE_KEY].fillna("").astype(str) if CHOICE_KEY in ok else ""})
    hist = history[["trial_id", "step", "eval_loss"]].copy()
    hist["eval_loss"] = pd.to_numeric(hist["eval_loss"], errors="coerce")
    hist = hist[np.isfinite(hist["eval_loss"].to_numpy(dtype=float))]
    merged = hist.merge(keep, on="trial_id", how="inner")
    if merged.empty:
        return pd.DataFrame(columns=columns)
    merged = merged.sort_values([*arm_columns, "trial_id", "step"]).reset_index(drop=True)
    merged["best_loss"] = merged.groupby("trial_id")["eval_loss"].cummin()
    merged[RANK_KEY] = merged[RANK_KEY].astype(int)
    merged["step"] = merged["step"].astype(int)
    return merged[columns]


def nuisance_columns(trials: Optional[pd.DataFrame]) -> list[str]:
    """The nuisance dimensions of these trials: the learning rate always (NaN in experiments from
    before learning-rate lists), any further one when the trials have it."""
    return [k for k in NUISANCE_KEYS if k == LR_KEY or (trials is not None and k in trials)]


def searched_nuisance(trials: Optional[pd.DataFrame]) -> list[str]:
    """The nuisance dimensions searched over several values."""
    return [k for k in nuisance_columns(trials) if trials is not None and k in trials and trials[k].dropna().nunique() > 1]


def _nuisance_key(values) -> tuple:
    """A nuisance tuple as a dict key: NaN (no value) becomes None, so equal arms meet."""
    return tuple(None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values)


def _nuisance_dict(keys: Sequence[str], values: tuple) -> dict:
    return {k: v for k, v in zip(keys, values) if v is not None}


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    mean = float(np.mean(values))
    se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) >= 2 else 0.0
    return mean, se


def _arm_table(curves: pd.DataFrame, unstable_ids: set) -> dict[tuple, dict]:
    """Per arm (target choice, r, nuisance tuple): its trials, seeds, {step: (mean, se)} at steps all its seeds reached."""
    table: dict[tuple, dict] = {}
    nuisance = [k for k in NUISANCE_KEYS if k in curves]
    for (choice, r, *values), group in curves.groupby([CHOICE_KEY, RANK_KEY, *nuisance], dropna=False):
        last = group.groupby("trial_id")["step"].max()
        by_step = {}
        for step, at in group.groupby("step"):
            if at["trial_id"].nunique() == len(last):
                by_step[int(step)] = _mean_se(at["best_loss"].to_numpy(dtype=float))
        if not by_step:
            continue  # its seeds share no evaluated step: nothing to compare
        seeds = group.drop_duplicates("trial_id").sort_values(REPLICATE_KEY)
        ids = [str(t) for t in seeds["trial_id"]]
        table[(str(choice), int(r), _nuisance_key(values))] = {
            "trial_ids": ids, "seeds": [int(s) for s in seeds[REPLICATE_KEY]], "by_step": by_step, "keys": nuisance,
            "step": max(by_step), "max_step": int(last.max()), "unstable": any(t in unstable_ids for t in ids),
        }
    return table


def _rank_table(arms: dict[tuple, dict]) -> dict[tuple, dict]:
    """Per unit (target choice, r): {step: (mean, se, nuisance)} from its best usable arm at each step, and its arms."""
    table: dict[tuple, dict] = {}
    for unit in sorted({key[:2] for key in arms}):
        mine = {values: stats for (c, q, values), stats in arms.items() if (c, q) == unit}
        stable = {values: s for values, s in mine.items() if not s["unstable"]}
        used = stable or mine
        by_step: dict[int, tuple] = {}
        for values, stats in used.items():  # values: the arm's nuisance tuple (ties go to the smaller)
            for step, (mean, se) in stats["by_step"].items():
                if step not in by_step or (mean, values) < (by_step[step][0], by_step[step][2]):
                    by_step[step] = (mean, se, values)
        table[unit] = {"by_step": by_step, "evidence_step": max(by_step), "arms": mine, "used": set(used),
                    "unstable": not stable, "max_step": max(s["max_step"] for s in mine.values())}
    return table


def _reference(table: dict[tuple, dict], step: int) -> tuple[tuple, float, float]:
    """(best unit (choice, r), its mean, its se) among units that reached `step`; ties -> smaller r."""
    candidates = [(stats["by_step"][step][0], u, stats["by_step"][step][1]) for u, stats in sorted(table.items())
                  if step in stats["by_step"]]
    loss, u, se = min(candidates, key=lambda c: (c[0], c[1][1], c[1][0]))
    return u, loss, se


def slack(rule: str, tolerance: float, ref_loss: float, base: float) -> float:
    """How far above the reference loss a rank may sit and still be adequate (nats/token)."""
    if rule == "gain":
        return tolerance * max(base - ref_loss, 0.0)
    if rule == "relative":
        return tolerance * abs(ref_loss)
    return tolerance


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


def metric_view(trials: pd.DataFrame, history: pd.DataFrame, metric: str, mode: str) -> tuple:
    """(trials, history) with the downstream metric in the loss columns (eval.metric, issue 22): the
    eval loss becomes -metric (mode max) or the metric (mode min) and the base's step-0 loss the
    base's step-0 metric, so the verdict (gain share, same-step comparison, cheapest adequate) is
    computed on the metric by the same code. Evaluations whose metric failed (NaN) drop out."""
    sign = -1.0 if mode == "max" else 1.0
    hist = history.copy()
    hist["eval_loss"] = sign * pd.to_numeric(hist.get("eval_metric", pd.Series(np.nan, index=hist.index)), errors="coerce")
    base_values = pd.to_numeric(hist.get("base_eval_metric", pd.Series(dtype=float)), errors="coerce").dropna()
    base = float(base_values.median()) if len(base_values) else math.nan
    out = trials.copy()
    out["base_eval_loss"] = sign * base
    return out, hist, base


def recommend_by_metric(trials: pd.DataFrame, history: pd.DataFrame, metric: str, mode: str = "max",
                        tolerance: Optional[float] = None, rule: str = DEFAULT_RULE) -> "Recommendation":
    """The verdict on a downstream metric (eval.metric) instead of the eval loss."""
    view_trials, view_history, base = metric_view(trials, history, metric, mode)
    rec = recommend(view_trials, view_history, tolerance, rule, quantity=f"eval_metric:{metric}", metric_mode=mode)
    sign = rec.quantity_sign
    rec.base_eval_metric = base
    rec.eval_metric = sign * rec.loss if rec.loss == rec.loss else math.nan
    rec.base_eval_loss_measured = base_loss(trials)
    if "eval_metric_error" in history:
        errors = history["eval_metric_error"].dropna().astype(str)
        errors = errors[errors != ""]
        for message, count in errors.value_counts().items():
            note = f"{count} evaluation(s) without a {metric} value, left out of the verdict: {message}"
            rec.metric_errors.append(note)
            rec.excluded.append(note)
        if rec.rank is None and len(errors) and not np.isfinite(view_history["eval_loss"].to_numpy(dtype=float)).any():
            losses = pd.to_numeric(history.get("eval_loss", pd.Series(dtype=float)), errors="coerce").to_numpy(dtype=float)
            finite = "the eval losses were finite; " if np.isfinite(losses).any() else ""
            rec.reason = (f"no evaluation produced a value of {metric} ({finite}the metric failed every time: "
                          f"{errors.value_counts().index[0]}), so no rank can be recommended")
    return rec


def base_loss(trials: pd.DataFrame) -> float:
    """The untouched base model's eval loss: the median of the trials' step-0 evaluations."""
    if trials is None or trials.empty or "base_eval_loss" not in trials:
        return math.nan
    values = pd.to_numeric(trials["base_eval_loss"], errors="coerce").dropna()
    values = values[np.isfinite(values.to_numpy(dtype=float))]
    return float(values.median()) if len(values) else math.nan


def _unstable_ids(trials: pd.DataFrame) -> set:
    if trials is None or trials.empty or "unstable" not in trials:
        return set()
    return set(trials.loc[trials["unstable"].fillna(False).astype(bool), "trial_id"].astype(str))


def _excluded(trials: pd.DataFrame, curves: pd.DataFrame, table: dict) -> tuple[list[str], dict[int, int]]:
    notes, failed_by_rank = [], {}
    if trials is None or trials.empty:
        return notes, failed_by_rank
    usable = set(curves["trial_id"]) if not curves.empty else set()
    keys = nuisance_columns(trials)
    for row in trials.itertuples():
        values = _nuisance_key(getattr(row, k, math.nan) for k in keys)
        shown = _nuisance_dict(keys, values)
        arm = f"r={row.r}" + "".join(f" {k}={show_value(k, v)}" for k, v in shown.items()) + f" seed {row.seed}"
        if str(row.trial_id) in usable:
            stats = table.get((_choice(row), int(row.r)))
            if stats and not stats["unstable"] and values not in stats["used"]:
                notes.append(f"{arm}: ended worse than the untouched base (unstable: learning rate too high for this rank); "
                             f"left out, r={row.r} is judged at its other learning rate(s)")
            continue
        status = getattr(row, "status", "")
        if status in UNUSABLE_STATUSES:
            unit = (_choice(row), int(row.r))
            failed_by_rank[unit] = failed_by_rank.get(unit, 0) + 1
            notes.append(f"{arm}: the trial failed; left out")
        else:
            notes.append(f"{arm}: no finite eval loss ({status or 'no status'}); left out")
    return notes, failed_by_rank


def _choice(row) -> str:
    value = getattr(row, CHOICE_KEY, "")
    return value if isinstance(value, str) else ""


def recommend(trials: pd.DataFrame, history: pd.DataFrame, tolerance: Optional[float] = None,
              rule: str = DEFAULT_RULE, quantity: str = "eval_loss", metric_mode: str = "") -> Recommendation:
    """The smallest adequate rank by the module's rule, with the evidence for every rank.

    Args:
        trials: one row per trial with at least trial_id, r, seed, status (as `load_experiment`
            returns; lr, base_eval_loss, unstable, lora_alpha, alpha_rule, targets, max_steps are
            used when present).
        history: one row per report with at least trial_id, step, eval_loss.
        tolerance: the rule's tolerance (default: RULES[rule]).
        rule: gain (share of the gain over the base), relative (to the best loss) or absolute (nats).
        quantity, metric_mode: what the loss columns hold ('eval_metric:<name>' and its mode when
            `recommend_by_metric` put a metric there): the reasons name it and its values.
    """
    rule = check_rule(rule)
    tol = check_tolerance(RULES[rule] if tolerance is None else tolerance, rule)
    base = base_loss(trials)
    used_rule = rule
    if rule == "gain" and not math.isfinite(base):
        used_rule, tol = "relative", RULES["relative"] if tolerance is None else tol
    curves = trial_curves(trials, history)
    lrs = sorted({float(v) for v in trials[LR_KEY].dropna()}) if trials is not None and LR_KEY in trials else []
    empty = Recommendation(None, tol, "", rule_name=used_rule, base_eval_loss=base, learning_rates=lrs, rule=rule_text(used_rule),
                           curves=curves, searched=searched_nuisance(trials), quantity=quantity, metric_mode=metric_mode)
    if curves.empty:
        empty.excluded = _excluded(trials, curves, {})[0]
        empty.reason = f"no trial produced a finite {empty.quantity_name}{'' if quantity == 'eval_loss' else ' value'}, so no rank can be recommended"
        return empty
    table = _rank_table(_arm_table(curves, _unstable_ids(trials)))
    excluded, failed_by_rank = _excluded(trials, curves, table)
    max_steps = _max_steps(trials)
    costs = unit_costs(trials)
    units = [_judge(u, stats, table, used_rule, tol, base, max_steps, failed_by_rank.get(u, 0), costs.get(u))
             for u, stats in sorted(table.items())]
    deepest = max(e.evidence_step for e in units)
    best_u, best_loss, _ = _reference(table, deepest)
    rec = Recommendation(
        rank=None, tolerance=tol, reason="", rule_name=used_rule, base_eval_loss=base, best_rank=best_u[1],
        best_choice=best_u[0], best_step=deepest, best_loss=best_loss, units=units, excluded=excluded,
        learning_rates=lrs, rule=rule_text(used_rule), curves=curves, searched=searched_nuisance(trials),
        quantity=quantity, metric_mode=metric_mode,
    )
    _set_choice(rec, best_u[0])
    if rule == "gain" and used_rule != "gain":
        rec.excluded.append("no step-0 (untouched base) evaluation in this experiment: judged by the relative rule instead")
    # `<=`: a best rank no better than the base is no signal even where the base is 0 (a metric such
    # as exact_match of an untuned model), where the share of the base allows no slack at all
    if math.isfinite(base) and base - best_loss <= NO_SIGNAL * abs(base):
        rec.no_signal = True
        name = rec.quantity_name
        units = " nats/token" if rec.quantity == "eval_loss" else ""
        rec.reason = (f"no fine-tuning signal: the best rank ({rec.unit_name(*best_u)} at step {deepest}) reaches {name} "
                      f"{rec.shown(best_loss):.4f} against the untouched base's {rec.shown(base):.4f}, a gain of {base - best_loss:+.4f}"
                      f"{units} (at most {NO_SIGNAL:.1%} of the base's {name}), so no rank can be recommended; check the data, "
                      "the learning rates and the steps")
        return rec
    _not_established(units, table, rec.several_choices, rec.unit_name)
    # the reference unit itself always qualifies; with one target choice the cost follows the rank
    chosen = min((e for e in units if e.adequate), key=lambda e: cost_key(e, rec.several_choices))
    _set_choice(rec, chosen.target_choice)
    rec.trainable_params, rec.adapter_bytes = chosen.trainable_params, chosen.adapter_bytes
    if rec.several_choices:
        rec.choices = choice_verdicts(units)
        rec.close = close_calls(rec, chosen)
    rec.rank, rec.evidence_step, rec.loss, rec.learning_rate = chosen.r, chosen.evidence_step, chosen.loss, chosen.lr
    rec.nuisance = dict(chosen.nuisance)
    rec.ref_rank, rec.ref_loss, rec.threshold, rec.gap = chosen.ref_rank, chosen.ref_loss, chosen.threshold, chosen.gap
    rec.gain_share = chosen.gain_share
    rec.reason = _reason(rec, chosen)
    _attach_trial(rec, trials, curves, chosen)
    return rec


def _not_established(units: list, table: dict, several: bool, name) -> None:
    """Withdraw adequacy that was judged early against a field a cheaper unit then left behind.

    A unit judged adequate at step s (it was stopped there) is not adequate when a unit that costs
    no more had a loss at least as low at s, trained on, and was judged *not* adequate at its later
    step: at s the cheaper unit looked just as adequate, and the longer race showed it was not, so
    the costlier unit's standing at s shows nothing the cheaper one's did not.
    """
    short = {(q.target_choice, q.r) for q in units if not q.adequate}
    for e in units:
        if not e.adequate or (e.target_choice, e.r) == (e.ref_choice, e.ref_rank):
            continue
        step = e.evidence_step
        for q in sorted(units, key=lambda q: cost_key(q, several)):
            if cost_key(q, several) >= cost_key(e, several):
                break
            at = table[(q.target_choice, q.r)]["by_step"].get(step)
            if (q.target_choice, q.r) in short and q.evidence_step > step and at is not None and at[0] <= e.loss:
                e.adequate, e.overtaken_by = False, name(q.target_choice, q.r)
                break


def _set_choice(rec: Recommendation, choice: str) -> None:
    """The per-rank view (`rec.ranks`, the knee) of one target choice."""
    rec.target_choice = choice
    rec.ranks = [e for e in rec.units if e.target_choice == choice]
    rec.knee = knee_rank([e.r for e in rec.ranks], [1 - e.gain_share if math.isfinite(e.gain_share) else e.gap for e in rec.ranks])


def _judge(unit: tuple, stats: dict, table: dict, rule: str, tol: float, base: float, max_steps: Optional[int],
           failed: int, cost: Optional[tuple] = None) -> RankEvidence:
    choice, r = unit
    step = stats["evidence_step"]
    loss, se, best = stats["by_step"][step]
    ref_u, ref_loss, ref_se = _reference(table, step)
    threshold = ref_loss + max(slack(rule, tol, ref_loss, base), ref_se)
    best_arm = stats["arms"][best]
    nuisance = _nuisance_dict(best_arm["keys"], best)
    common = max(set.intersection(*(set(a["by_step"]) for a in stats["arms"].values())) or {0})
    arms = []
    for values, a in sorted(stats["arms"].items(), key=lambda item: tuple(-math.inf if v is None else v for v in item[0])):
        mine = _nuisance_dict(a["keys"], values)
        arms.append(ArmEvidence(lr=mine.get(LR_KEY, math.nan), seeds=a["seeds"], trial_ids=a["trial_ids"], step=a["step"],
                                loss=a["by_step"][a["step"]][0], unstable=a["unstable"], used=values in stats["used"],
                                compared_step=common, nuisance=mine,
                                compared_loss=a["by_step"][common][0] if common in a["by_step"] else math.nan))
    lr = nuisance.get(LR_KEY, math.nan)
    gain = base - ref_loss
    return RankEvidence(
        r=r, seeds=best_arm["seeds"], trial_ids=best_arm["trial_ids"], evidence_step=step, loss=loss, se=se,
        ref_rank=ref_u[1], ref_loss=ref_loss, ref_se=ref_se, threshold=threshold,
        gap=loss / ref_loss - 1.0 if ref_loss else math.nan,
        adequate=bool(loss <= threshold + 1e-12 * max(1.0, abs(threshold))),
        stopped_early=bool(max_steps is not None and step < max_steps), max_step=stats["max_step"],
        failed_seeds=failed, lr=lr, gain_share=(base - loss) / gain if math.isfinite(base) and gain > 0 else math.nan,
        unstable=stats["unstable"], arms=arms, target_choice=choice, ref_choice=ref_u[0], nuisance=nuisance,
        trainable_params=(cost or (math.nan, math.nan))[0], adapter_bytes=(cost or (math.nan, math.nan))[1],
    )


def _max_steps(trials: pd.DataFrame) -> Optional[int]:
    if trials is None or "max_steps" not in trials:
        return None
    values = pd.to_numeric(trials["max_steps"], errors="coerce").dropna()
    return int(values.max()) if len(values) else None


def _reason(rec: Recommendation, chosen: RankEvidence) -> str:
    shown = {k: v for k, v in chosen.nuisance.items() if k in rec.searched}
    at = f" ({describe_nuisance(shown)})" if shown else ""
    if rec.several_choices:
        return reason_cheapest(rec, chosen, at)
    if chosen.r == chosen.ref_rank:
        head = f"r={chosen.r}{at} is the best rank at step {chosen.evidence_step}"
        if any(e.r < chosen.r for e in rec.ranks):
            head += " and every smaller rank is worse than the tolerance allows"
        return head
    noise = " (one standard error)" if chosen.threshold - chosen.ref_loss > slack(
        rec.rule_name, rec.tolerance, chosen.ref_loss, rec.base_eval_loss) + 1e-15 else ""
    if rec.rule_name == "gain":
        return (
            f"r={chosen.r}{at} is the smallest rank that recovers at least {1 - rec.tolerance:.0%} of the best rank's gain "
            f"over the untouched base at step {chosen.evidence_step}{noise}: {chosen.gain_share:.1%} ({rec.quantity_name} "
            f"{rec.shown(chosen.loss):.4f} vs r={chosen.ref_rank}'s {rec.shown(chosen.ref_loss):.4f}; base "
            f"{rec.shown(rec.base_eval_loss):.4f})"
        )
    units = " nats/token" if rec.quantity == "eval_loss" else f" of {rec.quantity_name}"
    within = f"{rec.tolerance:.2%}" if rec.rule_name == "relative" else f"{rec.tolerance:g}{units}"
    return (
        f"r={chosen.r}{at} is the smallest rank within {within}{noise} of the best at step {chosen.evidence_step}: "
        f"{rec.quantity_name} {rec.shown(chosen.loss):.4f} vs r={chosen.ref_rank}'s "
        f"{rec.shown(chosen.ref_loss):.4f} ({chosen.gap:+.2%})"
    )


def _attach_trial(rec: Recommendation, trials: pd.DataFrame, curves: pd.DataFrame, chosen: RankEvidence) -> None:
    """The recommended arm's best seed (lowest best-so-far at the evidence step) and its labels."""
    at = curves[curves["trial_id"].isin(chosen.trial_ids) & (curves["step"] == chosen.evidence_step)]
    best = at.sort_values(["best_loss", REPLICATE_KEY]).iloc[0]
    rec.trial_id = str(best["trial_id"])
    row = trials[trials["trial_id"].astype(str) == rec.trial_id].iloc[0]
    if "lora_alpha" in row:
        rec.lora_alpha = float(row["lora_alpha"])
    if "alpha_rule" in row:
        rec.alpha_rule = str(row["alpha_rule"])
    if "targets" in row and isinstance(row["targets"], str) and row["targets"]:
        rec.targets = row["targets"].split(",")
