"""The choice of challengers for confirmations, on hand-made rung tables (no Ray)."""

from __future__ import annotations

import math

from lora_rank_search.search.confirm import (COSTLIER, NEAR_MISS, choose_challengers, current_node, cut_units, finishes_in_tail,
                                                   free_slots, leader_of)

BASE = 3.0
UNIT = {r: r for r in (1, 2, 4, 8, 16)}  # one arm per unit: the arm is the rank


def demo_table():
    """Rung 0 (step 10): r=4 and r=8 lead; r=2 at 87.5% of the best gain; r=1 and r=16 far.
    Rung 1 (step 30): r=4 goes on alone, r=8 is cut close behind."""
    table = {0: {1: 2.6, 2: 2.125, 4: 2.0, 8: 2.05, 16: 2.5}, 1: {4: 1.8, 8: 1.82}}
    survivors = {0: [4, 8], 1: [4]}
    return table, survivors


def test_a_near_miss_first_then_the_strongest_costlier_unit():
    table, survivors = demo_table()
    assert [c.unit for c in choose_challengers(table, survivors, UNIT, free=9, base=BASE)] == [2, 8], \
        "at most one of each: r=1 (40% of the gain) is no near miss, r=16 is weaker than r=8"
    got = choose_challengers(table, survivors, UNIT, free=2, base=BASE)
    assert [(c.unit, c.role, c.rung) for c in got] == [(2, NEAR_MISS, 0), (8, COSTLIER, 1)]
    one = choose_challengers(table, survivors, UNIT, free=1, base=BASE)
    assert [(c.unit, c.role) for c in one] == [(2, NEAR_MISS)], "one free slot: the near miss comes first"


def test_the_strongest_costlier_unit_is_the_one_that_got_furthest_then_the_best_there():
    table = {0: {1: 2.6, 2: 2.5, 4: 2.0, 8: 2.05, 16: 2.01}, 1: {4: 1.8, 8: 1.82}}
    survivors = {0: [4, 8], 1: [4]}
    got = choose_challengers(table, survivors, UNIT, free=4, base=BASE)
    # r=16 was better than r=8 at step 10, but r=8 got to step 30: it is the leader's closest opponent
    assert [(c.unit, c.role) for c in got] == [(8, COSTLIER)], "r=2 (50% of the gain) is no near miss; nothing else"
    assert cut_units(table, survivors, UNIT) == {1: (0, 2.6, 1), 2: (0, 2.5, 2), 16: (0, 2.01, 16), 8: (1, 1.82, 8)}


def test_nothing_when_no_capacity_is_free_or_a_kept_arm_waits():
    table, survivors = demo_table()
    assert choose_challengers(table, survivors, UNIT, free=0, base=BASE) == []
    assert choose_challengers(table, survivors, UNIT, free=3, base=BASE, kept_waiting=True) == [], \
        "a kept trial pending or paused for a slot takes it: a confirmation never delays a kept arm"


def test_nothing_before_a_rung_is_decided_and_each_role_once():
    table, survivors = demo_table()
    assert choose_challengers({0: table[0]}, {}, UNIT, free=2, base=BASE) == []
    got = choose_challengers(table, survivors, UNIT, free=2, base=BASE, filled=[NEAR_MISS])
    assert [(c.unit, c.role) for c in got] == [(8, COSTLIER)]
    assert choose_challengers(table, survivors, UNIT, free=2, base=BASE, filled=[NEAR_MISS, COSTLIER]) == []


def test_the_cheapest_leader_has_no_near_miss_and_the_costliest_no_costlier_opponent():
    table = {0: {1: 2.0, 2: 2.1, 4: 2.5}}
    assert [(c.unit, c.role) for c in choose_challengers(table, {0: [1]}, UNIT, free=2, base=BASE)] == [(2, COSTLIER)]
    table = {0: {1: 2.6, 2: 2.2, 4: 2.0}}
    got = choose_challengers(table, {0: [4]}, UNIT, free=2, base=BASE)
    assert [(c.unit, c.role) for c in got] == [(2, NEAR_MISS)], "r=2 recovers (3 - 2.2) / (3 - 2.0) = 80%"
    table = {0: {1: 2.6, 2: 2.4, 4: 2.0}}
    # r=2 recovers 60% < NEAR_MISS_SHARE: no near miss, and nothing costs more than r=4
    assert choose_challengers(table, {0: [4]}, UNIT, free=2, base=BASE) == []


