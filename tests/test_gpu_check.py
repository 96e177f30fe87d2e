"""bench/gpu_check.py: its smoke run on CPU with Ray unimportable, and its arithmetic and report on
hand-made results (the GPU-only rows included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._gpu_parts import aggregate_rate, flops_per_token  # noqa: E402
from bench._gpu_report import markdown  # noqa: E402
from bench.gpu_check import ANCHOR_8B, mfu  # noqa: E402

NO_RAY = """import os, traceback
with open(os.environ["NO_RAY_LOG"], "a") as log:
    log.write("".join(traceback.format_stack()) + "---\\n")
raise ImportError("ray is not installed on this machine (test shim)")
"""


@pytest.mark.slow
def test_smoke_run_writes_every_section_without_ray(tmp_path):
    shim = tmp_path / "no-ray" / "ray"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(NO_RAY)
    attempts = tmp_path / "ray-imports.log"
    path = [str(shim.parent), str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "NO_RAY_LOG": str(attempts)}
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(out), "--smoke", "--work", str(tmp_path / "work")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert not attempts.exists(), f"something imported ray:\n{attempts.read_text()}"

    results = json.loads((out / "results.json").read_text())
    assert results["device"]["matmul_bf16_tflops"] > 0
    correctness = results["correctness"]
    assert correctness["passed"], correctness["checks"]
    assert correctness["linear4bit_layers"] > 0 and correctness["quant_types"] == ["nf4"] and correctness["double_quant"]
    assert correctness["loss_first"] > correctness["loss_last"]
    assert correctness["reload_relative_difference"] <= 1e-3
    exact = results["packed_exact"]
    assert exact["passed"] and exact["mode"] == "stacked", exact["checks"]
    assert max(exact["largest_relative_difference"].values()) <= 1e-4, "on CPU packed arms train as alone"
    memory = results["memory"]
    assert [(r["model"], r["gradient_checkpointing"]) for r in memory] == [("1b", False), ("1b", True)]
    for row in memory:
        assert row["status"] == "ok" and row["estimated_bytes"] > 0 and row["measured_bytes"] > 0
        assert row["ratio_estimated_to_measured"] == pytest.approx(row["estimated_bytes"] / row["measured_bytes"])
        assert row["tokens_per_s"] > 0
    packing = results["packing"]
    assert [r["trials_per_gpu"] for r in packing] == [1, 2]
    for row in packing:
        assert row["aggregate_tokens_per_s"] > 0 and row["all_trained_together"] and row["statuses"] == ["ok"]
        assert len(row["per_process_peak_bytes"]) == row["trials_per_gpu"]
    packed = results["packed"]
    assert [(r["model"], r["arms"]) for r in packed] == [("tiny", 1), ("tiny", 2)]
    for row in packed:
        assert row["mode"] == "stacked" and row["statuses"] == ["ok"]
        assert row["packed_tokens_per_s"] > 0 and row["processes_tokens_per_s"] > 0
        assert row["packed_vs_processes"] == pytest.approx(row["packed_tokens_per_s"] / row["processes_tokens_per_s"])
        assert row["packed_peak_bytes_per_row"] > 0 and row["processes_peak_bytes_per_row"] > 0
    assert packed[1]["packed_peak_bytes_per_row"] < packed[1]["processes_peak_bytes_per_row"], "one base, not two"
    assert 0 < results["mfu"]["1b"]["mfu"]
    text = (out / "results.md").read_text()
    for heading in ("## device", "## correctness", "## packed_exact", "## memory", "## packing", "## packed", "## mfu"):
        assert heading in text
    assert "error" not in text and "**PASS**" in text


def test_aggregate_rate_counts_only_the_window_in_which_all_train():
    alone_early = [(0.0, 0), (10.0, 1000)]  # 100 tokens/s from t=0 to 10
    late = [(2.0, 0), (12.0, 2000)]  # 200 tokens/s from t=2 to 12
    assert aggregate_rate([alone_early, late]) == (pytest.approx(300.0), True)
    rate, together = aggregate_rate([[(0.0, 0), (1.0, 100)], [(2.0, 0), (3.0, 100)]])
    assert not together and rate == pytest.approx(200 / 3)


def test_flops_per_token_is_the_stated_formula():
    f = flops_per_token(frozen_params=1000, lora_params=10, layers=2, hidden=8, seq=4)
    assert f == {"frozen": 4000, "adapter": 60, "attention": 12 * 2 * 4 * 8, "total": 4000 + 60 + 768}


def _memory_row(model, checkpointing, tokens_per_s, measured):
    return {"model": model, "shape": model, "gradient_checkpointing": checkpointing, "estimated_bytes": 2 * measured,
            "estimate_parts": {}, "measured_bytes": measured, "ratio_estimated_to_measured": 2.0,
            "max_allocated_bytes": measured - 2**29, "context_bytes": 2**29, "max_reserved_bytes": measured,
            "device_used_peak_bytes": measured + 2**28, "tokens_per_s": tokens_per_s, "trainable_params": 10**7,
            "frozen_matmul_params": 10**9, "layers": 16, "hidden": 2048, "seq_len": 512, "batch_size": 4,
            "load_seconds": 3.0, "status": "ok", "failure": ""}


def test_mfu_and_report_on_hand_made_gpu_results():
    results = {
        "mode": "gpu", "date": "2026-12-02 12:00", "command": "bench/gpu_check.py --out x", "anchor_8b": ANCHOR_8B,
        "device": {"name": "H200", "memory_bytes": 139 * 2**30, "torch": "2.11", "cuda": "13.0", "bitsandbytes": "0.50.2",
                   "transformers": "5.17", "peft": "0.21", "matmul_bf16_tflops": 800.0, "matmul_size": 8192},
        "memory": [_memory_row("1b", False, 40000.0, 10 * 2**30), _memory_row("1b", True, 30000.0, 6 * 2**30),
                   _memory_row("8b", False, 4826.0, 30 * 2**30),
                   {"model": "8b", "shape": "8b", "gradient_checkpointing": True, "error": "trial process timed out"}],
        "packing": [{"trials_per_gpu": 1, "gpus_per_trial": 1.0, "aggregate_tokens_per_s": 1000.0, "all_trained_together": True,
                     "per_process_peak_bytes": [2**30], "device_used_peak_bytes": 2**31, "vs_1_per_gpu": 1.0},
                    {"trials_per_gpu": 2, "error": "skipped: the time budget is spent"}],
        "packed": [{"model": "1b", "shape": "1b", "arms": 4, "mode": "stacked", "statuses": ["ok"], "packed_tokens_per_s": 9000.0,
                    "processes_tokens_per_s": 3000.0, "processes_trained_together": True, "packed_vs_processes": 3.0,
                    "packed_peak_bytes_per_row": 2**27, "processes_peak_bytes_per_row": 2**28},
                   {"model": "1b", "arms": 8, "error": "skipped: the time budget is spent"}],
    }
    derived = mfu(results)
    flops = 4 * 10**9 + 6 * 10**7 + 12 * 16 * 512 * 2048
    assert derived["1b"]["mfu"] == pytest.approx(40000.0 * flops / 800e12)
    assert derived["8b"]["vs_anchor_tokens_per_s"] == pytest.approx(2.0)
    assert "8b_checkpointing" not in derived  # its row failed
    text = markdown({**results, "mfu": derived})
    assert f"MFU {100 * derived['1b']['mfu']:.1f}%" in text
    assert "4,826 tokens/s" in text and "2.00x the anchor" in text and "not measured" not in text
    assert "trial process timed out" in text and "skipped: the time budget is spent" in text
    assert "| 1b | 4 | stacked | 9,000 | 3,000 | **3.00x** |" in text
