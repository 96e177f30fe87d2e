"""A failing trial does not fail the search: exceptions are retried from the last checkpoint,
NaN losses end the trial as `diverged`, out-of-memory as `oom`; the others finish, and the
results table says what happened. Faults are injected with the LORA_RANK_SEARCH_FAULT test hook."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml

from lora_rank_search.analysis.results import format_failures, load_experiment
from lora_rank_search.search.cli import main
from lora_rank_search.search.config import parse_config
from lora_rank_search.search.runner import prepare
from lora_rank_search.search.space import trial_settings
from lora_rank_search.trainables.failures import FAULT_ENV, planned_fault
from lora_rank_search.trainables.trial import run_trial


def test_the_fault_hook_is_off_unless_set_and_once_skips_a_resumed_run():
    assert planned_fault(2, resumed=False, spec="") is None
    spec = "r=2:step=20:kind=raise:once;r=4:step=5:kind=nan"
    assert planned_fault(2, resumed=False, spec=spec).step == 20
    assert planned_fault(2, resumed=True, spec=spec) is None
    assert planned_fault(4, resumed=True, spec=spec).kind == "nan"
    assert planned_fault(8, resumed=False, spec=spec) is None
    with pytest.raises(ValueError, match="kind must be one of raise, nan, oom, hang"):
        planned_fault(2, resumed=False, spec="r=2:step=1:kind=segfault")


@pytest.mark.slow  # trains
@pytest.mark.parametrize("kind, status, detail", [
    ("nan", "diverged", "training loss became nan at step 7 (r=2, seed=0)"),
    ("oom", "oom", "out of memory at step 7 (r=2, batch 16 x"),
])
def test_a_nan_loss_or_oom_ends_the_trial_with_a_final_report_instead_of_raising(kind, status, detail, raw_config, monkeypatch):
    cfg = parse_config(raw_config(train={"max_steps": 20, "eval_every": 5}))
    prepared = prepare(cfg, log=lambda _: None)
    settings = trial_settings(cfg, prepared.model_path, prepared.targets)
    monkeypatch.setenv(FAULT_ENV, f"r=2:step=7:kind={kind}")
    reports = []
    last = run_trial({"r": 2, "seed": 0}, settings, prepared.data, lambda m, folder: reports.append((dict(m), folder)))
    assert [m["step"] for m, _ in reports] == [5, 7], "one evaluation, then the failure report; training stopped"
    failure, folder = reports[-1]
    assert folder is None, "no checkpoint with a failure report"
    assert failure["trial_status"] == status and detail in failure["failure"] and last == failure
    assert reports[0][0]["trial_status"] == "ok" and reports[0][0]["failure"] == ""
    assert failure["best_eval_loss"] == reports[0][0]["eval_loss"], "what the trial achieved before is kept"
    if kind == "oom":
        assert "GiB" in failure["failure"] and failure["peak_memory_bytes"] > 0
        for hint in ("resources.gpus_per_trial", "train.batch_size", "train.gradient_checkpointing"):
            assert hint in failure["failure"]


FAULTS = ";".join([
    "r=1:step=15:kind=nan",         # diverges: ends itself, no retry
    "r=2:step=12:kind=oom",         # out of memory: ends itself, no retry
    "r=4:step=20:kind=raise:once",  # a transient crash: retried from its step-10 checkpoint, finishes
    "r=8:step=5:kind=raise",        # crashes every time: fails after max_failures retries
])


@pytest.mark.slow
def test_failing_trials_leave_the_others_finishing_and_show_in_the_results(raw_config, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(FAULT_ENV, FAULTS)  # set before Ray starts: the trial workers inherit it
    raw = raw_config(
        name="faults",
        lora={"ranks": [1, 2, 4, 8, 16]},
        train={"max_steps": 20, "eval_every": 10},
        scheduler={"type": "none"},
        resources={"max_failures": 1},
    )
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(raw))
    code = main(["search", str(config)])
    out, err = capsys.readouterr()
    assert code == 1, err[-3000:]  # a trial ended in error: the search says so in its exit code
    assert "error: 1 trial(s) ended in error (r=8 lr=3e-3 seed=0); the results of the others are kept" in err

    trials, history = load_experiment(str(tmp_path / "runs" / "faults"))
    by_r = {int(t.r): t for t in trials.itertuples()}
    assert sorted(by_r) == [1, 2, 4, 8, 16]
    assert by_r[16].status == "completed" and by_r[16].steps == 20 and by_r[16].retries == 0

    assert (by_r[1].status, by_r[1].steps, by_r[1].retries) == ("diverged", 15, 0)
    assert by_r[1].failure == "training loss became nan at step 15 (r=1, seed=0)"
    assert by_r[1].best_eval_loss > 0, "its evaluation before diverging is kept"

    assert (by_r[2].status, by_r[2].steps, by_r[2].retries) == ("oom", 12, 0)
    assert "out of memory at step 12" in by_r[2].failure and "resources.gpus_per_trial" in by_r[2].failure

    assert (by_r[4].status, by_r[4].steps, by_r[4].retries) == ("completed", 20, 1)
    resumed = history[history["trial_id"] == by_r[4].trial_id]
    assert resumed.set_index("step")["resumed_from_step"].to_dict() == {10: 0, 20: 10}, "retried from its step-10 checkpoint"
    assert len(resumed["pid"].unique()) == 2

    assert (by_r[8].status, by_r[8].retries) == ("error", 1)
    assert "RuntimeError: injected fault" in by_r[8].failure
    with open(os.path.join(tmp_path, "runs", "faults", by_r[8].trial_dir, "error.txt")) as handle:
        assert handle.read().count("Failure #") == 2, "tried once more, then given up"

    # The CLI's table and failure lines, and the progress lines while it ran.
    table = out[out.index("best eval loss"):]
    for status in ("diverged", "oom", "error", "completed (1 retry)"):
        assert status in table
    assert "failed trials (the others are unaffected):" in out
    assert format_failures(trials) in out and len(format_failures(trials).splitlines()) == 3
    assert "DIVERGED: training loss became nan at step 15" in out and "OOM: out of memory at step 12" in out
    assert f"{'r4-lr3e-3-seed0':<22} crashed (last report at step 10); retrying from its last checkpoint" in out
    with open(os.path.join(tmp_path, "runs", "faults", by_r[1].trial_dir, "result.json")) as handle:
        last = [json.loads(line) for line in handle][-1]
    assert last["trial_status"] == "diverged" and last["failure"]


@pytest.mark.slow  # trains
def test_a_trial_restored_from_its_final_checkpoint_ends_without_loading_the_model(raw_config, tmp_path, weight_loads):
    """What a driver killed between a trial's last report and the next snapshot leaves behind."""
    cfg = parse_config(raw_config(train={"max_steps": 10, "eval_every": 10}))
    prepared = prepare(cfg, log=lambda _: None)
    settings = trial_settings(cfg, prepared.model_path, prepared.targets)
    final = tmp_path / "final"
    run_trial({"r": 2, "seed": 0}, settings, prepared.data, lambda m, folder: shutil.copytree(folder, final))
    loads = len(weight_loads)
    reports = []
    assert run_trial({"r": 2, "seed": 0}, settings, prepared.data, lambda *a: reports.append(a), restore_from=str(final)) == {}
    assert reports == [] and len(weight_loads) == loads


