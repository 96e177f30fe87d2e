"""The experiment folder: every name in it, and the readers and writers of our own files in it.

The experiment folder (`storage_path/name`, local or s3:// / gs://) is the interface between the
search and the analysis: the analysis reads only what is on disk. Both halves import this module
(it imports nothing heavy), so each name is defined once::

    <experiment>/
      lora_rank_search.yaml        CONFIG_FILE: the validated config (plain YAML)
      search_meta.json             META_FILE: what the driver worked out (targets, data, resources)
      confirmations.json           CONFIRMATIONS_FILE: the units confirmed in idle capacity (search.halving)
      tuner.pkl, experiment_state-*.json     Tune's own (TUNER_FILE, STATE_PREFIX): --resume
      .lora-rank-search-storage    storage.MARKER: this run's token (shared-storage check)
      r0008_lr3e-4_seed0_<id>/     one folder per trial (trial_dirname / parse_trial_dirname);
                                   mlp_r0008_lr3e-4_seed0_<id>/ with several target choices
        params.json, result.json   PARAMS_FILE (the trial's config), RESULT_FILE (one report a line)
        error.txt                  ERROR_FILE: Tune's record of an exception
        checkpoint_000003/         CHECKPOINT_PREFIX + index, as Tune names them
          adapter/                 ADAPTER_DIR: the PEFT adapter (adapter_config.json, adapter_model.safetensors)
          trainer_state.pt         TRAINER_STATE_FILE: optimizer, scheduler, RNG, loop state
      analysis/                    ANALYSIS_DIR: what `lora-rank analyze` writes (analysis.report names its files)
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

from lora_rank_search.contract import storage
from lora_rank_search.contract.arms import DIMENSIONS, Arm

CONFIG_FILE = "lora_rank_search.yaml"
META_FILE = "search_meta.json"
CONFIRMATIONS_FILE = "confirmations.json"
TUNER_FILE = "tuner.pkl"
STATE_PREFIX = "experiment_state-"
PARAMS_FILE = "params.json"
RESULT_FILE = "result.json"
ERROR_FILE = "error.txt"
ERROR_FILES = (ERROR_FILE, "error.pkl")
PROGRESS_FILE = "progress.csv"
CHECKPOINT_PREFIX = "checkpoint_"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINER_STATE_FILE = "trainer_state.pt"
ANALYSIS_DIR = "analysis"
TRIAL_OUTPUTS = (RESULT_FILE, PROGRESS_FILE, *ERROR_FILES)  # a trial folder holding any of these has run

def trial_name(config: Mapping[str, Any]) -> str:
    """'r8-lr3e-4-seed0' ('mlp-r8-lr3e-4-seed0' with several target choices): how progress lines
    and Tune name a trial (`Arm.name`)."""
    return Arm.of(config).name()


def trial_dirname(config: Mapping[str, Any], trial_id: str) -> str:
    """'r0008_lr3e-4_seed0_<trial id>' ('mlp_r0008_...' with several target choices): trial folders
    sort by target choice, rank, then the nuisance (`Arm.dirname`)."""
    return Arm.of(config).dirname(trial_id)


def parse_trial_dirname(name: str) -> Optional[dict]:
    """The arm's coordinates of a trial folder name (`Arm` fields: 'r', 'lr' (None in folders from
    before learning-rate lists), 'seed', 'target_choice' ('' with one target choice), ...) and its
    'trial_id', or None when the name is not one of ours."""
    parsed = Arm.parse_dirname(name)
    if parsed is None:
        return None
    arm, trial_id = parsed
    present = {f.name: getattr(arm, f.name) for f in DIMENSIONS if getattr(arm, f.name) is not None or not f.metadata["optional"]}
    return {**present, "trial_id": trial_id}


def is_resumable(names) -> bool:
    """A folder listing that Tune can resume: its tuner.pkl and at least one snapshot."""
    return TUNER_FILE in names and any(n.startswith(STATE_PREFIX) for n in names)


def newest_state(names) -> Optional[str]:
    """The newest of Tune's experiment-state snapshots in a folder listing (their names sort by
    time), or None: what --resume restores, and what the analysis reads statuses from."""
    states = sorted(n for n in names if n.startswith(STATE_PREFIX) and n.endswith(".json"))
    return states[-1] if states else None


def write_config(experiment: str, plain_config: dict) -> None:
    import yaml

    storage.write_text(storage.join(experiment, CONFIG_FILE), yaml.safe_dump(plain_config, sort_keys=False))


def read_config(experiment: str) -> dict:
    """The validated config the search saved (plain dict); {} if absent or unreadable."""
    import yaml

    try:
        loaded = yaml.safe_load(storage.read_text(storage.join(experiment, CONFIG_FILE)))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def write_meta(experiment: str, meta: dict) -> None:
    storage.write_text(storage.join(experiment, META_FILE), json.dumps(meta, indent=2))


def read_meta(experiment: str) -> dict:
    """search_meta.json (plain dict); {} if absent or unreadable."""
    try:
        loaded = json.loads(storage.read_text(storage.join(experiment, META_FILE)))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def read_confirmations(experiment: str) -> Optional[dict]:
    """`confirmations.json` (written by successive halving with `scheduler.confirm` on), or None."""
    path = storage.join(experiment, CONFIRMATIONS_FILE)
    try:
        if not storage.exists(path):
            return None
        loaded = json.loads(storage.read_text(path))
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None