def test_units_arms_and_costs():
    # units (choice, r), arms (choice, r, lr): a unit is resumed at its best arm where it was cut
    arm = {("mlp", 2, "a"): ("mlp", 2), ("mlp", 2, "b"): ("mlp", 2), ("all", 2, "a"): ("all", 2), ("all", 4, "a"): ("all", 4)}
    cost = {("mlp", 2): 1000, ("all", 2): 2500, ("all", 4): 5000}
    table = {0: {("mlp", 2, "a"): 2.2, ("mlp", 2, "b"): 2.1, ("all", 2, "a"): 2.0, ("all", 4, "a"): 2.02}}
    got = choose_challengers(table, {0: [("all", 2, "a")]}, arm, free=2, cost=cost, base=BASE)
    assert [(c.arm, c.role) for c in got] == [(("mlp", 2, "b"), NEAR_MISS), (("all", 4, "a"), COSTLIER)]


def test_without_a_base_loss_a_near_miss_is_within_a_few_percent_of_the_best_loss():
    table = {0: {1: 2.05, 2: 2.2, 4: 2.0}}
    got = choose_challengers(table, {0: [4]}, UNIT, free=2)
    assert [(c.unit, c.role) for c in got] == [(1, NEAR_MISS)], "r=1 within 3%, the cheapest such"
    assert leader_of(table, {0: [4]}) == 4


def test_non_finite_losses_are_never_challengers():
    table = {0: {1: math.nan, 2: 2.0, 4: math.inf}}
    assert choose_challengers(table, {0: [2]}, UNIT, free=2, base=BASE) == []


def test_free_slots_count_only_nodes_already_held():
    available = {"a": {"CPU": 1.5, "GPU": 0.5}, "b": {"CPU": 8, "GPU": 1.0}}
    assert free_slots(available, held={"a"}, demand={"CPU": 1, "GPU": 0.5}) == 1
    assert free_slots(available, held={"a"}, demand={"CPU": 1, "GPU": 1}) == 0, "node b is idle: never used"
    assert free_slots(available, held={"a", "b"}, demand={"CPU": 1, "GPU": 0.5}) == 3
    assert free_slots(available, held={"a"}, demand={"CPU": 0.25, "GPU": 0}) == 6, "pack clients: 1/N of a node"
    assert free_slots({}, held={"a"}, demand={"CPU": 1}) == 0
    # a worker Tune keeps for the next trial (reuse_actors) holds its CPU in Ray's view, yet is free
    assert free_slots({"a": {"CPU": 0}}, held={"a"}, demand={"CPU": 1}, idle=1) == 1
    assert free_slots({"a": {"CPU": 0}, "b": {"CPU": 0}}, held={"a", "b"}, demand={"CPU": 1}, idle=1) == 1, "counted once"


def test_a_cut_arm_held_in_a_pack_goes_on_in_place_only_where_a_pack_is_free():
    from lora_rank_search.search.confirm import pack_room

    # make demo packed: 2 CPU packs of 8 arms; the leader and the near miss (held at its rung) run
    view = dict(available={"a": {"CPU": 2 - 3 / 8}}, held={"a"}, demand={"CPU": 1 / 8}, pack=(8, 1))
    assert pack_room(**view, running={"a": 3}, resting={"a": 1}) == 0, "two kept arms train: both packs busy"
    assert pack_room(**{**view, "available": {"a": {"CPU": 2 - 2 / 8}}}, running={"a": 2}, resting={"a": 1}) == 1, \
        "one kept arm trains: the other pack is free"
    assert pack_room(**{**view, "pack": (8, 8)}, running={"a": 3}, resting={"a": 1}) is None, "stacked on a GPU: in its own slot"
    assert pack_room(**{**view, "pack": None}, running={"a": 3}, resting={"a": 1}) is None, "one arm per worker"


