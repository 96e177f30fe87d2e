"""The per-trial Ray Tune trainable: 4-bit model loading, LoRA, data, the training loop, metrics."""

import sys


def _quiet_sigterm_in_a_ray_worker() -> None:
    """Ray imports this package in a worker as it creates a trial's (or a pack server's) actor, before
    any trial code runs. Tune sometimes creates a trial actor and drops it again at once (seen
    13 ms apart in a raylet log); the raylet then SIGTERMs the worker, and without
    `trial.exit_quietly_on_sigterm` in place the exit could land in a weakref callback and print a
    traceback on the user's console. The driver (not a worker) is left alone."""
    ray = sys.modules.get("ray")
    worker = getattr(getattr(ray, "_private", None), "worker", None)
    if worker is None or getattr(worker.global_worker, "mode", None) != getattr(ray, "WORKER_MODE", object()):
        return
    from lora_rank_search.trainables.trial import exit_quietly_on_sigterm

    exit_quietly_on_sigterm()


_quiet_sigterm_in_a_ray_worker()
