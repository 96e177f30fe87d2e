"""Read an experiment directory (local path or URI) into pandas: one row per trial, one per report.

Only what is on disk is used, so a finished, an interrupted or a synced-from-cluster experiment
reads the same way.
"""

from __future__ import annotations

import json
import math
from typing import Optional

import pandas as pd
import yaml

from lora_rank_search.analysis.integrity import arm_mismatch, base_loss_outliers, diverged_reason, duplicate_arms, nonfinite_eval
from lora_rank_search.contract.arms import ARM_KEYS, LR_KEY, NUISANCE_KEYS, REPLICATE_KEY, format_lr, show_value
from lora_rank_search.contract import layout, storage
from lora_rank_search.contract.layout import read_config, read_meta  # noqa: F401 - the analysis side's readers of our files
from lora_rank_search.contract.metrics import DIVERGED, OOM

# Trial status as analysis names it (Ray's TERMINATED covers both finished and early-stopped; a
# trial that diverged or ran out of memory ends itself and says so in its last report).
COMPLETED, STOPPED, ERROR, INTERRUPTED, PENDING = "completed", "stopped", "error", "interrupted", "pending"
DAMAGED = "damaged"  # its folder's files are missing, damaged or contradict each other: left out of the evidence
FAILED = (ERROR, DIVERGED, OOM, DAMAGED)  # statuses whose `failure` column says why
DONE = (COMPLETED, STOPPED, *FAILED)  # trials that ended; the rest were interrupted before they could


_fs = storage.filesystem


def _read(fs, path: str) -> str:
    with fs.open_input_stream(path) as handle:
        return handle.read().decode("utf-8")


def _listing(fs, root: str) -> dict[str, object]:
    import pyarrow.fs

    return {info.base_name: info for info in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))}


def _ray_statuses(fs, root: str, listing: dict) -> dict[str, tuple[str, int]]:
    """trial_id -> (Ray status, number of failures Tune retried) from the newest experiment_state snapshot."""
    newest = layout.newest_state(listing)
    if newest is None:
        return {}
    out = {}
    try:
        data = json.loads(_read(fs, f"{root}/{newest}"))
        for entry in data.get("trial_data", []):
            state = json.loads(entry[0])
            runtime = json.loads(entry[1]) if len(entry) > 1 and isinstance(entry[1], str) else {}
            out[state["trial_id"]] = (state.get("status", ""), int(runtime.get("num_failures", 0) or 0))
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OSError):
        return out  # a damaged snapshot: statuses then come from the trial folders alone
    return out


def _error_line(fs, trial_root: str) -> str:
    """The last line of Tune's error.txt: the exception that ended the trial."""
    try:
        lines = [line.strip() for line in _read(fs, f"{trial_root}/{layout.ERROR_FILE}").splitlines() if line.strip()]
    except (FileNotFoundError, OSError):
        return ""
    return lines[-1] if lines else ""


def _history(fs, trial_root: str, problems: Optional[list] = None) -> pd.DataFrame:
    """The trial's reports (result.json); lines that are not a JSON mapping are skipped and named
    in `problems`."""
    try:
        text = _read(fs, f"{trial_root}/{layout.RESULT_FILE}")
    except (FileNotFoundError, OSError):
        return pd.DataFrame()
    rows, bad, cut = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            if cut is not None and row.get("iterations_since_restore") != 1:
                bad.append(cut)  # not followed by a restart: a damaged line, not one cut by an interruption
            cut = None
            rows.append(row)
        else:
            if cut is not None:
                bad.append(cut)
            cut = number  # a line cut by a killed run is followed by the resumed run's first report
    if cut is not None:
        bad.append(cut)
    if bad and problems is not None:
        problems.append(f"result.json line{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad[:3]))} not a JSON report")
    frame = pd.DataFrame(rows)
    if "config" in frame:
        frame = frame.drop(columns=["config"])
    if "step" in frame:
        # A resumed trial can repeat steps after its last checkpoint: keep the latest report per step.
        frame = frame.drop_duplicates(subset="step", keep="last").sort_values("step").reset_index(drop=True)
    return frame


