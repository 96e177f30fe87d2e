"""Tune's per-trial logs (result.json, progress.csv) without the lines a retried trial loses.

Tune writes each trial's reports to the driver's staging folder and copies that folder to storage
every ~10 s. When a failed trial starts again in the same run, Tune's loggers first copy the
*stored* file over the staging one (`LoggerCallback._restore_from_remote`): the reports written
since the last copy are gone, e.g. the step-10 line of an arm whose pack died at step 15, while its
step-10 checkpoint stays. The verdict, the halving rungs and the plots then miss that report.

The copy is right only where the staging folder has no file yet: a resumed search (a new Ray
session, a new staging folder). These loggers copy exactly then, and keep the staging file, which
holds every line the stored one holds and more, in a retry.
"""

from __future__ import annotations

import os

from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback


class _KeepStagedLines:
    def _restore_from_remote(self, file_name: str, trial) -> None:
        if os.path.exists(os.path.join(trial.local_path, file_name)):
            return  # a retry within this run: the staged file is the longer one
        super()._restore_from_remote(file_name, trial)


class ResultLog(_KeepStagedLines, JsonLoggerCallback):
    """result.json: one report a line, every report kept across retries."""


class ProgressLog(_KeepStagedLines, CSVLoggerCallback):
    """progress.csv: as result.json."""


def trial_logs() -> list:
    """The loggers a search passes to Tune (Tune then adds no default JSON or CSV logger)."""
    return [ResultLog(), ProgressLog()]
