"""Autoscaling with Ray's own autoscaler: a fake_multinode head with no GPU gets GPU worker nodes
when a search's trials ask for them, and loses them when the search is done
(tests/fake_cluster/autoscale.py; its output is quoted in the README's cluster section)."""

from __future__ import annotations

import os
import sys

from lora_rank_search.analysis.results import load_experiment

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_cluster"))

from autoscale import FAKE_HEAD_NODE_ID, run  # noqa: E402
import pytest

pytestmark = pytest.mark.slow  # every test here starts Ray or trains


def test_gpu_nodes_are_added_for_the_search_and_removed_after_it(tmp_path):
    result = run(tmp_path, log=print, settle_s=45)
    assert result["returncode"] == 0, result["stderr"][-3000:]
    timeline = result["timeline"]
    before = [row for row in timeline if row[3] == "before"]
    during = [row for row in timeline if row[3] == "search"]
    assert before and all(nodes == 0 and gpus == 0 for _, nodes, gpus, _ in before), "no GPU node before the search"
    assert max(gpus for _, _, gpus, _ in during) >= 1, "the autoscaler added GPU nodes while trials waited"
    assert timeline[-1][3] == "after" and timeline[-1][1:3] == (0, 0), f"idle GPU nodes were not removed: {timeline[-1]}"
    assert "no GPU node in the cluster yet; trials wait for the autoscaler" in result["stdout"]

    trials, history = load_experiment(result["experiment"])
    assert trials["status"].eq("completed").all() and len(trials) == 2
    nodes = set(history["node_id"])
    assert FAKE_HEAD_NODE_ID not in nodes and all(n.startswith(FAKE_HEAD_NODE_ID[:-5]) for n in nodes), nodes