def test_a_packed_slot_beside_an_arm_that_would_slow_down_is_not_free():
    # 2 CPU packs of 8 arms on node a (each client asks 1/8 CPU), one arm training: on CPU (or taking
    # turns) a pack trains one arm at full speed, so only the other pack is free
    available = {"a": {"CPU": 2 - 1 / 8}}
    one_each = dict(held={"a"}, demand={"CPU": 1 / 8}, running={"a": 1})
    assert free_slots(available, **one_each, pack=(8, 1)) == 1
    assert free_slots({"a": {"CPU": 2 - 2 / 8}}, held={"a"}, demand={"CPU": 1 / 8}, running={"a": 2}, pack=(8, 1)) == 0
    assert free_slots({"a": {"CPU": 2 - 3 / 8}}, held={"a"}, demand={"CPU": 1 / 8}, running={"a": 3}, pack=(8, 1)) == 0, "never below 0"
    # stacked on a GPU a pack trains all its arms at once: every client slot is free capacity
    assert free_slots(available, **one_each, pack=(8, 8)) == 15
    assert free_slots(available, **one_each) == 15, "unpacked trials: Ray's slots as they are"
    # a 4-GPU node, a pack of 4 arms per GPU taking turns (MoE expert weights), 3 arms on 3 GPUs
    gpus = {"a": {"CPU": 16 - 3 * 0.25, "GPU": 4 - 3 * 0.25}}
    assert free_slots(gpus, held={"a"}, demand={"CPU": 0.25, "GPU": 0.25}, running={"a": 3}, pack=(4, 1)) == 1


def test_a_running_trial_is_on_the_live_node_its_report_names_or_after_a_resume_the_one_with_its_ip():
    alive = {"new-a": "10.0.0.1", "new-b": "10.0.0.2"}
    assert current_node({"node_id": "new-b", "node_ip": "10.0.0.2"}, alive) == "new-b"
    # back from --resume: the report still names the last Ray session's node (SIGINT, then --resume:
    # the kept arm held no node, so no slot looked free and the near miss waited until it reported)
    assert current_node({"node_id": "old-a", "node_ip": "10.0.0.1"}, alive) == "new-a"
    assert current_node({"node_id": "old-a", "node_ip": "10.9.9.9"}, {"new": "10.0.0.5"}) == "new", "one live node: that one"
    assert current_node({"node_id": "old-a", "node_ip": "10.9.9.9"}, alive) is None, "unknown: it holds no node"
    assert current_node({}, alive) is None


def test_in_the_tail_a_challenger_close_to_the_step_finishes_and_one_far_from_it_stops():
    assert finishes_in_tail(50, 30, 60), "a third of its 30 steps left: it trains on to step 60"
    assert not finishes_in_tail(40, 30, 60), "two thirds left: it stops with the last kept arm"
    assert not finishes_in_tail(30, 30, 60), "never started"
    assert finishes_in_tail(60, 30, 60)


# --------------------------------------------------------------------------- the verdict uses them (pure, no Ray)

def _tables(curves: dict, base: float = 3.0):
    """(trials, history) from {r: {step: eval_loss}} (one seed; max_steps 60)."""
    import pandas as pd

    trials, history = [], []
    for r, curve in curves.items():
        steps = max(curve)
        trials.append({"trial_id": f"t{r}", "r": r, "seed": 0, "lr": 5e-4, "status": "TERMINATED", "steps": steps,
                       "max_steps": 60, "base_eval_loss": base, "lora_alpha": 16.0, "alpha_rule": "fixed", "targets": "q_proj"})
        history += [{"trial_id": f"t{r}", "step": s, "eval_loss": loss} for s, loss in curve.items()]
    return pd.DataFrame(trials), pd.DataFrame(history)


def _record(trial="t8", from_step=30, step=60):
    return {"mode": "tail", "target_step": 60, "why_none": "",
            "challengers": [{"trial_id": trial, "role": COSTLIER, "from_step": from_step, "step": step, "unit": ["", 8],
                             "lr": 5e-4, "seed": 0}]}


