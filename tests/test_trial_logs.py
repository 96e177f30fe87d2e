"""A trial that fails and starts again in the same run keeps every report it had written
(Tune's own loggers copy the stored file, up to ~10 s old, over the newer staged one)."""

import csv
import json
from pathlib import Path

import pyarrow.fs
import pytest
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from lora_rank_search.search.logs import ProgressLog, ResultLog, trial_logs


class _Trial:
    """What Tune's loggers read of a trial (hashable by identity, as Tune's Trial is)."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def _trial(tmp_path: Path):
    staged, stored = tmp_path / "staging" / "r4", tmp_path / "storage" / "r4"
    stored.mkdir(parents=True)
    staged.mkdir(parents=True)  # Tune makes it when the trial is created
    trial = _Trial(
        config={"r": 4}, local_path=str(staged), checkpoint=object(),
        storage=_Trial(trial_fs_path=str(stored), storage_filesystem=pyarrow.fs.LocalFileSystem()),
    )
    trial.init_local_path = lambda: staged.mkdir(parents=True, exist_ok=True)
    return trial, staged, stored


def _steps(logger, folder: Path) -> list:
    if isinstance(logger, JsonLoggerCallback):
        return [json.loads(line)["step"] for line in (folder / "result.json").read_text().splitlines()]
    return [int(row["step"]) for row in csv.DictReader((folder / "progress.csv").open())]


def _retry(logger, tmp_path) -> tuple[list, Path]:
    """Report step 10, let storage hold an older copy (the last sync was before that report),
    fail, start again (a retry in the same run), report step 20."""
    trial, staged, stored = _trial(tmp_path)
    logger.log_trial_start(trial)
    logger.log_trial_result(1, trial, {"step": 10, "eval_loss": 2.0})
    name = "result.json" if isinstance(logger, JsonLoggerCallback) else "progress.csv"
    (stored / name).write_text("")  # synced when the trial started: no report yet
    logger.log_trial_end(trial, failed=True)
    logger.log_trial_start(trial)
    logger.log_trial_result(2, trial, {"step": 20, "eval_loss": 1.5})
    logger.log_trial_end(trial)
    return _steps(logger, staged), stored


@pytest.mark.parametrize("ours, tunes", [(ResultLog, JsonLoggerCallback), (ProgressLog, CSVLoggerCallback)])
def test_a_retried_trial_keeps_the_reports_written_before_it_failed(ours, tunes, tmp_path):
    assert _retry(ours(), tmp_path / "ours")[0] == [10, 20]
    # Tune's logger, same events: the step-10 report is lost (why ours exist)
    assert _retry(tunes(), tmp_path / "tunes")[0] == [20]


@pytest.mark.parametrize("logger", [ResultLog, ProgressLog])
def test_a_resumed_search_starts_from_the_stored_reports(logger, tmp_path):
    """A new Ray session has an empty staging folder: the stored reports are copied in first."""
    first = logger()
    steps, stored = _retry(first, tmp_path)
    resumed_trial, staged, _ = _trial(tmp_path / "resumed")
    for path in stored.iterdir():
        path.unlink()
    for name in ("result.json", "progress.csv"):
        source = Path(tmp_path / "staging" / "r4" / name)
        if source.exists():
            (Path(resumed_trial.storage.trial_fs_path) / name).write_text(source.read_text())
    again = logger()
    again.log_trial_start(resumed_trial)
    again.log_trial_result(3, resumed_trial, {"step": 30, "eval_loss": 1.2})
    again.log_trial_end(resumed_trial)
    assert _steps(again, staged) == [10, 20, 30]


def test_a_search_passes_its_loggers_so_tune_adds_none_of_its_own():
    from ray.tune.utils.callback import _create_default_callbacks

    callbacks = _create_default_callbacks(trial_logs(), air_verbosity=None)
    assert sum(isinstance(c, JsonLoggerCallback) for c in callbacks) == 1
    assert sum(isinstance(c, CSVLoggerCallback) for c in callbacks) == 1