def load_experiment(experiment: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, history): one row per trial, and one row per report with a `trial_id` column."""
    import pyarrow.fs

    try:
        fs, root = _fs(experiment)
        kind = fs.get_file_info(root).type
        listing = _listing(fs, root) if kind == pyarrow.fs.FileType.Directory else {}
    except (ValueError, OSError) as exc:  # an unknown URI scheme, an unreadable folder
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FileNotFoundError(f"cannot read {experiment!r} ({first})") from None
    if kind == pyarrow.fs.FileType.File:
        raise FileNotFoundError(f"{experiment!r} is a file, not an experiment folder (give storage_path/name of a search)")
    if not listing:
        raise FileNotFoundError(f"no experiment at {experiment!r}")
    config = read_config(experiment)
    max_steps = (config.get("train") or {}).get("max_steps")
    statuses = _ray_statuses(fs, root, listing)
    trials, histories, incomplete = [], [], []
    for name in sorted(listing):
        if listing[name].type != pyarrow.fs.FileType.Directory:
            continue
        trial_root = f"{root}/{name}"
        files = _listing(fs, trial_root)
        if not _looks_like_trial(files):
            continue
        problems: list[str] = []
        params = _params(fs, trial_root, files, problems)
        history = _history(fs, trial_root, problems)
        parsed = layout.parse_trial_dirname(name)
        trial_id = parsed["trial_id"] if parsed else "_".join(name.split("_")[-2:])
        if not history.empty and "trial_id" in history:
            trial_id = str(history["trial_id"].iloc[-1])
        ray_status, failures = statuses.get(trial_id, ("", 0))
        if layout.RESULT_FILE not in files and _ran(files, ray_status):
            problems.append("result.json is missing, though the trial ran ("
                            + (f"Ray recorded it as {ray_status}" if ray_status not in ("", "PENDING") else "its folder holds its outputs") + ")")
        elif layout.RESULT_FILE in files and history.empty and _reported(files, ray_status):
            size = getattr(files[layout.RESULT_FILE], "size", None)
            problems.append(f"result.json holds no report ({size if size is not None else '?'} bytes), though the trial "
                            + ("has checkpoints" if _checkpointed(files) else f"ran (Ray recorded it as {ray_status})"))
        problems.extend(arm_mismatch(params, history, parsed))
        if "r" not in params and (history.empty or "r" not in history):
            if problems:
                incomplete.append(f"{name}: {'; '.join(problems)}")
            continue  # nothing says which arm it was: only named as incomplete
        row = _trial_row(name, trial_id, params, history, files, ray_status, max_steps, _configured_lr(config))
        row["retries"] = failures if row["status"] != ERROR else max(failures - 1, 0)
        if row["status"] == ERROR:
            row["failure"] = _error_line(fs, trial_root)
        if problems:
            row.update(status=DAMAGED, failure="; ".join(problems), stopped_early=False)
        trials.append(row)
        if not history.empty:
            histories.append(history.assign(trial_id=trial_id, trial_dir=name))
    twins = duplicate_arms([row for row in trials if row["status"] != DAMAGED])  # a damaged row's arm is not known
    outliers = base_loss_outliers([row for row in trials if row["status"] != DAMAGED])
    for row in trials:  # two syncs merged into one folder: neither copy is believed; nor one judged on other data
        twin = "; ".join(filter(None, [twins.get(row["trial_dir"]), outliers.get(row["trial_dir"])]))
        if twin:
            row.update(status=DAMAGED, failure="; ".join(filter(None, [row["failure"] if row["status"] == DAMAGED else "", twin])),
                       stopped_early=False)
    incomplete = sorted({line.split(":", 1)[0]: line for line in incomplete
                         + [f"{row['trial_dir']}: {row['failure']}" for row in trials if row["status"] == DAMAGED]}.values())
    trials_df = pd.DataFrame(trials)
    if not trials_df.empty:
        trials_df = trials_df.sort_values([k for k in (*ARM_KEYS, REPLICATE_KEY) if k in trials_df]).reset_index(drop=True)
    history_df = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    trials_df.attrs[INCOMPLETE] = incomplete
    return trials_df, history_df


def _first(history: pd.DataFrame, column: str, default=math.nan):
    if history.empty or column not in history:
        return default
    values = pd.to_numeric(history[column], errors="coerce").dropna()
    return values.iloc[0] if len(values) else default


# --------------------------------------------------------------------------- incomplete trial folders
INCOMPLETE = "incomplete"  # trials.attrs key: one line per trial folder whose files are damaged or missing
_TRIAL_FILES = (layout.PARAMS_FILE, *layout.TRIAL_OUTPUTS)


class IncompleteExperiment(ValueError):
    """Trial folders whose results are missing or damaged: a recommendation could be wrong."""


def _looks_like_trial(files: dict) -> bool:
    return any(n in files for n in _TRIAL_FILES) or any(n.startswith(layout.CHECKPOINT_PREFIX) for n in files)


def _ran(files: dict, ray_status: str) -> bool:
    """The trial produced something (Ray's status past PENDING, or outputs in its folder)."""
    return ray_status not in ("", "PENDING") or any(n in files for n in layout.TRIAL_OUTPUTS) or any(
        n.startswith((layout.CHECKPOINT_PREFIX, "events.out.tfevents")) for n in files)


def _checkpointed(files: dict) -> bool:
    return any(n.startswith(layout.CHECKPOINT_PREFIX) for n in files)


def _reported(files: dict, ray_status: str) -> bool:
    """The trial reported at least once: Tune ended it normally (every trial reports before it ends;
    one that raised first is ERROR), or it saved a checkpoint (one per report).

    Not so for the first checkpoint of a trial Tune had not ended (RUNNING, PAUSED, PENDING in the
    snapshot): a trial's worker writes its checkpoint before the driver records the report that
    came with it, and a driver stopped (Ctrl-C) between the two leaves exactly that; `--resume`
    trains the trial again from its last recorded checkpoint (none: the start)."""
    if ray_status in ("RUNNING", "PAUSED", "PENDING"):
        return any(n.startswith(layout.CHECKPOINT_PREFIX) and n != f"{layout.CHECKPOINT_PREFIX}000000" for n in files)
    return ray_status == "TERMINATED" or _checkpointed(files)


def _params(fs, trial_root: str, files: dict, problems: list) -> dict:
    """params.json as a mapping; {} (and a line in `problems`) when missing, unparsable or not a mapping."""
    if layout.PARAMS_FILE not in files:
        problems.append("params.json is missing")
        return {}
    try:
        params = json.loads(_read(fs, f"{trial_root}/{layout.PARAMS_FILE}"))
    except (ValueError, OSError) as exc:
        problems.append(f"params.json does not parse ({type(exc).__name__})")
        return {}
    if not isinstance(params, dict):
        problems.append(f"params.json is not a mapping (it holds a {type(params).__name__})")
        return {}
    return params


def incomplete_trials(trials: pd.DataFrame) -> list[str]:
    """One line per incomplete trial folder found by `load_experiment` ('<folder>: <why>')."""
    return list(trials.attrs.get(INCOMPLETE, []))


def check_complete(experiment: str, allow_incomplete: bool = False) -> list[str]:
    """Raise IncompleteExperiment naming every incomplete trial folder, unless allow_incomplete
    (then they are returned, for a warning). A missing experiment is left to the caller."""
    try:
        trials, _ = load_experiment(experiment)
    except FileNotFoundError:
        return []
    lines = incomplete_trials(trials)
    if lines and not allow_incomplete:
        n = len(lines)
        raise IncompleteExperiment(
            f"EXPERIMENT_DIR: {n} trial folder{'s are' if n > 1 else ' is'} incomplete or damaged, so a recommendation could be "
            "wrong:\n" + "\n".join(f"  {line}" for line in lines)
            + "\nrestore the files (sync the experiment again), or pass --allow-incomplete to use the other trials"
        )
    return lines


def _last(history: pd.DataFrame, column: str, default=math.nan):
    if history.empty or column not in history:
        return default
    values = history[column].dropna()
    return values.iloc[-1] if len(values) else default


def _configured_lr(config: dict) -> float:
    """The learning rate of an experiment from before learning-rate lists (one value), else NaN."""
    lr = (config.get("train") or {}).get("learning_rate")
    return float(lr) if isinstance(lr, (int, float)) else math.nan


def _trial_row(name: str, trial_id: str, params: dict, history: pd.DataFrame, files: dict, ray_status: str,
               max_steps: Optional[int], configured_lr: float = math.nan) -> dict:
    steps = int(_last(history, "step", 0))
    reported = str(_last(history, "trial_status", ""))
    # error.txt stays after a retry that succeeded: without Ray's status, trust it only if unfinished.
    error_file = any(n in files for n in layout.ERROR_FILES)
    if ray_status == "ERROR" or (not ray_status and error_file and not (max_steps and steps >= max_steps)):
        status = ERROR
    elif reported in (DIVERGED, OOM):
        status = reported
    elif nonfinite_eval(history):
        status = DIVERGED  # an eval loss of NaN/inf is divergence, whatever the loop reported
    elif ray_status in ("RUNNING", "PENDING", "PAUSED") or (ray_status == "" and steps and max_steps and steps < max_steps):
        status = INTERRUPTED if steps else PENDING
    elif max_steps and steps >= max_steps:
        status = COMPLETED
    elif steps:
        status = STOPPED
    else:
        status = PENDING
    eval_loss = history["eval_loss"] if "eval_loss" in history else pd.Series(dtype=float)
    base = float(_first(history, "base_eval_loss"))
    final = float(_last(history, "eval_loss"))
    return {
        "trial_id": trial_id,
        "trial_dir": name,
        "r": int(params.get("r", _last(history, "r", 0))),
        "seed": int(params.get("seed", _last(history, "seed", 0))),
        "lr": float(params.get("lr", _last(history, "learning_rate", configured_lr))),
        "alpha_rule": str(params.get("alpha_rule", _last(history, "alpha_rule", ""))),
        "lora_alpha": float(_last(history, "lora_alpha")),
        "targets": str(_last(history, "target_modules", params.get("target_preset", ""))),
        # the target choice's label (a preset, or names joined by '+'); with one choice, its label
        "target_choice": str(params.get("target_choice") or params.get("target_preset") or ""),
        # a further nuisance searched (contract.arms), as the trial's config names it
        **{k: float(params[k]) for k in NUISANCE_KEYS if k != LR_KEY and params.get(k) is not None},
        "status": status,
        "failure": _failure(history, status, params),
        "stopped_early": status == STOPPED,
        "steps": steps,
        "max_steps": max_steps,
        "base_eval_loss": base,
        "final_eval_loss": final,
        # Ended worse than the untouched base (or diverged): the learning rate was too high for this arm.
        "unstable": status == DIVERGED or bool(math.isfinite(base) and math.isfinite(final) and final > base),
        "best_eval_loss": float(eval_loss.min()) if len(eval_loss.dropna()) else math.nan,
        "best_step": int(history.loc[eval_loss.idxmin(), "step"]) if len(eval_loss.dropna()) else 0,
        "final_train_loss": float(_last(history, "train_loss")),
        "trainable_params": int(_last(history, "trainable_params", 0)),
        "adapter_bytes": int(_last(history, "adapter_bytes", 0)),
        "peak_memory_bytes": int(history["peak_memory_bytes"].max()) if "peak_memory_bytes" in history else 0,
        "tokens_per_s": float(history["tokens_per_s"].mean()) if "tokens_per_s" in history else math.nan,
        "wall_time_s": float(_last(history, "time_total_s")),
        "node_id": str(_last(history, "node_id", "")),
        "gpu_ids": str(_last(history, "gpu_ids", "")),
        "started_at": float(_last(history, "started_at")),
        "ended_at": float(_last(history, "timestamp")),
    }


def _failure(history: pd.DataFrame, status: str, params: dict) -> str:
    """Why a diverged or out-of-memory trial ended: its own last word, else the non-finite eval."""
    if status not in (DIVERGED, OOM):
        return ""
    said = str(_last(history, "failure", ""))
    bad = nonfinite_eval(history)
    if said or bad is None:
        return said
    return diverged_reason(bad[0], bad[1], params.get("lr", _last(history, "learning_rate")), int(params.get("r", _last(history, "r", 0))))


def _size(n: float, unit: str = "B") -> str:
    for prefix in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(n) < 1024 or prefix == "Ti":
            return f"{n:.0f} {prefix}{unit}" if prefix == "" else f"{n:.1f} {prefix}{unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _count(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return f"{int(n)}"


def format_table(trials: pd.DataFrame) -> str:
    """The per-trial table the CLI prints at the end of a search (and `analyze` reuses)."""
    several = "target_choice" in trials and trials["target_choice"].nunique() > 1
    # every further nuisance searched (lora.dropout as a list): without its column two arms read as one row
    extra = [k for k in NUISANCE_KEYS if k != LR_KEY and k in trials and trials[k].nunique() > 1]
    headers = [*(["targets"] if several else []), "r", "alpha", "lr", *extra, "seed", "steps", "status", "best eval loss",
               "params", "adapter", "peak mem", "tokens/s"]
    rows = []
    for t in trials.itertuples():
        steps = f"{t.steps}/{t.max_steps}" if t.max_steps else str(t.steps)
        status = "stopped early" if t.stopped_early else t.status
        if getattr(t, "unstable", False) and t.status not in FAILED:
            status += ", unstable"
        retries = getattr(t, "retries", 0)
        if retries and not math.isnan(retries):
            status += f" ({int(retries)} {'retry' if retries == 1 else 'retries'})"
        rows.append([
            *([t.target_choice] if several else []),
            str(t.r),
            "-" if math.isnan(t.lora_alpha) else f"{t.lora_alpha:g}",
            "-" if math.isnan(getattr(t, "lr", math.nan)) else format_lr(t.lr),
            *("-" if pd.isna(getattr(t, k)) else show_value(k, getattr(t, k)) for k in extra),
            str(t.seed),
            steps,
            status,
            "-" if math.isnan(t.best_eval_loss) else f"{t.best_eval_loss:.4f} @{t.best_step}",
            _count(t.trainable_params) if t.trainable_params else "-",
            f"{t.adapter_bytes / 1e6:.2f} MB" if t.adapter_bytes else "-",
            _size(t.peak_memory_bytes) if t.peak_memory_bytes else "-",
            "-" if math.isnan(t.tokens_per_s) else f"{t.tokens_per_s:,.0f}",
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def format_failures(trials: pd.DataFrame) -> str:
    """One line per failed trial (error, diverged, oom) saying why; empty when none failed."""
    if trials.empty or "failure" not in trials:
        return ""
    failed = trials[trials["status"].isin(FAILED)]
    return "\n".join(f"r={t.r} lr={format_lr(getattr(t, 'lr', math.nan))} seed={t.seed} {t.status}: "
                     f"{t.failure or 'see error.txt in ' + t.trial_dir}" for t in failed.itertuples())