def _analysed(curves, record):
    from lora_rank_search.analysis.confirmations import apply, summary
    from lora_rank_search.analysis.diagnosis import diagnose
    from lora_rank_search.analysis.selection import recommend

    trials, history = _tables(curves)
    rec = recommend(trials, history)
    apply(rec, trials, history, record)
    return rec, summary(rec), {f.kind for f in diagnose(rec, trials, history)}


def test_a_confirmed_unit_is_judged_at_the_leaders_step_and_the_verdict_says_so():
    # r=2 led alone from step 30; r=8, cut at 30 close behind, was confirmed to 60 and ends no better
    curves = {1: {10: 2.6}, 2: {10: 2.3, 30: 2.1, 60: 2.0}, 8: {10: 2.25, 30: 2.12, 60: 2.01}}
    rec, line, kinds = _analysed(curves, _record())
    assert rec.rank == 2 and rec.evidence_step == 60
    assert rec.evidence(8).evidence_step == 60, "judged at the later step like any other unit"
    assert rec.confirmations[0]["unit"] == "r=8" and rec.confirmations[0]["trained"]
    assert rec.verdict_changed is False and rec.unopposed_without_confirmations is True
    assert line.startswith("confirmed against r=8 lr 5e-4 (strongest costlier, from step 30) at step 60")
    assert "the verdict is the same without them" in line
    assert "confirmed" in kinds and "unopposed" not in kinds


def test_a_confirmation_that_changes_the_verdict_says_what_it_would_have_been():
    # r=8 pulls ahead after step 30: r=2 (alone at 60 without it) recovers under 95% of r=8's gain
    curves = {2: {10: 2.3, 30: 2.1, 60: 2.05}, 8: {10: 2.25, 30: 2.12, 60: 1.8}}
    rec, line, _ = _analysed(curves, _record())
    assert rec.rank == 8 and rec.verdict_changed is True
    assert rec.without_confirmations["rank"] == 2
    assert "without them the verdict would have been r=2" in line
    # the report's finding names the verdict without them (r=2) as the one that stood alone
    from lora_rank_search.analysis.diagnosis import diagnose

    trials, history = _tables(curves)
    found = next(f.text for f in diagnose(rec, trials, history) if f.kind == "confirmed")
    assert found.startswith("Confirmed against r=8") and "without them r=2 would have been judged alone" in found, found


def test_a_confirmation_that_never_trained_is_named_as_written_in_the_report():
    curves = {2: {10: 2.3, 30: 2.1, 60: 2.0}, 8: {10: 2.25, 30: 2.12}}
    rec, _, _ = _analysed(curves, _record(step=30))
    from lora_rank_search.analysis.diagnosis import diagnose

    trials, history = _tables(curves)
    found = next(f.text for f in diagnose(rec, trials, history) if f.kind == "confirmed")
    assert found.startswith("r=8 lr 5e-4 (strongest costlier)"), found


def test_why_nothing_was_confirmed_and_off_says_nothing():
    curves = {2: {10: 2.3, 30: 2.1, 60: 2.0}, 8: {10: 2.25, 30: 2.12}}
    rec, line, _ = _analysed(curves, {"mode": "tail", "target_step": 60, "challengers": [], "why_none": "no slot was free"})
    assert line == "nothing confirmed (scheduler.confirm: tail): no slot was free"
    assert rec.unopposed_without_confirmations is True
    rec, line, _ = _analysed(curves, None)
    assert line == "" and rec.confirm_mode == "" and rec.confirmations == []


def test_a_confirmation_stopped_short_is_reported_as_such():
    curves = {2: {10: 2.3, 30: 2.1, 60: 2.0}, 8: {10: 2.25, 30: 2.12, 50: 2.05}}
    rec, line, _ = _analysed(curves, _record(step=50))
    assert "r=8 lr 5e-4 (strongest costlier) trained from step 30 to 50 only, short of step 60" in line


# --------------------------------------------------------------------------- the scheduler's bookkeeping (fake trials, no Ray session)

