"""Tune's callback usage tag, computed without importing Ray's logger integrations (wandb)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from ray.tune import Callback
from ray.tune.logger import CSVLoggerCallback, LoggerCallback
from ray.air._internal import usage
from lora_rank_search.search import ray_usage
from lora_rank_search.search.progress import ProgressPrinter

class Mine(LoggerCallback):
    pass

callbacks = [ProgressPrinter(10), CSVLoggerCallback(), Mine(), Mine(), object()]
ray_usage.install()
assert usage.tag_callbacks is ray_usage.tag_callbacks
ours = dict(ray_usage.callback_counts(callbacks))
assert usage.tag_callbacks(callbacks) is True and usage.tag_callbacks([]) is False
assert "wandb" not in sys.modules, "imported wandb"
theirs = dict(usage._count_callbacks(callbacks))  # Ray's own: imports the integrations
assert "wandb" in sys.modules, "the probe cannot tell: wandb is not installed"
assert ours == theirs == {"CustomCallback": 1, "CSVLoggerCallback": 1, "CustomLoggerCallback": 2}, (ours, theirs)
print("ok")
"""


def test_the_callback_usage_tag_equals_rays_and_does_not_import_wandb():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-3000:]
