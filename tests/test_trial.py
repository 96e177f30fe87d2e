"""The trial loop without Ray: metrics present and sane, checkpoints real, resume exact."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_rank_search.search.config import parse_config
from lora_rank_search.search.runner import prepare
from lora_rank_search.search.space import trial_settings
from lora_rank_search.trainables.lora import lora_param_count
from lora_rank_search.trainables.trial import ADAPTER_DIR, STATE_FILE, lr_factor, run_trial

# Every report carries every declared metric (trainables/metrics.py).
from lora_rank_search.contract.metrics import REPORTED


@pytest.fixture
def setup(raw_config):
    def make(**over):
        cfg = parse_config(raw_config(**over))
        prepared = prepare(cfg, log=lambda _: None)
        return cfg, prepared, trial_settings(cfg, prepared.model_path, prepared.targets)

    return make


@pytest.mark.slow
def test_every_report_has_every_metric_and_sane_values(setup, tmp_path):
    cfg, prepared, settings = setup(train={"max_steps": 25, "eval_every": 10})
    reports = []

    def report(metrics, folder):
        saved = Path(folder) / ADAPTER_DIR / "adapter_model.safetensors"
        assert metrics["adapter_bytes"] == saved.stat().st_size
        assert (Path(folder) / STATE_FILE).is_file()
        reports.append(dict(metrics))

    run_trial({"r": 4, "seed": 0}, settings, prepared.data, report)
    assert [m["step"] for m in reports] == [10, 20, 25], "every eval_every steps, and at max_steps"
    for m in reports:
        missing = [k for k in REPORTED if k not in m]
        assert not missing, missing
        assert math.isfinite(m["eval_loss"]) and m["eval_loss"] > 0
        assert m["eval_perplexity"] == pytest.approx(math.exp(m["eval_loss"]))
        assert math.isfinite(m["train_loss"]) and m["tokens_per_s"] > 0 and m["peak_memory_bytes"] > 0
        assert m["trainable_params"] == lora_param_count(prepared.linear_shapes, prepared.targets, 4)
        assert m["lora_alpha"] == 8.0 and m["alpha_rule"] == "2r" and m["r"] == 4
    assert reports[0]["tokens_seen"] < reports[1]["tokens_seen"] < reports[2]["tokens_seen"]
    assert reports[-1]["eval_loss"] < reports[0]["eval_loss"], "training reduces the eval loss"
    base = reports[0]["base_eval_loss"]
    assert all(m["base_eval_loss"] == base for m in reports), "the step-0 evaluation is carried in every report"
    assert base > reports[0]["eval_loss"], "the untouched base is worse than the adapter after training"


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1])  # with dropout, the masks after the resume must be the same ones too
def test_resume_from_a_checkpoint_continues_exactly(setup, tmp_path, dropout):
    cfg, prepared, settings = setup(train={"max_steps": 30, "eval_every": 10}, lora={"dropout": dropout})
    full, partial = [], []
    saved = tmp_path / "ckpt10"

    def keep_first(metrics, folder):
        full.append(metrics)
        if metrics["step"] == 10:
            shutil.copytree(folder, saved)

    run_trial({"r": 2, "seed": 1}, settings, prepared.data, keep_first)
    run_trial({"r": 2, "seed": 1}, settings, prepared.data, lambda m, f: partial.append(m), restore_from=str(saved))
    assert [m["step"] for m in partial] == [20, 30]
    assert partial[0]["resumed_from_step"] == 10
    for a, b in zip(full[1:], partial):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)
        assert b["tokens_seen"] == a["tokens_seen"]


def test_lr_schedules():
    assert lr_factor(0, "constant", 0, 100) == 1.0
    assert lr_factor(0, "cosine", 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, "cosine", 10, 100) == pytest.approx(1.0)
    assert lr_factor(100, "cosine", 10, 100) == pytest.approx(0.0)
    assert lr_factor(55, "linear", 10, 100) == pytest.approx(0.5)


_EXIT_IN_CALLBACK = """
import weakref
{install}
class Thing: pass
def on_collect(_):  # what Ray's SIGTERM handler does when the signal lands in a weakref callback
    raise SystemExit(1)
thing = Thing()
ref = weakref.ref(thing, on_collect)
del thing
print("kept running", flush=True)
"""


@pytest.mark.parametrize("installed", [False, True])
def test_a_sigterm_exit_inside_a_callback_exits_without_a_traceback(installed):
    install = "from trainables.trial import exit_quietly_on_sigterm; exit_quietly_on_sigterm()" if installed else ""
    done = subprocess.run([sys.executable, "-c", _EXIT_IN_CALLBACK.format(install=install)], capture_output=True, text=True, timeout=600)
    if installed:
        assert (done.returncode, done.stdout, done.stderr) == (1, "", "")
    else:  # plain Python: the exit is ignored, with a traceback, and the process goes on
        assert done.returncode == 0 and "kept running" in done.stdout
        assert "Traceback" in done.stderr and "SystemExit" in done.stderr


def test_a_reused_worker_reports_each_trials_own_peak_memory():
    """Workers run trial after trial (reuse_actors): the peak a trial reports starts at its start,
    not at the largest trial that ran before it in the same process."""
    import torch  # noqa: F401 - loaded before the count, as in a worker

    from lora_rank_search.trainables.trial import peak_memory_bytes, reset_peak_memory

    reset_peak_memory()
    earlier_trial = bytearray(b"\x01") * (400 * 2**20)  # 400 MiB resident
    del earlier_trial
    before = peak_memory_bytes("cpu")
    reset_peak_memory()
    after = peak_memory_bytes("cpu")
    assert before - after > 300 * 2**20, (before, after)


@pytest.mark.slow
def test_a_trial_actor_has_the_quiet_exit_from_its_creation_before_any_trial_runs(ray_session, tmp_path):
    """Tune may create a trial's actor and drop it before its first step; the raylet then SIGTERMs
    it (a raylet log showed 13 ms between the two). The quiet exit must already be in place then,
    and the driver's own process must not get it."""
    import ray
    from ray import tune
    from ray.train._internal.storage import StorageContext
    from ray.tune.trainable.function_trainable import wrap_function

    from lora_rank_search.trainables.trial import lora_trial

    ray_session(num_cpus=1)
    trainable = wrap_function(tune.with_parameters(lora_trial, settings=None, data=None))  # the class Tune makes of it
    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="search", trial_dir_name="trial")
    actor = ray.remote(trainable).remote(config={}, storage=storage)
    installed = ray.get(actor.__ray_call__.remote(lambda _: getattr(sys.unraisablehook, "lrs_exit_on_sigterm", False)))
    assert installed is True, "a trial actor that has not run its trial has no quiet exit on SIGTERM"
    driver = subprocess.run([sys.executable, "-c", "import sys, ray, lora_rank_search.trainables.trial; "
                             "print(getattr(sys.unraisablehook, 'lrs_exit_on_sigterm', False))"],
                            capture_output=True, text=True, timeout=600)
    assert driver.stdout.strip() == "False", driver.stderr[-2000:]
