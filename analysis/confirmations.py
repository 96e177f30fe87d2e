"""Confirmations in the verdict: which units were trained on in the search's idle capacity, to which
step, and whether the verdict changed because of them.

Successive halving with `scheduler.confirm: tail | full` (`search.confirm`) trains a cut unit on
from the rung where it was cut to the leader's step, and records it in `confirmations.json`
(`contract.layout.CONFIRMATIONS_FILE`). The selection rule needs nothing special for it: a unit is
judged at the last step it reached against the best unit at that same step, so a confirmed unit is
judged at its later step like any other. What this module adds is the account: each confirmation
(its unit, role, from which step to which), the verdict recomputed without the confirmations' extra
steps (each confirmed trial's history cut at the step it was cut), and whether that verdict
differs, or was unopposed (no other unit judged at the leader's step).
"""

from __future__ import annotations

import math
from typing import Optional

import pandas as pd

from lora_rank_search.contract.arms import format_lr


def history_without(history: pd.DataFrame, record: Optional[dict]) -> pd.DataFrame:
    """The reports as they would be without confirmations: each confirmed trial's rows after the
    step where it was cut are dropped."""
    rows = [c for c in (record or {}).get("challengers", []) if c.get("trial_id")]
    if history is None or history.empty or not rows:
        return history
    cut = {str(c["trial_id"]): int(c["from_step"]) for c in rows}
    ids = history["trial_id"].astype(str)
    limit = ids.map(cut)
    keep = limit.isna() | (pd.to_numeric(history["step"], errors="coerce") <= limit)
    return history[keep.to_numpy()]


def apply(rec, trials: pd.DataFrame, history: pd.DataFrame, record: Optional[dict], tolerance=None, rule: str = "gain") -> None:
    """Fill rec's confirmation fields from the record (None: confirmations were off or the search is
    not successive halving: the fields stay empty)."""
    from lora_rank_search.analysis.selection import recommend

    if not record:
        return
    rec.confirm_mode = str(record.get("mode", ""))
    target = record.get("target_step")
    by_id = {}
    for c in record.get("challengers", []):
        unit = c.get("unit") or ["", None]
        choice, r = (unit[0] or "", unit[1]) if len(unit) == 2 else ("", unit[-1])
        step = int(c.get("step") or 0)
        by_id.setdefault((choice, r), []).append(step)
        rec.confirmations.append({
            "unit": rec.unit_name(choice, r), "target_choice": choice, "r": r, "lr": c.get("lr"), "seed": c.get("seed"),
            "trial_id": c.get("trial_id"), "role": c.get("role", ""), "from_step": int(c.get("from_step") or 0),
            "step": step, "target_step": target, "trained": step > int(c.get("from_step") or 0),
            "replaced": bool(c.get("replaced")), "started": bool(c.get("started")) or step > int(c.get("from_step") or 0),
        })
    rec.confirm_why_none = "" if rec.confirmations else str(record.get("why_none") or "")
    if rec.rank is None or not any(c["trained"] for c in rec.confirmations):
        rec.verdict_changed = False if rec.rank is not None else None
        rec.unopposed_without_confirmations = _unopposed(rec) if rec.rank is not None else None
        return
    before = recommend(trials, history_without(history, record), tolerance, rule)
    rec.without_confirmations = {"rank": before.rank, "target_choice": before.target_choice, "learning_rate": before.learning_rate,
                                 "evidence_step": before.evidence_step, "reason": before.reason}
    rec.verdict_changed = (before.rank, before.target_choice) != (rec.rank, rec.target_choice)
    rec.unopposed_without_confirmations = _unopposed(before)


def _unopposed(rec) -> bool:
    """No other unit was judged at (or beyond) the recommended unit's step."""
    chosen = next((e for e in rec.units if (e.target_choice, e.r) == (rec.target_choice, rec.rank)), None)
    if chosen is None:
        return False
    return not any(e.evidence_step >= chosen.evidence_step for e in rec.units if e is not chosen)


def summary(rec) -> str:
    """One line for the verdict: 'confirmed against r=16 at step 60 ...', or why nothing was."""
    if not rec.confirm_mode:
        return ""
    if not rec.confirmations:
        return f"nothing confirmed (scheduler.confirm: {rec.confirm_mode}): {rec.confirm_why_none or 'no record of why'}"
    at = rec.evidence_step
    there = [c for c in rec.confirmations if c["trained"] and at is not None and c["step"] >= at]
    short = [c for c in rec.confirmations if c not in there]
    parts = []
    if there:
        names = " and ".join(f"{c['unit']}{_lr(c)} ({c['role']}, from step {c['from_step']})" for c in _units(there))
        parts.append(f"confirmed against {names} at step {at}")
    for c in _units(short):
        if c.get("replaced"):
            parts.append(f"{c['unit']}{_lr(c)} ({c['role']}) trained from step {c['from_step']} to {c['step']}, then gave its "
                         "role to a unit cut at a later rung (nearer the leader's step)")
        elif c["trained"]:
            parts.append(f"{c['unit']}{_lr(c)} ({c['role']}) trained from step {c['from_step']} to {c['step']} only, short of "
                         f"step {at}: the search's last kept arm ended first")
        elif c.get("started"):
            parts.append(f"{c['unit']}{_lr(c)} ({c['role']}) was started from step {c['from_step']}, but the last kept arm "
                         "ended before it reported a later step")
        else:
            parts.append(f"{c['unit']}{_lr(c)} ({c['role']}) was chosen but no slot came free before the last kept arm ended")
    if rec.verdict_changed:
        w = rec.without_confirmations or {}
        parts.append(f"without them the verdict would have been {rec.unit_name(w.get('target_choice', ''), w.get('rank'))}")
    elif any(c["trained"] for c in rec.confirmations):
        parts.append("the verdict is the same without them")
    return "; ".join(parts)


def _units(rows: list) -> list:
    """One row per (unit, role) (the seeds of an arm are one confirmation)."""
    seen, out = set(), []
    for c in rows:
        key = (c["unit"], c["role"])
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _lr(c: dict) -> str:
    lr = c.get("lr")
    return f" lr {format_lr(lr)}" if isinstance(lr, (int, float)) and math.isfinite(lr) else ""
