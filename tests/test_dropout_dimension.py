"""`lora.dropout` as a list: a second nuisance dimension, end to end through the CLI on the tiny model.

Each (rank, learning rate, dropout) is one arm; a rank is judged at its best arm. The test reads
every place the arm shows: trial names (the progress lines), folders, params.json, TensorBoard's
HParams, recommendation.json (each rank at the arm with its lowest loss) and the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow

DROPOUTS = [0.0, 0.2]
RATES = [1e-3, 3e-3]


def test_dropout_list_is_searched_and_each_rank_judged_at_its_best_arm(raw_config, tmp_path):
    raw = raw_config(name="dropout", lora={"ranks": [2, 16], "dropout": DROPOUTS},
                     train={"max_steps": 20, "eval_every": 10, "learning_rate": RATES}, scheduler={"type": "none"})
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "lora_rank_search.search.cli", "search", str(config)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    experiment = tmp_path / "runs" / "dropout"

    # folders and names: one per (rank, learning rate, dropout), the dropout after the learning rate
    folders = sorted(p.name for p in experiment.iterdir() if p.is_dir() and p.name.startswith("r0"))
    assert len(folders) == 2 * len(RATES) * len(DROPOUTS), folders
    for r in (2, 16):
        for lr in ("1e-3", "3e-3"):
            for dropout in ("0", "0.2"):
                prefix = f"r{r:04d}_lr{lr}_do{dropout}_seed0_"
                assert sum(f.startswith(prefix) for f in folders) == 1, (prefix, folders)
    assert "r16-lr3e-3-do0.2-seed0" in done.stdout + done.stderr, "the progress lines name the arm"
    trained = {json.loads((experiment / f / "params.json").read_text())["dropout"] for f in folders}
    assert trained == set(DROPOUTS)

    # the verdict: every rank at the arm (lr, dropout) with its lowest loss at its evidence step
    from lora_rank_search.analysis.results import load_experiment
    from lora_rank_search.analysis.selection import recommend

    trials, history = load_experiment(str(experiment))
    assert sorted(set(trials["dropout"])) == DROPOUTS
    rec = recommend(trials, history)
    assert rec.searched == ["lr", "dropout"]
    for e in rec.ranks:
        assert len(e.arms) == len(RATES) * len(DROPOUTS)
        usable = [a for a in e.arms if a.used]
        best = min(usable, key=lambda a: a.loss)
        assert e.nuisance == best.nuisance and e.loss == pytest.approx(best.loss), e
    saved = json.loads((experiment / "analysis" / "recommendation.json").read_text())
    assert saved["rank"] == rec.rank and saved["nuisance"] == rec.nuisance and set(saved["nuisance"]) == {"lr", "dropout"}

    # the report: the best arm per rank, the arms table, and the snippet with the recommended arm's dropout
    report = (experiment / "analysis" / "REPORT.md").read_text()
    assert "best arm" in report and "Arms (lr, dropout)" in report
    assert f"lr {rec.nuisance['lr']:.0e}".replace("e-0", "e-") in report
    assert f"lora_dropout={rec.nuisance['dropout']:g}," in report

    # TensorBoard: each run's HParams carry its dropout
    from lora_rank_search.analysis.tb import read_back
    from lora_rank_search.search.cli import main

    logdir = tmp_path / "tb"
    assert main(["tensorboard", str(experiment), "--logdir", str(logdir), "--no-serve"]) == 0
    for row in trials.itertuples():
        _, hparams = read_back(str(logdir), row.trial_dir)
        assert hparams["dropout"] == pytest.approx(row.dropout) and hparams["lr"] == pytest.approx(row.lr)
