"""Experiment-directory I/O that works the same for local paths and s3:// / gs:// URIs (pyarrow)."""

from __future__ import annotations

import os
from pathlib import Path


def is_uri(path: str) -> bool:
    return "://" in str(path)


def _fs(path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path)


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
