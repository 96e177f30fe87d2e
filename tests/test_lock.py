"""One search per experiment at a time (`search.lock`): two drivers in one experiment folder trained
the same arms into the same trial folders, and both reported an interruption that never happened."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import yaml

from lora_rank_search.search import lock
from lora_rank_search.search.config import ConfigError, parse_config


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def _write_lock(cfg, **holder) -> None:
    path = lock.lock_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"started": "2026-12-06 12:00:00", **holder}))


def test_a_second_search_on_a_held_experiment_is_refused_naming_the_holder(raw_config):
    cfg = parse_config(raw_config(name="held"))
    with lock.held(cfg):
        assert lock.lock_path(cfg).exists()
        with pytest.raises(ConfigError) as info:
            lock.take(cfg)
        text = str(info.value)
        assert f"name: the experiment {cfg.experiment_path!r} is in use by another search (pid {os.getpid()} on {socket.gethostname()}" in text
    assert not lock.lock_path(cfg).exists(), "released when the search ends"
    with lock.held(cfg):  # and taken again by the next one
        pass


def test_a_lock_whose_search_is_gone_is_taken_over(raw_config):
    cfg = parse_config(raw_config(name="stale"))
    _write_lock(cfg, host=socket.gethostname(), pid=_dead_pid())  # a driver killed on this machine
    with lock.held(cfg):
        assert json.loads(lock.lock_path(cfg).read_text())["pid"] == os.getpid()
    _write_lock(cfg, host="another-node", pid=1)  # another machine's driver, heartbeat fresh
    with pytest.raises(ConfigError, match="in use by another search \\(pid 1 on another-node"):
        lock.take(cfg)
    old = time.time() - lock.STALE_S - 5
    os.utime(lock.lock_path(cfg), (old, old))  # ... and silent for longer than STALE_S: gone
    with lock.held(cfg):
        assert json.loads(lock.lock_path(cfg).read_text())["pid"] == os.getpid()


def test_the_cli_refuses_a_search_and_a_resume_while_another_runs_before_any_work(raw_config, tmp_path, capsys):
    from lora_rank_search.search.cli import main

    raw = raw_config(name="busy")
    config = tmp_path / "busy.yaml"
    config.write_text(yaml.safe_dump(raw))
    cfg = parse_config(raw)
    with lock.held(cfg):  # another search holds the experiment
        for extra in ([], ["--resume"]):
            assert main(["search", str(config), *extra]) == 2
            err = capsys.readouterr().err
            assert "is in use by another search" in err and "Traceback" not in err
    assert not os.path.exists(cfg.experiment_path), "nothing written"
    assert not os.path.exists(cfg.storage_path), "the storage folder the lock needed is removed again"
