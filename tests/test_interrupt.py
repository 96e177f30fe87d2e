"""An interrupted search loses nothing: the real `lora-rank search` driver is stopped with SIGINT,
resumed, killed with SIGKILL, and resumed again; finished trials are not re-run, unfinished ones
continue from their last checkpoint, and the end result has every trial of the grid."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import yaml

from lora_rank_search.analysis.results import load_experiment
from lora_rank_search.contract.layout import newest_state
from processes import kill_marked

pytestmark = pytest.mark.slow  # every test here starts Ray or trains

MAX_STEPS, EVAL_EVERY = 240, 30
RANKS = [2, 8, 32]
# Only against a hung driver: every wait here ends on an event (a snapshot, the driver's exit), and
# a loaded machine makes the event come later, never makes the test fail.
HANG_GUARD_S = 900


def _snapshot(experiment: str) -> dict[str, tuple[str, int]]:
    """trial folder -> (Tune status, step of its last *recorded* checkpoint) in the newest experiment state.

    A trial's report and its checkpoint reach the driver in two steps; a driver stopped between
    them has the report but not the checkpoint, and the trial resumes from the one before.
    """
    from ray import cloudpickle

    newest = newest_state(os.listdir(experiment)) if os.path.isdir(experiment) else None
    if newest is None:
        return {}
    try:
        with open(os.path.join(experiment, newest)) as handle:
            data = json.load(handle)
    except (OSError, ValueError):  # being rewritten right now
        return {}
    out = {}
    for state, runtime in data["trial_data"]:
        state, runtime = json.loads(state), json.loads(runtime)
        manager = cloudpickle.loads(bytes.fromhex(runtime["checkpoint_manager"]["value"]))
        latest = manager._latest_checkpoint_result
        out[state["relative_logdir"]] = (state["status"], int(latest.metrics["step"]) if latest else 0)
    return out


def _wait_for(experiment: str, driver: subprocess.Popen, ready) -> dict:
    """The first experiment snapshot for which ready(snapshot) holds, read while the driver runs.

    No deadline: a loaded machine only makes the moment come later. What fails the test is the
    driver ending before the moment came."""
    while True:
        snap = _snapshot(experiment)
        if ready(snap):
            return snap
        assert driver.poll() is None, f"the search ended before it could be interrupted; last snapshot {snap}"
        time.sleep(0.1)


def _mid_run(snap: dict) -> bool:
    """Some trial has a recorded checkpoint and is still running."""
    return any(status == "RUNNING" and 0 < step < MAX_STEPS for status, step in snap.values())


def _repaired(output: str) -> dict[str, int]:
    """trial folder -> the step it resumes from where `--resume` found its saved latest checkpoint
    deleted since (a newer, worse one arrived before the kill; search/storage.py): the previous kept one."""
    said = re.finditer(r"resume: (\S+): its saved latest checkpoint .*; it resumes from (?:its step-(\d+) checkpoint|the start)", output)
    return {m.group(1): int(m.group(2) or 0) for m in said}


def _results(experiment: str) -> dict[str, bytes]:
    out = {}
    for path in glob.glob(os.path.join(experiment, "*", "result.json")):
        with open(path, "rb") as handle:
            out[os.path.basename(os.path.dirname(path))] = handle.read()
    return out


@pytest.fixture
def driver_env():
    """Environment for driver subprocesses: a private Ray temp dir and a marker every Ray process
    of these runs inherits, so processes a killed driver leaves behind are found and ended by PID."""
    marker = f"LRS_TEST_RUN={uuid.uuid4().hex}".encode()
    temp = tempfile.mkdtemp(prefix="lrs-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": temp, "LRS_TEST_RUN": marker.split(b"=")[1].decode(),
           # Tune's experiment state (what the snapshots read) saved every 0.5 s, not every >= 10 s:
           # a moment lasting a second (ranks waiting at a rung) reaches the disk while it lasts
           "TUNE_GLOBAL_CHECKPOINT_S": "0.5"}
    env.pop("RAY_ADDRESS", None)
    yield env
    kill_marked(marker)
    shutil.rmtree(temp, ignore_errors=True)



def test_sigint_and_sigkill_lose_nothing_and_resume_completes_the_grid(raw_config, tmp_path, driver_env):
    raw = raw_config(
        name="interrupted",
        lora={"ranks": RANKS},
        train={"max_steps": MAX_STEPS, "eval_every": EVAL_EVERY},
        scheduler={"type": "none"},
    )
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(raw))
    experiment = str(tmp_path / "runs" / "interrupted")
    cli = [sys.executable, "-m", "lora_rank_search.search.cli", "search", str(config)]

    def start(*extra: str) -> subprocess.Popen:  # output to files: a full pipe would stall the driver
        n = len(list(tmp_path.glob("out-*")))
        out, err = open(tmp_path / f"out-{n}.txt", "w+"), open(tmp_path / f"err-{n}.txt", "w+")
        driver = subprocess.Popen([*cli, *extra], stdout=out, stderr=err, text=True, env=driver_env)
        driver.output = lambda: (out.seek(0) or out.read(), err.seek(0) or err.read())
        return driver

    def finish(driver: subprocess.Popen) -> tuple[str, str]:
        driver.wait(timeout=HANG_GUARD_S)
        return driver.output()

    # 1. Ctrl-C while a trial with a checkpoint is running: Tune saves its state and returns;
    #    the CLI must not pretend the search is done.
    first = start()
    _wait_for(experiment, first, _mid_run)
    first.send_signal(signal.SIGINT)
    out, err = finish(first)
    assert first.returncode == 130, err[-3000:]
    assert f"Continue with:\n  lora-rank search {config} --resume" in err
    assert "Tuner.restore" not in err and "Traceback" not in err
    assert "recommended:" not in out and "report:" not in out, "no verdict from an interrupted search"
    after_sigint, results_at_sigint = _snapshot(experiment), _results(experiment)
    assert any(0 < step < MAX_STEPS for _, step in after_sigint.values())

    # 2. Resume, then SIGKILL the driver once a trial has finished and another is mid-run.
    second = start("--resume")
    after_sigkill = _wait_for(
        experiment, second, lambda s: _mid_run(s) and any(st == "TERMINATED" for st, _ in s.values()) and len(s) == len(RANKS)
    )
    second.send_signal(signal.SIGKILL)
    resumed_first, _ = finish(second)
    kill_marked(f"LRS_TEST_RUN={driver_env['LRS_TEST_RUN']}".encode())  # the Ray processes it leaves
    after_sigkill, results_at_sigkill = _snapshot(experiment), _results(experiment)

    # 3. Resume again: it completes.
    third = start("--resume")
    out, err = finish(third)
    assert third.returncode == 0, err[-3000:]
    assert "recommended: r=" in out and "analysis/REPORT.md" in out, "the finished search ends with the verdict"

    trials, history = load_experiment(experiment)
    assert sorted(zip(trials["r"], trials["seed"])) == [(r, 0) for r in RANKS], "the same trials as an uninterrupted run"
    assert trials["status"].eq("completed").all() and trials["steps"].eq(MAX_STEPS).all()
    final = _results(experiment)
    for snap, before, resumed in ((after_sigint, results_at_sigint, resumed_first), (after_sigkill, results_at_sigkill, out)):
        repaired = _repaired(resumed)
        for folder, (status, step) in snap.items():
            step = repaired.get(folder, step)
            rows = history[history["trial_dir"] == folder]
            if status == "TERMINATED":
                assert final[folder] == before[folder], f"{folder} finished before the interruption and was re-run"
            elif step == MAX_STEPS:  # its last checkpoint saved, not yet marked done: nothing left to train
                assert rows["step"].is_unique and rows["step"].max() == MAX_STEPS, f"{folder} trained again after its last step"
            elif step:
                continued = rows[rows["resumed_from_step"] == step]
                assert len(continued) and continued["step"].min() == step + EVAL_EVERY, (
                    f"{folder} did not continue from its step-{step} checkpoint"
                )
    assert (history["resumed_from_step"] > 0).any()


def test_a_killed_halving_search_resumes_with_the_same_decisions(raw_config, tmp_path, driver_env):
    """SIGKILL while ranks wait at a successive-halving rung; --resume reads the rung losses back
    and finishes: the ranks that go on are the best at each rung, and stopped ranks stay stopped."""
    from lora_rank_search.search.halving import decide

    # rungs at 20 and 40: the first wave waits at step 20 while the second trains its 20 steps
    raw = raw_config(name="halving", lora={"ranks": [1, 2, 16, 32]}, train={"max_steps": 80, "eval_every": 20},
                     scheduler={"type": "sha", "grace_period": 20, "reduction_factor": 2})
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(raw))
    experiment = str(tmp_path / "runs" / "halving")
    cli = [sys.executable, "-m", "lora_rank_search.search.cli", "search", str(config)]
    logs = [open(tmp_path / name, "w+") for name in ("out-0.txt", "err-0.txt", "out-1.txt", "err-1.txt")]

    first = subprocess.Popen(cli, stdout=logs[0], stderr=logs[1], env=driver_env)
    at_rung = _wait_for(experiment, first, lambda s: any(status == "PAUSED" for status, _ in s.values()))
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=HANG_GUARD_S)
    kill_marked(f"LRS_TEST_RUN={driver_env['LRS_TEST_RUN']}".encode())
    before = _results(experiment)

    second = subprocess.Popen([*cli, "--resume"], stdout=logs[2], stderr=logs[3], env=driver_env)
    second.wait(timeout=HANG_GUARD_S)
    assert second.returncode == 0, (logs[3].seek(0) or logs[3].read())[-3000:]

    trials, history = load_experiment(experiment)
    assert set(trials["status"]) <= {"completed", "stopped"}
    # The decisions equal those successive halving makes on the losses reported at the rungs, and
    # no trial trained past a rung before its decision (a resumed rung waiter came back paused).
    rung_losses = {t: dict(zip(rows["step"], rows["best_eval_loss"])) for t, rows in history.groupby("trial_id")}
    first = history.groupby("trial_id").first()  # the base's loss and the adapter's size: the keep rule reads both
    d = decide(dict(zip(trials["trial_id"], trials["r"])), rung_losses, ended=[], rungs=[20, 40], reduction_factor=2,
               base=first["base_eval_loss"].to_dict(), costs=first["trainable_params"].to_dict())
    steps = dict(zip(trials["r"], trials["steps"]))
    assert len(d.survivors[0]) == 2 and all(steps[r] >= 40 for r in d.survivors[0])
    assert {r for r, s in steps.items() if s == 20} == set(trials["r"]) - set(d.survivors[0])
    assert {r for r, s in steps.items() if s == 80} == set(d.survivors[1])
    assert set(trials.loc[trials["status"] == "completed", "r"]) == set(d.survivors[1]), "the ranks kept at the last rung completed"
    for folder, (status, step) in at_rung.items():
        if status == "TERMINATED":
            assert _results(experiment)[folder] == before[folder], f"{folder} was stopped before the kill and ran again"
    assert _snapshot(experiment) and all(status == "TERMINATED" for status, _ in _snapshot(experiment).values())
