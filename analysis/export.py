"""Export the recommended trial's adapter in PEFT format.

Which adapter: the recommended rank's best seed (lowest eval loss at the step the rank was
judged), and of that trial the kept checkpoint with the lowest eval loss, i.e. Tune's
best-by-eval_loss checkpoint (it keeps that one and the latest). That is the adapter whose eval
loss the recommendation reports. If the scheduler stopped the trial early, the adapter is the one it had
then (the report says so): train the rank for the full budget before shipping it.

The exported adapter_config.json names the base the user configured (`model.name_or_path` of the
experiment's saved config: a hub id or a local folder), not the per-machine 4-bit cache the trial
loaded, so `AutoPeftModelForCausalLM.from_pretrained(out)` loads the user's base. For a
`builtin:` model it names the hub model the builtin was converted from (BUILTIN_BASES; the
adapter was trained on its Q4_1 GGUF copy, dequantized - lora_rank_export.json says so); for a
GGUF model it names the folder holding the GGUF file (load the base with `gguf_file=` then
`PeftModel.from_pretrained`). An earlier export in `out` is replaced only with force.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import pandas as pd

from lora_rank_search.analysis.checkpoints import best_checkpoint, copy_tree
from lora_rank_search.analysis.selection import Recommendation, json_safe
from lora_rank_search.contract.layout import ADAPTER_CONFIG

EXPORT_INFO = "lora_rank_export.json"
# builtin model -> the hub model its shipped GGUF file was made from (what a PEFT user loads)
BUILTIN_BASES = {"builtin:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def base_for_peft(model: dict) -> tuple[Optional[str], str]:
    """(base_model_name_or_path for adapter_config.json, a note for lora_rank_export.json) from the
    experiment config's `model` section."""
    name = model.get("name_or_path")
    if not name:
        return None, "the experiment's config names no model"
    if name in BUILTIN_BASES:
        return BUILTIN_BASES[name], (f"{name} is the Q4_1 GGUF of {BUILTIN_BASES[name]}, dequantized; the adapter was "
                                     "trained on that copy (lora-rank's converted folder), a few tenths of a percent "
                                     "away from the hub weights")
    if model.get("gguf_file"):
        return name, f"load the base with from_pretrained({name!r}, gguf_file={model['gguf_file']!r})"
    return name, ""


class ExportError(ValueError):
    """Nothing to export, or the output folder cannot take it."""


def _earlier_export(out: str) -> Optional[dict]:
    try:
        with open(os.path.join(out, EXPORT_INFO)) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {} if os.path.exists(os.path.join(out, EXPORT_INFO)) else None


