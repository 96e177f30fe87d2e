"""Confirmations through Ray and the CLI, on the tiny model: the slot left idle in the tail of
successive halving trains a cut unit on to the leader's step, so the verdict is opposed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lora_rank_search.analysis.results import COMPLETED, load_experiment
from lora_rank_search.search.cli import main
from lora_rank_search.trainables.planted import build_planted_task, planted_config

pytestmark = pytest.mark.slow


def test_the_idle_slot_of_the_tail_confirms_a_cut_unit_at_the_leaders_step(tmp_path, capsys):
    # planted rank 2; with alpha 2r at a high rate r=16 takes too large steps: r=2 leads at the one
    # rung (step 10 of 120) and r=16, costlier and no better, is cut there. Without confirmations
    # r=2 then trains alone to step 120 (unopposed) while the second slot sits idle.
    task = build_planted_task(tmp_path / "task", rank=2)
    raw = planted_config(task, [2, 16], str(tmp_path / "runs"), name="confirm",
                         lora={"alpha": "2r"}, train={"max_steps": 120, "eval_every": 10, "learning_rate": 3e-2},
                         scheduler={"type": "sha", "grace_period": 10, "reduction_factor": 4, "confirm": "tail"},
                         resources={"gpus_per_trial": 0, "cpus_per_trial": 1, "arms_per_worker": 1})
    config = tmp_path / "confirm.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["search", str(config)]) == 0
    out = capsys.readouterr().out
    experiment = Path(raw["storage_path"]) / "confirm"
    record = json.loads((experiment / "confirmations.json").read_text())
    assert record["mode"] == "tail" and record["challengers"], record
    rec = json.loads((experiment / "analysis" / "recommendation.json").read_text())
    leader = rec["evidence_step"]
    confirmed = [c for c in rec["confirmations"] if c["step"] == leader]
    assert confirmed, f"a cut unit reached the leader's step {leader}: {rec['confirmations']}"
    judged_there = [u for u in rec["units"] if u["evidence_step"] == leader and u["r"] != rec["rank"]]
    assert judged_there, "another unit is judged at the leader's step: the verdict is opposed"
    assert rec["unopposed_without_confirmations"] is True, "without the confirmation the leader was alone at its step"
    assert "confirmed against r=" in out and f"at step {leader}" in out
    trials, _ = load_experiment(str(experiment))
    assert set(trials["status"]) == {COMPLETED}, "both trained to the end; no trial was left paused: Tune's run ended"
    kinds = {f["kind"] for f in rec["diagnosis"]}
    assert "unopposed" not in kinds
