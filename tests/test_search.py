"""Whole searches on a real (local) Ray runtime: ASHA stops trials, successive halving, TensorBoard
event files, every metric on every report."""

from __future__ import annotations

import glob
import json
import math
import os

from lora_rank_search.analysis.results import load_experiment
from lora_rank_search.search.config import parse_config
from lora_rank_search.search.runner import run_search
from lora_rank_search.contract.metrics import REPORTED
import pytest

pytestmark = pytest.mark.slow  # every test here starts Ray or trains


@pytest.fixture(scope="module")
def ray_two_cpus():
    """One local Ray with two CPUs for both searches here (a start costs 5-15 s on this machine)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _event_scalars(trial_dir: str, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(trial_dir, "events.out.tfevents.*"))
    assert files, f"no TensorBoard event file in {trial_dir}"
    acc = EventAccumulator(trial_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_asha_stops_poor_ranks_and_every_trial_leaves_readable_results(raw_config, ray_two_cpus):
    cfg = parse_config(raw_config())
    experiment = run_search(cfg, log=lambda _: None)
    trials, history = load_experiment(experiment)
    assert sorted(trials["r"]) == [1, 2, 16, 32]
    assert (trials["status"] != "error").all()
    stopped = trials[trials["steps"] < cfg.train.max_steps]
    assert len(stopped) >= 1, "ASHA stopped at least one rank early"
    assert stopped["status"].eq("stopped").all()
    best = trials.loc[trials["best_eval_loss"].idxmin()]
    assert best["steps"] == cfg.train.max_steps, "the best trial ran to max_steps"
    assert best["r"] >= 16, "on this task low ranks are clearly worse"

    for row in trials.itertuples():
        folder = os.path.join(experiment, row.trial_dir)
        with open(os.path.join(folder, "result.json")) as handle:
            reports = [json.loads(line) for line in handle]
        assert [r["step"] for r in reports] == list(range(10, row.steps + 1, 10))
        for report in reports:
            assert not [k for k in REPORTED if k not in report]
            assert math.isfinite(report["eval_loss"]) and report["trainable_params"] > 0
        # TensorBoard: eval_loss by step reads back equal to what was reported.
        scalars = _event_scalars(folder, "ray/tune/eval_loss")
        by_step = {r["training_iteration"]: r["eval_loss"] for r in reports}
        assert set(scalars) == set(by_step)
        for step, value in by_step.items():
            assert abs(scalars[step] - value) < 1e-5 * max(1.0, abs(value))


# Fractional packing on logical GPUs (four trials at 0.5 GPU on two GPUs) is checked with
# `gpus_per_trial: auto` in test_resources.py, by the shares Ray holds at once rather than by clocks.


def test_successive_halving_compares_all_ranks_at_each_rung_and_resumes_survivors(raw_config, ray_two_cpus):
    cfg = parse_config(raw_config(scheduler={"type": "sha", "grace_period": 10, "reduction_factor": 2}))
    experiment = run_search(cfg, log=lambda _: None)
    trials, history = load_experiment(experiment)
    # Rungs at steps 10 and 20: 4 ranks to step 10, the best 2 to 20, the best 1 to 40.
    assert sorted(trials["steps"]) == [10, 10, 20, 40]
    loss_at = history.pivot_table(index="step", columns="r", values="best_eval_loss")  # best so far, as the rule
    survivors = set(trials.loc[trials["steps"] >= 20, "r"])
    assert survivors == set(loss_at.loc[10].nsmallest(2).index), "the best two at step 10 went on"
    assert trials.loc[trials["steps"].idxmax(), "r"] == loss_at.loc[20, list(survivors)].idxmin()
    # At step 10 the first wave (two slots) was paused, as two ranks still waited for a slot: a
    # survivor from it resumed from the checkpoint it reported there. Later a rank pauses at a rung
    # only when another waits for its slot, and then resumes from that rung's checkpoint; without a
    # wait it trains on in the same run. Which ranks ran first is Tune's order: the waves are read
    # from the clock of each step-10 report.
    at_10 = history[history["step"] == 10].set_index("r")
    first_wave = set((at_10["started_at"] + at_10["elapsed_s"]).nsmallest(2).index)
    for r in survivors:
        mine = history[history["r"] == r].sort_values("step").set_index("step")
        assert mine.index.is_unique, f"r={r} trained a step range twice"
        for step, resumed in mine["resumed_from_step"].items():
            assert resumed == 0 or (resumed in (10, 20) and resumed < step), (r, step, resumed)
        if r in first_wave:
            assert mine.loc[20, "resumed_from_step"] == 10, f"r={r} was paused at step 10 and resumed there"
    # Every trial ended and the experiment snapshot says so (a resume would re-run nothing).
    assert set(trials["status"]) == {"completed", "stopped"}
    assert trials.loc[trials["status"] == "stopped", "steps"].lt(40).all()
    # Two slots, two worker processes for the whole search (reuse_actors): at a rung the workers of
    # the cut trials go to the kept ones (a third process meant a new start, imports and base load)
    workers = sorted(set(history["pid"].dropna().astype(int)))
    assert len(workers) == 2, f"worker processes {workers}: a trial started a new one while a freed worker was shut down"


def test_successive_halving_under_max_concurrent_trains_every_rank_to_the_first_rung(raw_config, ray_two_cpus):
    """resources.max_concurrent below what the machine holds: with Tune's own cap the later trials did
    not exist when the first two reached step 10, the rung was decided without them, and they were
    cut unstarted ("finished at step 0"), after which Tune failed on their missing folders."""
    cfg = parse_config(raw_config(scheduler={"type": "sha", "grace_period": 10, "reduction_factor": 2},
                                  resources={"max_concurrent": 1}))
    experiment = run_search(cfg, log=lambda _: None)
    trials, history = load_experiment(experiment)
    assert sorted(trials["steps"]) == [10, 10, 20, 40], "every rank trained to the first rung, then halving as without a cap"
    assert set(history.loc[history["step"] == 10, "r"]) == {1, 2, 16, 32}
    # one trial at a time: each run of a trial (from its start to its last report) overlaps no other
    runs = history[history["step"] > 0].groupby(["trial_id", "started_at"])["elapsed_s"].max()
    spans = sorted((start, start + elapsed) for (_, start), elapsed in runs.items())
    assert len(spans) >= 4
    overlaps = [(a, b) for a, b in zip(spans, spans[1:]) if b[0] < a[1] - 0.05]
    assert not overlaps, f"trials ran at once under max_concurrent 1: {overlaps}"
