"""What one trial asks Ray for, and the memory estimate behind `gpus_per_trial: auto`.

Fractions are a scheduling promise, not a memory limit: Ray does not stop four trials at 0.25 GPU
from using more than a quarter of the card each, so the fraction must come from what a trial
really needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

GIB = 1024**3
CUDA_CONTEXT_BYTES = int(0.6 * GIB)  # CUDA context + allocator slack per process (measured ~0.5 GiB)
PACKINGS = (8, 4, 2, 1)  # trials per GPU tried by auto, most first
USABLE_FRACTION = 0.9  # of the card's memory that auto plans to fill


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one trial needs on the GPU, by part."""

    base_weights: int
    adapter_and_optimizer: int
    activations: int
    context: int = CUDA_CONTEXT_BYTES

    @property
    def total(self) -> int:
        return self.base_weights + self.adapter_and_optimizer + self.activations + self.context


def estimate_trial_memory(
    linear_shapes: Mapping[str, tuple[int, int]],
    other_params: int,
    lora_params: int,
    *,
    hidden: int,
    layers: int,
    vocab: int,
    batch_size: int,
    seq_len: int,
    load_in_4bit: bool = True,
    double_quant: bool = True,
    compute_bytes: int = 2,
    gradient_checkpointing: bool = False,
) -> MemoryEstimate:
    """Peak GPU bytes of one trial.

    Args:
        linear_shapes: (in, out) of every linear layer (quantized when load_in_4bit).
        other_params: parameters outside those layers (embeddings, norms, untied LM head).
        lora_params: trainable LoRA parameters at the largest rank.
        hidden, layers, vocab: model dimensions. batch_size, seq_len: one micro-batch (tokens).
        compute_bytes: bytes per element of the compute dtype (2 for bf16).
    """
    linear = sum(i * o for i, o in linear_shapes.values())
    # NF4: 4 bits + one absmax per 64 weights (fp32, or 8-bit + 256-block fp32 with double quant).
    per_param = (0.5 + 1 / 64 + 4 / (64 * 256)) if double_quant else (0.5 + 4 / 64)
    base = int(linear * (per_param if load_in_4bit else compute_bytes) + other_params * compute_bytes)
    adapter = lora_params * 16  # fp32 weights + grads + two AdamW moments
    tokens = batch_size * seq_len
    # Saved activations per layer and token: ~34*hidden bytes at 16 bits (attention + MLP, no
    # recompute); with checkpointing only the layer inputs stay. Logits: fp32 copy + its grad.
    per_layer = (2 * hidden * compute_bytes) if gradient_checkpointing else 17 * hidden * compute_bytes
    activations = tokens * (layers * per_layer + vocab * (compute_bytes + 8))
    return MemoryEstimate(base, adapter, int(activations))


def gpu_fraction_for(estimate_bytes: int, gpu_total_bytes: int, cpus_available: Optional[int] = None) -> float:
    """The smallest clean fraction (1/8, 1/4, 1/2, 1) whose share of the card holds the estimate."""
    for k in PACKINGS:
        if cpus_available is not None and k > cpus_available:
            continue
        if k * estimate_bytes <= USABLE_FRACTION * gpu_total_bytes:
            return 1.0 / k
    return 1.0


def local_gpu_memory() -> Optional[int]:
    """Total bytes of GPU 0 of this process, or None without CUDA."""
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # noqa: BLE001
        return None
    return None


def cluster_gpu_memory() -> Optional[int]:
    """Total bytes of one GPU on the Ray cluster (probed by a tiny task), or None without GPUs."""
    import ray

    if ray.cluster_resources().get("GPU", 0) <= 0:
        return None

    @ray.remote(num_gpus=0.001, num_cpus=0)
    def probe() -> Optional[int]:
        return local_gpu_memory()

    return ray.get(probe.remote(), timeout=300)


MAX_ARMS_PER_PACK = 16  # auto never packs more arms than this on one GPU or node


def arms_that_fit(estimate: MemoryEstimate, gpu_total_bytes: int, most: int) -> int:
    """Arms per pack on one GPU (at most `most`): the base and the CUDA context once, plus each arm's
    adapter, optimizer state and activations, within USABLE_FRACTION of the card."""
    per_arm = max(1, estimate.adapter_and_optimizer + estimate.activations)
    room = USABLE_FRACTION * gpu_total_bytes - estimate.base_weights - estimate.context
    return max(1, min(int(most), int(room // per_arm)))


def pack_memory(estimate: MemoryEstimate, arms: int) -> int:
    """Bytes one pack of `arms` arms needs on the GPU: the base and context once, the rest per arm."""
    return estimate.base_weights + estimate.context + arms * (estimate.adapter_and_optimizer + estimate.activations)
