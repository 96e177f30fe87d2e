"""Confirmations through Ray and the CLI, on the tiny model: the slot left idle in the tail of
successive halving trains a cut unit on to the leader's step, so the verdict is opposed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from analysis.results import load_experiment
from search.cli import main

pytestmark = pytest.mark.slow


def test_the_idle_slot_of_the_tail_confirms_a_cut_unit_at_the_leaders_step(raw_config, tmp_path, capsys):
    # 4 ranks on 2 slots, rungs at 10 and 20 of 40 (keep 1/2): from step 20 the leader trains alone
    raw = raw_config(name="confirm", scheduler={"type": "sha", "grace_period": 10, "reduction_factor": 2, "confirm": "tail"})
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
    assert set(trials["status"]) == {"TERMINATED"}, "no trial is left paused: Tune's run ended"
    kinds = {f["kind"] for f in rec["diagnosis"]}
    assert "unopposed" not in kinds
