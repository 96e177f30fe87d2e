"""Synchronous successive halving over all ranks at once (`scheduler.type: sha`, the default).

A rank search has few trials (5-8 ranks), all known before it starts. Asynchronous ASHA lets the
first trials to reach a rung through unconditionally (there is nothing to compare them with yet),
so with a handful of trials which ranks survive depends on who arrives first, not on how good
they are, and the early arrivals always train to the end. Successive halving waits until every
rank has reached the rung, keeps the best ceil(n / reduction_factor) ranks and stops the rest, so
each decision compares all ranks at the same step. A rank searched at several learning rates is
scored by its best one, and within a kept rank only the best ceil(m / reduction_factor) of its m
learning rates go on (`contract.arms` names the roles; all seeds of an arm go on or stop together).
With several target choices (`lora.target_modules` as a list), ranks are compared within a choice
and the choices by their best rank: the best ceil(c / reduction_factor) choices go on, and within
each the best ceil(n / reduction_factor) of its ranks. Besides those, a rank whose best arm already
recovers KEEP_SHARE of the best rank's gain over the base model goes on, unless a kept rank that
costs no more (fewer trainable parameters) is at least as good: the verdict wants the cheapest
adequate rank at the end, and an adapter of exactly the rank a task needs learns more slowly than
a larger one, so by loss alone it was often cut at the first rung.
A trial that arrives early is paused when another trial waits for its slot, and resumes from the
checkpoint it reported at the rung; when nothing waits it holds in its worker (model loaded) until
the rung is decided. Once one arm is left it trains to the end without further pauses.

With `confirm` (`scheduler.confirm: tail | full`, see `search.confirm`) a cut arm that may be a
challenger stays paused with its rung checkpoint instead of stopping; when a slot is free (nothing
kept waits for it) the near-miss cheaper unit and the strongest costlier unit train on from there
to max_t (a held one goes on in its live worker). With `tail` they, and every paused cut arm, stop
when the last kept arm ends, so Tune's run ends then; `confirm: off` stops cut arms at once. The
bookkeeping is the `search.confirming.Confirmations` mixin; who is confirmed, `search.confirm`.

The decisions are a pure function of the losses reported at the rungs (`decide`), recomputed at
every event; a rung's survivors are frozen once decided, so a late report cannot undo a stop.
After `--resume` the scheduler reads the rung losses back from each trial's result.json, so the
decisions come out as they would have without the interruption.

Over 400 lines on purpose: the pure decision (`decide`, tested as a state machine) sits beside the
Tune scheduler that feeds it, so the two cannot drift; confirmations are `search.confirming`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Mapping, Optional, Sequence

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from lora_rank_search.contract.arms import arm_of, family_of, unit_of
from lora_rank_search.contract.layout import RESULT_FILE
from lora_rank_search.search.confirming import Confirmations, _controller

logger = logging.getLogger(__name__)

# A unit whose best arm recovers at least this share of the best unit's gain over the base at a rung
# is kept, whatever its place by loss. The verdict asks for the smallest unit recovering 95% at the
# end, and that unit is often behind at an early rung: an adapter of exactly the rank the task needs
# learns more slowly than a larger one (measured on planted tasks: bench/halving_replay.py).
KEEP_SHARE = 0.80
BASE_KEY = "base_eval_loss"  # every trial reports the untouched model's eval loss under this key
COST_KEY = "trainable_params"  # ...and its adapter's size under this one


def halving_rungs(grace_period: int, max_steps: int, reduction_factor: float) -> list[int]:
    """The steps (ascending, all below max_steps) at which ranks are compared:
    ceil(grace_period · reduction_factor^k). Trials evaluate at these steps (besides every
    eval_every), so every rank is compared on a loss measured at the same step."""
    rungs: list[int] = []
    step = float(grace_period)
    while math.ceil(round(step, 6)) < max_steps:
        rung = math.ceil(round(step, 6))
        if not rungs or rung > rungs[-1]:
            rungs.append(rung)
        step *= reduction_factor
    return rungs


def halving_survivors(num_ranks: int, rungs: int, reduction_factor: float) -> list[int]:
    """How many ranks train past each rung (ceil(n / rf) each time, at least 1)."""
    out, n = [], num_ranks
    for _ in range(rungs):
        n = max(1, math.ceil(n / reduction_factor))
        out.append(n)
    return out


def halving_steps(num_ranks: int, grace_period: int, max_steps: int, reduction_factor: float, num_lrs: int = 1,
                  num_choices: int = 1) -> int:
    """Training steps a halving search spends per seed when no trial fails (the grid spends
    num_choices · num_ranks · num_lrs · max_steps); a lone surviving arm skips the remaining rungs.
    Ranks kept for their gain share (KEEP_SHARE) come on top of this."""
    rungs = halving_rungs(grace_period, max_steps, reduction_factor)
    choices, units, per_unit, done, total = num_choices, num_ranks, num_lrs, 0, 0
    for rung in rungs:
        total += choices * units * per_unit * (rung - done)
        done = rung
        if choices * units * per_unit == 1:
            break
        choices = max(1, math.ceil(choices / reduction_factor))
        units = max(1, math.ceil(units / reduction_factor))
        per_unit = max(1, math.ceil(per_unit / reduction_factor))
        if choices * units * per_unit == 1:
            break
    return total + choices * units * per_unit * (max_steps - done)


@dataclass(frozen=True)
class Decision:
    """Where every trial stands.

    Attributes:
        level: trial -> how many rungs its rank has passed; it may train up to rungs[level]
            (to the end when level == len(rungs)).
        stopped: trials whose rank was cut at a rung.
        survivors: rung index -> the ranks that passed it (only for decided rungs).
    """

    level: dict
    stopped: frozenset
    survivors: dict


def decide(
    groups: Mapping[Any, Hashable],
    scores: Mapping[Any, Mapping[int, float]],
    ended: Iterable[Any],
    rungs: Sequence[int],
    reduction_factor: float,
    frozen: Optional[Mapping[int, Sequence[Hashable]]] = None,
    arms: Optional[Mapping[Any, Hashable]] = None,
    families: Optional[Mapping[Any, Hashable]] = None,
    base: Optional[Mapping[Any, float]] = None,
    costs: Optional[Mapping[Any, float]] = None,
    keep_share: float = KEEP_SHARE,
) -> Decision:
    """Successive halving as a pure function of what was reported.

    Args:
        groups: trial -> its unit (the rank: what is kept or cut as a whole; see `contract.arms`).
        scores: trial -> {rung step: eval loss reported there} (NaN/inf for a failed evaluation).
        ended: trials that ended on their own (finished, failed for good): not waited for.
        rungs: the rung steps, ascending.
        reduction_factor: keep the best ceil(n / reduction_factor) units at each rung, and within
            each kept unit the best ceil(m / reduction_factor) of its m arms.
        frozen: rung index -> surviving arms already decided (kept as they are).
        arms: trial -> its arm (unit + learning rate; seeds of an arm move together). Default:
            the unit itself (one arm per unit).
        families: trial -> its unit's target choice. Ranks are compared within a choice; choices
            are compared by their best rank (the best ceil(c / reduction_factor) of c choices go
            on, and within each the best ceil(n / reduction_factor) of its n ranks). Default: one.
        base: trial -> the untouched base model's eval loss (`base_eval_loss`). With it, a unit
            whose best arm recovers at least KEEP_SHARE of the best unit's gain over the base at
            the rung goes on too, whatever its place (its best 1/rf arms; its target choice with
            it), unless a kept unit that costs no more is at least as good: the verdict's answer,
            the cheapest adequate unit, is often not among the fastest learners at an early rung.
        costs: trial -> its unit's trainable parameters (`trainable_params`): what "costs no
            more" means above. Default: a smaller rank of the same target choice.
        keep_share: the gain share that keeps a unit (default KEEP_SHARE; other values are for
            `bench/halving_replay.py --keep-share`, not a setting of the search).

    A rung is decided once every live trial of every surviving arm has reported there. An arm's
    score is its mean loss over the seeds that reported a finite one; a unit's score is its best
    arm's (each rank at its best learning rate). Ties go to the smaller unit, then the smaller arm.
    `Decision.survivors` holds arms.
    """
    frozen = frozen or {}
    arms = dict(arms) if arms is not None else dict(groups)
    unit = {arms[t]: groups[t] for t in groups}
    family = {groups[t]: (families or {}).get(t, "") for t in groups}
    base_loss = _base_loss(base)
    cost = {groups[t]: float(c) for t, c in (costs or {}).items() if t in groups and c is not None and math.isfinite(float(c))}
    ended = set(ended)
    level = {t: 0 for t in groups}
    stopped: set = set()
    survivors: dict = {}
    alive = sorted(set(arms.values()))
    for k, rung in enumerate(rungs):
        if len(alive) <= 1:
            break
        members = [t for t in groups if arms[t] in alive]
        arrived = [t for t in members if rung in scores.get(t, {})]
        if k in frozen:
            keep = list(frozen[k])
        elif any(t not in arrived and t not in ended for t in members):
            break  # someone is still on the way to this rung
        else:
            keep = _keep(alive, arrived, arms, unit, scores, rung, reduction_factor, family, base_loss, cost, first=k == 0,
                         keep_share=keep_share)
        survivors[k] = keep
        stopped |= {t for t in members if arms[t] not in keep}
        alive = [a for a in alive if a in keep]
        for t in groups:
            if arms[t] in alive:
                level[t] = k + 1
    if len(alive) <= 1:  # a lone arm has nobody to be compared with: it trains to the end
        for t in groups:
            if arms[t] in alive:
                level[t] = len(rungs)
    return Decision(level, frozenset(stopped), survivors)


def _top(items, score, reduction_factor) -> list:
    """The best ceil(n / reduction_factor) of items by (score, item) (at least one)."""
    ranked = sorted(items, key=lambda i: (score[i], i))
    return ranked[: max(1, math.ceil(len(ranked) / reduction_factor))]


def _base_loss(base: Optional[Mapping[Any, float]]) -> Optional[float]:
    """The base model's loss (the mean of the finite values reported; None without one)."""
    values = [float(v) for v in (base or {}).values() if v is not None and math.isfinite(float(v))]
    return sum(values) / len(values) if values else None


