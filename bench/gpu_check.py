"""GPU check: the GPU path measured by one command on a bare GPU machine (no Ray, nothing fetched).

    python bench/gpu_check.py --out DIR            # on a GPU: planned for under 8 minutes on an H200
    python bench/gpu_check.py --out DIR --smoke    # on CPU with tiny shapes: the same code paths

Writes DIR/results.json and DIR/results.md after every step (a run cut short keeps what it
measured). Trials run through `trainables.trial.run_trial` with a plain `report` callable, as a
Ray worker runs them but without Ray; each measured trial is a fresh process. Models are Llama
shapes built from a config with random weights (speed and memory do not depend on the values),
quantized in-process; scratch files go to --work (a temporary folder by default), never to DIR.

- device: name, memory, versions, the measured dense bf16 matmul rate (TFLOP/s).
- correctness: one trial in NF4 + double quant with bf16 compute, Linear4bit layers on the device:
  the loss falls over 50 steps, the saved adapter reloads with PEFT and reproduces the eval loss.
- packed_exact: three arms (different ranks, learning rates, target choices; LoRA dropout on) trained
  20 steps packed in one pass and each alone: the largest relative differences of their train and
  eval losses and saved adapters (the CPU test holds them within 1e-4; bf16 kernels may differ).
- memory: what `gpus_per_trial: auto` plans with (search.runner.memory_estimate) against the
  measured peak = CUDA max allocated + the process's CUDA context (on CPU: peak RSS), Llama-3.2-1B
  and Llama-3.1-8B shapes, r=64 on all linear layers, batch 4 x 512, gradient checkpointing off
  and on; each row alone on the device.
- packing: 1, 2, 4, 8 trial processes on one GPU at once (Ray's gpus_per_trial 1 ... 0.125),
  SmolLM2-135M shape, r=16 on attention, batch 8 x 256: aggregate tokens/s over the window in
  which all of them train, the peak memory of each process.
- packed: N arms in one process on one shared base (trainables.pack; N = 1, 2, 4, 8) against N
  trial processes at 1/N GPU, for the SmolLM2-135M and the Llama-3.2-1B shapes, r=16 on attention:
  aggregate tokens/s and peak memory per row (examples). Expected on a GPU: at 4 arms the pack
  trains >= 3x the aggregate tokens/s of 4 processes at 0.25 GPU for the 1B shape.
- mfu: tokens/s x model FLOPs per token / the measured matmul rate, for the 1B shape at 1 trial per
  GPU (its memory row without checkpointing); FLOPs per token = 4 N_frozen + 6 N_lora + 12 L s d
  (see _gpu_parts.flops_per_token). The 8B shape's tokens/s beside a published anchor.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._gpu_parts import (  # noqa: E402
    aggregate_rate, build_random_llama, chain_data, device_used, flops_per_token, matmul_tflops, pack_child, random_text,
    raw_config, run_children, trial_child,
)
from bench._gpu_report import markdown  # noqa: E402

ANCHOR_8B = {"source": "torchtune QLoRA Llama-3.1-8B on one RTX 4090", "tokens_per_s": 2413, "peak_bytes": int(7.4 * 2**30)}


@dataclass(frozen=True)
class Plan:
    """Sizes of one run (steps are optimizer steps, seq in tokens, budget in seconds)."""

    device: str
    matmul_n: int
    matmul_repeats: int
    correctness_shape: str
    correctness_steps: int
    memory_shapes: tuple  # (label, shape): the label names the real model the shape stands for
    memory_batch: int
    memory_seq: int
    memory_rank: int
    memory_steps: int
    memory_together: bool  # the two checkpointing rows of a shape at once (CPU smoke: saves time)
    packing_shape: str
    packings: tuple
    packing_batch: int
    packing_seq: int
    packing_rank: int
    packing_steps: int  # steps of the process that trains alone; k processes train packing_steps / k each
    budget_s: float
    packed_shapes: tuple = ()  # (label, shape) of the packed section
    packed_steps: int = 0  # steps of each packed row (the pack) and of each of its N processes


GPU = Plan("cuda", 8192, 20, "small", 50, (("1b", "1b"), ("8b", "8b")), 4, 512, 64, 10, False,
           "135m", (1, 2, 4, 8), 8, 256, 16, 240, 450, (("135m", "135m"), ("1b", "1b")), 20)
# The smoke run keeps to five trial processes (their imports dominate its time on 2 cores): one
# memory shape, packings of 1 and 2; mfu() and the report are tested on hand-made rows besides.
SMOKE = Plan("cpu", 256, 5, "tiny", 50, (("1b", "tiny-1b"),), 4, 64, 64, 4, True,
             "tiny", (1, 2), 8, 32, 16, 40, 600, (("tiny", "tiny"),), 6)
SECTIONS = ("device", "correctness", "packed_exact", "memory", "packing", "packed")
EXPECTED_PACKED_1B_AT_4 = 3.0  # aggregate tokens/s, 4 arms in one process / 4 processes at 0.25 GPU (1B shape)


class Run:
    """The results so far, written to DIR after every step, and the time left."""

    def __init__(self, out: Path, plan: Plan, smoke: bool):
        self.out, self.plan, self.started = out, plan, time.time()
        self.results = {"mode": "smoke (CPU, tiny shapes)" if smoke else "gpu", "plan": asdict(plan),
                        "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv), "anchor_8b": ANCHOR_8B}

    def left(self) -> float:
        return self.plan.budget_s - (time.time() - self.started)

    def save(self) -> None:
        self.results["wall_s"] = time.time() - self.started
        self.results["mfu"] = mfu(self.results)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str))
        (self.out / "results.md").write_text(markdown(self.results))


class PeakUsed:
    """The most bytes in use on the GPU while child processes run, above a baseline (None on CPU)."""

    def __init__(self):
        self.baseline = device_used()
        self.peak = self.baseline

    def poll(self) -> None:
        if self.baseline is not None:
            self.peak = max(self.peak, device_used())

    @property
    def bytes(self):
        return None if self.baseline is None else self.peak - self.baseline


# --------------------------------------------------------------------------- sections


def check_device(plan: Plan) -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    from bench._common import machine

    gpu = plan.device == "cuda"
    props = torch.cuda.get_device_properties(0) if gpu else None
    return {
        "name": props.name if gpu else machine(),
        "memory_bytes": int(props.total_memory) if gpu else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "bitsandbytes": bitsandbytes.__version__,
        "bitsandbytes_from": os.path.dirname(bitsandbytes.__file__), "transformers": transformers.__version__,
        "peft": peft.__version__, "python": sys.version.split()[0],
        "matmul_bf16_tflops": matmul_tflops(plan.device, plan.matmul_n, plan.matmul_repeats),
        "matmul_size": plan.matmul_n,
    }


def check_correctness(plan: Plan, work: Path) -> dict:
    """One trial in this process; then the adapter it saved, reloaded by PEFT on a fresh base."""
    import bitsandbytes as bnb

    from lora_rank_search.search.config import parse_config
    from lora_rank_search.search.runner import prepare
    from lora_rank_search.search.space import trial_settings
    from lora_rank_search.trainables.trial import ADAPTER_DIR, build_model, evaluate, run_trial, trial_device

    model_path, words = build_random_llama(plan.correctness_shape, work / "correctness-model", plan.device)
    raw = raw_config("gpu-check-correctness", model_path, chain_data(words, work / "chain.jsonl"), work, fmt="instruction",
                     seq=32, rank=8, targets="all-linear", batch=16, steps=plan.correctness_steps, eval_every=10, lr=2e-3)
    cfg = parse_config(raw)
    prepared = prepare(cfg, log=lambda _: None)
    settings = trial_settings(cfg, prepared.model_path, prepared.targets)
    adapter, reports = work / "adapter", []

    def report(metrics: dict, folder) -> None:
        reports.append(dict(metrics))
        if folder:
            shutil.rmtree(adapter, ignore_errors=True)
            shutil.copytree(Path(folder) / ADAPTER_DIR, adapter)

    run_trial({"r": 8, "seed": 0}, settings, prepared.data, report)
    trained = [m for m in reports if m.get("step", 0) > 0]
    first, last = trained[0], trained[-1]
    device = trial_device()
    model = build_model(settings, 8, device)  # a fresh base and adapter; then the saved adapter, by PEFT
    model.load_adapter(str(adapter), adapter_name="reloaded")
    model.set_adapter("reloaded")
    eval_batch = settings.train.eval_batch_size or 2 * settings.train.batch_size
    reloaded, _ = evaluate(model, prepared.data, eval_batch, device)
    with model.disable_adapter():
        base_loss, _ = evaluate(model, prepared.data, eval_batch, device)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    states = [m.weight.quant_state for m in layers]
    out = {
        "device": device, "steps": last["step"], "status": last.get("trial_status"),
        "loss_first": first["train_loss"], "loss_last": last["train_loss"],
        "eval_loss_first": reports[0]["eval_loss"], "eval_loss_last": last["eval_loss"],
        "eval_loss_reloaded": reloaded, "eval_loss_base": base_loss,
        "adapter_files": sorted(p.name for p in adapter.iterdir()), "adapter_bytes": last.get("adapter_bytes"),
        "tokens_per_s": last.get("tokens_per_s"), "linear4bit_layers": len(layers),
        "linear4bit_devices": sorted({str(m.weight.device) for m in layers}),
        "quant_types": sorted({s.quant_type for s in states}), "double_quant": all(s.nested for s in states),
        "compute_dtypes": sorted({str(m.compute_dtype) for m in layers}),
    }
    relative = abs(reloaded - last["eval_loss"]) / last["eval_loss"]
    out["checks"] = {
        "runs on the expected device": device.startswith(plan.device),
        "the trial ended normally": last.get("trial_status") == "ok",
        "Linear4bit layers on the device": bool(layers) and all(m.weight.device.type == plan.device for m in layers),
        "NF4 + double quant, bf16 compute": out["quant_types"] == ["nf4"] and out["double_quant"]
        and out["compute_dtypes"] == ["torch.bfloat16"],
        "train loss falls (first > last report)": first["train_loss"] > last["train_loss"],
        "eval loss falls": last["eval_loss"] < reports[0]["eval_loss"],
        "reloaded adapter reproduces the eval loss (rel. 1e-3)": relative <= 1e-3,
        "the reloaded adapter is the trained one (not the base)": abs(base_loss - reloaded) > 1e-2 * reloaded,
    }
    out["reload_relative_difference"] = relative
    out["passed"] = all(out["checks"].values())
    del model
    _free()
    return out


EXACT_ARMS = {  # different ranks, learning rates and target choices, LoRA dropout on (tests/test_pack.py's arms)
    "a": {"r": 2, "lr": 3e-3, "seed": 0, "target_choice": "attention"},
    "b": {"r": 8, "lr": 1e-2, "seed": 1, "target_choice": "mlp"},
    "c": {"r": 4, "lr": 1e-3, "seed": 2, "target_choice": "attention"},
}
EXACT_STEPS, EXACT_EVERY = 20, 5


def check_packed_exact(plan: Plan, work: Path) -> dict:
    """Three different arms trained packed (stacked in one pass on one base) and each alone, in this
    process: the largest relative differences of their per-step train losses, eval losses and saved
    adapter weights. On CPU they are equal (tests/test_pack.py: within 1e-4); with bf16 compute on a
    GPU a stacked pass's matmuls have other shapes, whose kernels may sum in another order."""
    from safetensors.torch import load_file

    from lora_rank_search.contract.layout import ADAPTER_DIR, ADAPTER_WEIGHTS
    from lora_rank_search.search.config import parse_config
    from lora_rank_search.search.runner import prepare
    from lora_rank_search.search.space import trial_settings
    from lora_rank_search.trainables.pack import Pack
    from lora_rank_search.trainables.trial import trial_device

    model_path, words = build_random_llama(plan.correctness_shape, work / "exact-model", plan.device)
    raw = raw_config("gpu-check-exact", model_path, chain_data(words, work / "exact.jsonl"), work, fmt="instruction",
                     seq=32, rank=8, targets=["attention", "mlp"], batch=8, steps=EXACT_STEPS, eval_every=EXACT_EVERY)
    raw["lora"].update(dropout=0.1, alpha=16)
    cfg = parse_config(raw)
    prepared = prepare(cfg, log=lambda _: None)
    settings = trial_settings(cfg, prepared.model_path, prepared.choices)

    def train(keys: list, folder: Path) -> tuple:
        pack = Pack(settings, prepared.data, threads=1)
        for key in keys:
            pack.add(key, EXACT_ARMS[key])
        evals = {k: [] for k in keys}
        for step in range(1, EXACT_STEPS + 1):
            failed = pack.train_step(keys)
            if failed:
                raise RuntimeError(f"arms failed: {failed}: {[pack.arms[k].failure for k in failed]}")
            if step % EXACT_EVERY == 0:
                for key, loss in pack.evaluate(keys).items():
                    evals[key].append(loss)
        for key in keys:
            pack.save(key, folder / key)
        out = {k: (list(pack.arms[k].step_losses), evals[k]) for k in keys}
        mode = pack.mode
        del pack
        _free()
        return out, mode

    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(a), abs(b), 1e-12)

    packed, mode = train(list(EXACT_ARMS), work / "exact-packed")
    worst = {"train_loss": 0.0, "eval_loss": 0.0, "adapter_weights": 0.0}
    learned = True
    for key in EXACT_ARMS:
        alone, _ = train([key], work / "exact-alone")
        (train_p, eval_p), (train_a, eval_a) = packed[key], alone[key]
        worst["train_loss"] = max([worst["train_loss"], *(rel(x, y) for x, y in zip(train_p, train_a))])
        worst["eval_loss"] = max([worst["eval_loss"], *(rel(x, y) for x, y in zip(eval_p, eval_a))])
        learned &= train_a[-1] < train_a[0] and len(train_p) == len(train_a) == EXACT_STEPS
        w_p = load_file(str(work / "exact-packed" / key / ADAPTER_DIR / ADAPTER_WEIGHTS))
        w_a = load_file(str(work / "exact-alone" / key / ADAPTER_DIR / ADAPTER_WEIGHTS))
        for name in w_a:
            scale = float(w_a[name].float().abs().max()) or 1e-12
            worst["adapter_weights"] = max(worst["adapter_weights"], float((w_p[name].float() - w_a[name].float()).abs().max()) / scale)
    out = {"device": trial_device(), "mode": mode, "arms": EXACT_ARMS, "steps": EXACT_STEPS,
           "largest_relative_difference": worst}
    out["checks"] = {
        "the packed arms stacked in one pass": mode == "stacked",
        "every arm learned, packed and alone": learned,
        "within 1e-4 relative (the CPU test's tolerance)": max(worst.values()) <= 1e-4,
        "losses within bf16 rounding (1e-2 relative)": max(worst["train_loss"], worst["eval_loss"]) <= 1e-2,
    }
    out["passed"] = all(v for k, v in out["checks"].items() if not k.startswith("within 1e-4"))
    return out


