"""Shared fixtures: a tiny 2-layer Llama with a word-level tokenizer, a rank-sensitive dataset,
and Ray sessions with declared (logical) resources."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile

import pytest

from lora_rank_search.trainables.tiny import build_tiny_llama, chain_records, word_list, write_jsonl

os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# One converted/pre-quantized model cache for the whole test session, never the user's
# ~/.cache/lora-rank-search: set before any Ray starts, so trial workers and driver subprocesses
# inherit it. Tests that check the cache itself point the variable at their own folder.
TEST_CACHE = tempfile.mkdtemp(prefix="lrs-test-cache-")
os.environ["LORA_RANK_SEARCH_CACHE"] = TEST_CACHE


def pytest_collection_modifyitems(config, items):
    """The longest files first, each file's tests together and in their order: under `make test`
    (`-n 2 --dist loadfile`) each worker takes the next file as it finishes one, so longest-first
    ends both workers close together (the quick files fill their ends). Seconds per file come
    from `durations.json` (a measured run); a file missing there counts 30 s per slow test."""
    import json
    from collections import Counter
    from pathlib import Path

    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    measured = json.loads((Path(__file__).parent / "durations.json").read_text())

    def seconds(item) -> float:
        return measured.get(item.path.name, 30.0 * slow[item.path])

    items.sort(key=lambda item: -seconds(item))  # stable: a file's tests keep their order


@pytest.fixture(scope="session", autouse=True)
def _session_cache():
    yield TEST_CACHE
    shutil.rmtree(TEST_CACHE, ignore_errors=True)

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
    "scheduler": {"type": "asha", "grace_period": 10, "reduction_factor": 2, "confirm": "off"},
    "resources": {"gpus_per_trial": 0, "cpus_per_trial": 1, "arms_per_worker": 1},
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


# --------------------------------------------------------------------------- a fake experiment folder

FAKE_BASE_LOSS = 3.0
FAKE_MAX_STEPS = 40
# (r, lr, seed) -> (Ray status, {step: eval loss}, how it ended): every trial status, early stops,
# two learning rates and two seeds, as successive halving would leave them (rungs at 10 and 20).
FAKE_TRIALS = {
    (2, 3e-4, 0): ("TERMINATED", {10: 2.60}, "ok"),
    (2, 3e-4, 1): ("TERMINATED", {10: 2.62}, "ok"),
    (2, 1e-3, 0): ("TERMINATED", {10: 2.50}, "ok"),
    (2, 1e-3, 1): ("TERMINATED", {10: 2.52}, "ok"),
    (4, 3e-4, 0): ("TERMINATED", {10: 2.45}, "ok"),
    (4, 1e-3, 0): ("TERMINATED", {10: 2.40, 20: 2.20, 30: 2.10, 40: 2.04}, "ok"),
    (4, 1e-3, 1): ("TERMINATED", {10: 2.40, 20: 2.22, 30: 2.12, 40: 2.06}, "ok"),
    (8, 3e-4, 0): ("TERMINATED", {10: 2.42}, "ok"),
    (8, 1e-3, 0): ("TERMINATED", {10: 2.38, 20: 2.18}, "ok"),
    (16, 1e-3, 0): ("TERMINATED", {10: 2.30, 15: float("nan")}, "diverged"),
    (16, 3e-4, 0): ("ERROR", {10: 2.36}, "error"),
    (16, 3e-4, 1): ("RUNNING", {10: 2.35}, "ok"),  # interrupted
    (32, 3e-4, 0): ("TERMINATED", {5: float("nan")}, "oom"),
    (32, 1e-3, 0): ("PENDING", {}, "ok"),
}


def write_fake_experiment(root) -> str:
    """Write an experiment folder in the layout a real search leaves (contract.layout), by hand: no
    Ray, no model. Returns its path."""
    import json
    from pathlib import Path

    import yaml

    from lora_rank_search.contract import layout

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    layout.write_config(str(root), {"model": {"name_or_path": "tiny"}, "lora": {"dropout": 0.0},
                                    "train": {"max_steps": FAKE_MAX_STEPS, "learning_rate": [3e-4, 1e-3]}})
    states = []
    for i, ((r, lr, seed), (ray_status, curve, end)) in enumerate(FAKE_TRIALS.items()):
        trial_id = f"fake_{i:05d}"
        config = {"r": r, "lr": lr, "seed": seed, "alpha_rule": "16", "target_preset": "attention"}
        folder = root / layout.trial_dirname(config, trial_id)
        folder.mkdir()
        (folder / layout.PARAMS_FILE).write_text(json.dumps(config))
        lines, best = [], float("inf")
        for step, loss in sorted(curve.items()):
            failed = loss != loss
            best = best if failed else min(best, loss)
            report = {"trial_id": trial_id, "step": step, "r": r, "seed": seed, "learning_rate": lr, "lora_alpha": 16.0,
                      "alpha_rule": "16", "target_modules": "q_proj,v_proj", "base_eval_loss": FAKE_BASE_LOSS,
                      "eval_loss": loss, "best_eval_loss": best, "train_loss": loss + 0.05, "lr": lr, "tokens_seen": 100 * step,
                      "tokens_per_s": 1000.0, "trainable_params": 1000 * r, "adapter_bytes": 4000 * r,
                      "peak_memory_bytes": 2**20, "time_total_s": float(step), "timestamp": 1e9 + step, "started_at": 1e9,
                      "trial_status": end if failed else "ok",
                      "failure": f"{end} at step {step}" if failed else ""}
            lines.append(json.dumps(report))
        if lines:
            (folder / layout.RESULT_FILE).write_text("\n".join(lines) + "\n")
        if end == "error":
            (folder / layout.ERROR_FILE).write_text("Traceback (most recent call last):\nRuntimeError: the fake trial failed\n")
        states.append([json.dumps({"trial_id": trial_id, "status": ray_status}), json.dumps({"num_failures": 0})])
    (root / f"{layout.STATE_PREFIX}2026-12-02_00-00-00.json").write_text(json.dumps({"trial_data": states}))
    (root / layout.TUNER_FILE).write_bytes(b"")
    assert yaml  # the config above is YAML on disk
    return str(root)


@pytest.fixture
def fake_experiment(tmp_path) -> str:
    return write_fake_experiment(tmp_path / "fake-exp")


# A fake search over three target choices x ranks 2, 4, 8 (one learning rate, one seed, no early
# stop): attention recovers under half of the best gain at every rank, mlp r=4 95%, all-linear is
# the best. Per rank: trainable params (as the parameter calculator would count them) and targets.
FAKE_CHOICES = {
    "attention": ("q_proj,k_proj,v_proj,o_proj", 1024, {2: 2.75, 4: 2.70, 8: 2.66}),
    "mlp": ("gate_proj,up_proj,down_proj", 1152, {2: 2.30, 4: 2.0825, 8: 2.04}),
    "all-linear": ("down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj", 2176, {2: 2.10, 4: 2.035, 8: 2.035}),
}


def write_fake_choice_experiment(root) -> str:
    """An experiment folder as a search over FAKE_CHOICES leaves it (target_choice in every trial's
    config, folder names prefixed by the choice). Returns its path."""
    import json
    from pathlib import Path

    from lora_rank_search.contract import layout

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    layout.write_config(str(root), {"model": {"name_or_path": "tiny"}, "lora": {"dropout": 0.0, "target_modules": list(FAKE_CHOICES)},
                                    "train": {"max_steps": FAKE_MAX_STEPS, "learning_rate": 1e-3}})
    states, i = [], 0
    for choice, (targets, per_rank, losses) in FAKE_CHOICES.items():
        for r, final in losses.items():
            trial_id = f"fake_{i:05d}"
            i += 1
            config = {"r": r, "lr": 1e-3, "seed": 0, "alpha_rule": "16", "target_choice": choice}
            folder = root / layout.trial_dirname(config, trial_id)
            folder.mkdir()
            (folder / layout.PARAMS_FILE).write_text(json.dumps(config))
            lines = []
            for step in (10, 20, 30, FAKE_MAX_STEPS):
                loss = FAKE_BASE_LOSS + (final - FAKE_BASE_LOSS) * step / FAKE_MAX_STEPS
                lines.append(json.dumps({
                    "trial_id": trial_id, "step": step, "r": r, "seed": 0, "learning_rate": 1e-3, "lora_alpha": 16.0,
                    "alpha_rule": "16", "target_modules": targets, "base_eval_loss": FAKE_BASE_LOSS, "eval_loss": loss,
                    "best_eval_loss": loss, "train_loss": loss, "lr": 1e-3, "trainable_params": per_rank * r,
                    "adapter_bytes": 4 * per_rank * r, "time_total_s": float(step), "timestamp": 1e9 + step,
                    "started_at": 1e9, "trial_status": "ok"}))
            (folder / layout.RESULT_FILE).write_text("\n".join(lines) + "\n")
            states.append([json.dumps({"trial_id": trial_id, "status": "TERMINATED"}), json.dumps({"num_failures": 0})])
    (root / f"{layout.STATE_PREFIX}2026-12-02_00-00-00.json").write_text(json.dumps({"trial_data": states}))
    (root / layout.TUNER_FILE).write_bytes(b"")
    return str(root)
