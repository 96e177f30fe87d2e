"""The cheapest adequate adapter: what the verdict adds when several target choices are searched.

The unit compared is (target choice, rank) (`contract.arms`); `analysis.selection` judges every unit
against the best of any choice at the same step, and this module orders the adequate ones by cost
(trainable parameters, from the trials' own reports), gives each choice its own verdict (its smallest
adequate rank), and names cheaper units that fell just short of the rule. Pure functions on the
selection's evidence (duck-typed: RankEvidence and Recommendation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pandas as pd


@dataclass
class ChoiceVerdict:
    """One target choice's own verdict: its smallest adequate rank (None: no rank of it is adequate)."""

    target_choice: str
    rank: Optional[int]
    gain_share: float = math.nan  # of that rank (or of the choice's best rank when none is adequate)
    trainable_params: float = math.nan
    best_rank: Optional[int] = None  # its rank with the highest gain share
    best_gain_share: float = math.nan
    step: Optional[int] = None  # the last step any of its ranks was judged at (early: successive halving cut it)


def unit_costs(trials: pd.DataFrame) -> dict[tuple, tuple[float, float]]:
    """(target choice, r) -> (trainable params, adapter bytes): the median over its trials that
    reported them (NaN when none did)."""
    if trials is None or trials.empty:
        return {}
    frame = trials.assign(target_choice=trials["target_choice"].fillna("").astype(str) if "target_choice" in trials else "")
    out = {}
    for (choice, r), group in frame.groupby(["target_choice", "r"]):
        values = []
        for column in ("trainable_params", "adapter_bytes"):
            col = pd.to_numeric(group[column], errors="coerce") if column in group else pd.Series(dtype=float)
            col = col[col > 0]
            values.append(float(col.median()) if len(col) else math.nan)
        out[(str(choice), int(r))] = tuple(values)
    return out


def cost_key(e, several: bool) -> tuple:
    """Cheaper first: trainable parameters (several target choices; unknown counts last), then the
    smaller rank, then the choice's label."""
    params = e.trainable_params if math.isfinite(e.trainable_params) else math.inf
    return (params, e.r, e.target_choice) if several else (e.r, e.target_choice)


def choice_verdicts(units: list) -> list[ChoiceVerdict]:
    """Each target choice's smallest adequate rank (judged against the best unit of any choice)."""
    out = []
    for choice in sorted({e.target_choice for e in units}):
        mine = [e for e in units if e.target_choice == choice]
        best = max(mine, key=lambda e: (e.gain_share if math.isfinite(e.gain_share) else -math.inf, -e.r))
        ok = next((e for e in mine if e.adequate), None)
        pick = ok or best
        out.append(ChoiceVerdict(choice, ok.r if ok else None, pick.gain_share, pick.trainable_params, best.r, best.gain_share,
                                 max(e.evidence_step for e in mine)))
    return out


CLOSE = 2.0  # a cheaper unit whose missing gain share is within CLOSE x tolerance is named as a close call


def close_calls(rec, chosen) -> list[str]:
    """Cheaper units than the verdict that fell just short of the rule (gain rule only): budgets decide
    these (an exact-size adapter can converge slower than a larger one), so say so."""
    if rec.rule_name != "gain":
        return []
    out = []
    for e in sorted(rec.units, key=lambda e: cost_key(e, True)):
        if cost_key(e, True) >= cost_key(chosen, True) or e.adequate or not math.isfinite(e.gain_share):
            continue
        short = (1 - rec.tolerance) - e.gain_share
        if short <= (CLOSE - 1) * rec.tolerance:
            out.append(f"{rec.unit_name(e.target_choice, e.r)}: {e.gain_share:.0%} of the best gain, {100 * short:.0f} points short "
                       f"of {1 - rec.tolerance:.0%} at step {e.evidence_step}, and cheaper ({_params(e.trainable_params)} vs "
                       f"{_params(chosen.trainable_params)} parameters): train longer to check")
    return out


def _bytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _params(n: float) -> str:
    if not math.isfinite(n):
        return "?"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else (f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}")


def reason_cheapest(rec, chosen, at: str) -> str:
    """'mlp r=4 is the cheapest adequate adapter (4.6k parameters): ...; on attention no rank is adequate ...'."""
    name = rec.unit_name(chosen.target_choice, chosen.r)
    ref = rec.unit_name(chosen.ref_choice, chosen.ref_rank)
    size = f", {_bytes(chosen.adapter_bytes)}" if math.isfinite(chosen.adapter_bytes) else ""
    if rec.rule_name == "gain":
        how = (f"recovers {chosen.gain_share:.1%} of {ref}'s gain over the untouched base at step {chosen.evidence_step} "
               f"(at least {1 - rec.tolerance:.0%} needed)" if (chosen.target_choice, chosen.r) != (chosen.ref_choice, chosen.ref_rank)
               else f"is the best adapter at step {chosen.evidence_step}")
    else:
        how = f"is within the tolerance of {ref} at step {chosen.evidence_step} ({chosen.gap:+.2%})"
    def when(v: ChoiceVerdict) -> str:
        return f" (judged at step {v.step}, where it was cut)" if v.step is not None and v.step < chosen.evidence_step else ""

    per_choice = "; ".join(
        f"on {v.target_choice} the smallest adequate rank is {v.rank}{when(v)}" if v.rank is not None
        else f"on {v.target_choice} no rank is adequate{when(v)} (best: r={v.best_rank}, {v.best_gain_share:.0%})"
        for v in rec.choices)
    return (f"{name}{at} is the cheapest adequate adapter ({_params(chosen.trainable_params)} trainable parameters{size}): it {how}; "
            f"{per_choice}")
