"""The whole analysis side on a hand-made experiment folder (conftest.write_fake_experiment): every
trial status, early stops, two learning rates, two seeds; no Ray, no model, in seconds."""

from __future__ import annotations

import json
import re
import math
import os

import pandas as pd
import pytest

from lora_rank_search.analysis.results import load_experiment
from conftest import FAKE_BASE_LOSS
from lora_rank_search.search.cli import main


def test_every_status_is_read_from_the_folder(fake_experiment):
    trials, history = load_experiment(fake_experiment)
    status = {(t.r, t.lr, t.seed): t.status for t in trials.itertuples()}
    assert status[(4, 1e-3, 0)] == "completed" and status[(2, 3e-4, 0)] == "stopped"
    assert status[(16, 3e-4, 0)] == "error" and status[(16, 1e-3, 0)] == "diverged"
    assert status[(16, 3e-4, 1)] == "interrupted" and status[(32, 3e-4, 0)] == "oom" and status[(32, 1e-3, 0)] == "pending"
    assert set(trials["base_eval_loss"].dropna()) == {FAKE_BASE_LOSS}
    assert trials.set_index(["r", "lr", "seed"]).loc[(16, 1e-3, 0), "unstable"], "a diverged arm is unstable"
    assert sorted(set(trials["lr"])) == [3e-4, 1e-3]


def test_analyze_writes_the_verdict_with_the_base_the_gain_shares_and_the_learning_rates(fake_experiment, capsys):
    out = os.path.join(fake_experiment, "analysis")
    assert main(["analyze", fake_experiment]) == 0
    printed = capsys.readouterr().out
    assert "recommended: r=4, learning rate 1e-3" in printed and "of the best gain" in printed
    data = json.loads(open(os.path.join(out, "recommendation.json")).read())
    assert data["rank"] == 4 and data["learning_rate"] == 1e-3 and data["base_eval_loss"] == FAKE_BASE_LOSS
    assert data["rule_name"] == "gain" and data["tolerance"] == 0.05 and data["evidence_step"] == 40
    assert data["learning_rates"] == [3e-4, 1e-3]
    by_rank = {e["r"]: e for e in data["ranks"]}
    # r=2 judged at step 10 against r=16's 2.35 there (its only stable arm): (3 - 2.51) / (3 - 2.35) = 75%
    assert by_rank[2]["evidence_step"] == 10 and by_rank[2]["gain_share"] == pytest.approx(0.49 / 0.65)
    assert by_rank[2]["lr"] == 1e-3 and not by_rank[2]["adequate"]
    assert by_rank[16]["lr"] == 3e-4, "the diverged lr 1e-3 arm is left out while lr 3e-4 trained normally"
    kinds = {d["kind"] for d in data["diagnosis"]}
    assert "lr-edge-high" in kinds and "excluded" in kinds
    frame = pd.read_parquet(os.path.join(out, "results.parquet"))
    for column in ("lr", "base_eval_loss", "unstable", "rank_gain_share", "rank_best_lr", "recommended_arm", "judged_at_step"):
        assert column in frame, column
    assert frame["recommended_arm"].sum() == 2, "both seeds of r=4 at lr 1e-3"
    report = open(os.path.join(out, "REPORT.md")).read()
    assert "## Recommendation: r = 4, learning rate 1e-3" in report and "## Learning rates" in report
    assert "Untouched base model" in report and "share of its gain" in report
    for name in ("loss_vs_rank", "loss_vs_lr", "loss_vs_cost", "learning_curves"):
        assert os.path.getsize(os.path.join(out, "plots", f"{name}.png")) > 5000, name
    page = open(os.path.join(out, "report.html")).read()
    assert page.count("<svg") == 4 and "<img" not in page


def test_other_rules_and_bad_flags(fake_experiment, capsys):
    assert main(["analyze", fake_experiment, "--rule", "relative", "--tolerance", "0.5", "--out", os.path.join(fake_experiment, "a2")]) == 0
    assert json.load(open(os.path.join(fake_experiment, "a2", "recommendation.json")))["rank"] == 2
    report = open(os.path.join(fake_experiment, "a2", "REPORT.md")).read()
    # the export it names recommends what this report does (export's default rule gave another rank)
    assert f"`lora-rank export {fake_experiment} --rule relative --tolerance 0.5 --out DIR`" in report
    capsys.readouterr()
    assert main(["analyze", fake_experiment, "--tolerance", "1.5"]) == 2
    assert "--tolerance: must be a number >= 0 and < 1" in capsys.readouterr().err


