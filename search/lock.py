"""One search per experiment at a time: a lock file beside the experiment folder.

Two drivers in one experiment folder (two `lora-rank search` started together, or a `--resume`
while the first still runs) trained the same arms into the same trial folders: every arm ended
damaged, and both drivers reported an interruption that never happened. The driver that starts a
search creates `<storage_path>/.<name>.lock` (atomically: `O_EXCL`), holds it while it runs, and
touches it every `HEARTBEAT_S`; another search on the experiment is refused before any work.

A lock whose driver is gone is stale and taken over: on the same machine, its process no longer
exists; from another machine (a cluster's shared storage), it was not touched for `STALE_S`.
Remote storage (s3://, gs://) has no atomic create: it is not locked.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

from lora_rank_search.contract.config import ConfigError, SearchConfig
from lora_rank_search.contract.storage import is_uri

HEARTBEAT_S = 10.0
STALE_S = 60.0


def lock_path(cfg: SearchConfig) -> Path:
    return Path(cfg.storage_path) / f".{cfg.name}.lock"


def _alive(holder: dict, age_s: float) -> bool:
    """Whether the search that wrote this lock still runs."""
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's live process
            return True
        return True
    return age_s < STALE_S


def _holder(path: Path) -> tuple[dict, float]:
    """What the lock says (empty while its writer is still writing it) and its age in seconds."""
    try:
        age = time.time() - path.stat().st_mtime
        text = path.read_text()
    except FileNotFoundError:
        return {}, float("inf")
    try:
        data = json.loads(text)
    except ValueError:
        data = {}
    return (data if isinstance(data, dict) else {}), age


def take(cfg: SearchConfig) -> Optional[Path]:
    """Create the lock, or raise ConfigError naming the search that holds it. Returns its path (None
    for remote storage)."""
    if is_uri(cfg.storage_path):
        return None
    path = lock_path(cfg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # a storage_path that cannot be made: the search's own checks say so, naming it
        return None
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):  # a stale lock is removed once, then created again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder, age = _holder(path)
            if _alive(holder, age) or (not holder and age < STALE_S):
                who = f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}" if holder else "starting now"
                raise ConfigError(
                    [f"name: the experiment {cfg.experiment_path!r} is in use by another search ({who}); wait for it to "
                     f"end or stop it first (two searches in one folder train the same arms into the same trial folders). "
                     f"A search that is gone leaves {str(path)!r} behind: it is taken over once its process is gone "
                     f"(on this machine) or {STALE_S:.0f} s after its last heartbeat (on another); delete it if no search runs"], "input") from None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(mine, handle)
        return path
    raise ConfigError([f"name: could not take the lock {str(path)!r}: another search took it at the same moment"], "input")


@contextlib.contextmanager
def held(cfg: SearchConfig) -> Iterator[None]:
    """The experiment's lock for the duration of the block (refused: ConfigError, before any work)."""
    made = not Path(cfg.storage_path).exists() and not is_uri(cfg.storage_path)
    path = take(cfg)
    if path is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(path)

    thread = threading.Thread(target=beat, name="lrs-lock", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        holder, _ = _holder(path)
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if made:  # a search refused before it wrote anything leaves no storage folder behind
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # only if empty