class _Trial:
    """What the scheduler reads of a Tune trial."""

    def __init__(self, trial_id, r, status, step):
        self.trial_id, self.config, self.status, self.is_saving = trial_id, {"r": r, "lr": 3e-2, "seed": 0}, status, False
        self.last_result = {"step": step}

    def set_status(self, status):
        self.status = status


class _Controller:
    """A TuneController as the scheduler uses it: statuses, stops, staging."""

    def __init__(self):
        self.stopped, self._staged_trials = [], set()
        self.search_alg = type("Done", (), {"is_finished": lambda self: True})()

    def _set_trial_status(self, trial, status):
        trial.status = status

    def stop_trial(self, trial):
        self.stopped.append(trial.trial_id)
        trial.status = "TERMINATED"


def _back_from_resume(confirm: str):
    """(scheduler, kept trial, challenger, controller) back from --resume: r=2 (kept at step 10) was
    at step 30, r=16 (cut at 10) had been confirming up to step 20; max_t 40."""
    from lora_rank_search.search.halving import SuccessiveHalving

    sched = SuccessiveHalving("step", 40, [10], 4, score_attr="best_eval_loss", metric="eval_loss", mode="min", confirm=confirm)
    lead, challenger = _Trial("a", 2, "PENDING", 30), _Trial("b", 16, "PENDING", 20)
    ctrl = _Controller()
    for trial, loss, cost in ((lead, 2.5, 100), (challenger, 2.6, 800)):
        sched.on_trial_add(ctrl, trial)
        sched._record(trial, 10, loss, {"base_eval_loss": BASE, "trainable_params": cost})
    return sched, lead, challenger, ctrl


def test_after_resume_a_cut_trial_that_trained_past_its_rung_is_a_challenger_and_the_tail_ends_the_run():
    sched, lead, challenger, ctrl = _back_from_resume("tail")
    assert sched.choose_trial_to_run(ctrl) is lead, "the kept arm gets the slot first"
    assert sched._challengers["b"]["from_step"] == 10 and challenger.status == "PAUSED", \
        "recognised as a challenger, and paused (Tune would start a pending one whether a slot is free or not)"
    lead.status = "RUNNING"
    assert sched.choose_trial_to_run(ctrl) is None, "no resource view (no Ray): no slot is known to be free"
    sched.on_trial_complete(ctrl, lead, {"step": 40})
    assert ctrl.stopped == ["b"], "the last kept arm ended: the paused challenger stops, so Tune's run ends"
    record = sched.confirmation_record()
    assert record["challengers"][0]["role"] == COSTLIER and record["challengers"][0]["step"] == 20


def test_with_confirm_full_a_started_challenger_back_paused_from_resume_runs_on_after_the_tail():
    """confirm full: "a challenger that has started runs to max_steps". Back from --resume it is
    paused; when the last kept arm ended, the tail stopped it where it was (step 40 of 120)."""
    sched, lead, challenger, ctrl = _back_from_resume("full")
    assert sched.choose_trial_to_run(ctrl) is lead and challenger.status == "PAUSED"
    lead.status = "RUNNING"
    sched.on_trial_complete(ctrl, lead, {"step": 40})
    lead.status = "TERMINATED"
    assert ctrl.stopped == [], "started (it trained from 10 to 20): it is not stopped with the tail"
    assert sched.choose_trial_to_run(ctrl) is challenger, "it gets a worker to train on to step 40"


