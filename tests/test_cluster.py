"""A search on a real multi-node Ray cluster (several Ray nodes on this machine, logical GPUs):
trials spread across the nodes, a node lost mid-search costs only the interval since the last
checkpoint, and the checks that keep a cluster honest: storage shared by every node, the model
resolved on the node a trial runs on."""

from __future__ import annotations

import dataclasses

import glob
import json
import os
import shutil
import tempfile
import threading
import time
import uuid

import pytest

from lora_rank_search.analysis.results import load_experiment
from processes import kill_marked
from lora_rank_search.search import storage
from lora_rank_search.search.config import parse_config
from lora_rank_search.search.space import trial_settings
from lora_rank_search.search.runner import run_search
from lora_rank_search.trainables.failures import FAULT_ENV
from lora_rank_search.trainables.trial import NodeSetupError, on_this_node

pytestmark = pytest.mark.slow  # every test here starts Ray or trains

MAX_STEPS, EVAL_EVERY = 80, 10
RANKS = [2, 4, 8, 16]
# The tiny model trains 80 steps in about a second, faster than a node can be removed: without this
# the trial picked could reach its last step first. r=8 hangs once before step 50, with its step-40
# checkpoint recorded, and its node is removed while it hangs (removing another trial's node left
# the hang to run out: 60 s more, in about one run of three).
HANG_RANK = 8
HANG = f"r={HANG_RANK}:step=50:kind=hang:once"


# --------------------------------------------------------------------------- pure decisions


def test_storage_is_refused_when_any_node_cannot_see_the_marker():
    path = "/home/me/runs"
    assert storage.not_shared_problem(path, {"10.0.0.1": True, "10.0.0.2": True}) is None
    assert storage.not_shared_problem(path, {"10.0.0.1": True, "10.0.0.2": None}) is None, "no answer: the trial checks"
    problem = storage.not_shared_problem(path, {"10.0.0.1": True, "10.0.0.3": False, "10.0.0.2": False})
    assert problem.startswith("storage_path: '/home/me/runs' is not shared with node 10.0.0.2 (and 1 more)")
    assert "use s3://, gs:// or a shared filesystem" in problem
    assert storage.local_path("s3://bucket/runs") is None and storage.local_path("gs://b/r") is None
    assert storage.local_path("file:///mnt/nfs/runs") == "/mnt/nfs/runs"
    assert storage.local_path("/mnt/nfs/runs") == "/mnt/nfs/runs"


def test_a_trial_refuses_a_node_without_the_storage_or_the_model(tmp_path, tiny_model):
    marker = storage.write_marker(str(tmp_path / "runs" / "exp"))
    cfg = parse_config({"model": {"name_or_path": tiny_model}})
    settings = dataclasses.replace(trial_settings(cfg, "/driver/cache/model", ["q_proj"]), storage_marker=marker)
    # The model is resolved on this node, not taken from the driver's machine.
    assert on_this_node(settings).model_path == tiny_model
    # A node whose storage_path is another (node-local) folder: the token is not there.
    elsewhere = dataclasses.replace(settings, storage_marker={**marker, "token": uuid.uuid4().hex})
    with pytest.raises(NodeSetupError, match=r"storage_path: '.*/runs' is not shared with node \S+ \(the experiment folder"):
        on_this_node(elsewhere)
    # A node without the local model folder.
    missing = dataclasses.replace(settings, model=dataclasses.replace(settings.model, name_or_path=str(tmp_path / "not-copied")))
    with pytest.raises(NodeSetupError, match=r"model folder not found: .* on node \S+; a local model folder must exist"):
        on_this_node(missing)
    assert storage.write_marker("s3://bucket/runs/exp") is None, "object stores are the same from every node"


# --------------------------------------------------------------------------- a real multi-node cluster