def test_the_export_command_in_the_report_is_quoted_for_a_shell():
    from lora_rank_search.analysis.report import export_command
    from lora_rank_search.analysis.selection import Recommendation

    rec = Recommendation(2, 0.05, "", rule_name="gain")
    assert export_command("runs/my search ü", rec) == "lora-rank export 'runs/my search ü' --out DIR"


def test_tensorboard_folder_for_every_status(fake_experiment, tmp_path):
    from lora_rank_search.analysis.tb import read_back

    trials, _ = load_experiment(fake_experiment)
    logdir = tmp_path / "tb"
    assert main(["tensorboard", fake_experiment, "--logdir", str(logdir), "--no-serve"]) == 0
    written = [t for t in trials.itertuples() if t.status != "pending"]
    for t in written:
        scalars, hparams = read_back(str(logdir), t.trial_dir)
        assert hparams is not None and hparams["lr"] == pytest.approx(t.lr) and hparams["r"] == t.r
        finite = [s for s, v in scalars.get("loss/eval", {}).items() if not math.isnan(v)]
        assert finite or t.status == "oom"
        assert scalars["loss/eval_base"], "the base loss is a curve too"


def test_analyze_a_search_over_target_choices_names_the_cheapest_adequate_adapter(tmp_path, capsys):
    from conftest import write_fake_choice_experiment

    experiment = write_fake_choice_experiment(tmp_path / "choices")
    out = os.path.join(experiment, "analysis")
    assert main(["analyze", experiment]) == 0
    printed = capsys.readouterr().out
    # base 3.0, best all-linear r=4 at 2.035: mlp r=4 (2.0825) recovers 95.1% with 4,608 params,
    # all-linear r=2 (2.10) 93% with 4,352: the cheapest adequate pair is mlp r=4
    assert "recommended (cheapest adequate adapter): mlp r=4" in printed and "4,608 trainable params" in printed
    assert "on attention no rank is adequate" in printed and "on mlp the smallest adequate rank is 4" in printed
    data = json.loads(open(os.path.join(out, "recommendation.json")).read())
    assert data["target_choice"] == "mlp" and data["rank"] == 4 and data["trainable_params"] == 4608
    assert data["targets"] == ["gate_proj", "up_proj", "down_proj"]
    assert {c["target_choice"]: c["rank"] for c in data["choices"]} == {"attention": None, "mlp": 4, "all-linear": 4}
    assert any(c.startswith("all-linear r=2: 93%") for c in data["close"]), data["close"]
    assert "target_modules=[\"gate_proj\", \"up_proj\", \"down_proj\"]" in data["lora_config"]
    frame = pd.read_parquet(os.path.join(out, "results.parquet"))
    assert set(frame["target_choice"]) == {"attention", "mlp", "all-linear"}
    assert frame.loc[frame["recommended_rank"], ["target_choice", "r"]].values.tolist() == [["mlp", 4]]
    report = open(os.path.join(out, "REPORT.md")).read()
    assert "## Recommendation: mlp, r = 4" in report and "## Target choices: every adapter by its cost" in report
    assert "**yes (cheapest: recommended)**" in report and "Close calls" in report
    assert re.search(r"targets +r +alpha", report), "the trials table has a targets column"
    assert os.path.getsize(os.path.join(out, "plots", "cost_by_choice.png")) > 5000
    trials, _ = load_experiment(experiment)
    assert sorted(trials["trial_dir"].str.split("_r0").str[0].unique()) == ["all-linear", "attention", "mlp"]
    from lora_rank_search.analysis.tb import read_back

    assert main(["tensorboard", experiment, "--logdir", str(tmp_path / "tb"), "--no-serve"]) == 0
    for t in trials.itertuples():
        _, hparams = read_back(str(tmp_path / "tb"), t.trial_dir)
        assert hparams["target_choice"] == t.target_choice and hparams["r"] == t.r