def test_a_challenger_started_but_stopped_with_the_tail_before_its_next_report_is_not_called_slotless():
    """Seen through the CLI (tiny model, confirm tail): the near miss resumed from step 30 in a free
    worker, the leader ended a second later, and the verdict said it "was chosen but no slot came free"."""
    from lora_rank_search.analysis.confirmations import summary
    from lora_rank_search.search.halving import SuccessiveHalving

    sched = SuccessiveHalving("step", 40, [10], 4, score_attr="best_eval_loss", metric="eval_loss", mode="min", confirm="tail")
    lead, challenger = _Trial("a", 2, "RUNNING", 30), _Trial("b", 16, "PAUSED", 10)
    ctrl = _Controller()
    for trial, loss, cost in ((lead, 2.5, 100), (challenger, 2.6, 800)):
        sched.on_trial_add(ctrl, trial)
        sched._record(trial, 10, loss, {"base_eval_loss": BASE, "trainable_params": cost})
    sched._challengers["b"] = {"role": COSTLIER, "unit": ("", 16), "from_step": 10, "step": 10}
    challenger.status = "RUNNING"  # given a worker; restoring its rung checkpoint, nothing reported yet
    sched.on_trial_complete(ctrl, lead, {"step": 40})
    assert ctrl.stopped == ["b"]
    row = sched.confirmation_record()["challengers"][0]
    assert row["started"] is True and row["step"] == 10
    curves = {2: {10: 2.3, 30: 2.1, 40: 2.0}, 16: {10: 2.25}}
    rec, line, _ = _analysed(curves, {"mode": "tail", "target_step": 40, "why_none": "",
                                      "challengers": [{**row, "trial_id": "t16", "unit": ["", 16]}]})
    assert "r=16 lr 3e-2 (strongest costlier) was started from step 10, but the last kept arm ended before it reported" in line, line
    assert "no slot came free" not in line


def test_the_confirmations_record_also_goes_into_tunes_copy_of_the_experiment_folder(tmp_path):
    """On --resume Tune downloads the experiment folder's JSON files into its copy on the driver and
    later uploads that copy over the folder: a record written only to the folder was put back as it
    was at the interruption (a confirmation that then trained to the end read "chosen but no slot
    came free"; seen through the CLI with SIGINT and --resume)."""
    import json
    from types import SimpleNamespace

    from pyarrow.fs import LocalFileSystem

    from lora_rank_search.contract.layout import CONFIRMATIONS_FILE
    from lora_rank_search.search.halving import SuccessiveHalving

    folder, copy = tmp_path / "exp", tmp_path / "driver_artifacts"
    folder.mkdir()
    sched = SuccessiveHalving("step", 40, [10], 4, score_attr="best_eval_loss", metric="eval_loss", mode="min", confirm="full")
    trial = _Trial("a", 2, "RUNNING", 10)
    trial.storage = SimpleNamespace(storage_filesystem=LocalFileSystem(), experiment_fs_path=str(folder),
                                    experiment_driver_staging_path=str(copy))
    sched.on_trial_add(_Controller(), trial)
    sched._write_record()
    assert (folder / CONFIRMATIONS_FILE).exists() and not copy.exists(), "no copy of Tune's: nothing made up"
    copy.mkdir()
    (copy / CONFIRMATIONS_FILE).write_text('{"stale": true}')  # what Tune downloaded at --resume
    sched._write_record()
    written = json.loads((folder / CONFIRMATIONS_FILE).read_text())
    assert written["mode"] == "full" and json.loads((copy / CONFIRMATIONS_FILE).read_text()) == written


def test_a_role_goes_again_to_a_unit_cut_at_a_later_rung():
    """make demo's case: at step 10 the costlier role went to r=8 (cut there); at step 30 r=16 is cut
    close behind the leader. r=16 can reach step 60 beside the leader, r=8 (from step 10) cannot: the
    role goes to r=16, and r=8 stops where it got."""
    table = {0: {2: 2.0, 8: 2.05, 16: 2.02, 4: 2.5}, 1: {2: 1.8, 16: 1.81}}
    early = choose_challengers({0: table[0]}, {0: [2, 16]}, UNIT, free=1, base=BASE)
    assert [(c.unit, c.role, c.rung) for c in early] == [(8, COSTLIER, 0)]
    later = choose_challengers(table, {0: [2, 16], 1: [2]}, UNIT, free=1, base=BASE, filled={COSTLIER: 0})
    assert [(c.unit, c.role, c.rung) for c in later] == [(16, COSTLIER, 1)], "cut one rung later: the role goes again"
    assert choose_challengers(table, {0: [2, 16], 1: [2]}, UNIT, free=1, base=BASE, filled={COSTLIER: 1}) == [], \
        "given at this rung already"
    assert choose_challengers(table, {0: [2, 16], 1: [2]}, UNIT, free=1, base=BASE, filled=[COSTLIER]) == [], \
        "a role closed for good stays closed"