@pytest.fixture
def cluster(monkeypatch):
    """A head (no GPU, so trials never run there) and two worker nodes with one logical GPU each,
    in a private Ray temp dir; every process it starts carries a marker and is ended by PID."""
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="lrs-c-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    tag = uuid.uuid4().hex
    monkeypatch.setenv("RAY_TMPDIR", temp)
    monkeypatch.setenv("LRS_TEST_RUN", tag)
    monkeypatch.setenv(FAULT_ENV, HANG)  # before the nodes start: their workers inherit it
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    made = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    try:
        workers = [made.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
        made.wait_for_nodes()
        yield made, workers
    finally:
        made.shutdown()
        kill_marked(f"LRS_TEST_RUN={tag}".encode())
        shutil.rmtree(temp, ignore_errors=True)


def _progress(experiment: str) -> dict[str, list[dict]]:
    """trial folder -> its reports so far (result.json lines)."""
    out = {}
    for path in glob.glob(os.path.join(experiment, "*", "result.json")):
        try:
            with open(path) as handle:
                out[os.path.basename(os.path.dirname(path))] = [json.loads(line) for line in handle if line.endswith("\n")]
        except (OSError, ValueError):
            continue
    return out


def _recorded_checkpoints(experiment: str) -> dict[str, int]:
    """trial folder -> step of the last checkpoint the newest experiment state recorded."""
    from test_interrupt import _snapshot

    return {folder: step for folder, (_, step) in _snapshot(experiment).items()}


def test_trials_spread_over_nodes_and_a_lost_node_resumes_from_checkpoints(raw_config, cluster):
    made, workers = cluster
    raw = raw_config(
        name="cluster",
        lora={"ranks": RANKS},
        train={"max_steps": MAX_STEPS, "eval_every": EVAL_EVERY},
        scheduler={"type": "none"},
        resources={"gpus_per_trial": 1, "cpus_per_trial": 1, "max_failures": 2},
    )
    cfg = parse_config(raw)
    experiment = cfg.experiment_path
    seen: dict = {}

    def remove_a_busy_worker() -> None:
        """Once a trial has finished, remove the worker node of the hanging trial once it has a
        recorded checkpoint (step > 0): a node lost mid-search. Watches until that moment or the
        search's end (an event, not a deadline: a loaded machine only makes the search slower)."""
        while not search_ended.is_set() and not seen:
            reports, recorded = _progress(experiment), _recorded_checkpoints(experiment)
            done = {f for f, rows in reports.items() if rows and rows[-1]["step"] >= MAX_STEPS}
            for folder, rows in reports.items():
                step = recorded.get(folder, 0)
                if done and folder not in done and rows and rows[-1]["r"] == HANG_RANK and 0 < step <= MAX_STEPS - 2 * EVAL_EVERY:
                    node = next((w for w in workers if w.node_id == rows[-1]["node_id"]), None)
                    if node is None:
                        continue
                    seen.update(folder=folder, step=step, node=node.node_id, done={f: reports[f] for f in done},
                                finished_bytes={f: open(os.path.join(experiment, f, "result.json"), "rb").read() for f in done})
                    made.remove_node(node, allow_graceful=False)
                    return
            search_ended.wait(0.2)

    search_ended = threading.Event()
    remover = threading.Thread(target=remove_a_busy_worker, daemon=True)
    started = time.time()
    remover.start()
    try:
        run_search(cfg, address=made.address, log=lambda _: None)
    finally:
        search_ended.set()
        remover.join()
    elapsed = time.time() - started
    assert seen, "no moment with a finished trial and a running one with a checkpoint; nothing was removed"

    trials, history = load_experiment(experiment)
    assert sorted(trials["r"]) == RANKS
    assert trials["status"].eq("completed").all() and trials["steps"].eq(MAX_STEPS).all(), trials[["r", "status", "steps"]]
    # Spread: trials ran on both worker nodes and never on the GPU-less head.
    worker_ids = {w.node_id for w in workers}
    assert set(history["node_id"]) == worker_ids, (set(history["node_id"]), worker_ids)
    # The trial on the removed node went on elsewhere from its last recorded checkpoint.
    rows = history[history["trial_dir"] == seen["folder"]]
    resumed = rows[rows["resumed_from_step"] > 0]
    assert len(resumed), f"{seen['folder']} restarted from scratch"
    assert resumed["resumed_from_step"].min() >= seen["step"] > 0
    assert resumed["step"].min() == resumed["resumed_from_step"].min() + EVAL_EVERY
    assert set(resumed["node_id"]) == worker_ids - {seen["node"]}
    # Finished trials were neither lost nor re-run.
    for folder, before in seen["finished_bytes"].items():
        with open(os.path.join(experiment, folder, "result.json"), "rb") as handle:
            assert handle.read() == before, f"{folder} finished before the node was lost and changed afterwards"
    # The storage check ran against every node (one host: really shared) and left its marker.
    assert os.path.isfile(os.path.join(experiment, storage.MARKER))
    # Analysis reads the experiment through a filesystem URI (pyarrow, as for s3:// and gs://) alike.
    via_uri, _ = load_experiment("file://" + experiment)
    assert via_uri[["r", "status", "steps", "best_eval_loss"]].equals(trials[["r", "status", "steps", "best_eval_loss"]])
    print(f"cluster search: {elapsed:.0f} s; removed node {seen['node'][:8]} with {seen['folder']} at step {seen['step']}")
