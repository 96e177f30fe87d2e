"""The trackers' Ray Tune callbacks, made by `search.tracking`. Imported only when a tracker is
configured: Ray's W&B integration imports wandb (seconds of CPU per search).

The classes live at module level and keep Ray's names (its usage tag counts them by name,
`search.ray_usage`). Tune pickles its callbacks into the experiment's saved state; a resumed search
replaces them with new ones (`search.runner.build_tuner`), so it runs this code, not the copy of an
older one.

- `MLflowLoggerCallback`: a child run per trial under the search's parent run; a trial that
  continues after --resume logs on to its run of the first start (found by its trial name under the
  parent) instead of opening a second one, and that run ends when the trial does.
- `WandbLoggerCallback`: a W&B run per trial (its id is the trial's id, so a resumed trial continues
  its run); every run's files are written before its logging actor goes; and the end of an
  interrupted search tells the actors of the trials that never ended to finish, instead of waiting
  Ray's upload timeout (30 minutes) for them.
"""

from __future__ import annotations

from ray.air.integrations import mlflow as ray_mlflow
from ray.air.integrations import wandb as ray_wandb

END_WAIT_S = 120  # how long the end of a search waits for W&B's per-trial actors to write their runs


class MLflowLoggerCallback(ray_mlflow.MLflowLoggerCallback):
    def log_trial_start(self, trial) -> None:
        if trial not in self._trial_runs:
            earlier = self._run_of(str(trial))
            if earlier:
                self._trial_runs[trial] = earlier
        super().log_trial_start(trial)

    def _run_of(self, name: str):
        """The id of this search's child run named `name` (a trial of the first start), or None."""
        parent = (self.tags or {}).get("mlflow.parentRunId")
        if not parent or self.mlflow_util.experiment_id is None:
            return None
        quoted = name.replace("'", "\\'")
        runs = self.mlflow_util._get_client().search_runs(
            [self.mlflow_util.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.trial_name = '{quoted}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None


class _FlushingActor(ray_wandb._WandbLoggingActor):
    """`wandb.finish()` returns before W&B's service process has written the run's files, and Ray
    kills the actor (and with it that process) as soon as finish returns, which lost whole offline
    runs (a 7-byte run file): tear W&B down first."""

    def run(self):
        super().run()
        self._wandb.teardown()


class WandbLoggerCallback(ray_wandb.WandbLoggerCallback):
    _logger_actor_cls = _FlushingActor

    def __init__(self, *args, **kwargs):
        super().__init__(*args, resume="allow", **kwargs)  # a trial resumed by --resume continues its run

    def on_experiment_end(self, trials, **info) -> None:
        # Trials cut short by Ctrl-C had no log_trial_end: their actors wait for more results until told to end.
        for trial in list(self._trial_queues):
            self._signal_logging_actor_stop(trial)
        self._cleanup_logging_actors(timeout=min(self._upload_timeout, END_WAIT_S), kill_on_timeout=True)
