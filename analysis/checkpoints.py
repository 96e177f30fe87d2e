"""The adapter checkpoints a search kept on disk (local path or URI), and reading/copying them.

Tune keeps, per trial, the two best checkpoints by eval_loss and the latest one
(`search.storage.CHECKPOINTS_KEPT` plus the latest, which Ray always keeps for resuming). Each checkpoint folder `checkpoint_NNNNNN/`
holds `adapter/` (PEFT format: adapter_config.json + adapter_model.safetensors) and the trainer
state; the report row that produced it names it in `checkpoint_dir_name`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import pandas as pd

from lora_rank_search.contract import storage
from lora_rank_search.contract.layout import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, CHECKPOINT_PREFIX


@dataclass
class CheckpointRef:
    """One kept checkpoint: where it is and what the trial reported when it was written."""

    trial_id: str
    trial_dir: str
    name: str  # checkpoint_NNNNNN
    path: str  # the checkpoint folder (path or URI)
    step: int
    eval_loss: float

    @property
    def adapter(self) -> str:
        return f"{self.path}/{ADAPTER_DIR}"


_fs = storage.filesystem
_join = storage.join


def kept_checkpoints(experiment: str, trial_dir: str, history: pd.DataFrame, trial_id: str = "") -> list[CheckpointRef]:
    """The checkpoints still on disk for one trial, with the step and eval loss that made them."""
    import pyarrow.fs

    fs, root = _fs(experiment)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{root}/{trial_dir}", allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX))
    out = []
    rows = history if "checkpoint_dir_name" in history else pd.DataFrame(columns=["checkpoint_dir_name"])
    for name in names:
        match = rows[rows["checkpoint_dir_name"] == name]
        if match.empty:
            continue  # a checkpoint without its report (e.g. written just before a crash)
        row = match.iloc[-1]
        loss = float(row.get("eval_loss", math.nan))
        out.append(CheckpointRef(trial_id, trial_dir, name, _join(experiment, trial_dir, name), int(row["step"]), loss))
    return out


def best_checkpoint(experiment: str, trials: pd.DataFrame, history: pd.DataFrame, trial_id: str) -> Optional[CheckpointRef]:
    """The kept checkpoint with the lowest eval loss of one trial (ties: the earlier step)."""
    row = trials[trials["trial_id"].astype(str) == str(trial_id)]
    if row.empty:
        return None
    own = history[history["trial_id"].astype(str) == str(trial_id)] if not history.empty else history
    kept = [c for c in kept_checkpoints(experiment, str(row.iloc[0]["trial_dir"]), own, str(trial_id)) if math.isfinite(c.eval_loss)]
    return min(kept, key=lambda c: (c.eval_loss, c.step)) if kept else None


def read_bytes(path: str) -> bytes:
    fs, inner = _fs(path)
    with fs.open_input_stream(inner) as handle:
        return handle.read()


def read_adapter(adapter_dir: str) -> tuple[dict, dict]:
    """(adapter_config, {tensor name: numpy array}) of a PEFT adapter folder; no torch needed."""
    from safetensors.numpy import load

    config = json.loads(read_bytes(_join(adapter_dir, ADAPTER_CONFIG)).decode("utf-8"))
    return config, load(read_bytes(_join(adapter_dir, ADAPTER_WEIGHTS)))


def copy_tree(source: str, target: str) -> list[str]:
    """Copy the files of a folder (path or URI; not recursive) into a local folder; returns names."""
    import pyarrow.fs

    fs, inner = _fs(source)
    os.makedirs(target, exist_ok=True)
    names = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(inner)):
        if info.type != pyarrow.fs.FileType.File:
            continue
        with fs.open_input_stream(info.path) as handle, open(os.path.join(target, info.base_name), "wb") as out:
            out.write(handle.read())
        names.append(info.base_name)
    return sorted(names)
