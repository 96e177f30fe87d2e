"""Diagnosis in plain words: what the results say about the grid, the training and the answer.

Each check is a small pure function of the selection result and the tables; `diagnose` runs them
all. The signs (from practice):
- overfitting: eval loss rising while train loss falls (the best eval step well before the last);
- rank does not matter: every rank within tolerance -> take the smallest;
- grid too small: the largest rank is the only adequate one (and still improving) -> extend upward;
- grid too large: the best rank sits far below the largest, or the smallest rank already
  suffices -> drop the big ranks, or extend downward;
- a recommendation judged before max_steps (the scheduler stopped it): confirm, and train it fully;
- a smaller rank stopped early only narrowly outside the tolerance: re-run it for the full budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from lora_rank_search.analysis.selection import Recommendation, trial_curves
from lora_rank_search.contract.arms import format_lr


OVERFIT_RISE = 0.5  # eval loss above its best by more than this many tolerances (train loss falling): overfitting


@dataclass
class Finding:
    """One diagnosis: a short kind tag (for scripts) and a sentence (for people)."""

    kind: str
    text: str


def _overfitting(rec: Recommendation, trials: pd.DataFrame, history: pd.DataFrame, tol: float) -> list[Finding]:
    out = []
    if history.empty or "eval_loss" not in history:
        return out
    curves = rec.curves if rec.curves is not None else trial_curves(trials, history)
    for trial_id, c in curves.groupby("trial_id"):
        c = c.sort_values("step")
        best_i = c["eval_loss"].idxmin()
        best, last = c.loc[best_i], c.iloc[-1]
        if best["step"] >= last["step"] or last["eval_loss"] <= best["eval_loss"] * (1 + OVERFIT_RISE * max(tol, 1e-9)):
            continue
        h = history[(history["trial_id"] == trial_id)].set_index("step")
        train_text = ""
        if "train_loss" in h and best["step"] in h.index and last["step"] in h.index:
            t_best, t_last = float(h.loc[best["step"], "train_loss"]), float(h.loc[last["step"], "train_loss"])
            if not t_last < t_best:
                continue  # both rose: not the overfitting sign
            train_text = f" while train loss kept falling ({t_best:.4f} -> {t_last:.4f})"
        rise = last["eval_loss"] / best["eval_loss"] - 1
        out.append(Finding("overfitting", (
            f"r={int(c['r'].iloc[0])} (seed {int(c['seed'].iloc[0])}) overfits: eval loss rose {rise:.1%} from its best at "
            f"step {int(best['step'])} to step {int(last['step'])}{train_text}. The selection uses each trial's best "
            f"checkpoint; for the final run use fewer steps, more data, more dropout or a lower learning rate."
        )))
    return out


def _still_improving(history: pd.DataFrame, trial_ids: list, tol: float) -> bool:
    """True if the last evaluation of any of these trials improved on the previous one by > tol/2."""
    for trial_id in trial_ids:
        c = history[history["trial_id"] == trial_id].sort_values("step")["eval_loss"].dropna()
        if len(c) >= 2 and c.iloc[-1] < c.iloc[-2] * (1 - tol / 2):
            return True
    return False


def _grid(rec: Recommendation, history: pd.DataFrame) -> list[Finding]:
    ranks = [e.r for e in rec.ranks]
    if len(ranks) == 1:
        return [Finding("single-rank", f"Only one rank (r={ranks[0]}) has results: there is nothing to compare it with. "
                        "Search at least three ranks around it (e.g. r/2, r, 2r).")]
    out = []
    adequate = [e.r for e in rec.ranks if e.adequate]
    smallest, largest = min(ranks), max(ranks)
    if len(adequate) == len(ranks):
        out.append(Finding("rank-does-not-matter", (
            f"Rank does not matter here: every rank from {smallest} to {largest} is within the tolerance of the best "
            f"({_spread(rec)}). Take the smallest, r={smallest}; an even smaller rank may do as well."
        )))
        return out
    if rec.rank == largest and not any(e.overtaken_by for e in rec.ranks):
        top = rec.evidence(largest)
        improving = _still_improving(history, top.trial_ids, rec.relative_tolerance)
        out.append(Finding("grid-too-small", (
            f"The grid may be too small: only the largest rank, r={largest}, is adequate"
            + (", and its eval loss was still improving at its last evaluation" if improving else "")
            + f". Extend the grid upward (e.g. r={2 * largest}, {4 * largest}) before trusting r={largest} as the answer."
        )))
    elif rec.rank == smallest:
        out.append(Finding("extend-downward", (
            f"The smallest rank in the grid, r={smallest}, is already adequate: a smaller rank may suffice "
            f"(try r={max(1, smallest // 2)}{', ' + str(max(1, smallest // 4)) if smallest >= 4 else ''})."
        )))
    if rec.best_rank is not None and rec.rank is not None and largest >= 4 * max(rec.best_rank, rec.rank):
        wasted = [r for r in ranks if r > 2 * max(rec.best_rank, rec.rank)]
        if wasted:
            out.append(Finding("grid-too-large", (
                f"The grid is larger than needed: the best rank is r={rec.best_rank}, and "
                f"{', '.join(f'r={r}' for r in wasted)} add{'s' if len(wasted) == 1 else ''} nothing within the tolerance; "
                f"leave {'it' if len(wasted) == 1 else 'them'} out of the next search to save compute."
            )))
    return out


def _spread(rec: Recommendation) -> str:
    worst = max(rec.ranks, key=rec.shortfall)
    if rec.rule_name == "gain" and math.isfinite(worst.gain_share):
        return f"the smallest share of the best gain: {worst.gain_share:.1%}"
    return f"largest gap {max(e.gap for e in rec.ranks):+.2%}"


def _judged_early(rec: Recommendation, trials: pd.DataFrame, history: pd.DataFrame) -> list[Finding]:
    chosen = rec.evidence(rec.rank) if rec.rank is not None else None
    if chosen is None or not chosen.stopped_early:
        return []
    max_steps = int(pd.to_numeric(trials["max_steps"], errors="coerce").max()) if "max_steps" in trials else None
    text = (
        f"r={rec.rank} was judged at step {chosen.evidence_step}"
        + (f" of {max_steps}" if max_steps else "")
        + " (the scheduler stopped it, or the trial was interrupted): at that step it was within the tolerance of the best rank "
        f"that got as far. Its adapter is under-trained; train r={rec.rank} for the full budget before using it, and "
        f"re-check with `scheduler.type: none` on ranks {rec.rank} and {2 * rec.rank} if the decision matters."
    )
    widening = _gap_widening(rec, history)
    return [Finding("judged-early", text + widening)]


NEAR_MISS = 3.0  # a smaller rank cut early within this many tolerances of the best is worth a re-check


def _cut_early(rec: Recommendation) -> list[Finding]:
    """Smaller ranks judged before the recommendation's step, and only narrowly outside the tolerance.

    Early in training a larger LoRA learns faster (with alpha = 2r its updates span more
    directions from the first step), so an early gap overstates what a smaller rank reaches later.
    """
    chosen = rec.evidence(rec.rank) if rec.rank is not None else None
    if chosen is None:
        return []
    near = [e for e in rec.ranks if e.r < chosen.r and not e.adequate and e.evidence_step < chosen.evidence_step
            and not e.overtaken_by and rec.shortfall(e) <= NEAR_MISS * max(rec.tolerance, 1e-9)]
    if not near:
        return []
    parts = ", ".join(f"r={e.r} ({_standing(rec, e)} at step {e.evidence_step})" for e in near)
    return [Finding("smaller-rank-cut-early", (
        f"Smaller rank(s) were stopped early only narrowly outside the tolerance: {parts}, while r={chosen.r} was judged at "
        f"step {chosen.evidence_step}. Larger ranks learn faster at first, so an early gap overstates the final one: re-run "
        f"r={near[-1].r} for the full budget (scheduler.type: none, or a larger grace_period) before settling on r={chosen.r}."
    ))]


def _unopposed(rec: Recommendation) -> list[Finding]:
    """The recommendation reached its step alone: every costlier unit was cut earlier, close behind."""
    chosen = rec.evidence(rec.rank, rec.target_choice if rec.several_choices else None) if rec.rank is not None else None
    if chosen is None or (chosen.ref_choice, chosen.ref_rank) != (chosen.target_choice, chosen.r):
        return []
    others = [e for e in rec.units if e is not chosen]
    if any(e.evidence_step >= chosen.evidence_step for e in others):
        return []  # someone else got as far: it was opposed
    # an unstable unit (worse than the base at the end, or diverged) is no challenger that may pull ahead
    dearer = [e for e in others if not e.unstable
              and (e.trainable_params > chosen.trainable_params if rec.several_choices else e.r > chosen.r)]
    close = [e for e in dearer if not math.isfinite(e.gain_share) or e.gain_share >= 1 - NEAR_MISS * rec.tolerance]
    if not close:
        return []
    name = rec.unit_name(chosen.target_choice, chosen.r)
    parts = ", ".join(f"{rec.unit_name(e.target_choice, e.r)} ({_standing(rec, e)} at step {e.evidence_step})" for e in close)
    return [Finding("unopposed", (
        f"{name} is the best at step {chosen.evidence_step} because nothing else got that far: the costlier "
        f"{parts} were cut earlier, close behind it. A larger adapter may still pull ahead with training, which would "
        f"move the yardstick; to be sure, train the largest one to the end beside {name} (scheduler.type: none on the "
        "two, or a larger scheduler.grace_period)."
    ))]


def _confirmed(rec: Recommendation) -> list[Finding]:
    """What the confirmations (units trained on in the search's idle capacity) showed, or why none ran."""
    from lora_rank_search.analysis.confirmations import summary

    text = summary(rec)
    if not text:
        return []
    if rec.confirmations and rec.unopposed_without_confirmations:
        # the verdict without the confirmations (another unit where they changed it) stood alone at its step
        w = rec.without_confirmations if rec.verdict_changed and rec.without_confirmations else {}
        alone = rec.unit_name(w.get("target_choice", ""), w["rank"]) if w else rec.unit_name(rec.target_choice, rec.rank)
        text += f"; without them {alone} would have been judged alone at its step"
    if text.startswith(("confirmed", "nothing")):  # not a unit's name ('r=4 ...', 'attention r=4 ...'): kept as written
        text = text[0].upper() + text[1:]
    return [Finding("confirmed" if rec.confirmations else "not-confirmed", text + ".")]


def _overtaken(rec: Recommendation) -> list[Finding]:
    """Units stopped where a cheaper unit was as good, which then trained on and fell short."""
    gone = [e for e in rec.units if e.overtaken_by]
    if not gone:
        return []
    by = {}
    for e in gone:
        by.setdefault((e.overtaken_by, e.evidence_step), []).append(e)
    parts = []
    for (name, step), units in sorted(by.items(), key=lambda kv: kv[0][1]):
        cheaper = next((q for q in rec.units if rec.unit_name(q.target_choice, q.r) == name), None)
        later = f"{_standing(rec, cheaper)} at step {cheaper.evidence_step}" if cheaper else "short of adequate later"
        names = ", ".join(rec.unit_name(e.target_choice, e.r) for e in units)
        parts.append(f"{names} stopped at step {step}, where {name} was at least as good; {name} trained on and fell short "
                     f"({later})")
    chosen = rec.unit_name(rec.target_choice, rec.rank)
    return [Finding("not-established", (
        "Not established: " + "; ".join(parts) + ". Their standing where they stopped shows nothing the cheaper unit's "
        f"did not, so they are not counted as adequate, and {chosen} is the cheapest unit shown adequate. To tell them "
        "apart, train them for the full budget (scheduler.type: none) or compare later (a larger scheduler.grace_period)."
    ))]


def _standing(rec: Recommendation, e) -> str:
    """How a rank stood where it was judged, in the rule's terms."""
    if rec.rule_name == "gain" and math.isfinite(e.gain_share):
        return f"{e.gain_share:.1%} of the best gain"
    return f"{e.gap:+.2%}"


def _gap_widening(rec: Recommendation, history: pd.DataFrame) -> str:
    """' Its gap to the reference widened ...' if it grew over the recommended rank's last two steps."""
    chosen = rec.evidence(rec.rank)
    ref = rec.evidence(chosen.ref_rank, chosen.ref_choice if rec.several_choices else None)
    if ref is None or ref is chosen:
        return ""
    def at(trial_ids, step):
        values = history[history["trial_id"].isin(trial_ids) & (history["step"] <= step)].groupby("trial_id")["eval_loss"].min()
        return float(values.mean()) if len(values) == len(trial_ids) else math.nan
    steps = sorted(history[history["trial_id"].isin(chosen.trial_ids)]["step"].unique())
    steps = [s for s in steps if s <= chosen.evidence_step]
    if len(steps) < 2:
        return ""
    before, now = steps[-2], steps[-1]
    g0 = at(chosen.trial_ids, before) / at(ref.trial_ids, before) - 1
    g1 = at(chosen.trial_ids, now) / at(ref.trial_ids, now) - 1
    if math.isfinite(g0) and math.isfinite(g1) and g1 > g0 + 1e-9:
        return f" Caution: its gap to r={ref.r} widened from {g0:+.2%} at step {before} to {g1:+.2%} at step {now}."
    return ""


def _noise(rec: Recommendation) -> list[Finding]:
    noisy = [e for e in rec.ranks if len(e.seeds) >= 2 and e.se > rec.relative_tolerance * abs(e.loss)]
    if not noisy:
        return []
    worst = max(noisy, key=lambda e: e.se / abs(e.loss))
    return [Finding("noisy-seeds", (
        f"Seed-to-seed noise exceeds the tolerance for r={', '.join(str(e.r) for e in noisy)} (r={worst.r}: standard "
        f"error {worst.se / abs(worst.loss):.2%} of its loss), so the one-standard-error rule, not the tolerance, decided. "
        "More seeds or a larger eval set would sharpen the answer."
    ))]


def _unstable(rec: Recommendation, trials: pd.DataFrame | None = None) -> list[Finding]:
    """Ranks whose every learning rate ended worse than the untouched base, or diverged (a training
    loss or evaluation that became non-finite: the trial's status says `diverged`)."""
    bad = [e for e in rec.ranks if e.unstable]
    if not bad:
        return []
    diverged = set()
    if trials is not None and not trials.empty and {"status", "r"} <= set(trials.columns):
        statuses = trials.groupby("r")["status"].agg(set)
        diverged = {e.r for e in bad if statuses.get(e.r) == {"diverged"}}
    rates = ", ".join(sorted({format_lr(a.lr) for e in bad for a in e.arms if math.isfinite(a.lr)}, key=float))
    what = []
    for label, ranks in (("diverged (its training turned non-finite)", [e for e in bad if e.r in diverged]),
                         ("ended worse than the untouched base", [e for e in bad if e.r not in diverged])):
        if ranks:
            what.append(f"{', '.join(f'r={e.r}' for e in ranks)} {label}")
    return [Finding("unstable", (
        f"Unstable: {'; '.join(what)} at every learning rate tried"
        + (f" ({rates})" if rates else "") + f"; the evidence for {'it' if len(bad) == 1 else 'them'} is its best loss before "
        f"it got worse. Lower the learning rate for {', '.join(f'r={e.r}' for e in bad)} (add smaller values to "
        "train.learning_rate) or use a fixed lora_alpha."
    ))]


def _overfit_after_choice(rec: Recommendation, history: pd.DataFrame) -> list:
    """Ranks whose learning rate was chosen at an early rung (the others cut there) and whose chosen
    arm then overfit: its eval loss at the end is above its best by more than the tolerance."""
    out = []
    if history is None or history.empty or "eval_loss" not in history:
        return out
    for e in rec.ranks:
        chosen = next((a for a in e.arms if a.lr == e.lr), None)
        if chosen is None or len(e.arms) < 2 or chosen.compared_step >= e.evidence_step:
            continue
        last = history[history["trial_id"].isin(chosen.trial_ids) & history["eval_loss"].notna()]
        if last.empty:
            continue
        final = float(last[last["step"] == last["step"].max()]["eval_loss"].mean())
        if final > chosen.loss * (1 + OVERFIT_RISE * max(rec.relative_tolerance, 1e-9)):
            out.append(e)
    return out


def _early_rate_choice(rec: Recommendation, ranks: list) -> list[Finding]:
    """The rate that led at the first rung went on alone and then overfit (`ranks`, from
    `_overfit_after_choice`): a lower one may end better."""
    if not ranks:
        return []
    step = min(e.arms[0].compared_step for e in ranks)
    rates = sorted({e.lr for e in ranks})
    lower = [lr for lr in rec.learning_rates if lr < max(rates)]
    return [Finding("rate-chosen-early", (
        f"The learning rate of {', '.join(f'r={e.r}' for e in ranks)} was chosen at step {step}, where its rates competed: "
        f"{', '.join(format_lr(lr) for lr in rates)} led there and went on alone, then overfit (its eval loss rose from its "
        "best before the end). A lower rate, cut at that rung, may end better, and with it the verdict may change: "
        "the search cannot tell. Re-run with the lower rates"
        + (f" (train.learning_rate: [{', '.join(format_lr(lr) for lr in lower)}])" if lower else "")
        + " or compare later (a larger scheduler.grace_period)."
    ))]


def _learning_rate_edges(rec: Recommendation, overfit: frozenset = frozenset()) -> list[Finding]:
    """A rank whose best learning rate is the smallest or largest searched: the optimum may lie beyond
    (not said upward for the ranks in `overfit`, whose rate was chosen early and then overfit)."""
    rates = sorted(rec.learning_rates)
    if len(rates) < 2:
        return []
    out = []
    for edge, word, direction in ((rates[0], "smallest", "downward"), (rates[-1], "largest", "upward")):
        ranks = [e.r for e in rec.ranks if len(e.arms) >= 2 and e.lr == edge and not e.unstable
                 and not (direction == "upward" and e.r in overfit)]
        if ranks:
            out.append(Finding(f"lr-edge-{'low' if direction == 'downward' else 'high'}", (
                f"The best learning rate of {', '.join(f'r={r}' for r in ranks)} is the {word} searched ({format_lr(edge)}): "
                f"its optimum may lie beyond the list. Extend train.learning_rate {direction} "
                f"(e.g. {format_lr(edge / 3 if direction == 'downward' else edge * 3)}) to be sure."
            )))
    return out


def diagnose(rec: Recommendation, trials: pd.DataFrame, history: pd.DataFrame) -> list[Finding]:
    """Every finding that applies, most important first."""
    if rec.rank is None:
        failed = int((trials["status"] == "error").sum()) if not trials.empty and "status" in trials else 0
        text = rec.reason + (f" ({failed} trial(s) failed: see error.txt in their folders)." if failed else ".")
        return [Finding("no-signal" if rec.no_signal else "no-result", text)] + _unstable(rec, trials)
    out = _confirmed(rec) + _overtaken(rec) + _unopposed(rec) + _grid(rec, history)
    out += _judged_early(rec, trials, history)
    out += _cut_early(rec)
    out += _unstable(rec, trials)
    overfit = _overfit_after_choice(rec, history)
    out += _early_rate_choice(rec, overfit)
    out += _learning_rate_edges(rec, frozenset(e.r for e in overfit))
    out += _overfitting(rec, trials, history, rec.relative_tolerance)
    out += _noise(rec)
    for note in rec.excluded:
        out.append(Finding("excluded", note + "."))
    return out
