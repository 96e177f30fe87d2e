"""Packed searches through Ray and the CLI: per-arm folders and checkpoints as before, the same
verdict as one arm per worker, a crashed pack's arms resuming from their own checkpoints, and a
diverging arm leaving its pack-mates to finish."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml

from lora_rank_search.analysis.results import load_experiment
from processes import kill_marked
from lora_rank_search.search.cli import main
from test_interrupt import _wait_for, driver_env  # noqa: F401 - driver_env is a fixture used below
from lora_rank_search.trainables.failures import FAULT_ENV

pytestmark = pytest.mark.slow


def _search(raw_config, tmp_path, name: str, **resources) -> tuple[int, Path]:
    raw = raw_config(
        name=name,
        lora={"ranks": [1, 4], "target_modules": "attention", "dropout": 0.05, "alpha": 16},
        train={"max_steps": 30, "eval_every": 10, "batch_size": 8, "learning_rate": [3e-3, 1e-2]},
        scheduler={"type": "none"},
        resources={"cpus_per_trial": 1, "max_failures": 2, **resources},
    )
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    code = main(["search", str(config)])
    return code, Path(raw["storage_path"]) / name


def _verdict(experiment: Path) -> dict:
    return json.loads((experiment / "analysis" / "recommendation.json").read_text())


def _final_losses(experiment: Path) -> dict:
    trials, _ = load_experiment(str(experiment))
    return {(row.r, row.lr): row.best_eval_loss for row in trials.itertuples()}


def test_a_crashed_pack_resumes_its_arms_and_a_diverging_arm_leaves_its_pack_mates_finishing(raw_config, tmp_path, monkeypatch, capsys):
    """A packed search keeps every per-arm artifact and resumes with packing turned off and on; then
    the same search with a diverging arm and a crashing pack ends with the same verdict."""
    code, plain = _search(raw_config, tmp_path, "plain", arms_per_worker=4)
    out = capsys.readouterr().out
    assert code == 0 and "packing: 4 arms per worker" in out
    folders = sorted(p.name for p in plain.iterdir() if p.is_dir() and p.name.startswith("r"))
    assert len(folders) == 4, "one trial folder per arm, as without packing"
    for folder in folders:
        checkpoints = sorted((plain / folder).glob("checkpoint_*/adapter/adapter_model.safetensors"))
        assert checkpoints, f"{folder}: PEFT checkpoints per arm"
        assert len((plain / folder / "result.json").read_text().splitlines()) == 3
    pids = {json.loads(line)["train_pid"] for f in folders for line in (plain / f / "result.json").read_text().splitlines()}
    assert len(pids) == 1, "every arm trained in the one pack process"

    # `resources.*` may change on --resume, packing too: both modes are one Tune trainable (Tune's
    # restore refused a packed search resumed with arms_per_worker: 1, with a traceback).
    verdict = _verdict(plain)
    for arms in ("1", "2"):
        assert main(["search", str(tmp_path / "plain.yaml"), "--set", f"resources.arms_per_worker={arms}", "--resume"]) == 0
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err, captured.err[-3000:]
        assert _verdict(plain)["rank"] == verdict["rank"]

    # Both faults in one search: the r=1 arms diverge at step 12 and leave the pack; then the whole
    # pack process dies at step 15 (an r=4 arm's fault) and its r=4 arms resume in a new one.
    monkeypatch.setenv(FAULT_ENV, "r=1:step=12:kind=nan;r=4:step=15:kind=exit:once")
    code, crashed = _search(raw_config, tmp_path, "crashed", arms_per_worker=4)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    trials, _ = load_experiment(str(crashed))
    by_arm = {(row.r, row.lr): row for row in trials.itertuples()}
    for lr in (3e-3, 1e-2):
        assert by_arm[(1, lr)].status == "diverged" and by_arm[(1, lr)].steps == 12
        assert by_arm[(1, lr)].failure == "training loss became nan at step 12 (r=1, seed=0)"
        assert by_arm[(4, lr)].status == "completed" and by_arm[(4, lr)].steps == 30
    for log in crashed.glob("r0001*/result.json"):  # the failure row over its step-10 report, as a trial alone writes it
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        assert [r["step"] for r in rows] == [10, 12] and rows[-1]["trial_status"] == "diverged"
        for key in ("train_loss", "lr", "tokens_seen", "adapter_bytes"):
            assert rows[-1].get(key) == rows[0][key], (log.parent.name, key, rows[-1].get(key))
    assert "retrying from its last checkpoint" in captured.out + captured.err
    resumed = [json.loads(line) for f in crashed.glob("r0004*/result.json") for line in f.read_text().splitlines()]
    assert any(r["resumed_from_step"] == 10 for r in resumed), "arms resumed from their step-10 checkpoints"
    assert len({r["train_pid"] for r in resumed}) == 2, "a new pack took over"
    for log in crashed.glob("r0004*/result.json"):  # the retry keeps the reports before the crash (search/logs.py)
        steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
        assert steps[0] == 10 and set(steps) == {10, 20, 30}, f"{log.parent.name}: reports at steps {steps}"
    assert _verdict(crashed)["rank"] == _verdict(plain)["rank"] == 4
    assert _verdict(crashed)["learning_rate"] == _verdict(plain)["learning_rate"]
    before, after = _final_losses(plain), _final_losses(crashed)
    for arm in [(4, 3e-3), (4, 1e-2)]:
        assert after[arm] == pytest.approx(before[arm], rel=1e-4), f"arm {arm} continued exactly from its checkpoint"


def test_a_killed_packed_search_resumes_its_arms_from_their_checkpoints(raw_config, tmp_path, driver_env):
    import subprocess
    import sys

    raw = raw_config(name="packed-kill", lora={"ranks": [1, 4], "target_modules": "attention", "alpha": 16},
                     train={"max_steps": 40, "eval_every": 10, "batch_size": 8, "learning_rate": [3e-3, 1e-2]},
                     scheduler={"type": "sha", "grace_period": 10, "reduction_factor": 2},
                     resources={"cpus_per_trial": 1, "arms_per_worker": 4})
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(raw))
    experiment = str(tmp_path / "runs" / "packed-kill")
    cli = [sys.executable, "-m", "lora_rank_search.search.cli", "search", str(config)]
    logs = [open(tmp_path / name, "w+") for name in ("out-0.txt", "err-0.txt", "out-1.txt", "err-1.txt")]
    # The arm that goes on past rung 10 hangs at step 15 in the first driver only (`:once`): the kill
    # comes once the saved state records every arm's step-10 checkpoint while that arm still runs.
    # A trial's report reaches the state before its checkpoint does, and the arms held at the rung
    # (all cut here) record theirs first: "some running arm has a checkpoint" is not that moment.
    hang = ";".join(f"r={r}:step=15:kind=hang:once" for r in (1, 4))
    first = subprocess.Popen(cli, stdout=logs[0], stderr=logs[1], env={**driver_env, FAULT_ENV: hang})
    _wait_for(experiment, first, lambda snap: len(snap) == 4 and all(step >= 10 for _, step in snap.values())
              and any(status == "RUNNING" for status, _ in snap.values()))
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    kill_marked(f"LRS_TEST_RUN={driver_env['LRS_TEST_RUN']}".encode())  # the pack server and the trials with it

    second = subprocess.Popen([*cli, "--resume"], stdout=logs[2], stderr=logs[3], env={**driver_env, FAULT_ENV: hang})
    second.wait(timeout=600)
    assert second.returncode == 0, (logs[3].seek(0) or logs[3].read())[-3000:]
    logs[2].seek(0)
    assert "packing: 4 arms per worker" in logs[2].read()
    trials, history = load_experiment(experiment)
    assert len(trials) == 4 and set(trials["status"]) <= {"completed", "stopped"}
    assert (trials["status"] == "completed").sum() == 1
    assert (history["resumed_from_step"] >= 10).any(), "arms continued from their checkpoints"
    survivor = trials.loc[trials["status"] == "completed"].iloc[0]
    steps = history.loc[history["trial_id"] == survivor["trial_id"], "step"].tolist()
    assert steps == [10, 20, 30, 40], f"the first driver's step-10 report is kept, then the resumed steps: {steps}"
    assert _verdict(Path(experiment))["rank"] in (1, 4)


def test_on_gpus_auto_packs_the_arms_of_each_gpu_in_one_process(raw_config, ray_session, monkeypatch, capsys):
    """The default a GPU user gets (`gpus_per_trial: auto`, `arms_per_worker: auto`), on two logical
    GPUs whose (injected) memory holds the base once and two adapters beside it: two packs, one per
    GPU, each training its GPU's two arms in one process; Ray holds 0.5 GPU per arm; the meta says so."""
    import math

    from lora_rank_search.contract import layout
    from lora_rank_search.search import resources, runner
    from lora_rank_search.search.config import parse_config

    ray_session(num_cpus=4, num_gpus=2)  # Ray schedules these GPUs; torch never sees CUDA
    cfg = parse_config(raw_config(lora={"ranks": [1, 2, 4, 8]}, train={"max_steps": 20, "eval_every": 10},
                                  scheduler={"type": "none"}, resources={"gpus_per_trial": "auto", "arms_per_worker": "auto"}))
    prepared = runner.prepare(cfg, log=lambda _: None)
    est = runner.memory_estimate(cfg, prepared)
    device = math.ceil((est.base_weights + est.context + 2.5 * (est.adapter_and_optimizer + est.activations)) / resources.USABLE_FRACTION)
    for module in (runner, resources):  # the fraction's and the pack's sizing
        monkeypatch.setattr(module, "local_gpu_memory", lambda: device)
    lines: list[str] = []
    experiment = runner.run_search(cfg, log=lines.append)
    assert any(line.startswith("packing: 2 arms per worker on one shared base, 2 pack(s) of 1 GPU") for line in lines), lines
    assert any(line.startswith("search: 4 trials") and "0.5 CPU + 0.5 GPU each (a share of its pack)" in line for line in lines), lines
    meta = layout.read_meta(experiment)
    assert meta["resources_per_trial"] == {"cpu": 0.5, "gpu": 0.5}
    assert meta["packing"] == {"arms_per_worker": 2, "threads": 1, "packs_per_node": 1}
    trials, _ = load_experiment(experiment)
    assert len(trials) == 4 and trials["status"].eq("completed").all()
    pids = {}
    for row in trials.itertuples():
        reports = [json.loads(line) for line in (Path(experiment) / row.trial_dir / "result.json").read_text().splitlines()]
        assert [r["step"] for r in reports] == [10, 20]
        pids.setdefault(row.gpu_ids, set()).update(r["train_pid"] for r in reports)
    assert sorted(pids) == ["0", "1"] and sorted(trials["gpu_ids"]) == ["0", "0", "1", "1"], "two arms per GPU"
    assert all(len(p) == 1 for p in pids.values()) and len(set.union(*pids.values())) == 2, f"one pack process per GPU: {pids}"


