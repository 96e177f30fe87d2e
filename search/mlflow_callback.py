"""The MLflow callback of a search (made by `search.tracking`): Ray Tune's `MLflowLoggerCallback`,
under Ray's name (its usage tag counts callbacks by name, `search.ray_usage`), at module level so
that Tune's saved state names it and a resumed search runs this code (a restored Tuner gets new
tracker callbacks: `search.runner.build_tuner`).

A child run per trial under the search's parent run; a trial that continues after --resume logs on
to its run of the first start (found by its trial name under the parent) instead of opening a
second one, and that run ends when the trial does.
"""

from __future__ import annotations

from ray.air.integrations import mlflow as ray_mlflow


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
