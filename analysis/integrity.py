"""Is a trial folder's evidence believable? Pure checks on what `analysis.results` read from disk.

Each check returns the problems it found as short phrases (empty: nothing wrong); the loader
names them per trial folder, leaves those trials out of the evidence, and the verdict refuses
while any is there (unless --allow-incomplete). A non-finite evaluation is not damage but a
diverged trial: `nonfinite_eval` finds it.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional

import pandas as pd

from lora_rank_search.contract.arms import ARM_KEYS, CHOICE_KEY, LR_KEY, REPLICATE_KEY, format_lr, show_value

# params.json key -> the report column saying the same thing (result.json), as the trial loop writes them
_ARM_FIELDS = (("r", "r"), ("lr", "learning_rate"), ("seed", "seed"))


def _number(value) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def nonfinite_eval(history: pd.DataFrame) -> Optional[tuple[int, float]]:
    """(step, value) of the first report whose eval_loss is NaN or infinite (or not a number); None
    when every one is finite, or no report has an eval_loss column. Every report of the trial loop
    carries an evaluation, so a NaN there is a failed evaluation, not a missing one."""
    if history is None or history.empty or "eval_loss" not in history:
        return None
    values = pd.to_numeric(history["eval_loss"], errors="coerce")
    for index in history.index:
        value = float(values.loc[index])
        if not math.isfinite(value):
            step = history.loc[index, "step"] if "step" in history else 0
            return int(step) if _number(step) is not None else 0, value
    return None


def diverged_reason(step: int, value: float, lr: float, r: int) -> str:
    """The failure line of a trial whose eval loss became non-finite."""
    at = f"learning rate {format_lr(lr)}" if _number(lr) is not None else "its learning rate"
    return f"eval loss became {value} at step {step} ({at} too high for r={r})"


def arm_mismatch(params: Mapping, history: pd.DataFrame, dirname: Optional[Mapping] = None) -> list[str]:
    """Where params.json, the trial's own reports (the last one) and its folder name disagree on
    its arm (rank, learning rate, seed): its files were mixed up (a merge, a partial sync)."""
    problems = []
    last = {}
    if history is not None and not history.empty:
        for _, column in _ARM_FIELDS:
            if column in history:
                values = history[column].dropna()
                if len(values):
                    last[column] = values.iloc[-1]
    for key, column in _ARM_FIELDS:
        mine = _number(params.get(key)) if key in params else None
        theirs = _number(last.get(column)) if column in last else None
        if mine is not None and theirs is not None and not _same(mine, theirs):
            problems.append(f"params.json says {key}={_show(key, mine)} but result.json says {column}={_show(key, theirs)}")
        named = _number((dirname or {}).get(key))
        if mine is not None and named is not None and not _same(mine, named):
            problems.append(f"params.json says {key}={_show(key, mine)} but the folder name says {key}={_show(key, named)}")
    return problems


def _show(key: str, value: float) -> str:
    return format_lr(value) if key == LR_KEY else f"{value:g}"


def _arm_value(value) -> Optional[float]:
    """A numeric coordinate as a key: rounded (a float read back from text), None when absent."""
    number = _number(value)
    return None if number is None or math.isnan(number) else round(number, 15)


BASE_LOSS_RTOL = 0.01  # relative: trials of one experiment evaluate the same untouched base on the same data


def base_loss_outliers(rows: Iterable[Mapping], rtol: float = BASE_LOSS_RTOL) -> dict[str, str]:
    """{trial folder: problem} for every trial whose step-0 (base) eval loss differs from the median of
    the experiment's trials by more than rtol: it was evaluated on other data or another base (data
    changed under a resumed search, two experiments merged), so its losses compare with nothing here."""
    bases = {str(row["trial_dir"]): _number(row.get("base_eval_loss")) for row in rows}
    known = sorted(v for v in bases.values() if v is not None)
    if len(known) < 2:
        return {}
    median = known[len(known) // 2] if len(known) % 2 else (known[len(known) // 2 - 1] + known[len(known) // 2]) / 2
    return {folder: (f"its base eval loss {value:.4f} differs from the other trials' {median:.4f}: evaluated on other data "
                     "or another base model (did the data change under a resumed search?)")
            for folder, value in bases.items() if value is not None and abs(value - median) > rtol * abs(median)}


def duplicate_arms(rows: Iterable[Mapping]) -> dict[str, str]:
    """{trial folder: problem} for every folder that claims the same arm (target choice, rank,
    learning rate, seed) or the same trial id as another: two syncs merged into one folder. Such
    folders are not seed replicates; none of them is believed."""
    by_arm: dict[tuple, list[str]] = {}
    by_id: dict[str, list[str]] = {}
    keys = (*ARM_KEYS, REPLICATE_KEY)  # contract.arms: the arm's coordinates and its replicate
    for row in rows:
        arm = tuple(str(row.get(k) or "") if k == CHOICE_KEY else _arm_value(row.get(k)) for k in keys)
        by_arm.setdefault(arm, []).append(str(row["trial_dir"]))
        by_id.setdefault(str(row.get("trial_id", "")), []).append(str(row["trial_dir"]))
    out: dict[str, str] = {}
    for values, folders in by_arm.items():
        if len(folders) > 1:
            named = dict(zip(keys, values))
            arm = " ".join(([named[CHOICE_KEY]] if named[CHOICE_KEY] else [])
                           + [f"{k}={show_value(k, v)}" for k, v in named.items() if k != CHOICE_KEY and v is not None])
            for folder in folders:
                others = ", ".join(f for f in folders if f != folder)
                out[folder] = f"another folder claims the same arm {arm} ({others}): two copies merged? keep one"
    for trial_id, folders in by_id.items():
        if len(folders) > 1 and trial_id:
            for folder in folders:
                out.setdefault(folder, f"another folder holds the same trial {trial_id} "
                                       f"({', '.join(f for f in folders if f != folder)}): two copies merged? keep one")
    return out
