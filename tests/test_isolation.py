"""A local search's Ray: trial workers import nothing from the launch directory, and what listens
on the network requires Ray's token (issue 14, class 4). One tiny search serves both tests."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import pytest
import yaml

from lora_rank_search.search.cli import main

STRAYS = ("search", "trainables", "analysis", "data", "h2", "peft")  # named like ours or like what trials import


@pytest.fixture(scope="module")
def local_search(tmp_path_factory, tiny_model, chain_data):
    """Run a 1-trial search from a launch directory full of stray modules, with RAY_AUTH_MODE=disabled
    set (what a user might try); record, right after Ray started, every listening socket of this
    process tree and whether token authentication is on, and what was said about it."""
    import contextlib
    import io
    import logging

    import psutil

    import lora_rank_search.search.runner
    from lora_rank_search import search
    from conftest import BASE, merge

    launch = tmp_path_factory.mktemp("launch")
    for name in STRAYS:
        (launch / f"{name}.py").write_text(
            f"open(__file__ + '.imported', 'w').close()\nraise ImportError('stray {name}.py imported from the launch directory')\n"
        )
    raw = merge(BASE, {"name": "iso", "storage_path": str(launch / "runs"), "model": {"name_or_path": tiny_model},
                       "data": {"source": chain_data}, "lora": {"ranks": [2]}, "train": {"max_steps": 4, "eval_every": 2},
                       "scheduler": {"type": "none"}})
    (launch / "search.yaml").write_text(yaml.safe_dump(raw))
    seen: dict = {}
    original = search.runner.build_tuner

    def recording(*args, **kwargs):
        import ray

        from lora_rank_search.search.isolation import token_auth_enabled

        me = psutil.Process()
        listeners = []
        for proc in [me, *me.children(recursive=True)]:
            try:
                for conn in proc.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        listeners.append((proc.name(), conn.laddr.ip, conn.laddr.port))
            except psutil.Error:
                continue
        seen.update(listeners=listeners, token=token_auth_enabled(), gcs=ray.get_runtime_context().gcs_address)
        seen["anonymous"] = subprocess.run(
            [sys.executable, "-c", "import sys; from ray._raylet import GcsClient; GcsClient(address=sys.argv[1]); print('connected')", seen["gcs"]],
            env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}, capture_output=True, text=True, timeout=600,
        )
        return original(*args, **kwargs)

    class Said(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    said: list = []
    handler = Said()
    ray_auth = logging.getLogger("ray._private.authentication")  # where Ray's hints about it come from
    ray_auth.addHandler(handler)
    mp = pytest.MonkeyPatch()
    mp.setattr(search.runner, "build_tuner", recording)
    mp.setenv("RAY_AUTH_MODE", "disabled")
    mp.chdir(launch)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = main(["search", str(launch / "search.yaml")])
        seen.update(said=said + err.getvalue().splitlines())
    finally:
        ray_auth.removeHandler(handler)
        mp.undo()
    return code, launch, seen


@pytest.mark.slow
def test_trial_workers_do_not_import_modules_from_the_launch_directory(local_search):
    code, launch, _ = local_search
    imported = sorted(p.name for p in launch.iterdir() if p.name.endswith(".imported"))
    assert imported == [], f"stray modules imported: {imported}"
    assert code == 0


@pytest.mark.slow
def test_a_local_search_listens_only_behind_token_authentication(local_search):
    code, _, seen = local_search
    assert seen["listeners"], "no listening socket found: the check saw nothing"
    exposed = [(name, ip, port) for name, ip, port in seen["listeners"] if not ipaddress.ip_address(ip).is_loopback]
    # Ray 2.60 cannot bind its services to loopback (README, "Security"); every exposed one is Ray's.
    for name, ip, port in exposed:
        assert name in ("gcs_server", "raylet", "python", "python3") or name.startswith("ray::"), (name, ip, port)
    assert seen["token"] is True, "Ray's token authentication is off"
    said = "\n".join(seen["said"])
    assert "warning: RAY_AUTH_MODE: 'disabled' ignored" in said, said
    assert "opt out" not in said and "RAY_AUTH_MODE=disabled" not in said, f"Ray's hint to turn it off: {said}"
    assert "connected" not in seen["anonymous"].stdout
    assert "Authentication" in seen["anonymous"].stderr or "auth" in seen["anonymous"].stderr.lower(), seen["anonymous"].stderr[-2000:]
