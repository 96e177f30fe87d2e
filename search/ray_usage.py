"""Ray Tune's usage tag for callbacks, without importing every logger integration to compute it.

At the start of every `tune.run`, Tune tags its usage stats with how many callbacks of each built-in
class it was given. To tell its classes from ours it imports each integration module: the wandb one
imports wandb when it is installed (the `tracking` extra), about 2-3 s of CPU in every search's
start whether tracking is on or not (4.5 s of a 31 s tiny search under cProfile). The tag here is
the same (the same names and counts, tests/test_ray_usage.py compares them), from class names alone.
"""

from __future__ import annotations

import collections
import json

# Ray's logger integrations that `ray.air._internal.usage._count_callbacks` imports to name them.
INTEGRATIONS = ("WandbLoggerCallback", "MLflowLoggerCallback", "CometLoggerCallback", "AimLoggerCallback")


def callback_counts(callbacks) -> dict[str, int]:
    """Callback class name -> count, as Ray counts them: built-in classes by name, the others as
    CustomLoggerCallback or CustomCallback."""
    from ray.tune import Callback
    from ray.tune.logger import LoggerCallback
    from ray.tune.utils.callback import DEFAULT_CALLBACK_CLASSES

    names = set(INTEGRATIONS) | {cls.__name__ for cls in DEFAULT_CALLBACK_CLASSES}
    counts: dict[str, int] = collections.defaultdict(int)
    for callback in callbacks or []:
        if not isinstance(callback, Callback):
            continue
        name = type(callback).__name__
        if name in names:
            counts[name] += 1
        elif isinstance(callback, LoggerCallback):
            counts["CustomLoggerCallback"] += 1
        else:
            counts["CustomCallback"] += 1
    return counts


def tag_callbacks(callbacks) -> bool:
    from ray.air._internal import usage

    if not callbacks:
        return False
    counts = callback_counts(callbacks)
    if counts:
        usage.record_extra_usage_tag(usage.TagKey.AIR_CALLBACKS, json.dumps(counts))
    return True


def install() -> None:
    """Tune calls `ray.air._internal.usage.tag_callbacks` through the module: replace it there.
    A Ray without it (another version) is left as it is."""
    from ray.air._internal import usage

    if callable(getattr(usage, "tag_callbacks", None)) and hasattr(usage, "TagKey") and hasattr(usage, "record_extra_usage_tag"):
        usage.tag_callbacks = tag_callbacks