def _keep(alive, arrived, arms, unit, scores, rung, reduction_factor, family=None, base_loss=None, cost=None,
          first: bool = False, keep_share: float = KEEP_SHARE) -> list:
    """The arms that pass a rung: the best 1/rf of the target choices (each at its best unit), within
    each of those the best 1/rf of its units (each at its best arm), and within each of those the
    best 1/rf of its arms; besides, every unit whose gain share at the rung is at least KEEP_SHARE
    (with its best 1/rf arms) unless a kept unit that costs no more is at least as good; and at the
    first rung, every arm of the leading unit within KEEP_SHARE of the best gain. Arms without a
    finite loss there are cut. With one choice: units, arms."""
    family, cost = family or {}, cost or {}
    means = {}
    for a in alive:
        losses = [scores[t][rung] for t in arrived if arms[t] == a and math.isfinite(scores[t][rung])]
        if losses:
            means[a] = sum(losses) / len(losses)
    best: dict = {}
    for a, loss in means.items():
        best[unit[a]] = min(best.get(unit[a], math.inf), loss)
    choice_best: dict = {}
    for u, loss in best.items():
        f = family.get(u, "")
        choice_best[f] = min(choice_best.get(f, math.inf), loss)
    units = []
    for f in _top(choice_best, choice_best, reduction_factor):
        units += _top([u for u in best if family.get(u, "") == f], best, reduction_factor)
    if base_loss is not None and best:
        gain = base_loss - min(best.values())
        if gain > 0:
            # ...and those within KEEP_SHARE of the best gain, cheapest first, unless a kept unit
            # that costs no more is at least as good (then this one cannot be the answer)
            def no_dearer(v, u) -> bool:
                if v in cost and u in cost:
                    return cost[v] <= cost[u]
                return family.get(v, "") == family.get(u, "") and v < u

            for u in sorted(best, key=lambda u: (cost.get(u, math.inf), u)):
                if u not in units and base_loss - best[u] >= keep_share * gain and not any(
                        v != u and no_dearer(v, u) and best[v] <= best[u] for v in units):
                    units.append(u)
    close: set = set()
    if first and base_loss is not None and means and base_loss - min(means.values()) > 0:
        # The fastest learning rate at the first rung is not always the best at the end (a high rate
        # can lead early and overfit later): the leading unit keeps every rate that is close.
        gain = base_loss - min(means.values())
        lead = unit[min(means, key=lambda a: (means[a], a))]
        close = {a for a, loss in means.items() if unit[a] == lead and base_loss - loss >= keep_share * gain}
    keep = []
    for u in units:
        top = _top([a for a in means if unit[a] == u], means, reduction_factor)
        keep += top + sorted(a for a in close if unit[a] == u and a not in top)
    return keep


