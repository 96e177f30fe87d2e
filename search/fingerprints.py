"""What defines an experiment, as fingerprints: its config, its model's weight files, its data's contents.

Recorded in search_meta.json when a search starts (`FINGERPRINTS`); `--resume` recomputes them and
refuses when one changed (`changes`), because trials evaluated on different data or a different
base are not comparable. Digests are sha256 of the bytes; a file over FULL_HASH_BYTES (a large
weight shard) is fingerprinted by its size and three SAMPLE_BYTES samples (start, middle, end),
so a resume never reads many gigabytes. A hub model or dataset (not a local path) is recorded by
name only: nothing on this machine says what it held. `check_fingerprints` and the messages for a
missing stored config (`missing_config`, `recovery`) are what `--resume` runs before Ray starts.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping, Optional

from lora_rank_search.contract import layout
from lora_rank_search.search import storage
from lora_rank_search.search.config import ConfigError, warn

FINGERPRINTS = "fingerprints"  # the search_meta.json key
CONFIG_KEYS_IGNORED = ("resources.",)  # what may change between a run and its resume (as check_experiment_dir allows)
FULL_HASH_BYTES = 256 * 2**20  # bytes: files up to this size are hashed whole
SAMPLE_BYTES = 4 * 2**20  # bytes per sample of a larger file
MODEL_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".json")  # weights, their index, the model config


def file_digest(path: str) -> str:
    """'sha256:<hex>' of the file's bytes, or 'sampled-sha256:<size>:<hex>' of a large one."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
            return f"sha256:{digest.hexdigest()}"
        for offset in (0, size // 2, size - SAMPLE_BYTES):
            handle.seek(offset)
            digest.update(handle.read(SAMPLE_BYTES))
    return f"sampled-sha256:{size}:{digest.hexdigest()}"


def path_digest(path: Optional[str], suffixes: tuple = ()) -> Optional[dict]:
    """{relative file name: digest} of a local file or folder (with `suffixes`: only files ending so);
    None when `path` is not on this machine (a hub id, a builtin)."""
    if not path or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return {os.path.basename(path): file_digest(path)}
    out = {}
    for folder, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or (suffixes and not name.endswith(suffixes)):
                continue
            full = os.path.join(folder, name)
            out[os.path.relpath(full, path)] = file_digest(full)
    return out


def config_digest(plain_config: Mapping) -> str:
    """sha256 of the config's values that define the search (every key but CONFIG_KEYS_IGNORED)."""
    flat = {k: v for k, v in flatten(plain_config).items() if not k.startswith(CONFIG_KEYS_IGNORED)}
    return "sha256:" + hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()


def fingerprints(plain_config: Mapping, model_path: str) -> dict:
    """Every fingerprint of an experiment: {'config', 'model', 'data.source', 'data.eval_source'};
    each file entry is {'path', 'files': {name: digest} or None (not a local path)}."""
    data = plain_config.get("data") or {}
    out = {"config": config_digest(plain_config),
           "model": {"path": model_path, "files": path_digest(model_path, MODEL_SUFFIXES)}}
    for key in ("source", "eval_source"):
        if data.get(key):
            out[f"data.{key}"] = {"path": data[key], "files": path_digest(data[key])}
    return out


def changes(before: Mapping, now: Mapping) -> list[str]:
    """One message per fingerprint that differs (naming the field and the file); [] when none.
    A fingerprint recorded before but not now (or the reverse) is a change too."""
    out = []
    if before.get("config") and before.get("config") != now.get("config"):
        out.append("config: the experiment's config differs from the one it was started with (its fingerprint in "
                   "search_meta.json); was lora_rank_search.yaml edited?")
    for key in sorted((set(before) | set(now)) - {"config"}):
        old, new = before.get(key) or {}, now.get(key) or {}
        field = "model.name_or_path" if key == "model" else key
        if old.get("files") == new.get("files"):
            continue
        if old.get("files") is None or new.get("files") is None:
            where = old.get("path") or new.get("path")
            out.append(f"{field}: {where!r} was {'not ' if old.get('files') is None else ''}a local path when the search "
                       f"started and is {'not ' if new.get('files') is None else ''}one now")
            continue
        names = sorted(n for n in set(old["files"]) | set(new["files"]) if old["files"].get(n) != new["files"].get(n))
        where = str(new.get("path") or old.get("path") or "")
        shown = ", ".join(where if os.path.basename(where) == n else os.path.join(where, n) for n in names[:3])
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        out.append(f"{field}: the contents of {shown}{more} changed since the search started; trials before and after "
                   "would not be comparable (restore the original, or start a new search under another name)")
    return out


# --------------------------------------------------------------------------- on --resume

def missing_config(exp: str, saved_path: str) -> str:
    return (f"{saved_path}: the experiment's stored config is missing, so nothing says what this search was and "
            f"--resume cannot check it; {recovery(exp, saved_path)}")


def recovery(exp: str, saved_path: str) -> str:
    """How to rebuild the stored config: search_meta.json holds a copy (searches since its `config` entry)."""
    if layout.read_meta(exp).get("config"):
        meta = storage.join(exp, layout.META_FILE)
        return (f"rebuild it from search_meta.json's copy: python -c \"import json,yaml;print(yaml.safe_dump(json.load("
                f"open('{meta}'))['config'],sort_keys=False))\" > {saved_path!r}, then resume again")
    return "restore it from a copy of the experiment (sync it again); or start a new search under another name (--set name=...)"


def check_fingerprints(cfg, model_path: str) -> None:
    """On --resume: refuse (ConfigError, one line per change) when the config, the model's weight
    files or the data's contents differ from the fingerprints recorded when the search started.
    An experiment from before fingerprints is warned about and resumed."""
    recorded = layout.read_meta(cfg.experiment_path).get(FINGERPRINTS)
    if not isinstance(recorded, dict):
        warn(f"name: {cfg.experiment_path!r} records no fingerprints (an older search, or search_meta.json is missing): "
             "whether its model and data changed since it started cannot be checked")
        return
    changed = changes(recorded, fingerprints(cfg.to_dict(), model_path))
    if changed:
        raise ConfigError([f"{line} (experiment {cfg.experiment_path})" for line in changed], "input")


def flatten(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