CORRUPT = ";".join([
    "r=2:step=25:kind=corrupt:once",  # the newest checkpoint (step 20) truncated: the retry falls back to step 10
    "r=4:step=15:kind=corrupt:once",  # the only checkpoint (step 10) truncated: the retry finds none that loads
])


@pytest.mark.slow
def test_a_corrupted_checkpoint_is_skipped_for_the_previous_one_and_with_none_left_the_trial_fails_naming_it(
        raw_config, tmp_path, monkeypatch, capsys):
    """One search for both cases (each trial retried once): r=2 crashes at step 25 after its newest
    checkpoint was truncated, and its retry resumes from step 10; r=4's only checkpoint is
    truncated, so its retry fails naming the file, and the search exits 1 for it alone."""
    monkeypatch.setenv(FAULT_ENV, CORRUPT)
    raw = raw_config(name="corrupt", lora={"ranks": [2, 4]}, train={"max_steps": 30, "eval_every": 10},
                     scheduler={"type": "none"}, resources={"max_failures": 1})
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(raw))
    code = main(["search", str(config)])
    _, err = capsys.readouterr()
    trials, history = load_experiment(str(tmp_path / "runs" / "corrupt"))
    by_r = {int(t.r): t for t in trials.itertuples()}

    assert (by_r[2].status, by_r[2].steps, by_r[2].retries) == ("completed", 30, 1), err[-3000:]
    rows = history[history["trial_id"] == by_r[2].trial_id]
    assert rows.set_index("step")["resumed_from_step"].to_dict() == {10: 0, 20: 10, 30: 10}, "resumed from step 10, not 20"

    assert by_r[4].status == "error"
    assert "no kept checkpoint of this trial loads:" in by_r[4].failure
    assert "checkpoint_000000/adapter/adapter_model.safetensors (" in by_r[4].failure
    assert code == 1, err[-3000:]
    assert "error: 1 trial(s) ended in error (r=4 lr=3e-3 seed=0)" in err, "the recovered r=2 is no error"
