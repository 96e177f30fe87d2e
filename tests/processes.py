"""Ending the processes a test started, found by a marker in their environment (never `ray stop`,
which would end every Ray on the machine)."""

from __future__ import annotations

import os
import signal


def kill_marked(marker: bytes) -> list[int]:
    """SIGKILL every process but this one whose environment holds `marker` (b"KEY=VALUE"), such as
    the Ray processes a killed driver leaves behind; returns their PIDs."""
    killed = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if marker not in handle.read().split(b"\0"):
                    continue
            os.kill(int(pid), signal.SIGKILL)
            killed.append(int(pid))
        except (OSError, ProcessLookupError):
            continue
    return killed
