"""Experiment-directory I/O that works the same for local paths and s3:// / gs:// URIs (pyarrow).

The check that a storage path is shared by every node of a cluster needs Ray: it is in `search.storage`.
"""

from __future__ import annotations

import os
from pathlib import Path


# Checkpoints Tune keeps per trial: the best CHECKPOINTS_KEPT by eval loss, plus the latest (which Ray
# always keeps). With one, a trial whose latest checkpoint is also its best has nothing to fall back
# on when that one does not load; with two, it falls back to the previous evaluation's (while the
# loss falls) or to its best one (trainables.trial.restorable_checkpoint).
CHECKPOINTS_KEPT = 2


def is_uri(path: str) -> bool:
    return "://" in str(path)


def filesystem(path: str):
    """(pyarrow filesystem, path inside it) for a local path (made absolute) or a URI."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path if is_uri(path) else os.path.abspath(os.path.expanduser(path)))


_fs = filesystem


def exists(path: str) -> bool:
    """True if a file or folder exists at the path or URI."""
    if not is_uri(path):
        return os.path.exists(path)
    import pyarrow.fs

    fs, inner = _fs(path)
    return fs.get_file_info(inner).type != pyarrow.fs.FileType.NotFound


def listdir(path: str) -> list[str]:
    """Names inside a folder at the path or URI; [] if it does not exist (or is not a folder)."""
    if not is_uri(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    import pyarrow.fs

    fs, inner = _fs(path)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, allow_not_found=True))
    return sorted(info.base_name for info in infos)


def write_text(path: str, text: str) -> None:
    """Write a small text file, creating parent folders."""
    if not is_uri(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        return
    fs, inner = _fs(path)
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(inner) as out:
        out.write(text.encode())


def read_text(path: str) -> str:
    if not is_uri(path):
        return Path(path).read_text()
    fs, inner = _fs(path)
    with fs.open_input_stream(inner) as handle:
        return handle.read().decode()


def join(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts])


# --------------------------------------------------------------------------- shared storage on a cluster
# Since Ray 2.7 Tune does not copy trial folders to the head node: each trial writes its
# checkpoints to storage_path *on the node it runs on*. A local storage_path that is not the same
# shared filesystem on every node therefore scatters checkpoints across machines, and a trial
# restored on another node cannot find them. The driver checks every node before the search; each
# trial checks its own node when it starts (nodes an autoscaler adds later).

MARKER = ".lora-rank-search-storage"  # in the experiment folder: the token of the current run
SHARED_STORAGE_HINT = "on a multi-node cluster use s3://, gs:// or a shared filesystem mounted at the same path on every node"


def local_path(path: str) -> str | None:
    """The filesystem path behind a local storage path or file:// URI; None for object stores
    (s3://, gs://, ...: the same bucket from every node)."""
    if str(path).startswith("file://"):
        return str(path)[len("file://"):].split("?", 1)[0]
    return None if is_uri(path) else str(path)


def sees_marker(marker: str, token: str) -> bool:
    """True if the marker file at this local path holds the token (read on the node that asks)."""
    try:
        with open(marker) as handle:
            return handle.read().strip() == token
    except OSError:
        return False


def not_shared_problem(storage_path: str, answers: dict[str, bool | None]) -> str | None:
    """Decide from each node's answer (node ip -> saw the driver's marker; None: did not answer)
    whether storage_path is shared; the problem line, or None. Nodes that did not answer are left
    to the trial's own check."""
    missing = sorted(ip for ip, seen in answers.items() if seen is False)
    if not missing:
        return None
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    return (
        f"storage_path: {storage_path!r} is not shared with node {missing[0]}{more} (it cannot see a file the driver"
        f" wrote there); {SHARED_STORAGE_HINT}"
    )


def write_marker(experiment_path: str) -> dict | None:
    """Write this run's token into the experiment folder; what a trial needs to check its node
    ({'path', 'token'}), or None for object-store URIs."""
    import uuid

    folder = local_path(experiment_path)
    if folder is None:
        return None
    token = uuid.uuid4().hex
    write_text(os.path.join(folder, MARKER), token)
    return {"path": os.path.join(folder, MARKER), "token": token, "storage_path": experiment_path.rsplit("/", 1)[0]}


def writable_problem(path: str) -> str | None:
    """Why a local storage_path could not be created or written, or None; leaves nothing behind (a
    probe folder is made in the nearest existing folder and removed at once).

    The nearest existing folder on the way must be a folder this user can write into.
    """
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        return f"storage_path: cannot write to {path!r} ({existing!r} is a file, not a folder)"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"storage_path: cannot write to {path!r} (permission denied on {existing!r})"
    # os.access says yes to root everywhere, /proc and read-only mounts included: try a folder there (removed at once)
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lrs-probe-", dir=existing))
    except OSError as exc:
        return f"storage_path: cannot write to {path!r} (cannot create a folder in {existing!r}: {exc.strerror or exc})"
    return None
