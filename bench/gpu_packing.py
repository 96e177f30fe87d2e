"""Several trials per GPU: aggregate training tokens/s at 1, 2 and 4 trials per GPU
(gpus_per_trial 1, 0.5, 0.25), peak memory per trial, and MFU of the largest run.

    .venv/bin/python bench/gpu_packing.py [--models 135m 1b] [--steps 30] [--batch 8] [--seq 256]

Models are Llama-shaped with random weights from a config (speed does not depend on the values):
135m = SmolLM2-135M's shape, 1b = Llama-3.2-1B's shape. Each packing runs k identical trials
(rank 16, attention targets, seeds 0..k-1) at the same time through the real search (Ray Tune,
fractional GPUs). Aggregate tokens/s = all trials' training tokens / the wall time from the first
training step to the last report. MFU = model FLOPs / time / measured bf16 matmul rate, with model
FLOPs per token = 4 x frozen linear params (forward + activation gradients; the frozen base
computes no weight gradients) + attention (4 x seq x hidden per layer forward, x3 with backward);
the LoRA matrices add under 1% and are left out.

Without a GPU it says so and runs the same code on CPU with *logical* GPUs (Ray schedules them,
torch never sees CUDA) on the tiny model: that checks the packing machinery, not GPU speed.
Targets (GPU): 4-way packing >= 2x the aggregate tokens/s of 1 trial per GPU for 135m; MFU >= 30%
for 1b at 1 trial per GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import header  # noqa: E402

SHAPES = {
    "135m": dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152),
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=0),
}


def build_model(name: str, root: str) -> str:
    """A Llama-shaped model with random weights (bf16 on disk) and a word-level tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_rank_search.trainables.tiny import build_tiny_llama, build_tokenizer, word_list

    folder = os.path.join(root, name)
    if name == "tiny":
        return str(build_tiny_llama(folder, word_list(60)))
    s = SHAPES[name]
    os.makedirs(folder, exist_ok=True)
    tokenizer = build_tokenizer(word_list(s["vocab"] - 4), folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        max_position_embeddings=4096, tie_word_embeddings=name == "135m",
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    return folder


def write_data(path: str, words: int, seq: int, n: int = 512) -> str:
    """Random word sequences of about `seq` tokens (text format: loss on every token)."""
    import json
    import random

    rng = random.Random(0)
    with open(path, "w") as handle:
        for _ in range(n):
            handle.write(json.dumps({"text": " ".join(f"w{rng.randrange(words)}" for _ in range(seq - 2))}) + "\n")
    return path


def matmul_tflops() -> float:
    """Measured dense bf16 matmul rate of GPU 0 (TFLOP/s), 8192^3 products."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - start) / 1e12


def run_packing(model: str, data: str, k: int, args, root: str, gpu: bool) -> dict:
    import ray

    from lora_rank_search.analysis.results import load_experiment
    from lora_rank_search.search.config import parse_config
    from lora_rank_search.search.runner import run_search

    cfg = parse_config({
        "name": f"pack-{os.path.basename(model)}-{k}", "storage_path": os.path.join(root, "runs"),
        "model": {"name_or_path": model},
        "data": {"source": data, "format": "text", "max_seq_len": args.seq, "max_eval_examples": 16},
        "lora": {"ranks": [16], "target_modules": "attention", "dropout": 0.0},
        "train": {"max_steps": args.steps, "eval_every": args.steps, "batch_size": args.batch, "seeds": list(range(k))},
        "scheduler": {"type": "none"},
        "resources": {"gpus_per_trial": 1.0 / k, "cpus_per_trial": 1},
    })
    resources = {"num_cpus": max(4, k)} if gpu else {"num_cpus": max(4, k), "num_gpus": 1}
    ray.init(address="local", include_dashboard=False, logging_level="ERROR", **resources)
    try:
        trials, history = load_experiment(run_search(cfg, log=lambda _: None))
    finally:
        ray.shutdown()
    assert (trials["status"] == "completed").all(), trials[["r", "seed", "status"]]
    # Per trial, on its own clock (seconds): first training step = start + model load; end = start +
    # elapsed at its last report (Tune's `timestamp` has 1 s resolution: too coarse here).
    per = history.sort_values("step").groupby("trial_id").agg(
        start=("started_at", "first"), load=("load_seconds", "first"), elapsed=("elapsed_s", "last"), tokens=("tokens_seen", "last")
    )
    first_step, end = per["start"] + per["load"], per["start"] + per["elapsed"]
    wall = end.max() - first_step.min()
    tokens = per["tokens"].sum()
    return {"k": k, "tokens_per_s": tokens / wall, "peak": trials["peak_memory_bytes"].max(),
            "concurrent": first_step.max() < end.min(), "trial_tokens_per_s": trials["tokens_per_s"].mean(),
            "wall": wall, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="135m 1b (GPU default) or tiny (CPU default)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--packings", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()

    import torch

    from lora_rank_search.trainables.trial import quiet_libraries

    quiet_libraries()
    gpu = torch.cuda.is_available()
    header("gpu_packing: trials per GPU vs aggregate tokens/s")
    if not gpu:
        print("NO GPU on this machine: running on CPU with 1 *logical* GPU (Ray schedules fractions; torch sees no CUDA).")
        print("This checks the packing machinery only; GPU rows in bench/RESULTS.md stay 'not measured yet'.")
        args.models = args.models or ["tiny"]
        args.seq, args.steps = min(args.seq, 32), min(args.steps, 20)
    models = args.models or ["135m", "1b"]
    peak_rate = matmul_tflops() if gpu else None
    if peak_rate:
        print(f"measured bf16 matmul rate: {peak_rate:.0f} TFLOP/s")
    with tempfile.TemporaryDirectory() as root:
        os.environ["LORA_RANK_SEARCH_CACHE"] = os.path.join(root, "cache")
        for name in models:
            model = build_model(name, root)
            words = SHAPES[name]["vocab"] - 4 if SHAPES[name]["vocab"] else 60
            data = write_data(os.path.join(root, f"{name}.jsonl"), words, args.seq)
            rows = [run_packing(model, data, k, args, root, gpu) for k in args.packings]
            print(f"\nmodel {name}: batch {args.batch} x {args.seq} tokens, rank 16 on attention, {args.steps} steps")
            print(f"{'trials/GPU':>10} {'gpus_per_trial':>14} {'aggregate tok/s':>16} {'per-trial tok/s':>16} {'peak mem/trial':>15} {'ran together':>13}")
            for row in rows:
                print(f"{row['k']:>10} {1 / row['k']:>14.2f} {row['tokens_per_s']:>16,.0f} {row['trial_tokens_per_s']:>16,.0f}"
                      f" {row['peak'] / 2**30:>13.2f} G {str(row['concurrent']):>13}")
            base = rows[0]["tokens_per_s"]
            for row in rows[1:]:
                print(f"RATIO aggregate tokens/s, {row['k']} trials/GPU vs 1 ({name}): {row['tokens_per_s'] / base:.2f}x"
                      + ("  (target >= 2x for 135m at 4)" if name == "135m" and row["k"] == 4 else ""))
            if gpu and name == models[-1]:
                s = SHAPES[name]
                attention_params = 2 * s["hidden"] ** 2 * (1 + s["kv_heads"] / s["heads"])  # q, o + k, v (GQA)
                frozen = s["layers"] * (attention_params + 3 * s["hidden"] * s["intermediate"]) + s["hidden"] * s["vocab"]
                flops_per_token = 4 * frozen + 3 * 4 * s["layers"] * args.seq * s["hidden"]
                mfu = rows[0]["tokens_per_s"] * flops_per_token / (peak_rate * 1e12)
                print(f"RESULT MFU {name} at 1 trial/GPU: {100 * mfu:.1f}%  (target >= 30% for 1b)")


if __name__ == "__main__":
    main()
