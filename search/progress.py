"""One line per event on the driver: trial start, each evaluation, early stops, completion, errors."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

from ray.tune import Callback

from lora_rank_search.contract.layout import ERROR_FILE


WIDTH = 22  # trial names: r16-lr3e-4-seed0


class ProgressPrinter(Callback):
    """Concise progress for `lora-rank search` (Tune's own tables are switched off)."""

    def __init__(self, max_steps: int, stream: Optional[TextIO] = None):
        self.max_steps = max_steps
        self.stream = stream  # None = sys.stdout at the time of writing (keeps the callback picklable)
        self.t0 = time.time()

    def _say(self, text: str) -> None:
        stream = self.stream or sys.stdout
        stream.write(f"[{time.time() - self.t0:6.0f}s] {text}\n")
        stream.flush()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "stream": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, t0=time.time())  # a resumed search counts from its own start

    def on_trial_start(self, iteration, trials, trial, **info):
        # A trial that starts again from a checkpoint: its rank passed a halving rung, a retry, or
        # --resume. The step is its checkpoint's, which after a repaired --resume or a retry can
        # be earlier than its last report (search/storage.py::repair_stale_checkpoints).
        latest = getattr(trial, "latest_checkpoint_result", None)
        step = (latest.metrics or {}).get("step") if latest is not None else None
        self._say(f"{str(trial):<{WIDTH}} {'resumed from step ' + str(step) if step else 'started'}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("failure"):  # diverged or out of memory: the trial ends itself
            self._say(f"{str(trial):<{WIDTH}} {str(result.get('trial_status', 'failed')).upper()}: {result['failure']}")
            return
        if "eval_loss" not in result:
            return
        self._say(
            f"{str(trial):<{WIDTH}} step {result['step']:>5}/{self.max_steps}  eval_loss {result['eval_loss']:.4f}"
            f"  train_loss {result['train_loss']:.4f}  {result['tokens_per_s']:,.0f} tok/s"
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        step = last.get("step", 0)
        best = last.get("best_eval_loss")
        best_text = f" (best eval_loss {best:.4f} at step {last.get('best_step')})" if best is not None else ""
        if last.get("failure"):
            self._say(f"{str(trial):<{WIDTH}} ended at step {step}: {last.get('trial_status')}")
        elif step and step < self.max_steps:
            self._say(f"{str(trial):<{WIDTH}} stopped early by the scheduler at step {step}{best_text}")
        else:
            self._say(f"{str(trial):<{WIDTH}} finished at step {step}{best_text}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        step = (trial.last_result or {}).get("step", 0)
        self._say(f"{str(trial):<{WIDTH}} crashed (last report at step {step}); retrying from its last checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._say(f"{str(trial):<{WIDTH}} FAILED (see {trial.storage.trial_fs_path if trial.storage else 'its folder'}/{ERROR_FILE})")
