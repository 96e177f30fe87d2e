"""Shared bits of the benchmarks: the machine line, timing, result printing."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable


def machine() -> str:
    """One line naming the machine: CPU model and cores, memory, GPU if any."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f"{torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    except ImportError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {gpu}"


def header(title: str) -> None:
    print(f"# {title}")
    print(f"machine: {machine()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M')}")


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """Median wall seconds of `repeats` calls of fn, and all of them."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times
