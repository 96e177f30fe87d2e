"""The W&B callback of a search (made by `search.tracking`; its own module because Ray's W&B
integration imports wandb, seconds of CPU that an MLflow-only search does not pay): Ray Tune's
`WandbLoggerCallback`, under Ray's name (its usage tag counts callbacks by name,
`search.ray_usage`), at module level so that Tune's saved state names it and a resumed search runs
this code (a restored Tuner gets new tracker callbacks: `search.runner.build_tuner`).

A W&B run per trial whose id is the trial's id, so a trial resumed by --resume continues its run;
every run's files are written before its logging actor goes; and the end of an interrupted search
tells the actors of the trials that never ended to finish, instead of waiting Ray's upload timeout
(30 minutes) for them.
"""

from __future__ import annotations

from ray.air.integrations import wandb as ray_wandb

END_WAIT_S = 120  # how long the end of a search waits for W&B's per-trial actors to write their runs


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
