"""The Tune side of confirmations (`search.confirm`): the bookkeeping successive halving
(`search.halving.SuccessiveHalving`) does with `scheduler.confirm: tail | full`, as a mixin.

It keeps the cut arms that may be challengers paused (not stopped), chooses challengers with
`search.confirm.choose_challengers` whenever a slot is free that nothing kept waits for (a held
cut arm, or room for one trial now on a node that already runs a trial of the search:
`search.confirm.free_slots`), trains them on past the rungs to max_t, gives a slot back when a
kept trial waits for it, ends the tail with the last kept arm, recognises challengers after
--resume (a cut trial that trained past its rung), and writes `confirmations.json`.
"""

from __future__ import annotations

import json
from collections import Counter
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ray.tune.experiment import Trial

from lora_rank_search.contract.arms import arm_of, unit_of
from lora_rank_search.contract.metrics import PACK_ARMS, PACK_PARALLEL
from lora_rank_search.search.confirm import COSTLIER, choose_challengers, current_node, finishes_in_tail, free_slots, pack_room

if TYPE_CHECKING:
    from lora_rank_search.search.halving import Decision

logger = logging.getLogger("lora_rank_search.search.halving")


class Confirmations:
    """Mixin of `SuccessiveHalving`: uses its _trials, _scores, _cost, _rungs, _max_t, _time_attr,
    _held, _confirm and its _others_wait, _unmade and _kept_waiting; `Decision` is `search.halving.Decision`."""

    # ---- confirmations (`search.confirm`): cut arms trained on in free capacity

    def _rung_table(self, d: Decision) -> dict:
        """rung index -> {arm: mean finite loss over its seeds there} for the arms that competed there."""
        arms = {t.trial_id: arm_of(t.config) for t in self._trials}
        table: dict = {}
        for k in sorted(d.survivors):
            members = None if k == 0 else set(d.survivors[k - 1])
            losses: dict = {}
            for tid, mine in self._scores.items():
                if tid in arms and self._rungs[k] in mine and math.isfinite(mine[self._rungs[k]]) and (
                        members is None or arms[tid] in members):
                    losses.setdefault(arms[tid], []).append(mine[self._rungs[k]])
            table[k] = {a: sum(v) / len(v) for a, v in losses.items()}
        return table

    def _kept_active(self, tune_controller, d: Decision) -> bool:
        """A kept trial (not cut) is still to run or running, or the search has trials to create."""
        search_alg = getattr(_controller(tune_controller), "search_alg", None)
        if search_alg is not None and not search_alg.is_finished():
            return True
        return any(t.trial_id not in d.stopped and t.trial_id not in self._done and t.status not in (Trial.TERMINATED, Trial.ERROR)
                   for t in self._trials)

    def _resumable(self, trial: Trial, d: Decision) -> bool:
        """A cut trial kept paused: a challenger, or one that may still become one (after the last
        kept arm ended, only a started challenger under confirm full: `resumed_after_tail`)."""
        if self._confirm == "off":
            return False
        if self._kept_over:
            c = self._challengers.get(trial.trial_id)
            return self._confirm == "full" and c is not None and _started(c) and trial.trial_id not in self._ending
        if trial.trial_id in self._challengers:
            return True
        return arm_of(trial.config) in self._candidate_arms

    def _confirmations(self, tune_controller, d: Decision, reporting: Optional[Trial] = None) -> None:
        """Bookkeeping at every event: the tail's end, challengers back from --resume, new challengers.
        A cut trial that still holds its worker (held at the rung, or `reporting` its rung result
        now) is a free slot, confirmed in place if chosen: no restart, no model load."""
        self._candidate_arms = set()
        if not d.survivors:
            return
        groups = {arm_of(t.config): unit_of(t.config) for t in self._trials}
        trial_unit = {t.trial_id: unit_of(t.config) for t in self._trials}
        table = self._rung_table(d)
        cost = {trial_unit[t]: c for t, c in self._cost.items() if t in trial_unit}
        base = self._base_loss()
        every = choose_challengers(table, d.survivors, groups, free=2, cost=cost, base=base)
        self._candidate_arms = {c.arm for c in choose_challengers(table, d.survivors, groups, free=2, cost=cost, base=base,
                                                                  filled=self._filled)}
        for trial in self._trials:  # back from --resume: a cut trial that trained past its rung was confirming
            level = d.level.get(trial.trial_id, 0)
            last = int(trial.last_result.get(self._time_attr, 0) or 0)
            if trial.trial_id in d.stopped and trial.trial_id not in self._challengers and level < len(self._rungs) \
                    and last > self._rungs[level]:
                role = next((c.role for c in every if c.arm == arm_of(trial.config)), COSTLIER)
                self._challengers[trial.trial_id] = {"role": role, "from_step": self._rungs[level], "step": last}
                self._filled[role] = max(self._filled.get(role, -1), level)
        if not self._kept_active(tune_controller, d):
            if not self._kept_over:
                self._kept_over = True
                self._end_tail(tune_controller, d)
            return
        if not every:
            self._why_none = self._why_none or ("no unit to confirm: no cheaper unit was cut within a few points of "
                                                "adequacy and no costlier unit was cut")
            return
        waiting = self._kept_short_of_slots(tune_controller, d)
        if waiting:
            self._preempt(tune_controller)
        held = [t for t in self._trials if (t.trial_id in self._held or t is reporting) and t.trial_id in d.stopped
                and t.trial_id not in self._challengers and t.status == Trial.RUNNING]
        free = len(held)
        room = self._room_in_packs(held, tune_controller) if held else None
        if room is not None:
            free = min(free, room)  # a held packed arm would train beside its pack's arms
        if not waiting and not free and self._candidate_arms and not self._starting():
            free = self._free_capacity(next(t for t in self._trials if arm_of(t.config) in self._candidate_arms), tune_controller)
        seeds = max(1, max((sum(1 for t in self._trials if arm_of(t.config) == a) for a in groups), default=1))
        picks = choose_challengers(table, d.survivors, groups, free=free // seeds if free >= seeds else (1 if free else 0),
                                   cost=cost, base=base, kept_waiting=waiting, filled=self._filled)
        if not picks and not self._challengers and self._candidate_arms:
            self._why_none = "no slot was free while the kept arms trained (each was taken by a kept arm until the last one ended)"
        for pick in picks:
            mine = [t for t in self._trials if arm_of(t.config) == pick.arm and t.trial_id in d.stopped
                    and t.status in (Trial.RUNNING, Trial.PAUSED, Trial.PENDING)]
            if not mine:
                continue
            self._filled[pick.role] = pick.rung
            if all(t.trial_id in self._challengers for t in mine):
                continue  # already confirming (it reported at this rung on its way to max_t)
            for tid, c in list(self._challengers.items()):
                if c["role"] == pick.role and not c.get("replaced"):
                    self._replace(tune_controller, tid, reporting)
            for t in mine:
                self._challengers[t.trial_id] = {"role": pick.role, "from_step": self._rungs[pick.rung],
                                                 "step": int(t.last_result.get(self._time_attr, 0) or 0)}
            logger.info("successive halving: confirming %s (%s) from step %d to %d", pick.unit, pick.role,
                        self._rungs[pick.rung], self._max_t)
        if picks:
            self._write_record()

    def resumed_after_tail(self) -> Optional[Trial]:
        """confirm full: a started challenger that waits paused after the last kept arm ended (back
        from --resume) runs on to max_t, as it would have without the interruption; before, the end
        of the tail stopped it where it was."""
        if self._confirm != "full" or not self._kept_over:
            return None
        return next((t for t in self._trials if t.trial_id in self._challengers and t.status == Trial.PAUSED
                     and t.trial_id not in self._ending and _started(self._challengers[t.trial_id])), None)

    def _kept_short_of_slots(self, tune_controller, d) -> bool:
        """Kept trials wait for a slot that only a challenger could give them: more of them wait
        (pending, or paused ready to go on, or not yet made by the search) than slots are free now,
        idle workers Tune keeps for reuse included. A cut trial holding its worker may go on in
        place while the free slots take the kept ones: before, any kept trial waiting blocked it,
        so where a kept trial had just paused at the rung (its worker idle, kept for reuse) the near
        miss was paused too, and on a short tail never confirmed."""
        if self._unmade(tune_controller):
            return True
        waiting = self._kept_waiting(d)
        return bool(waiting) and len(waiting) > self._free_capacity(waiting[0], tune_controller)

    def _replace(self, tune_controller, trial_id: str, reporting: Optional[Trial] = None) -> None:
        """A challenger whose role went to a unit cut at a later rung: it stops, judged where it got."""
        self._challengers[trial_id]["replaced"] = True
        trial = next((t for t in self._trials if t.trial_id == trial_id), None)
        if trial is None or trial.trial_id in self._done or trial.status in (Trial.TERMINATED, Trial.ERROR):
            return
        self._ending.add(trial_id)  # on_trial_result stops it at its next report
        self._held.discard(trial_id)
        if trial is reporting or trial.is_saving:
            return
        tune_controller.stop_trial(trial)
        controller = _controller(tune_controller)
        if hasattr(controller, "_mark_trial_to_checkpoint"):
            controller._mark_trial_to_checkpoint(trial)

    def _starting(self) -> bool:
        """A challenger was handed to Tune and has no worker yet (one starts at a time)."""
        return any(t.trial_id in self._challengers and t.status == Trial.PENDING for t in self._trials)

    def _challenger_to_run(self, tune_controller, d: Decision) -> Optional[Trial]:
        """A paused challenger, when a slot is free that nothing kept waits for."""
        paused = [t for t in self._trials if t.trial_id in self._challengers and t.status == Trial.PAUSED]
        if not paused or self._starting() or self._others_wait(tune_controller, d):
            return None
        return paused[0] if self._free_capacity(paused[0], tune_controller) >= 1 else None

    def _slot_view(self, trial: Trial, tune_controller=None, resting: Optional[list] = None) -> Optional[dict]:
        """What `search.confirm.free_slots` (and, given `resting`, `pack_room`) count by, now; None without Ray."""
        try:
            import ray

            from ray._private.state import available_resources_per_node

            if not ray.is_initialized():
                return None
            demand = dict(trial.placement_group_factory.required_resources)
            available = available_resources_per_node()  # node id -> its free resources now
            alive = {n["NodeID"]: n.get("NodeManagerAddress") for n in ray.nodes() if n.get("Alive")}
        except Exception as exc:  # noqa: BLE001 - no Ray state (a test without Ray): nothing is free
            logger.debug("successive halving: no resource view (%s): no confirmation", exc)
            return None
        running = [t.last_result for t in self._trials if t.status == Trial.RUNNING]
        # after --resume a report names the last session's node until its trial reports again (a
        # kept arm resumed there held no node: no slot was free, and a confirmation waited)
        nodes = Counter(filter(None, (current_node(r, alive) for r in running)))
        packed = [r for r in running if r.get(PACK_ARMS)]  # packed trials: their pack's arms, and how many run at full speed
        pack = (int(packed[-1][PACK_ARMS]), int(packed[-1].get(PACK_PARALLEL) or 1)) if packed else None
        # Tune keeps the worker of a trial that ended or paused for the next trial to start
        # (reuse_actors): idle, but its resources still look taken to Ray
        cache = getattr(_controller(tune_controller), "_actor_cache", None) if tune_controller is not None else None
        idle = int(getattr(cache, "num_cached_objects", 0) or 0)
        view = {"available": available, "held": set(nodes), "demand": demand, "running": nodes, "pack": pack, "idle": idle}
        if resting is not None:
            view["resting"] = Counter(filter(None, (current_node(t.last_result, alive) for t in resting)))
        return view

    def _free_capacity(self, trial: Trial, tune_controller=None) -> int:
        """Trials of `trial`'s size that fit now on nodes that already run a trial of this search
        (`search.confirm.free_slots`): never a new node, never an idle one kept busy."""
        view = self._slot_view(trial, tune_controller)
        if view is None:
            return 0
        free = free_slots(**view)
        room = self.room()
        return free if room is None else min(free, room)

    def _room_in_packs(self, resting: list, tune_controller=None) -> Optional[int]:
        """How many of `resting` (running trials held at a rung, training nothing) can go on in place
        at full speed: None unless packs limit it (`search.confirm.pack_room`). A held trial alone in
        its worker goes on in its own slot; a held packed arm trains in its pack, beside the others."""
        view = self._slot_view(resting[0], tune_controller, resting) if resting else None
        return None if view is None else pack_room(**view)

    def _preempt(self, tune_controller) -> None:
        """A kept trial waits for a slot: a running challenger gives its slot back (it resumes later
        from its last checkpoint)."""
        for trial in self._trials:
            if trial.trial_id in self._challengers and trial.status == Trial.RUNNING and trial.trial_id not in self._held \
                    and trial.trial_id not in self._ending and not trial.is_saving:
                self._challengers[trial.trial_id]["started"] = True
                tune_controller.pause_trial(trial, should_checkpoint=False)
                return

    def _end_tail(self, tune_controller, d: Decision) -> None:
        """The last kept arm ended: stop what waits for a confirmation and (tail) the challengers.
        Only cut trials: a kept one ends by itself (the last is still RUNNING while Tune completes it)."""
        for trial in self._trials:
            if trial.trial_id in self._ending or trial.trial_id in self._done or trial.trial_id not in d.stopped \
                    or trial.status in (Trial.TERMINATED, Trial.ERROR):
                continue
            c = self._challengers.get(trial.trial_id)
            if c and self._confirm == "full" and (trial.status == Trial.RUNNING or _started(c)):
                continue  # runs on to max_t (paused, back from --resume: `resumed_after_tail` starts it again)
            if c and trial.status == Trial.RUNNING and finishes_in_tail(int(c.get("step", 0)), int(c["from_step"]), self._max_t):
                continue  # runs on to max_t
            if trial.status in (Trial.RUNNING, Trial.PAUSED, Trial.PENDING) and not trial.is_saving:  # saving: next call
                if c is not None and trial.status == Trial.RUNNING:
                    c["started"] = True  # it had a worker (the record says so, even if it reported nothing new)
                self._ending.add(trial.trial_id)
                self._held.discard(trial.trial_id)
                tune_controller.stop_trial(trial)
                controller = _controller(tune_controller)
                if hasattr(controller, "_mark_trial_to_checkpoint"):
                    controller._mark_trial_to_checkpoint(trial)
        self._write_record()

    def confirmation_record(self) -> dict:
        """What `confirmations.json` holds (`contract.layout.CONFIRMATIONS_FILE`)."""
        by_id = {t.trial_id: t for t in self._trials}
        rows = []
        for tid, c in sorted(self._challengers.items()):
            t = by_id.get(tid)
            rows.append({"trial_id": tid, "role": c["role"], "from_step": int(c["from_step"]), "step": int(c.get("step", 0)),
                         "replaced": bool(c.get("replaced")),
                         "started": _started(c) or (t is not None and t.status == Trial.RUNNING),
                         "unit": list(unit_of(t.config)) if t else None, "lr": t.config.get("lr") if t else None,
                         "seed": t.config.get("seed") if t else None})
        return {"mode": self._confirm, "target_step": self._max_t, "challengers": rows,
                "why_none": "" if rows else (self._why_none or "no unit was cut before the last kept arm ended")}

    def _write_record(self) -> None:
        """Write `confirmations.json` into the experiment folder (local or remote storage), and into
        Tune's copy of that folder on the driver where Tune keeps one: on --resume Tune downloads
        the folder's JSON files there and later uploads that copy over the folder, which put back
        the record as it was when the search was interrupted (a confirmation that trained to the
        end after the resume read "chosen but no slot came free")."""
        if self._confirm == "off" or not self._trials:
            return
        from lora_rank_search.contract.layout import CONFIRMATIONS_FILE

        content = json.dumps(self.confirmation_record(), indent=2).encode("utf-8")
        try:
            storage = self._trials[0].storage
            path = f"{storage.experiment_fs_path}/{CONFIRMATIONS_FILE}"
            with storage.storage_filesystem.open_output_stream(path) as handle:
                handle.write(content)
        except (OSError, AttributeError, RuntimeError) as exc:
            logger.warning("successive halving: cannot write the confirmations record (%s)", exc)
            return
        try:
            staging = Path(storage.experiment_driver_staging_path)
        except (AttributeError, RuntimeError):  # no Ray session (tests), or a Tune without the copy
            return
        try:
            if staging.is_dir():
                (staging / CONFIRMATIONS_FILE).write_bytes(content)
        except OSError as exc:
            logger.warning("successive halving: cannot write the confirmations record into Tune's copy %s (%s)", staging, exc)

    def _base_loss(self) -> Optional[float]:
        """The base model's eval loss: the mean of the finite values the trials reported (None without)."""
        values = [float(v) for v in self._base.values() if math.isfinite(float(v))]
        return sum(values) / len(values) if values else None


def _started(c: dict) -> bool:
    """A challenger that had a worker: marked so, or it trained past the step it was cut at."""
    return bool(c.get("started")) or int(c.get("step", 0) or 0) > int(c["from_step"])


def _controller(tune_controller):
    """The TuneController behind the wrapper Tune hands to schedulers (private methods are used
    without the wrapper's access warning)."""
    return getattr(tune_controller, "_tune_controller", tune_controller)


