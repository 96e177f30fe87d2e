"""Shared fixtures: a tiny 2-layer Llama with a word-level tokenizer, a rank-sensitive dataset,
and Ray sessions with declared (logical) resources."""

from __future__ import annotations

import copy
import os

import pytest

from trainables.tiny import build_tiny_llama, chain_records, word_list, write_jsonl

os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

WORDS = word_list(60)
ROLES = ["user", "assistant", "system"]  # so chat templates render to known words


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), WORDS + ROLES))


@pytest.fixture(scope="session")
def chain_data(tmp_path_factory) -> str:
    """600 permutation-chain records: low ranks are clearly worse than high ranks on this task."""
    return str(write_jsonl(chain_records(WORDS, 600), tmp_path_factory.mktemp("data") / "chain.jsonl"))


BASE = {
    "name": "test",
    "lora": {"ranks": [1, 2, 16, 32], "target_modules": "all-linear", "dropout": 0.0, "alpha": "2r"},
    "data": {"max_seq_len": 32},
    "train": {"max_steps": 40, "eval_every": 10, "batch_size": 16, "learning_rate": 3.0e-3, "lr_schedule": "constant"},
    "scheduler": {"type": "asha", "grace_period": 10, "reduction_factor": 2},
    "resources": {"gpus_per_trial": 0, "cpus_per_trial": 1},
}


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def raw_config(tiny_model, chain_data, tmp_path):
    """Factory: a raw (YAML-like) config dict for the tiny model and chain data, with overrides."""

    def make(**over) -> dict:
        base = merge(BASE, {"storage_path": str(tmp_path / "runs"), "model": {"name_or_path": tiny_model}, "data": {"source": chain_data}})
        return merge(base, over)

    return make


@pytest.fixture
def ray_session():
    """Factory: start Ray with the given logical resources; always shut down afterwards."""
    import ray

    def start(**resources):
        ray.init(address="local", include_dashboard=False, logging_level="ERROR", **resources)

    yield start
    ray.shutdown()


@pytest.fixture
def weight_loads(monkeypatch) -> list:
    """Every from_pretrained of model weights (the call goes through; the list records it)."""
    from transformers import PreTrainedModel

    calls: list = []
    original = PreTrainedModel.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        calls.append((cls.__name__, args[:1]))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(recording))
    return calls