def test_a_gpu_fraction_per_pack_puts_that_many_packs_on_a_gpu(raw_config, ray_session, monkeypatch):
    """`gpus_per_trial: 0.5` with packing: a pack holds half a GPU, so one GPU holds two packs (two
    processes, each with its base and its two arms), as the start-up summary says; before, every
    client of the GPU joined one pack, whatever the plan said."""
    import math

    from lora_rank_search.contract import layout
    from lora_rank_search.search import resources, runner
    from lora_rank_search.search.config import parse_config

    ray_session(num_cpus=4, num_gpus=1)
    cfg = parse_config(raw_config(lora={"ranks": [1, 2, 4, 8]}, train={"max_steps": 10, "eval_every": 10},
                                  scheduler={"type": "none"}, resources={"gpus_per_trial": 0.5, "arms_per_worker": "auto"}))
    prepared = runner.prepare(cfg, log=lambda _: None)
    est = runner.memory_estimate(cfg, prepared)
    half = math.ceil((est.base_weights + est.context + 2.5 * (est.adapter_and_optimizer + est.activations)) / resources.USABLE_FRACTION)
    for module in (runner, resources):
        monkeypatch.setattr(module, "local_gpu_memory", lambda: 2 * half)
    lines: list[str] = []
    experiment = runner.run_search(cfg, log=lines.append)
    assert any(line.startswith("packing: 2 arms per worker on one shared base, 2 pack(s) of 0.5 GPU") and "2 packs per GPU" in line
               for line in lines), lines
    assert layout.read_meta(experiment)["packing"]["packs_per_gpu"] == 2
    trials, _ = load_experiment(experiment)
    assert len(trials) == 4 and trials["status"].eq("completed").all()
    pids = {}
    for row in trials.itertuples():
        for line in (Path(experiment) / row.trial_dir / "result.json").read_text().splitlines():
            report = json.loads(line)
            pids.setdefault(report["train_pid"], set()).add(row.trial_id)
    assert len(pids) == 2, f"two pack processes on the one GPU: {pids}"