class SuccessiveHalving(Confirmations, TrialScheduler):
    """Synchronous successive halving of ranks, on `time_attr` (optimizer steps).

    Args:
        time_attr: the result key that counts progress (optimizer steps here).
        max_t: steps at which every trial ends.
        rungs: steps at which ranks are compared (see `halving_rungs`), all below max_t.
        reduction_factor: keep the best 1/reduction_factor of the ranks at each rung (and of
            each kept rank's learning rates).
        score_attr: the result key ranks are compared on (default: the metric). The search uses
            best_eval_loss, the best so far, as the selection rule does (and Tune's kept checkpoint).
        metric, mode: set by TuneConfig; a non-finite metric ends the trial.
        confirm: off | tail | full (`search.confirm`): cut arms that may be challengers stay paused,
            and free slots train them on to max_t.
        max_concurrent: at most this many trials running at once (`resources.max_concurrent`). The
            scheduler caps them itself, with every trial created up front: Tune's own cap creates a
            trial only when one ends, so a rung would be decided among the first trials alone and
            the later ones cut before they trained.
    """

    def __init__(self, time_attr: str, max_t: int, rungs: Sequence[int], reduction_factor: float,
                 score_attr: Optional[str] = None,
                 metric: Optional[str] = None, mode: Optional[str] = None, confirm: str = "off",
                 max_concurrent: Optional[int] = None):
        super().__init__()
        self._confirm = confirm
        self._max_concurrent = int(max_concurrent) if max_concurrent else None
        self._time_attr = time_attr
        self._score_attr = score_attr
        self._max_t = int(max_t)
        self._rungs = [int(r) for r in rungs]
        self._rf = float(reduction_factor)
        self._metric, self._mode = metric, mode
        self._trials: list[Trial] = []
        self._scores: dict[str, dict[int, float]] = {}
        self._base: dict[str, float] = {}  # trial -> the base model's eval loss it reported
        self._cost: dict[str, float] = {}  # trial -> its adapter's trainable parameters
        self._frozen: dict[int, list] = {}
        self._held: set[str] = set()  # trials holding at a rung in their live worker (nothing waited for the slot)
        self._settling, self._unsettled = False, False  # _settle: in progress; a trial ended inside it
        self._challengers: dict[str, dict] = {}  # trial -> {role, unit, from_step}: cut, trained on as a confirmation
        self._filled: dict[str, int] = {}  # challenger role -> the rung index its unit was cut at (given again at a later rung)
        self._ending: set[str] = set()  # trials being stopped (stop_trial calls back into on_trial_complete)
        self._why_none = ""  # why nothing was confirmed (the last reason seen)
        self._kept_over = False  # the last kept arm has ended (tail: confirmations end too)
        self._candidate_arms: set = set()  # cut arms that may still be challengers (kept paused)
        self._done: set[str] = set()  # trials that completed (Tune calls on_trial_complete before marking them)

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], **spec) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric = self._metric or metric
        self._mode = self._mode or mode
        return True

    # ---- bookkeeping

    def _loss(self, result: Mapping, key: Optional[str] = None) -> float:
        """The result's value at key (default: the score attribute), as a loss (lower is better)."""
        value = result.get(key or self._score_attr or self._metric, math.nan)
        value = float(value) if isinstance(value, (int, float)) else math.nan
        return -value if self._mode == "max" else value

    def _record(self, trial: Trial, step: int, loss: float, result: Mapping) -> None:
        """The first report at or after a rung is the trial's loss there (never overwritten)."""
        for key, into in ((BASE_KEY, self._base), (COST_KEY, self._cost)):
            value = result.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                into[trial.trial_id] = float(value)
        mine = self._scores.setdefault(trial.trial_id, {})
        if trial.trial_id in self._challengers:
            return  # a confirmation's later losses are the analysis's, not the halving's
        for rung in self._rungs:
            if step >= rung and rung not in mine:
                mine[rung] = loss

    def _decision(self) -> Decision:
        ended = [t.trial_id for t in self._trials if t.status in (Trial.TERMINATED, Trial.ERROR)]
        groups = {t.trial_id: unit_of(t.config) for t in self._trials}
        arms = {t.trial_id: arm_of(t.config) for t in self._trials}
        families = {t.trial_id: family_of(t.config) for t in self._trials}
        base = {t: b for t, b in self._base.items() if t in groups}
        costs = {t: c for t, c in self._cost.items() if t in groups}
        d = decide(groups, self._scores, ended, self._rungs, self._rf, self._frozen, arms, families, base, costs)
        self._frozen.update(d.survivors)
        return d

    def _waiting(self, trial: Trial, d: Decision) -> bool:
        """At (or past) a rung whose decision is still open."""
        level = d.level[trial.trial_id]
        return level < len(self._rungs) and trial.last_result.get(self._time_attr, 0) >= self._rungs[level]

    def _stop_cut_trials(self, tune_controller, d: Decision) -> None:
        """Stop paused or queued trials whose rank was cut. A trial still saving its pause
        checkpoint is left for the next call (stopping it mid-save can leave it PAUSED)."""
        controller = _controller(tune_controller)
        for trial in self._trials:
            if trial.trial_id in d.stopped and trial.status in (Trial.PAUSED, Trial.PENDING) and not trial.is_saving:
                if self._resumable(trial, d):
                    # kept for a confirmation: paused with its rung checkpoint (a pending one, back from
                    # --resume, would otherwise be started by Tune whether a slot is free or not)
                    if trial.status == Trial.PENDING and trial not in getattr(controller, "_staged_trials", ()):
                        controller._set_trial_status(trial, Trial.PAUSED)
                    continue
                tune_controller.stop_trial(trial)
                # Ray 2.60 does not mark a trial without an actor for the next experiment snapshot,
                # which would keep it PAUSED there (and resume it on --resume).
                controller = _controller(tune_controller)
                if hasattr(controller, "_mark_trial_to_checkpoint"):
                    controller._mark_trial_to_checkpoint(trial)

    def _others_wait(self, tune_controller, d: Decision) -> bool:
        """A trial needs a slot: one queued, one paused whose arm passed its rung, or one the
        search has not created yet."""
        return self._unmade(tune_controller) or bool(self._kept_waiting(d))

    def _unmade(self, tune_controller) -> bool:
        """The search has trials still to create."""
        search_alg = getattr(_controller(tune_controller), "search_alg", None)
        return search_alg is not None and not search_alg.is_finished()

    def _kept_waiting(self, d: Decision) -> list:
        """Trials not cut that wait for a slot: queued, or paused with their arm past its rung."""
        return [t for t in self._trials if t.trial_id not in d.stopped
                and (t.status == Trial.PENDING or (t.status == Trial.PAUSED and not self._waiting(t, d)))]

    def _release_held(self, tune_controller, d: Decision) -> None:
        """Trials holding at a rung: stop those cut, let those that passed train on, and pause the
        rest when another trial needs the slot (it resumes from the rung's checkpoint)."""
        controller = _controller(tune_controller)
        actions = []
        for trial in [t for t in self._trials if t.trial_id in self._held]:
            if trial.status != Trial.RUNNING:
                self._held.discard(trial.trial_id)
            elif trial.is_saving:
                # Its rung checkpoint is still on its way to Tune's state: a stop now would drop it
                # (the trial would end, or come back from --resume, without it). The next call acts:
                # Tune asks `choose_trial_to_run` at every step of its loop.
                continue
            elif trial.trial_id in self._challengers:
                actions.append((trial, "train"))  # confirmed in place, in its live worker
            elif trial.trial_id in d.stopped and self._resumable(trial, d):
                actions.append((trial, "pause"))  # resumable from its rung checkpoint
            elif trial.trial_id in d.stopped:
                actions.append((trial, "stop"))
            elif not self._waiting(trial, d):
                actions.append((trial, "train"))
            elif self._others_wait(tune_controller, d):
                actions.append((trial, "pause"))  # its rung checkpoint is saved
        self._hand_over(tune_controller, d, sum(action != "train" for _, action in actions))
        for trial, action in actions:
            self._held.discard(trial.trial_id)
            if action == "train":
                controller._schedule_trial_train(trial)
            elif action == "pause":
                tune_controller.pause_trial(trial, should_checkpoint=False)
            else:
                tune_controller.stop_trial(trial)

    def _hand_over(self, tune_controller, d: Decision, leaving: int) -> None:
        """`leaving` trials are about to give up their workers: queue as many kept trials that wait
        paused for a slot first, as Tune queues the trial `choose_trial_to_run` returns, so the
        workers go to them. Tune keeps a freed worker for reuse (`reuse_actors`) only for a trial it
        has queued, plus one spare: when a rung decision cut two running trials while two kept
        trials waited paused, one kept trial took a worker and the other started a new process
        (imports, CUDA context, the base's load) while the second worker was shut down."""
        controller = _controller(tune_controller)
        if leaving <= 0 or not all(hasattr(controller, name) for name in _STAGING):
            return
        ready = [t for t in self._trials if t.status == Trial.PAUSED and t.trial_id not in d.stopped
                 and not self._waiting(t, d)]
        room = self.room()
        for trial in ready[:leaving if room is None else min(leaving, room + leaving)]:
            # Ray 2.60's TuneController._maybe_add_actors, step 1, for a trial the scheduler chose
            controller._set_trial_status(trial, Trial.PENDING)
            controller._staged_trials.add(trial)
            controller._actor_cache.increase_max(trial.placement_group_factory)
            controller._schedule_trial_actor(trial)

    def _settle(self, tune_controller, reporting: Optional[Trial] = None) -> Decision:
        """Decide, then act on it. `reporting`: the trial whose result is being handled (it holds
        its worker: if it was just cut and is chosen to be confirmed, it goes on in place).

        Not re-entered: Tune's `stop_trial` calls `on_trial_complete`, which would decide and act
        again inside this pass, and this pass would then act a second time on what the inner one
        did (a held survivor got two train calls: reports ran ahead of their checkpoints' saves,
        and Tune registered the newest checkpoint once per queued save). An ending inside the pass
        makes it go round once more instead."""
        if self._settling:
            self._unsettled = True
            return self._decision()
        self._settling = True
        try:
            for _ in range(len(self._trials) + 2):  # each further round follows a trial that ended
                self._unsettled = False
                d = self._decision()
                if self._confirm != "off":
                    self._confirmations(tune_controller, d, reporting)
                self._stop_cut_trials(tune_controller, d)
                self._release_held(tune_controller, d)
                if not self._unsettled:
                    break
            return d
        finally:
            self._settling = False

    # ---- TrialScheduler interface

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self._trials.append(trial)
        if self.room() is not None and trial.status == Trial.PENDING:
            # Under max_concurrent every trial waits paused until `choose_trial_to_run` gives it a
            # slot: Tune starts every pending trial that resources allow, whatever the scheduler says
            # (a trial starts from its checkpoint, or from scratch without one).
            trial.set_status(Trial.PAUSED)
        last = trial.last_result.get(self._time_attr)
        if not last:
            return
        # Restored by --resume: read back its rung losses. One that had reported at a rung comes
        # back paused (Tune re-queues it as pending, and a pending trial would train past the
        # rung before the decision); the decision restarts or stops it.
        reports = [r for r in _reports(trial) if self._time_attr in r]
        if int(last) not in {int(r[self._time_attr]) for r in reports} and math.isfinite(self._loss(trial.last_result)):
            # The driver died after Tune saved the trial's last result in its experiment state but
            # before the line reached result.json: without it the rung would never be decided
            # (the search would wait for this trial's loss forever).
            reports.append(dict(trial.last_result))
        for report in reports:
            self._record(trial, int(report[self._time_attr]), self._loss(report), report)
        if trial.status == Trial.PENDING and int(last) in self._rungs:
            trial.set_status(Trial.PAUSED)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        step = int(result.get(self._time_attr, 0))
        if not math.isfinite(self._loss(result, self._metric)):
            return TrialScheduler.STOP  # a diverged / out-of-memory trial reports once and ends
        self._record(trial, step, self._loss(result), result)
        d = self._settle(tune_controller, reporting=trial)
        if trial.trial_id in self._challengers:
            self._challengers[trial.trial_id]["step"] = step
            if step >= self._max_t or trial.trial_id in self._ending:
                self._write_record()
                return TrialScheduler.STOP
            return TrialScheduler.CONTINUE  # to max_t, past the rungs: it is compared, not halved
        if trial.trial_id in d.stopped:
            self._hand_over(tune_controller, d, 1)
            # cut, but it may be confirmed: paused with its rung checkpoint
            return TrialScheduler.PAUSE if self._resumable(trial, d) else TrialScheduler.STOP
        if step >= self._max_t:
            self._hand_over(tune_controller, d, 1)
            return TrialScheduler.STOP
        level = d.level[trial.trial_id]
        if level < len(self._rungs) and step >= self._rungs[level]:
            if self._others_wait(tune_controller, d):
                self._hand_over(tune_controller, d, 1)
                return TrialScheduler.PAUSE  # its slot goes to a waiting trial
            # Nothing waits for the slot: hold the trial in its worker (model loaded) until the rung
            # is decided, instead of a pause that would restart it in a new worker.
            self._held.add(trial.trial_id)
            return TrialScheduler.NOOP
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._held.discard(trial.trial_id)
        self._done.add(trial.trial_id)  # still RUNNING while Tune calls this
        if trial.trial_id in self._challengers:
            self._challengers[trial.trial_id]["step"] = int((result or {}).get(self._time_attr, 0) or
                                                            self._challengers[trial.trial_id]["step"])
            self._write_record()
        self._settle(tune_controller)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._held.discard(trial.trial_id)
        pass  # a retried trial comes back PENDING; one that failed for good counts as ended

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._held.discard(trial.trial_id)
        pass

    def room(self) -> Optional[int]:
        """Trials that may still start under `max_concurrent` (None: no cap). A trial held at a rung
        in its worker counts (it holds the slot), and so does a pending one: under the cap only a
        trial given a slot (or a failed one Tune retries) is pending, on its way to a worker."""
        cap = getattr(self, "_max_concurrent", None)  # a scheduler pickled before the cap (--resume)
        if cap is None:
            return None
        return max(0, cap - sum(1 for t in self._trials if t.status in (Trial.RUNNING, Trial.PENDING)))

    def choose_trial_to_run(self, tune_controller) -> Optional[Trial]:
        d = self._settle(tune_controller)
        if self.room() == 0:
            return None
        for trial in self._trials:
            if trial.status == Trial.PENDING and trial.trial_id not in d.stopped:
                return trial
        for trial in self._trials:
            if trial.status == Trial.PAUSED and trial.trial_id not in d.stopped and not self._waiting(trial, d):
                return trial  # its rank passed the rung: resume it from the rung's checkpoint
        if self._confirm != "off" and not self._kept_over:
            return self._challenger_to_run(tune_controller, d)
        return self.resumed_after_tail()

    def debug_string(self) -> str:
        decided = "; ".join(f"step {self._rungs[k]}: {', '.join(map(str, v))}" for k, v in sorted(self._frozen.items()))
        return f"Successive halving at steps {self._rungs} (keep 1/{self._rf:g}); survivors {decided or 'none yet'}"


# What `SuccessiveHalving._hand_over` uses of Tune's controller to queue a trial (Ray 2.60).
_STAGING = ("_set_trial_status", "_staged_trials", "_actor_cache", "_schedule_trial_actor")


def _reports(trial: Trial) -> list[dict]:
    """Every report in the trial's result.json (as persisted in storage)."""
    try:
        storage = trial.storage
        with storage.storage_filesystem.open_input_stream(f"{storage.trial_fs_path}/{RESULT_FILE}") as handle:
            lines = handle.read().decode("utf-8").splitlines()
    except (OSError, AttributeError, RuntimeError) as exc:
        logger.warning("successive halving: cannot read the reports of %s (%s); it re-enters at its next rung", trial, exc)
        return []
    return [json.loads(line) for line in lines if line.strip()]
