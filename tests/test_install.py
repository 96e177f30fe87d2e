"""One installed namespace: the wheel holds `lora_rank_search` only (with its configs), and an install
in a fresh virtual environment runs the CLI and a search from a folder whose own `search.py` and
`analysis/` would shadow generic top-level names."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GENERIC = {"search", "analysis", "trainables", "contract", "bench", "tests"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = ROOT / "build"  # setuptools builds there, in the source tree
    existed = build.exists()
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                        "--disable-pip-version-check", "-w", str(out)], check=True)
    finally:
        if not existed:
            shutil.rmtree(build, ignore_errors=True)  # other tests list the repository's files
    return next(out.glob("lora_rank_search-*.whl"))


@pytest.mark.slow
def test_the_wheel_installs_one_namespace_and_its_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"lora_rank_search"}, f"top-level names in the wheel: {sorted(tops)}"
    for package in ("search", "trainables", "analysis"):
        assert f"lora_rank_search/{package}/__init__.py" in names
    assert "lora_rank_search/configs/quickstart.yaml" in names, "the configs error messages point to are shipped"
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "lora-rank = lora_rank_search.search.cli:main" in entry


@pytest.mark.slow
def test_a_fresh_environment_runs_the_cli_and_a_search_beside_a_users_search_py(wheel, tmp_path, raw_config):
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python, cli = env / "bin" / "python", env / "bin" / "lora-rank"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--disable-pip-version-check",
                    str(wheel)], check=True)
    # The dependencies (torch, Ray, ...) come from this environment's site-packages, after the install
    # (so pip never sees them); the package itself only from the wheel.
    site_dir = next((env / "lib").glob("python*/site-packages"))
    (site_dir / "zz_deps.pth").write_text("\n".join(p for p in site.getsitepackages() if p.endswith("site-packages")) + "\n")
    work = tmp_path / "user"
    (work / "analysis").mkdir(parents=True)
    for shadow in (work / "search.py", work / "analysis" / "__init__.py", work / "trainables.py"):
        shadow.write_text("raise SystemExit('a user module shadowed the package: ' + __name__)\n")
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import lora_rank_search, os; print(os.path.dirname(lora_rank_search.__file__))"],
                           cwd=work, env=clean, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).resolve().is_relative_to(site_dir.resolve()), f"imported from {where}, not the fresh install"
    shown = subprocess.run([str(cli), "--help"], cwd=work, env=clean, capture_output=True, text=True)
    assert shown.returncode == 0 and "search" in shown.stdout, shown.stderr[-2000:]
    raw = raw_config(lora={"ranks": [1, 4]}, train={"max_steps": 10, "eval_every": 5}, scheduler={"type": "asha"},
                     name="fresh", storage_path=str(work / "runs"))
    (work / "search.yaml").write_text(yaml.safe_dump(raw))
    run = subprocess.run([str(python), "-m", "lora_rank_search.search.cli", "search", "search.yaml"], cwd=work, env=clean,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    rec = json.loads((work / "runs" / "fresh" / "analysis" / "recommendation.json").read_text())
    assert rec.get("rank") in (1, 4)
