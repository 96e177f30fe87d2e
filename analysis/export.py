"""Export the recommended trial's adapter in PEFT format.

Which adapter: the recommended rank's best seed (lowest eval loss at the step the rank was
judged), and of that trial the kept checkpoint with the lowest eval loss, i.e. Tune's
best-by-eval_loss checkpoint (it keeps that one and the latest). That is the adapter whose eval
loss the recommendation reports. If the scheduler stopped the trial early, the adapter is the one it had
then (the report says so): train the rank for the full budget before shipping it.
"""

from __future__ import annotations

import json
import os

import pandas as pd

from analysis.checkpoints import best_checkpoint, copy_tree
from analysis.selection import Recommendation

EXPORT_INFO = "lora_rank_export.json"


class ExportError(ValueError):
    """Nothing to export, or the output folder cannot take it."""


def export_adapter(experiment: str, trials: pd.DataFrame, history: pd.DataFrame, rec: Recommendation, out: str,
                   config: dict | None = None) -> dict:
    """Copy the adapter (adapter_config.json, adapter_model.safetensors, README.md) into `out`
    and write `lora_rank_export.json` describing it; returns that description."""
    if rec.rank is None or rec.trial_id is None:
        raise ExportError(f"nothing to export: {rec.reason}")
    if os.path.isfile(out):
        raise ExportError(f"--out: {out!r} is a file; give a folder")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, EXPORT_INFO)):
        raise ExportError(f"--out: {out!r} is not empty (and holds no earlier export); give a new or empty folder")
    ckpt = best_checkpoint(experiment, trials, history, rec.trial_id)
    if ckpt is None:
        raise ExportError(f"trial {rec.trial_id} (r={rec.rank}) has no checkpoint with an eval loss on disk under {experiment!r}")
    files = copy_tree(ckpt.adapter, out)
    row = trials[trials["trial_id"].astype(str) == str(rec.trial_id)].iloc[0]
    info = {
        "trial_status": str(row.get("status", "")),
        "rank": rec.rank,
        "lora_alpha": rec.lora_alpha,
        "alpha_rule": rec.alpha_rule,
        "targets": rec.targets,
        "trial_id": rec.trial_id,
        "trial_dir": ckpt.trial_dir,
        "seed": int(row["seed"]),
        "checkpoint": ckpt.name,
        "step": ckpt.step,
        "eval_loss": ckpt.eval_loss,
        "trial_steps": int(row["steps"]),
        "max_steps": None if pd.isna(row.get("max_steps")) else int(row["max_steps"]),
        "base_model": ((config or {}).get("model") or {}).get("name_or_path"),
        "experiment": experiment,
        "tolerance": rec.tolerance,
        "rule": rec.rule,
        "files": files,
    }
    with open(os.path.join(out, EXPORT_INFO), "w") as handle:
        json.dump(info, handle, indent=2)
    return info


def stop_note(info: dict) -> str:
    """' (why this trial ended before max_steps: ...)' for the export line; '' when it trained fully."""
    steps, max_steps = info.get("trial_steps"), info.get("max_steps")
    if max_steps is None or steps is None or steps >= max_steps:
        return ""
    at = f"at step {steps} of {max_steps}"
    why = {
        "stopped": f"the scheduler stopped this trial {at}",
        "interrupted": f"the search was interrupted {at} (resume it with --resume to finish this trial)",
        "pending": f"the search was interrupted {at} (resume it with --resume to finish this trial)",
        "error": f"this trial failed with an error {at}",
        "diverged": f"this trial diverged {at}",
        "oom": f"this trial ran out of memory {at}",
    }.get(info.get("trial_status", ""), f"this trial ended {at}")
    return f" ({why}: train it fully before shipping)"