def export_adapter(experiment: str, trials: pd.DataFrame, history: pd.DataFrame, rec: Recommendation, out: str,
                   config: dict | None = None, force: bool = False) -> dict:
    """Copy the adapter (adapter_config.json, adapter_model.safetensors, README.md) into `out`,
    point its base_model_name_or_path at the configured model, and write `lora_rank_export.json`
    describing it; returns that description. An earlier export in `out` is replaced only if `force`."""
    if rec.rank is None or rec.trial_id is None:
        raise ExportError(f"nothing to export: {rec.reason}")
    if os.path.isfile(out):
        raise ExportError(f"--out: {out!r} is a file; give a folder")
    earlier = _earlier_export(out) if os.path.isdir(out) else None
    if os.path.isdir(out) and os.listdir(out) and earlier is None:
        raise ExportError(f"--out: {out!r} is not empty (and holds no earlier export); give a new or empty folder")
    if earlier is not None and not force:
        what = f" (r={earlier.get('rank')}, trial {earlier.get('trial_dir')}, from {earlier.get('experiment')})" if earlier else ""
        raise ExportError(f"--out: {out!r} holds an earlier export{what}; pass --force to replace it")
    refused = unshippable(trials, rec.trial_id)
    if refused:
        raise ExportError(f"nothing to export: {refused}")
    ckpt = best_checkpoint(experiment, trials, history, rec.trial_id)
    if ckpt is None:
        raise ExportError(f"trial {rec.trial_id} (r={rec.rank}) has no checkpoint with an eval loss on disk under {experiment!r}")
    damaged = adapter_problem(ckpt.adapter)
    if damaged:
        raise ExportError(f"EXPERIMENT_DIR: the adapter of trial {ckpt.trial_dir} ({ckpt.name}) is not shipped: {damaged}; "
                          "restore the experiment's files (sync it again)")
    if earlier is not None:  # force: the earlier export's files go, so none of them outlives it
        for name in [*earlier.get("files", []), EXPORT_INFO]:
            if os.path.isfile(os.path.join(out, name)) and os.sep not in name:
                os.remove(os.path.join(out, name))
    files = copy_tree(ckpt.adapter, out)
    model = (config or {}).get("model") or {}
    base, base_note = base_for_peft(model)
    adapter_config = os.path.join(out, ADAPTER_CONFIG)
    trained_on = None
    if base and os.path.isfile(adapter_config):
        with open(adapter_config) as handle:
            data = json.load(handle)
        trained_on = data.get("base_model_name_or_path")
        data["base_model_name_or_path"] = base
        with open(adapter_config, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
    row = trials[trials["trial_id"].astype(str) == str(rec.trial_id)].iloc[0]
    info = {
        "trial_status": str(row.get("status", "")),
        "rank": rec.rank,
        "learning_rate": rec.learning_rate,
        "gain_share": rec.gain_share,
        "base_eval_loss": rec.base_eval_loss,
        "lora_alpha": rec.lora_alpha,
        "alpha_rule": rec.alpha_rule,
        "targets": rec.targets,
        "target_choice": rec.target_choice,
        "trainable_params": rec.trainable_params,
        "trial_id": rec.trial_id,
        "trial_dir": ckpt.trial_dir,
        "seed": int(row["seed"]),
        "checkpoint": ckpt.name,
        "step": ckpt.step,
        "eval_loss": ckpt.eval_loss,
        "trial_steps": int(row["steps"]),
        "max_steps": None if pd.isna(row.get("max_steps")) else int(row["max_steps"]),
        "base_model": model.get("name_or_path"),
        "base_model_name_or_path": base,
        "base_model_note": base_note,
        "trained_on": trained_on,  # what the trial's checkpoint names: the model folder it resolved (per machine)
        "experiment": experiment,
        "tolerance": rec.tolerance,
        "rule_name": rec.rule_name,
        "rule": rec.rule,
        "files": files,
    }
    with open(os.path.join(out, EXPORT_INFO), "w") as handle:
        json.dump(json_safe(info), handle, indent=2)
    return info


def adapter_problem(adapter_dir: str) -> str:
    """Why the adapter folder must not be shipped: its config or weights do not load, or a weight is
    NaN/inf; '' when it is sound."""
    import numpy as np

    from lora_rank_search.analysis.checkpoints import read_adapter

    try:
        config, tensors = read_adapter(adapter_dir)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        return f"{adapter_dir} does not load ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    if not isinstance(config, dict) or not tensors:
        return f"{adapter_dir} holds no adapter config or no weights"
    bad = sorted(name for name, array in tensors.items() if not np.isfinite(array).all())
    if bad:
        return f"{adapter_dir} has non-finite weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
    return ""


def unshippable(trials: pd.DataFrame, trial_id: str) -> str:
    """Why the trial's adapter must not be shipped (damaged files, or a failed or non-finite trial:
    diverged, oom, error); '' when it may be."""
    from lora_rank_search.analysis.results import DAMAGED, FAILED

    rows = trials[trials["trial_id"].astype(str) == str(trial_id)] if "trial_id" in trials else trials.iloc[0:0]
    if rows.empty:
        return f"trial {trial_id} is not among the experiment's trials"
    row = rows.iloc[0]
    status = str(row.get("status", ""))
    final = pd.to_numeric(pd.Series([row.get("final_eval_loss")]), errors="coerce").iloc[0]
    if status in FAILED:
        what = "its folder is damaged" if status == DAMAGED else f"it {'failed' if status == 'error' else status}"
        return (f"the recommended trial {row.get('trial_dir', trial_id)} (r={row.get('r')}) is not shipped: {what} "
                f"({row.get('failure') or status}); train that arm again (a lower learning rate if it diverged)")
    if not pd.isna(final) and not math.isfinite(float(final)):
        return f"the recommended trial {row.get('trial_dir', trial_id)} ended with a non-finite eval loss ({final}); train that arm again"
    return ""


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
