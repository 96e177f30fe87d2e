"""The CLI end to end (a real subprocess) and its refusal of bad input before Ray starts."""

from __future__ import annotations

import pytest

import glob
import os
import subprocess
import sys

import yaml

from lora_rank_search.search.cli import main


def _write(tmp_path, raw: dict) -> str:
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_bad_config_lists_every_problem_exits_2_and_starts_no_ray(raw_config, tmp_path, capsys):
    import ray

    raw = raw_config(lora={"ranks": [8, 0], "dropout": 2.0}, train={"batch_size": -1}, extra_key=1)
    code = main(["search", _write(tmp_path, raw)])
    err = capsys.readouterr().err
    assert code == 2
    assert "4 problems" in err
    for line in ("extra_key: unknown key", "lora.ranks[1]: rank must be a positive integer, got 0",
                 "lora.dropout: must be in [0, 1), got 2.0", "train.batch_size: must be a positive integer, got -1"):
        assert line in err
    assert "Traceback" not in err
    assert not ray.is_initialized()
    assert not os.path.exists(tmp_path / "runs" / "test"), "nothing written"


def test_bad_model_data_and_targets_are_found_before_ray(raw_config, tmp_path, capsys):
    import ray

    raw = raw_config(lora={"target_modules": ["q_proj", "qkv"]}, data={"source": str(tmp_path / "missing.jsonl")})
    assert main(["search", _write(tmp_path, raw)]) == 2
    err = capsys.readouterr().err
    assert "lora.target_modules: 'qkv' not found; the model's linear layers are: down_proj, gate_proj, k_proj" in err
    assert "data.source: data file not found" in err
    assert not ray.is_initialized()


@pytest.mark.slow
def test_cli_search_end_to_end_prints_the_table_and_writes_the_experiment(raw_config, tmp_path):
    raw = raw_config(name="cli", lora={"ranks": [2, 16]}, train={"max_steps": 20, "eval_every": 10})
    config = _write(tmp_path, raw)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "lora_rank_search.search.cli", "search", config]
    done = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "best eval loss" in out and "tokens/s" in out and "peak mem" in out
    table = out[out.index("best eval loss"):].splitlines()
    assert sum(1 for line in table if line.split() and line.split()[0] in ("2", "16")) == 2
    experiment = tmp_path / "runs" / "cli"
    assert f"experiment: {experiment}" in out
    assert len(list(experiment.glob("r*_seed0_*/result.json"))) == 2
    assert (experiment / "lora_rank_search.yaml").is_file()
    # It ends with the verdict, in three lines, and the analysis in the experiment folder.
    verdict = out[out.index("recommended: r="):].splitlines()
    assert len(verdict) == 3 and "learning rate 3e-3" in verdict[0] and "of the best gain" in verdict[0], verdict
    assert verdict[2] == f"  report: {experiment / 'analysis' / 'REPORT.md'}"
    assert (experiment / "analysis" / "recommendation.json").is_file()
    # Running it again without --resume is refused: no silent merge into the old experiment.
    again = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 2 and "already exists; add --resume" in again.stderr


def test_analyze_and_export_name_bad_input(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nope")]) == 2
    assert "EXPERIMENT_DIR: no experiment at" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path), "--tolerance", "-0.5"]) == 2
    assert "--tolerance: must be a number >= 0" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert glob.glob(str(tmp_path / "x")) == []


def test_params_and_analyze_do_not_load_the_4bit_kernels(tmp_path):
    """Neither command needs bitsandbytes: it stays unimported, so its "Failed to load CPU
    gemm_4bit_forward from kernels-community" line is not printed."""
    from conftest import write_fake_experiment

    _tiny_llama_config().save_pretrained(tmp_path / "llama")
    experiment = write_fake_experiment(tmp_path / "fake")
    script = (
        "import sys\n"
        "from search.cli import main\n"
        f"assert main(['params', {str(tmp_path / 'llama')!r}, '--ranks', '8']) == 0\n"
        f"assert main(['analyze', {experiment!r}]) == 0\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('bitsandbytes', 'peft'))\n"
        "print('LOADED', loaded, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOADED []" in done.stderr, done.stderr[-3000:]
    assert "kernels-community" not in done.stderr + done.stdout


def _tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, vocab_size=100)


def test_the_resume_command_keeps_the_cluster_address_and_the_analysis_choice():
    """After a Ctrl-C of a cluster search, the printed command dropped --address: it would have
    resumed on a new local Ray instead of the cluster."""
    import argparse

    from lora_rank_search.search.cli import resume_command

    args = argparse.Namespace(config="my search.yaml", set=["train.max_steps=40"], address="auto", no_analyze=True)
    assert resume_command(args) == "lora-rank search 'my search.yaml' --set train.max_steps=40 --address auto --no-analyze --resume"
    args = argparse.Namespace(config="a.yaml", set=[], address=None, no_analyze=False)
    assert resume_command(args) == "lora-rank search a.yaml --resume"
