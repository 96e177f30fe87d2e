"""Trackers (issue 22): a real search writes an MLflow tracking folder and offline W&B files, read
back by the real mlflow client and W&B's own offline-file reader; a missing package is refused
before Ray with what to install; an unreachable tracker warns and the search goes on. No network."""

from __future__ import annotations

import glob
import os

import pytest
import yaml

from lora_rank_search.search import tracking
from lora_rank_search.search.config import parse_config
from test_interrupt import driver_env  # noqa: F401 - a fixture used below

# mlflow and wandb come with the tracking extra, which `make test` installs (pip install -e '.[dev,tracking]').


def _write(tmp_path, raw) -> str:
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def wandb_records(run_dir: str) -> list:
    """Every record of an offline W&B run file (run-*.wandb): W&B's transaction log (a LevelDB-style
    log: a 7-byte ':W&B' header, 32 KiB blocks of chunks with a crc32/length/type header), each
    record parsed with W&B's own protobuf `Record`."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    data = open(path, "rb").read()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a W&B transaction log"
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_a_missing_tracker_package_is_refused_before_ray_saying_what_to_install(raw_config, tmp_path, capsys, monkeypatch):
    import ray

    from lora_rank_search.search.cli import main

    monkeypatch.setattr(tracking, "_has", lambda module: False)
    raw = raw_config(tracking={"mlflow": {"tracking_uri": str(tmp_path / "mlruns")}, "wandb": {"project": "p", "mode": "offline"}})
    assert main(["search", _write(tmp_path, raw)]) == 2
    err = capsys.readouterr().err
    assert "tracking.mlflow.tracking_uri: logging to MLflow needs the mlflow package: pip install 'lora-rank-search[tracking]'" in err
    assert "tracking.wandb.project: logging to W&B needs the wandb package: pip install 'lora-rank-search[tracking]'" in err
    assert not ray.is_initialized()


def test_an_unreachable_tracker_warns_and_the_search_goes_on(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tracking, "REACH_TIMEOUT_S", 1.0)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    cfg = parse_config({"name": "s", "storage_path": str(tmp_path),
                        "tracking": {"mlflow": {"tracking_uri": "http://127.0.0.1:9"}, "wandb": {"project": "p"}}})
    callbacks, record = tracking.callbacks(cfg, log=lambda line: None)
    err = capsys.readouterr().err
    assert "warning: tracking.mlflow.tracking_uri: cannot reach http://127.0.0.1:9" in err and "goes on without MLflow" in err
    assert "warning: tracking.wandb: cannot reach http://127.0.0.1:9; the search goes on with W&B logging offline" in err
    assert "mlflow" not in record and record["wandb"]["mode"] == "offline"
    assert [type(c).__name__ for c in callbacks] == ["WandbLoggerCallback"]


def test_a_local_folder_becomes_a_file_uri_and_uris_stay():
    assert tracking.mlflow_uri("/x/mlruns") == "file:///x/mlruns"
    assert tracking.mlflow_uri("sqlite:///x/m.db") == "sqlite:///x/m.db"
    assert tracking.mlflow_uri("http://host:5000") == "http://host:5000"


@pytest.mark.slow
def test_an_interrupted_and_resumed_search_logs_every_trial_once_and_the_verdict_to_mlflow_and_offline_wandb(
        raw_config, tmp_path, driver_env):
    """Ctrl-C mid-run, then --resume: the resumed trial logs on to its run of the first start (one
    MLflow child run per trial, each ended; one W&B run id per trial), the Ctrl-C returns at once (Ray's
    W&B callback waited its 30-minute upload timeout for the interrupted trial's actor), and the
    resume sets up the trackers again (it died on MLflow's folder-store opt-in and W&B's offline mode)."""
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    from lora_rank_search.trainables.failures import FAULT_ENV
    from test_interrupt import _wait_for

    store, wdir = tmp_path / "mlruns", tmp_path / "wandb-files"
    raw = raw_config(name="tracked", lora={"ranks": [1, 4]}, train={"max_steps": 20, "eval_every": 10},
                     scheduler={"type": "none"},
                     tracking={"mlflow": {"tracking_uri": str(store)},
                               "wandb": {"project": "rank-search", "mode": "offline", "dir": str(wdir)}})
    cli = [sys.executable, "-m", "lora_rank_search.search.cli", "search", _write(tmp_path, raw)]
    env = {**driver_env, "WANDB_SILENT": "true", FAULT_ENV: "r=4:step=15:kind=hang:once"}  # r=4 waits in the first start
    env.pop("WANDB_API_KEY", None)
    env.pop("MLFLOW_ALLOW_FILE_STORE", None)
    logs = [open(tmp_path / name, "w+") for name in ("out-0.txt", "err-0.txt", "out-1.txt", "err-1.txt")]
    first = subprocess.Popen(cli, stdout=logs[0], stderr=logs[1], env=env)
    _wait_for(str(tmp_path / "runs" / "tracked"), first, lambda snap: len(snap) == 2 and all(step >= 10 for _, step in snap.values()))
    interrupted = time.time()
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=900) == 130, (logs[1].seek(0) or logs[1].read())[-3000:]
    assert time.time() - interrupted < 120, "the Ctrl-C waited for the W&B actor of the interrupted trial"
    second = subprocess.run([*cli, "--resume"], stdout=logs[2], stderr=logs[3], env=env, timeout=900)
    out, err = (logs[2].seek(0) or logs[2].read()), (logs[3].seek(0) or logs[3].read())
    assert second.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    assert "tracking: resumed: each trial logs on to its run of the first start" in out
    assert "tracking: verdict logged on MLflow run" in out and "tracking: verdict logged as the summary of W&B run" in out

    tracking.allow_folder("file://" + str(store))
    client = MlflowClient(tracking_uri="file://" + str(store))
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("lora_rank_search.role") == "search"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 2, "one child run per trial, the resumed one included"
    assert {c.info.status for c in children} == {"FINISHED"}
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.params["r"] for c in children) == ["1", "4"]
    for child in children:
        history = client.get_metric_history(child.info.run_id, "eval_loss")
        assert len(history) >= 2 and child.data.metrics["step"] == 20
    assert parent.data.params["recommended_rank"] in ("1", "4")
    assert {"gain_share", "base_eval_loss"} <= set(parent.data.metrics)

    run_dirs = sorted(glob.glob(str(wdir / "wandb" / "offline-run-*")))
    # two trials (the resumed one continues its run id from a second folder: `wandb sync` joins them) and the verdict
    assert len({d.rsplit("-", 1)[1] for d in run_dirs}) == 3 and len(run_dirs) == 4, run_dirs
    groups, verdicts, trial_histories = set(), [], 0
    for run_dir in run_dirs:
        records = wandb_records(run_dir)
        for record in records:
            kind = record.WhichOneof("record_type")
            if kind == "run":
                groups.add(record.run.run_group)
                if record.run.job_type == "verdict":
                    verdicts.append(run_dir)
            if kind == "history" and any(_key(item) == "eval_loss" for item in record.history.item):
                trial_histories += 1
        summary = {_key(item): item.value_json for r in records if r.WhichOneof("record_type") == "summary"
                   for item in r.summary.update}
        if run_dir in verdicts:
            assert summary["recommended_rank"] == parent.data.params["recommended_rank"]
            assert "gain_share" in summary and "base_eval_loss" in summary
    assert groups == {"tracked"} and len(verdicts) == 1
    assert trial_histories >= 4, [(d, [r.WhichOneof("record_type") for r in wandb_records(d)]) for d in run_dirs]
