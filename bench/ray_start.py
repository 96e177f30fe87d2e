"""A local Ray's start as a search starts it: `ray.init` (dashboard off), two one-CPU tasks, shutdown.

    .venv/bin/python bench/ray_start.py [--repeats 3] [--busy 2]

Each repeat runs in a fresh Python process (as every search driver does) and prints the seconds of
`ray.init` alone and of the whole start-task-shutdown round. Whether Ray's dashboard packages are
installed (`ray[default]`) decides what `ray.init` starts: with them a dashboard process and a full
dashboard agent, without them (this project installs `ray[tune]`) a minimal agent. Run it in each
environment to compare; the header line says which one this is. `--busy N` keeps N processes
spinning on the CPU meanwhile: `make test` runs two test workers on two cores, so a Ray start there
competes for the CPU, and the agents' start is what grows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import header  # noqa: E402

ONE_START = """
import json, os, time
import ray
started = time.perf_counter()
ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
ready = time.perf_counter()
@ray.remote(num_cpus=1)
def pid():
    return os.getpid()
ray.get([pid.remote() for _ in range(2)])
ray.shutdown()
print(json.dumps({"init_s": ready - started, "round_s": time.perf_counter() - started}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", type=int, default=0, help="processes spinning on the CPU while Ray starts")
    args = parser.parse_args()
    import ray._private.utils as ray_utils

    missing = ray_utils.get_dashboard_dependency_error()
    header("ray_start: a local Ray's start, dashboard off")
    print(f"dashboard packages: {'absent (' + str(missing) + ')' if missing else 'present (ray[default])'}; "
          f"{args.busy} busy process(es)")
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        runs = _starts(args.repeats)
    finally:
        for spinner in spinners:
            spinner.kill()
    print(f"RESULT ray.init (median of {len(runs)}): {statistics.median(r['init_s'] for r in runs):.2f} s")


def _starts(repeats: int) -> list[dict]:
    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="lrs-rs-", dir="/tmp") as temp:  # short: Ray's socket paths
            env = {**os.environ, "RAY_TMPDIR": temp}
            env.pop("RAY_ADDRESS", None)
            done = subprocess.run([sys.executable, "-c", ONE_START], env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"the Ray start failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  ray.init {runs[-1]['init_s']:.2f} s, start + 2 tasks + shutdown {runs[-1]['round_s']:.2f} s")
    return runs


if __name__ == "__main__":
    main()
