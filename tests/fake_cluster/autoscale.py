"""Autoscaling on one machine: a `RAY_FAKE_CLUSTER=1` head whose autoscaler adds fake GPU worker
nodes when a search's trials wait for GPUs, and removes them when they are idle.

    .venv/bin/python tests/fake_cluster/autoscale.py     # prints the node count over time

It starts a head with no GPU (tests/fake_cluster/autoscaling.yaml, on a free port, in a private
Ray temp dir), runs `lora-rank search CONFIG --address HEAD` on a tiny model with
gpus_per_trial: 1, samples the cluster's nodes every second, and ends every process it started
by PID (never `ray stop`: other Ray clusters on the machine are left alone).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))
from processes import kill_marked  # noqa: E402  (tests/processes.py; this file also runs as a script)
CONFIG = HERE / "autoscaling.yaml"
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # as the fake provider numbers nodes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _search_config(work: Path) -> Path:
    """A small grid on the tiny test model: two ranks, one GPU each (logical)."""
    sys.path.insert(0, str(ROOT))
    from lora_rank_search.trainables.tiny import build_tiny_llama, chain_records, word_list, write_jsonl

    words = word_list(60)
    model = build_tiny_llama(work / "tiny-llama", words + ["user", "assistant", "system"])
    data = write_jsonl(chain_records(words, 600), work / "chain.jsonl")
    raw = {
        "name": "autoscaled",
        "storage_path": str(work / "runs"),
        "model": {"name_or_path": str(model)},
        "data": {"source": str(data), "max_seq_len": 32},
        "lora": {"ranks": [4, 16], "target_modules": "all-linear", "dropout": 0.0},
        "train": {"max_steps": 40, "eval_every": 10, "batch_size": 16, "learning_rate": 3.0e-3, "lr_schedule": "constant"},
        "scheduler": {"type": "none"},
        "resources": {"gpus_per_trial": 1, "cpus_per_trial": 1},
    }
    path = work / "search.yaml"
    path.write_text("# lora-rank search search.yaml --address HEAD\n" + yaml.safe_dump(raw))
    return path


class _Nodes:
    """Reads the cluster's node table straight from its GCS (no driver, no worker processes)."""

    def __init__(self, address: str):
        from ray._private.state import GlobalState
        from ray._raylet import GcsClientOptions

        self.state = GlobalState()
        self.state._initialize_global_state(
            GcsClientOptions.create(address, None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False)
        )

    def workers(self) -> list[dict]:
        """Alive worker nodes (not the head) and their GPUs."""
        return [
            {"id": n["NodeID"], "gpus": n["Resources"].get("GPU", 0)}
            for n in self.state.node_table()
            if n["Alive"] and "node:__internal_head__" not in n["Resources"]
        ]


def run(work: Path, log=print, settle_s: float = 60.0) -> dict:
    """Start the fake autoscaling head, run the search against it, watch the nodes; clean up.

    Returns {'timeline': [(seconds, worker nodes, worker GPUs, phase)], 'experiment': path,
    'returncode': search exit code, 'search_s': seconds}.
    """
    work.mkdir(parents=True, exist_ok=True)
    temp = tempfile.mkdtemp(prefix="lrs-as-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    tag = uuid.uuid4().hex
    port = _free_port()
    env = {
        **os.environ,
        "RAY_TMPDIR": temp,
        "LRS_TEST_RUN": tag,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_AUTH_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("RAY_ADDRESS", None)
    import ray._private.services

    ip = ray._private.services.get_node_ip_address()
    address = f"{ip}:{port}"
    cluster = yaml.safe_load(CONFIG.read_text())
    cluster["provider"]["gcs_address"] = address
    fake_config = work / "autoscaling.yaml"
    fake_config.write_text(yaml.safe_dump(cluster))
    search_config = _search_config(work)
    timeline: list[tuple] = []
    t0 = time.time()

    nodes_of = None

    def sample(phase: str) -> list[dict]:
        nodes = nodes_of.workers()
        row = (round(time.time() - t0, 1), len(nodes), sum(n["gpus"] for n in nodes), phase)
        if not timeline or row[1:3] != timeline[-1][1:3]:
            log(f"[{row[0]:6.1f} s] {phase:8s} worker nodes {row[1]}, GPUs {row[2]:g}")
        timeline.append(row)
        return nodes

    try:
        subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}", "--num-cpus=1", "--num-gpus=0",
             f"--autoscaling-config={fake_config}", "--include-dashboard=false", "--disable-usage-stats",
             # free ports for every service: another Ray on this machine keeps its defaults
             *(f"--{name}={_free_port()}" for name in (
                 "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                 "metrics-export-port", "runtime-env-agent-port"))],
            # The head gets the node id the fake provider knows it by (workers get theirs from it).
            env={**env, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID, "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID},
            check=True, capture_output=True, timeout=120,
        )
        nodes_of = _Nodes(address)
        sample("before")
        out, err = open(work / "search.out", "w+"), open(work / "search.err", "w+")
        search = subprocess.Popen(
            [sys.executable, "-m", "lora_rank_search.search.cli", "search", str(search_config), "--address", address],
            cwd=ROOT, env=env, stdout=out, stderr=err, text=True,
        )
        started = time.time()
        while search.poll() is None:
            sample("search")
            time.sleep(0.5)
        search_s = time.time() - started
        deadline = time.time() + settle_s
        while time.time() < deadline:
            if not sample("after"):
                break
            time.sleep(1)
        out.seek(0), err.seek(0)
        return {"timeline": timeline, "experiment": str(work / "runs" / "autoscaled"), "returncode": search.returncode,
                "search_s": search_s, "stdout": out.read(), "stderr": err.read()}
    finally:
        for log_file in Path(temp).glob("ray/session_latest/logs/monitor.*"):  # the autoscaler's own account
            shutil.copy(log_file, work / log_file.name)
        kill_marked(f"LRS_TEST_RUN={tag}".encode())
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    result = run(Path(tempfile.mkdtemp(prefix="lrs-autoscale-")), settle_s=float(os.environ.get("SETTLE_S", 60)))
    print(f"search exit code {result['returncode']} after {result['search_s']:.0f} s; experiment {result['experiment']}")
    if result["returncode"]:
        print(result["stderr"][-3000:])