def test_after_resume_a_rung_report_missing_from_result_json_is_read_from_tunes_saved_state():
    """The driver died after Tune saved a trial's step-10 result but before the line reached
    result.json: the rung must still get the trial's loss, or the search waits for it forever."""
    from lora_rank_search.search.halving import SuccessiveHalving

    sched = SuccessiveHalving("step", 40, [10], 4, score_attr="best_eval_loss", metric="eval_loss", mode="min", confirm="off")
    trial = _Trial("a", 2, "PENDING", 10)  # no storage: its result.json reads as empty
    trial.last_result.update(best_eval_loss=2.5, eval_loss=2.5, base_eval_loss=BASE, trainable_params=100)
    sched.on_trial_add(_Controller(), trial)
    assert sched._scores["a"] == {10: 2.5}
    assert trial.status == "PAUSED", "back at its rung: it waits for the decision"


def test_a_trial_held_at_a_rung_is_acted_on_only_once_its_rung_checkpoint_is_saved():
    """Tune registers a report's checkpoint in a save that follows the report. Stopping a held trial
    while that save is in flight drops the checkpoint from Tune's state: the cut arm ended without
    it, and after --resume an arm came back without its rung checkpoint (a killed packed search)."""
    from ray.tune.schedulers import TrialScheduler

    from lora_rank_search.search.halving import SuccessiveHalving

    sched = SuccessiveHalving("step", 40, [10], 2, score_attr="best_eval_loss", metric="eval_loss", mode="min", confirm="off")
    ctrl = _Controller()
    cut, kept = _Trial("a", 1, "RUNNING", 0), _Trial("b", 16, "RUNNING", 0)
    for trial in (cut, kept):
        sched.on_trial_add(ctrl, trial)

    def report(trial, loss, cost):
        trial.last_result = {"step": 10, "eval_loss": loss, "best_eval_loss": loss, "base_eval_loss": BASE, "trainable_params": cost}
        return sched.on_trial_result(ctrl, trial, trial.last_result)

    assert report(cut, 2.9, 100) == TrialScheduler.NOOP, "first at the rung, nothing waits for its slot: held"
    cut.is_saving = True  # its step-10 checkpoint is being registered
    assert report(kept, 2.0, 800) == TrialScheduler.CONTINUE, "the rung is decided: r=16 goes on"
    sched.choose_trial_to_run(ctrl)
    assert ctrl.stopped == [] and cut.status == "RUNNING", "not stopped while its checkpoint is saving"
    cut.is_saving = False
    sched.choose_trial_to_run(ctrl)  # Tune's next loop step
    assert ctrl.stopped == ["a"], "stopped once the checkpoint is registered"


def test_a_stop_that_completes_a_trial_inside_a_decision_does_not_start_a_held_trial_twice():
    """Tune's `stop_trial` calls `on_trial_complete`, which decides again inside the decision being
    acted on. The inner pass let a held survivor train on, then the outer pass did too: two train
    calls queued in its worker, so its next reports arrived while their checkpoints' saves were
    still queued. Tune then registered the newest checkpoint once per queued save, never the ones
    between (left on disk), and printed "Error handling checkpoint" for each double delete."""
    from ray.tune.schedulers import TrialScheduler

    from lora_rank_search.search.halving import SuccessiveHalving

    sched = SuccessiveHalving("step", 40, [10], 3, score_attr="best_eval_loss", metric="eval_loss", mode="min", confirm="off")

    class Tune(_Controller):  # stop_trial ends the trial the way Tune does: on_trial_complete is called
        trained: list = []

        def stop_trial(self, trial):
            super().stop_trial(trial)
            sched.on_trial_complete(self, trial, trial.last_result)

        def _schedule_trial_train(self, trial):
            self.trained.append(trial.trial_id)

    ctrl = Tune()
    cut, kept, last = _Trial("a", 1, "RUNNING", 0), _Trial("b", 16, "RUNNING", 0), _Trial("c", 2, "RUNNING", 0)
    for trial in (cut, kept, last):
        sched.on_trial_add(ctrl, trial)

    def report(trial, loss, cost):
        trial.last_result = {"step": 10, "eval_loss": loss, "best_eval_loss": loss, "base_eval_loss": BASE, "trainable_params": cost}
        return sched.on_trial_result(ctrl, trial, trial.last_result)

    assert report(cut, 2.9, 100) == TrialScheduler.NOOP and report(kept, 2.0, 800) == TrialScheduler.NOOP, "both held"
    assert report(last, 2.8, 200) == TrialScheduler.STOP, "the rung is decided: only r=16 goes on"
    assert ctrl.stopped == ["a"] and kept.status == "RUNNING"
    assert ctrl.trained == ["b"], "the survivor is started once"