def measure_memory(run: Run, work: Path, label: str, shape: str) -> list[dict]:
    plan = run.plan
    if run.left() < (150 if label == "8b" else 60):  # building and loading the 8B shape alone takes minutes
        return [{"model": label, "shape": shape, "gradient_checkpointing": c, "error": "skipped: the time budget is spent"}
                for c in (False, True)]
    model_path, words = build_random_llama(shape, work / f"model-{shape}", plan.device)
    data = random_text(words, plan.memory_seq, work / f"text-{shape}.jsonl")
    specs = []
    for checkpointing in (False, True):
        raw = raw_config(f"gpu-check-memory-{label}", model_path, data, work, fmt="text", seq=plan.memory_seq,
                         rank=plan.memory_rank, targets="all-linear", batch=plan.memory_batch, steps=plan.memory_steps,
                         eval_every=plan.memory_steps // 2, checkpointing=checkpointing)
        specs.append({"raw": raw, "r": plan.memory_rank, "seed": 0})
    rows = []
    for group in ([specs] if plan.memory_together else [[spec] for spec in specs]):
        used = PeakUsed()  # alone on the device on a GPU: this process's context and all it reserved
        results = run_children([{**spec, "parent_used": used.baseline or 0} for spec in group], work,
                               max(run.left(), 30), poll=used.poll)
        for spec, res in zip(group, results):
            rows.append(memory_row(label, shape, spec["raw"]["train"]["gradient_checkpointing"], res, used.bytes))
    shutil.rmtree(model_path, ignore_errors=True)
    return rows


def memory_row(label: str, shape: str, checkpointing: bool, res: dict, used) -> dict:
    row = {"model": label, "shape": shape, "gradient_checkpointing": checkpointing}
    if "error" in res:
        return {**row, "error": res["error"]}
    last = res["reports"][-1]
    measured = last["peak_memory_bytes"] + res["context_bytes"]
    return {
        **row, "estimated_bytes": res["estimate"]["total"], "estimate_parts": res["estimate"],
        "measured_bytes": measured, "ratio_estimated_to_measured": res["estimate"]["total"] / measured,
        "max_allocated_bytes": last["peak_memory_bytes"], "context_bytes": res["context_bytes"],
        "max_reserved_bytes": res["max_reserved_bytes"], "device_used_peak_bytes": used,
        "tokens_per_s": last["tokens_per_s"], "trainable_params": last["trainable_params"],
        "frozen_matmul_params": res["frozen_matmul_params"], "layers": res["layers"], "hidden": res["hidden"],
        "seq_len": res["seq_len"], "batch_size": res["batch_size"], "load_seconds": last["load_seconds"],
        "status": last["trial_status"], "failure": last["failure"],
    }


def measure_packing(run: Run, work: Path) -> list[dict]:
    plan = run.plan
    model_path, words = build_random_llama(plan.packing_shape, work / "packing-model", plan.device)
    data = random_text(words, plan.packing_seq, work / "packing.jsonl")
    rows = []
    for k in plan.packings:
        if run.left() < 30:
            rows.append({"trials_per_gpu": k, "error": "skipped: the time budget is spent"})
            continue
        steps = max(10, plan.packing_steps // k)  # the same total work per row
        raw = raw_config("gpu-check-packing", model_path, data, work, fmt="text", seq=plan.packing_seq, rank=plan.packing_rank,
                         targets="attention", batch=plan.packing_batch, steps=steps, eval_every=max(1, steps // 10))
        used = PeakUsed()
        specs = [{"raw": raw, "r": plan.packing_rank, "seed": i, "parent_used": used.baseline or 0} for i in range(k)]
        results = run_children(specs, work, run.left(), barrier=True, poll=used.poll)
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            rows.append({"trials_per_gpu": k, "error": errors[0]})
            continue
        curves = [[(rep["t"], rep["tokens_seen"]) for rep in r["reports"] if rep["step"] > 0] for r in results]
        rate, together = aggregate_rate(curves)
        lasts = [r["reports"][-1] for r in results]
        rows.append({
            "trials_per_gpu": k, "gpus_per_trial": 1 / k, "aggregate_tokens_per_s": rate, "all_trained_together": together,
            "per_process_tokens_per_s": [last["tokens_per_s"] for last in lasts],
            "per_process_peak_bytes": [last["peak_memory_bytes"] for last in lasts],
            "per_process_max_reserved_bytes": [r["max_reserved_bytes"] for r in results],
            "device_used_peak_bytes": used.bytes, "steps_per_process": steps,
            "statuses": sorted({last["trial_status"] for last in lasts}),
        })
        rows[-1]["vs_1_per_gpu"] = rate / rows[0]["aggregate_tokens_per_s"] if "aggregate_tokens_per_s" in rows[0] else None
    return rows


def measure_packed(run: Run, work: Path) -> list[dict]:
    """N arms in one pack against N trial processes at 1/N GPU, per shape (see the module doc)."""
    plan = run.plan
    rows = []
    for label, shape in plan.packed_shapes:
        model_path, words = build_random_llama(shape, work / f"packed-{shape}", plan.device)
        data = random_text(words, plan.packing_seq, work / f"packed-{shape}.jsonl")
        raw = raw_config("gpu-check-packed", model_path, data, work, fmt="text", seq=plan.packing_seq, rank=plan.packing_rank,
                         targets="attention", batch=plan.packing_batch, steps=plan.packed_steps,
                         eval_every=max(1, plan.packed_steps // 3))  # the processes' rate needs several reports
        for k in plan.packings:
            if run.left() < 30:
                rows.append({"model": label, "arms": k, "error": "skipped: the time budget is spent"})
                continue
            used = PeakUsed()
            packed = run_children([{"raw": raw, "r": plan.packing_rank, "arms": k, "steps": plan.packed_steps, "pack": True}],
                                  work, run.left(), poll=used.poll)[0]
            packed_used = used.bytes
            used = PeakUsed()
            specs = [{"raw": raw, "r": plan.packing_rank, "seed": i, "parent_used": used.baseline or 0} for i in range(k)]
            procs = run_children(specs, work, run.left(), barrier=True, poll=used.poll)
            errors = [r["error"] for r in [packed, *procs] if "error" in r]
            if errors:
                rows.append({"model": label, "arms": k, "error": errors[0]})
                continue
            curves = [[(rep["t"], rep["tokens_seen"]) for rep in r["reports"] if rep["step"] > 0] for r in procs]
            rate, together = aggregate_rate(curves)
            rows_per_step = k * plan.packing_batch
            rows.append({
                "model": label, "shape": shape, "arms": k, "mode": packed["mode"], "statuses": packed["statuses"],
                "packed_tokens_per_s": packed["tokens_per_s"], "processes_tokens_per_s": rate, "processes_trained_together": together,
                "packed_vs_processes": packed["tokens_per_s"] / rate if rate else None,
                "packed_peak_bytes_per_row": (packed_used or packed["peak_bytes"]) / rows_per_step,
                "processes_peak_bytes_per_row": (used.bytes or sum(r["reports"][-1]["peak_memory_bytes"] for r in procs)) / rows_per_step,
            })
    return rows


def mfu(results: dict) -> dict:
    """Derived from the device and memory sections (recomputed whenever results are saved)."""
    rate = (results.get("device") or {}).get("matmul_bf16_tflops")
    rows = [r for r in results.get("memory") or [] if "error" not in r and r.get("status") == "ok"]
    out: dict = {"formula": "FLOPs/token = 4 N_frozen + 6 N_lora + 12 L s d (gradient-checkpointing recompute not counted);"
                            " MFU = tokens/s x FLOPs/token / measured bf16 matmul rate"}
    for row in rows:
        if row["model"] == "1b" and not row["gradient_checkpointing"] and rate:
            flops = flops_per_token(row["frozen_matmul_params"], row["trainable_params"], row["layers"], row["hidden"], row["seq_len"])
            achieved = row["tokens_per_s"] * flops["total"] / 1e12
            out["1b"] = {"shape": row["shape"], "tokens_per_s": row["tokens_per_s"], "flops_per_token": flops, "achieved_tflops": achieved,
                         "peak_tflops": rate, "mfu": achieved / rate}
        if row["model"] == "8b":
            key = "8b_checkpointing" if row["gradient_checkpointing"] else "8b"
            out[key] = {"shape": row["shape"], "tokens_per_s": row["tokens_per_s"], "measured_bytes": row["measured_bytes"],
                        "vs_anchor_tokens_per_s": row["tokens_per_s"] / ANCHOR_8B["tokens_per_s"]}
    return out


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for results.json and results.md")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: the same code paths in about a minute")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--work", help="scratch folder for models and data (default: a temporary folder, removed)")
    parser.add_argument("--budget-s", type=float, help="stop starting trials after this many seconds")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(Path(args.child[0]).read_text())
        Path(args.child[1]).write_text(json.dumps((pack_child if spec.get("pack") else trial_child)(spec)))
        return 0
    if not args.out:
        parser.error("--out is required")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched, on any machine
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from lora_rank_search.trainables.trial import quiet_libraries

    quiet_libraries()
    plan = SMOKE if args.smoke else GPU
    if args.budget_s:
        plan = Plan(**{**asdict(plan), "budget_s": args.budget_s})
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device here: run on a GPU, or with --smoke on CPU", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["LORA_RANK_SEARCH_CACHE"] = str(work / "cache")  # this run's own pre-quantized models
    run = Run(Path(args.out), plan, args.smoke)
    steps = [("device", lambda: check_device(plan))] if "device" in args.sections else []
    if "correctness" in args.sections:
        steps.append(("correctness", lambda: check_correctness(plan, work)))
    if "packed_exact" in args.sections:
        steps.append(("packed_exact", lambda: check_packed_exact(plan, work)))
    memory = [(label, shape) for label, shape in plan.memory_shapes] if "memory" in args.sections else []
    if memory:  # the 1B rows, then packing, then the 8B rows (the longest) last
        steps.append(("memory", lambda: measure_memory(run, work, *memory[0])))
    if "packing" in args.sections:
        steps.append(("packing", lambda: measure_packing(run, work)))
    if "packed" in args.sections:
        steps.append(("packed", lambda: measure_packed(run, work)))
    for label_shape in memory[1:]:
        steps.append(("memory", lambda ls=label_shape: measure_memory(run, work, *ls)))
    ok = True
    try:
        for name, step in steps:
            started = time.time()
            print(f"[{time.time() - run.started:6.1f} s] {name} ...", flush=True)
            try:
                value = step()
            except Exception:  # noqa: BLE001 - record it and go on to the next section
                value = {"error": traceback.format_exc()[-3000:]}
                print(value["error"], file=sys.stderr)
            if isinstance(value, list):
                run.results[name] = run.results.get(name, []) + value
                ok &= all("error" not in row for row in value)
            else:
                run.results[name] = value
                ok &= "error" not in value and value.get("passed", True)
            run.results.setdefault("section_seconds", {})[name] = run.results.get("section_seconds", {}).get(name, 0) + time.time() - started
            run.save()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(run.results))
    print(f"wrote {run.out / 'results.json'} and {run.out / 'results.md'} in {time.time() - run.started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
