"""Pieces of bench/gpu_check.py: Llama-shaped models with random weights, synthetic data, the
trial config, the matmul rate, model FLOPs per token, and trials in child processes (no Ray).

A child is `python bench/gpu_check.py --child SPEC.json OUT.json`: a fresh process runs one trial
through the public path (parse_config -> prepare -> trial_settings -> run_trial), so its peak
memory is its own, as a Ray worker's would be.
"""

from __future__ import annotations

import gc
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

# Llama shapes. vocab = the tokenizer's size (a word-level tokenizer over vocab - 4 words + 4 specials).
SHAPES = {
    "8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256, tied=False),  # Llama-3.1-8B
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, tied=True),  # Llama-3.2-1B
    "135m": dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, tied=True),  # SmolLM2-135M
    "small": dict(hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1536, vocab=64, tied=False),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=64, tied=False),
    "tiny-1b": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=1024, tied=True),
}
# NF4 + double quantization, bf16 compute: the QLoRA recipe. Quantized in-process from the
# bf16 folder on first load, then cached under $LORA_RANK_SEARCH_CACHE (a folder of this run).
QUANT = {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
KEPT = ("step", "train_loss", "eval_loss", "tokens_seen", "tokens_per_s", "peak_memory_bytes", "trainable_params",
        "load_seconds", "elapsed_s", "adapter_bytes", "device", "trial_status", "failure")


def build_random_llama(shape: str, folder: Path, device: str) -> tuple[str, list[str]]:
    """Save a LlamaForCausalLM of `shape` with random bf16 weights (built on `device`) and a
    word-level tokenizer to `folder`; returns the folder and the tokenizer's words."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lora_rank_search.trainables.tiny import SPECIAL, build_tokenizer, word_list

    s = SHAPES[shape]
    folder.mkdir(parents=True, exist_ok=True)
    words = word_list(s["vocab"] - len(SPECIAL))
    tokenizer = build_tokenizer(words, folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        max_position_embeddings=4096, tie_word_embeddings=s["tied"], pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return str(folder), words


def chain_data(words: list[str], path: Path) -> str:
    """The permutation-chain task of the tests (instruction format): a LoRA learns it in steps."""
    from lora_rank_search.trainables.tiny import chain_records, write_jsonl

    return str(write_jsonl(chain_records(words, 400), path))


def random_text(words: list[str], seq: int, path: Path, n: int = 80) -> str:
    """Text records longer than `seq` tokens (truncated to exactly seq: every batch is full)."""
    from lora_rank_search.trainables.tiny import write_jsonl

    rng = random.Random(0)
    return str(write_jsonl([{"text": " ".join(rng.choice(words) for _ in range(seq + 8))} for _ in range(n)], path))


def raw_config(name: str, model: str, data: str, work: Path, *, fmt: str, seq: int, rank: int, targets: str,
               batch: int, steps: int, eval_every: int, lr: float = 2e-4, checkpointing: bool = False) -> dict:
    """A search config (as YAML would give it) for one trial; parsed by search.config.parse_config."""
    return {
        "name": name,
        "storage_path": str(work / "runs"),
        "model": {"name_or_path": model},
        "quantization": dict(QUANT),
        "data": {"source": data, "format": fmt, "max_seq_len": seq, "max_eval_examples": 8},
        "lora": {"ranks": [rank], "target_modules": targets, "dropout": 0.0},
        "train": {"max_steps": steps, "eval_every": eval_every, "batch_size": batch, "learning_rate": lr,
                  "lr_schedule": "constant", "gradient_checkpointing": checkpointing},
        "scheduler": {"type": "none"},
        "resources": {"cpus_per_trial": 1},
    }


def matmul_tflops(device: str, n: int, repeats: int) -> float:
    """Measured dense bf16 matmul rate (TFLOP/s) of n x n by n x n products on `device`."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    rate = 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12
    del a, b
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rate


def flops_per_token(frozen_params: int, lora_params: int, layers: int, hidden: int, seq: int) -> dict:
    """Model FLOPs of one trained token (recomputation by gradient checkpointing not counted):
    4 N_frozen (2N forward + 2N backward for the activation gradients; frozen weights get no weight
    gradient) + 6 N_lora (forward, activation and weight gradients) + 12 L s d (attention scores
    and values: 4 L s d forward, twice that backward)."""
    terms = {"frozen": 4 * frozen_params, "adapter": 6 * lora_params, "attention": 12 * layers * seq * hidden}
    return {**terms, "total": sum(terms.values())}


def aggregate_rate(curves: list[list[tuple[float, int]]]) -> tuple[float, bool]:
    """Tokens/s of several processes together, each curve its (time s, tokens trained) at each
    report: over the window in which every one of them was training (from the last first report
    to the first last report, tokens interpolated linearly), and True; without such a window, all
    tokens over the whole span, and False."""
    import numpy as np

    start, end = max(c[0][0] for c in curves), min(c[-1][0] for c in curves)
    if end > start:
        tokens = 0.0
        for curve in curves:
            times, counts = zip(*curve)
            tokens += float(np.interp(end, times, counts) - np.interp(start, times, counts))
        return tokens / (end - start), True
    span = max(c[-1][0] for c in curves) - min(c[0][0] for c in curves)
    return sum(c[-1][1] - c[0][1] for c in curves) / max(span, 1e-9), False


def device_used() -> Optional[int]:
    """Bytes in use on GPU 0 by every process (what nvidia-smi shows), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return int(total - free)


# --------------------------------------------------------------------------- trial processes


def trial_child(spec: dict) -> dict:
    """Runs in a fresh process: one trial, its memory estimate, its CUDA context (bytes)."""
    import torch

    from lora_rank_search.search.config import parse_config
    from lora_rank_search.search.runner import memory_estimate, prepare
    from lora_rank_search.search.space import trial_settings
    from lora_rank_search.trainables.trial import quiet_libraries, run_trial, trial_device

    quiet_libraries()
    device = trial_device()
    context = 0
    if device.startswith("cuda"):
        torch.zeros(1, device=device)
        context = max(0, device_used() - spec["parent_used"] - torch.cuda.memory_reserved())
    cfg = parse_config(spec["raw"])
    prepared = prepare(cfg, log=lambda _: None)
    settings = trial_settings(cfg, prepared.model_path, prepared.targets)
    estimate = memory_estimate(cfg, prepared)
    if spec.get("go_file"):  # start training together with the other processes of a packing
        import peft  # noqa: F401 - imported before the barrier, so no process spends its start importing
        Path(spec["ready_file"]).touch()
        while not os.path.exists(spec["go_file"]):
            time.sleep(0.05)
    reports: list[dict] = []

    def report(metrics: dict, folder: Optional[str]) -> None:
        reports.append({"t": time.time(), **{k: metrics.get(k) for k in KEPT}})

    run_trial({"r": spec["r"], "seed": spec["seed"]}, settings, prepared.data, report, threads=1)
    dims = prepared.dims
    return {
        "device": device,
        "context_bytes": context,
        "max_reserved_bytes": int(torch.cuda.max_memory_reserved()) if device.startswith("cuda") else 0,
        "estimate": {"base_weights": estimate.base_weights, "adapter_and_optimizer": estimate.adapter_and_optimizer,
                     "activations": estimate.activations, "context": estimate.context, "total": estimate.total},
        "frozen_matmul_params": sum(i * o for i, o in prepared.linear_shapes.values()) + dims["hidden"] * dims["vocab"],
        "hidden": dims["hidden"], "layers": dims["layers"], "vocab": dims["vocab"],
        "seq_len": cfg.data.max_seq_len, "batch_size": cfg.train.batch_size,
        "reports": reports,
    }


def pack_child(spec: dict) -> dict:
    """Runs in a fresh process: `spec['arms']` arms of rank `spec['r']` (seeds 0..) in one pack
    (trainables.pack) on one base, trained together; tokens/s after a warm-up step, peak memory."""
    import torch

    from lora_rank_search.search.config import parse_config
    from lora_rank_search.search.runner import prepare
    from lora_rank_search.search.space import trial_settings
    from lora_rank_search.trainables.pack import Pack
    from lora_rank_search.trainables.trial import peak_memory_bytes, quiet_libraries, trial_device

    quiet_libraries()
    device = trial_device()
    cfg = parse_config(spec["raw"])
    prepared = prepare(cfg, log=lambda _: None)
    settings = trial_settings(cfg, prepared.model_path, prepared.targets)
    pack = Pack(settings, prepared.data, threads=1)
    keys = [str(i) for i in range(spec["arms"])]
    for key in keys:
        pack.add(key, {"r": spec["r"], "seed": int(key)})
    pack.train_step(keys)  # the first step pays one-time costs (allocator, kernels): not timed
    start_tokens = sum(pack.arms[k].interval_tokens for k in keys)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.time()
    for _ in range(spec["steps"] - 1):
        pack.train_step(keys)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.time() - start
    tokens = sum(pack.arms[k].interval_tokens for k in keys) - start_tokens
    return {"device": device, "mode": pack.mode, "arms": len(keys), "tokens_per_s": tokens / max(elapsed, 1e-9),
            "peak_bytes": peak_memory_bytes(device),
            "max_reserved_bytes": int(torch.cuda.max_memory_reserved()) if device.startswith("cuda") else 0,
            "statuses": sorted({pack.arms[k].status for k in keys})}


def run_children(specs: list[dict], work: Path, timeout_s: float, barrier: bool = False,
                 poll: Optional[Callable[[], None]] = None) -> list[dict]:
    """Run one trial process per spec, all at once, with one CPU thread each as a Ray worker of
    cpus_per_trial 1 has; with `barrier` they start training at the same moment (after their
    imports and data). Returns each one's result, or {"error": ...}."""
    script = str(Path(__file__).with_name("gpu_check.py"))
    tag = time.time_ns()
    go = work / f"go-{tag}"
    children = []
    for i, spec in enumerate(specs):
        paths = {ext: work / f"child-{tag}-{i}.{ext}" for ext in ("spec.json", "out.json", "log", "ready")}
        paths["spec.json"].write_text(json.dumps({**spec, **({"ready_file": str(paths["ready"]), "go_file": str(go)} if barrier else {})}))
        with open(paths["log"], "w") as log:
            proc = subprocess.Popen([sys.executable, script, "--child", str(paths["spec.json"]), str(paths["out.json"])],
                                    stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        children.append((proc, paths))
    deadline, timed_out = time.time() + timeout_s, False
    try:
        while any(proc.poll() is None for proc, _ in children):
            if time.time() > deadline:
                timed_out = True
                break
            if barrier and not go.exists() and all(paths["ready"].exists() or proc.poll() is not None for proc, paths in children):
                go.touch()
            if poll:
                poll()
            time.sleep(0.1)
    finally:
        for proc, _ in children:  # only the processes started here, by their handle
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = []
    for proc, paths in children:
        if proc.returncode == 0 and paths["out.json"].exists():
            results.append(json.loads(paths["out.json"].read_text()))
        else:
            why = f"timed out after {timeout_s:.0f} s" if timed_out else f"exit code {proc.returncode}"
            results.append({"error": f"trial process {why}; its output ends: {paths['log'].read_text()[-1500:]}"})
    return results