def test_a_worker_tune_keeps_for_reuse_is_a_free_slot_for_a_kept_trial_so_a_near_miss_goes_on_in_place(monkeypatch):
    """Four ranks on one node of two CPUs, rungs at 10 and 20, `confirm: full`. At step 20 the leader
    (r=32) reported first and paused, as r=16 still waited for a slot; then r=16 reports step 20 and is
    cut, a near miss. The leader's worker is idle, kept by Tune for the next trial (reuse_actors), and
    Ray counts its CPU as taken: before, the waiting leader blocked the near miss, which paused and,
    on a short tail, was never confirmed ("chosen but no slot came free"; the verdict then was r=32
    where r=16 confirmed to step 80 is adequate). Now the kept worker is counted: r=16 goes on in place."""
    import ray
    import ray._private.state
    from ray.tune.schedulers import TrialScheduler

    from lora_rank_search.search.halving import SuccessiveHalving

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray._private.state, "available_resources_per_node", lambda: {"n1": {"CPU": 0.0}})
    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": "n1", "Alive": True, "NodeManagerAddress": "10.0.0.1"}])
    sched = SuccessiveHalving("step", 80, [10, 20], 2, score_attr="best_eval_loss", metric="eval_loss", mode="min", confirm="full")
    ctrl = _Controller()
    ctrl._actor_cache = type("Cache", (), {"num_cached_objects": 1})()
    ctrl._schedule_trial_train = lambda trial: None  # a held trial trains on in its worker
    ctrl.pause_trial = lambda trial, should_checkpoint=True: trial.set_status("PAUSED")
    trials = {r: _Trial(f"t{r}", r, "RUNNING", 0) for r in (1, 2, 16, 32)}
    for trial in trials.values():
        trial.placement_group_factory = type("PGF", (), {"required_resources": {"CPU": 1.0}})()
        sched.on_trial_add(ctrl, trial)
    costs = {1: 100, 2: 200, 16: 1600, 32: 3200}

    def report(r, step, loss):
        trial = trials[r]
        trial.last_result = {"step": step, "eval_loss": loss, "best_eval_loss": loss, "base_eval_loss": BASE,
                             "trainable_params": costs[r], "node_id": "n1"}
        return sched.on_trial_result(ctrl, trial, trial.last_result)

    for r, loss in ((1, 2.9), (2, 2.8), (16, 2.4), (32, 2.3)):
        report(r, 10, loss)
    for r in (1, 2):
        trials[r].status = "TERMINATED"
    trials[16].status = "PAUSED"  # waits for a slot to go on from step 10
    assert report(32, 20, 2.0) == TrialScheduler.PAUSE, "r=16 waits for a slot: the leader gives its worker up"
    trials[32].status, trials[16].status = "PAUSED", "RUNNING"  # Tune keeps the leader's worker for reuse
    assert report(16, 20, 2.25) == TrialScheduler.CONTINUE, "cut (75% of the best gain), a near miss: confirmed in place"
    assert sched._challengers["t16"]["role"] == NEAR_MISS
    assert sched.choose_trial_to_run(ctrl) is trials[32], "the leader resumes in the kept worker"
