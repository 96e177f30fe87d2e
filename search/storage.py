"""The driver's storage check that needs Ray (is storage_path shared by every node?), and the
experiment-folder I/O of `contract.storage`, re-exported for the driver's modules."""

from __future__ import annotations

import os
from pathlib import Path

from lora_rank_search.contract.storage import (  # noqa: F401 - re-exported: the driver's modules read `storage.X`
    CHECKPOINTS_KEPT, MARKER, SHARED_STORAGE_HINT, exists, filesystem, is_uri, join, listdir, local_path, not_shared_problem,
    read_text, sees_marker, writable_problem, write_marker, write_text,
)


def check_shared_with_nodes(storage_path: str, timeout_s: float = 60.0) -> str | None:
    """On a Ray cluster of more than one node, write a marker into the local storage_path and ask
    a tiny task pinned to each alive node whether it sees it; the problem line, or None.
    Object-store URIs and one-node clusters need no check. Needs a connected Ray."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder = local_path(storage_path)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if folder is None or len(nodes) < 2:
        return None
    token = uuid.uuid4().hex
    marker = os.path.join(folder, f"{MARKER}-check-{token}")
    Path(folder).mkdir(parents=True, exist_ok=True)
    Path(marker).write_text(token)
    try:
        probe = ray.remote(num_cpus=0, max_retries=0)(sees_marker)
        refs = {
            n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})": probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(marker, token)
            for n in nodes
        }
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        answers = {}
        for node, ref in refs.items():
            try:
                answers[node] = ray.get(ref) if ref in ready else None
            except Exception:  # noqa: BLE001 - a node that died meanwhile: left to the trial's check
                answers[node] = None
        return not_shared_problem(storage_path, answers)
    finally:
        os.remove(marker)


def repair_stale_checkpoints(experiment: str) -> list[str]:
    """Before `--resume`: point each trial at a checkpoint that still exists.

    Tune saves the experiment state (each trial's latest checkpoint) every >= 10 s, and deletes a
    trial's checkpoints as newer ones arrive (the best CHECKPOINTS_KEPT by eval loss, plus the
    latest). After a killed driver the saved state can name a latest checkpoint deleted since (a
    newer one arrived while the loss went up), and Tune's restore then fails that trial. Such a
    trial resumes from the newest checkpoint of its saved state that still exists (the fallback a
    corrupted checkpoint already takes: exact, a few evaluations earlier), or from scratch.
    Returns one line per trial repaired; a state in an unexpected shape is left as it is.
    """
    import json

    import pyarrow.fs
    from ray import cloudpickle

    from lora_rank_search.contract.layout import newest_state

    def gone(result) -> bool:
        return result.checkpoint.filesystem.get_file_info(result.checkpoint.path).type == pyarrow.fs.FileType.NotFound

    folder = None if is_uri(experiment) else local_path(experiment)
    newest = newest_state(os.listdir(folder)) if folder and os.path.isdir(folder) else None
    if newest is None:
        return []
    state_file = os.path.join(folder, newest)
    try:
        with open(state_file) as handle:
            data = json.load(handle)
        rows, said = [], []
        for state_json, runtime_json in data["trial_data"]:
            runtime = json.loads(runtime_json)
            manager = cloudpickle.loads(bytes.fromhex(runtime["checkpoint_manager"]["value"]))
            latest = manager._latest_checkpoint_result
            if latest is None or not gone(latest):
                rows.append((state_json, runtime_json))
                continue
            kept = [r for r in manager._checkpoint_results if not gone(r)]
            manager._checkpoint_results = kept
            manager._latest_checkpoint_result = max(kept, key=lambda r: r.metrics.get("step", 0)) if kept else None
            runtime["checkpoint_manager"]["value"] = cloudpickle.dumps(manager).hex()
            rows.append((state_json, json.dumps(runtime)))
            instead = f"its step-{manager._latest_checkpoint_result.metrics.get('step')} checkpoint" if kept else "the start"
            name = json.loads(state_json).get("relative_logdir", "a trial")
            said.append(f"resume: {name}: its saved latest checkpoint ({os.path.basename(latest.checkpoint.path)}) was deleted"
                        f" after the state was saved; it resumes from {instead}")
        if said:
            data["trial_data"] = rows
            with open(state_file, "w") as handle:
                json.dump(data, handle)
        return said
    except (KeyError, TypeError, ValueError, AttributeError, OSError):  # a Tune version with another layout
        return []
