"""Memory of the base model in 4-bit NF4 (double quant) vs bf16/fp32, and of a trial at each rank.

    .venv/bin/python bench/memory.py [--model builtin:smollm2-135m-instruct] [--ranks 2 8 32] [--steps 3]

Exact tensor bytes of each loaded base (packed 4-bit weights plus their quantization constants,
and everything left unquantized), bytes per parameter of the quantized linear weights, and the peak
memory of a training trial per rank (each measurement in a fresh process: CUDA max-allocated on
GPU, peak resident set size on CPU) split into base, adapter + AdamW state, and the rest
(activations, logits, allocator and runtime). Target: <= 0.56 bytes/param for NF4 + double quant.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import header  # noqa: E402

QUANT = {"quant_type": "nf4", "double_quant": True, "prequantized_cache": True}  # QuantizationConfig fields


def tensor_bytes(model) -> dict:
    """Bytes by part: quantized linear weights (with their quant state), and the rest."""
    import bitsandbytes as bnb

    quant_bytes, quant_params, other_bytes = 0, 0, 0
    seen = set()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            quant_params += module.in_features * module.out_features
            quant_bytes += weight.numel() * weight.element_size()
            state = weight.quant_state
            for tensor in (state.absmax, state.code, getattr(state.state2, "absmax", None), getattr(state.state2, "code", None)):
                if tensor is not None:
                    quant_bytes += tensor.numel() * tensor.element_size()
            seen.add(id(weight))
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            other_bytes += tensor.numel() * tensor.element_size()
    return {"quantized_linear_bytes": quant_bytes, "quantized_linear_params": quant_params, "other_bytes": other_bytes}


def _peak(device: str) -> int:
    import resource

    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def child(kind: str, model: str, dtype: str, rank: int, steps: int) -> dict:
    """Runs in a fresh process: load (and for kind=trial, train a few steps), report bytes."""
    import torch

    from lora_rank_search.trainables.model import load_base_model, resolve_model
    from lora_rank_search.trainables.trial import quiet_libraries, trial_device

    quiet_libraries()
    torch.set_num_threads(1)
    device = trial_device()
    path = resolve_model(model)
    baseline = _peak(device)
    from lora_rank_search.search.config import QuantizationConfig

    quant = QuantizationConfig(**QUANT, load_in_4bit=dtype == "nf4", compute_dtype="auto" if dtype == "nf4" else dtype)
    base = load_base_model(path, quant, device)
    out = {"device": device, "baseline_peak": baseline, "load_peak": _peak(device)}
    if dtype == "nf4":
        out.update(tensor_bytes(base))
    else:
        out["other_bytes"] = sum(p.numel() * p.element_size() for p in base.parameters())
    if kind == "trial":
        from peft import get_peft_model

        from lora_rank_search.trainables.lora import linear_layers, peft_config, resolve_targets

        model_ = get_peft_model(base, peft_config(rank, "2r", 0.0, resolve_targets("attention", linear_layers(base))))
        params = [p for p in model_.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        ids = torch.randint(10, 1000, (8, 128), device=device)
        saved: dict[int, int] = {}

        def pack(tensor):  # what autograd keeps for backward: the activations
            storage = tensor.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        for _ in range(steps):
            saved.clear()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                output = model_(input_ids=ids, labels=ids)
            output.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        out["saved_activation_bytes"] = sum(saved.values())
        out["logits_bytes"] = output.logits.numel() * output.logits.element_size()
        out["lora_params"] = sum(p.numel() for p in params)
        out["adapter_state_bytes"] = out["lora_params"] * 16  # fp32 weight + grad + 2 AdamW moments
        out["train_peak"] = _peak(device)
    return out


def run_child(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", *args], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, model, dtype, rank, steps = args.child
        print(json.dumps(child(kind, model, dtype, int(rank), int(steps))))
        return

    header("memory: 4-bit NF4 base vs bf16/fp32, and a trial per rank")
    run_child("load", args.model, "nf4", "0", "0")  # warm the converted/pre-quantized caches
    loads = {dtype: run_child("load", args.model, dtype, "0", "0") for dtype in ("nf4", "bfloat16", "float32")}
    device = loads["nf4"]["device"]
    peak_kind = "CUDA max allocated" if device.startswith("cuda") else "process peak RSS"
    print(f"model: {args.model}; device {device}; peaks are {peak_kind}, minus the process baseline before loading")
    print(f"{'base':>9} {'tensor bytes':>14} {'peak - baseline':>16}")
    for dtype, r in loads.items():
        total = r.get("quantized_linear_bytes", 0) + r["other_bytes"]
        print(f"{dtype:>9} {mib(total):>14} {mib(r['load_peak'] - r['baseline_peak']):>16}")
    nf4 = loads["nf4"]
    per_param = nf4["quantized_linear_bytes"] / nf4["quantized_linear_params"]
    print(f"quantized linear weights: {nf4['quantized_linear_params'] / 1e6:.1f}M params in {mib(nf4['quantized_linear_bytes']).strip()}"
          f"; unquantized rest (embeddings, norms, LM head): {mib(nf4['other_bytes']).strip()}")
    fp32 = loads["float32"]["other_bytes"]
    print(f"RATIO base tensor bytes, NF4 / fp32: {(nf4['quantized_linear_bytes'] + nf4['other_bytes']) / fp32:.3f};"
          f" NF4 / bf16: {(nf4['quantized_linear_bytes'] + nf4['other_bytes']) / loads['bfloat16']['other_bytes']:.3f}")

    print(f"\ntrial (4-bit base + LoRA on attention, AdamW, batch 8 x 128 tokens, {args.steps} steps):")
    print(f"{'r':>4} {'LoRA params':>12} {'adapter+AdamW':>14} {'base':>12} {'activations':>12} {'logits':>12} {'other':>12} {'peak - baseline':>16}")
    for rank in args.ranks:
        t = run_child("trial", args.model, "nf4", str(rank), str(args.steps))
        base = t["quantized_linear_bytes"] + t["other_bytes"]
        used = t["train_peak"] - t["baseline_peak"]
        other = used - base - t["adapter_state_bytes"] - t["saved_activation_bytes"]
        print(f"{rank:>4} {t['lora_params']:>12,} {mib(t['adapter_state_bytes']):>14} {mib(base):>12} "
              f"{mib(t['saved_activation_bytes']):>12} {mib(t['logits_bytes']):>12} {mib(other):>12} {mib(used):>16}")
    print("(activations = tensors autograd saved for backward, logits included; other = the rest of the peak:"
          " temporaries of the loss and backward, allocator and runtime)")
    print(f"RESULT bytes/param of the NF4 + double-quant linear weights: {per_param:.4f}  (target <= 0.56)")


if __name__ == "__main__":
    main()
