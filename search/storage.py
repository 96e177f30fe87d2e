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
