"""`gpus_per_trial: auto` without a GPU: the memory estimate's parts against hand arithmetic, the
fraction it picks over a table of GPU sizes, and the `auto` branch end to end on logical GPUs with
an injected device memory."""

from __future__ import annotations

import math
import threading

import pytest

from lora_rank_search.search.resources import CUDA_CONTEXT_BYTES, GIB, estimate_trial_memory, gpu_fraction_for

MIB = 2**20
# Two linear layers with 2**20 weights in all (512*1024 + 1024*512), as a 4-bit model holds them.
SHAPES = {"layers.0.up": (512, 1024), "layers.0.down": (1024, 512)}
DIMS = dict(hidden=256, layers=2, vocab=1000, batch_size=4, seq_len=128)  # 512 tokens per micro-batch


def test_4bit_base_weights_cost_half_a_byte_plus_the_quantization_constants():
    # NF4 with double quantization: 4 bits per weight (2**19 bytes), one 8-bit absmax per 64 weights
    # (2**14 bytes), one fp32 constant per 256 absmaxes (2**20 / 64 / 256 * 4 = 2**8 bytes);
    # 1000 other parameters in bf16 (2000 bytes).
    est = estimate_trial_memory(SHAPES, 1000, 0, **DIMS)
    assert est.base_weights == 524288 + 16384 + 256 + 2000
    # Without double quantization: one fp32 absmax per 64 weights (2**20 / 64 * 4 = 2**16 bytes).
    assert estimate_trial_memory(SHAPES, 1000, 0, double_quant=False, **DIMS).base_weights == 524288 + 65536 + 2000
    # Not quantized: every weight in the compute dtype (2 bytes in bf16, 4 in fp32).
    assert estimate_trial_memory(SHAPES, 1000, 0, load_in_4bit=False, **DIMS).base_weights == 2 * 2**20 + 2000
    assert estimate_trial_memory(SHAPES, 1000, 0, load_in_4bit=False, compute_bytes=4, **DIMS).base_weights == 4 * 2**20 + 4000


def test_adapter_costs_16_bytes_per_trainable_parameter():
    # fp32 weight (4) + its gradient (4) + AdamW's two moments (4 + 4).
    assert estimate_trial_memory(SHAPES, 0, 12_345, **DIMS).adapter_and_optimizer == 12_345 * 16


def test_activations_per_token_and_the_cuda_context():
    # Without recompute: 17 * hidden values of 2 bytes per layer and token (2 * 8704 bytes for two
    # layers); the logits in bf16 plus an fp32 copy and its gradient: vocab * (2 + 8) = 10000 bytes.
    est = estimate_trial_memory(SHAPES, 0, 0, **DIMS)
    assert est.activations == 512 * (2 * 17 * 256 * 2 + 1000 * 10)
    # With gradient checkpointing only each layer's input (and its gradient) stays: 2 * hidden * 2.
    ckpt = estimate_trial_memory(SHAPES, 0, 0, gradient_checkpointing=True, **DIMS)
    assert ckpt.activations == 512 * (2 * 2 * 256 * 2 + 1000 * 10)
    assert est.context == CUDA_CONTEXT_BYTES == int(0.6 * GIB)
    assert est.total == est.base_weights + est.adapter_and_optimizer + est.activations + est.context


# (estimate GiB, GPU GiB, CPUs available or None, expected fraction). auto fills 90% of the card.
FRACTIONS = [
    (5, 80, None, 1 / 8),  # 8 * 5 = 40 <= 72
    (5, 40, None, 1 / 4),  # 8 * 5 = 40 > 36, 4 * 5 = 20 <= 36
    (5, 42, None, 1 / 4),  # 8 * 5 = 40 fits the card but not 90% of it (37.8)
    (5, 24, None, 1 / 4),  # 8 * 5 = 40 > 21.6, 4 * 5 = 20 <= 21.6
    (5, 16, None, 1 / 2),  # 20 > 14.4, 10 <= 14.4
    (5, 8, None, 1.0),  # 10 > 7.2, 5 <= 7.2
    (10, 8, None, 1.0),  # does not fit even alone: a whole GPU (the trial may still run out of memory)
    (5, 80, 2, 1 / 2),  # 8 and 4 per GPU would need more CPUs than there are
    (5, 80, 4, 1 / 4),
    (0.9 * 24 / 4, 24, None, 1 / 4),  # exactly at the limit: fits
]


@pytest.mark.parametrize("estimate_gib, gpu_gib, cpus, expected", FRACTIONS)
def test_gpu_fraction_for_a_table_of_gpu_sizes(estimate_gib, gpu_gib, cpus, expected):
    assert gpu_fraction_for(int(estimate_gib * GIB), gpu_gib * GIB, cpus) == expected


def test_memory_estimate_of_a_config_uses_its_largest_rank_and_every_targeted_layer(raw_config):
    from lora_rank_search.search.config import parse_config
    from lora_rank_search.search.runner import memory_estimate, prepare

    cfg = parse_config(raw_config(lora={"ranks": [2, 8], "target_modules": "all-linear"},
                                  train={"batch_size": 4}, data={"max_seq_len": 32}))
    prepared = prepare(cfg, log=lambda _: None)
    est = memory_estimate(cfg, prepared)
    targeted = [prepared.linear_shapes[name] for name in prepared.linear_shapes if name.rsplit(".", 1)[-1] in
                {t.rsplit(".", 1)[-1] for t in prepared.targets}]
    assert targeted, prepared.targets
    # LoRA at r=8 on a layer (in, out): A is r x in, B is out x r.
    assert est.adapter_and_optimizer == 16 * sum(8 * (i + o) for i, o in targeted)
    d = prepared.dims
    assert est.activations == 4 * 32 * (d["layers"] * 17 * d["hidden"] * 2 + d["vocab"] * 10)


@pytest.mark.slow
def test_auto_sizes_the_fraction_from_the_device_memory_and_ray_packs_trials_by_it(raw_config, ray_session, monkeypatch):
    """On two logical GPUs: without a device memory auto falls back to CPU; with an injected one
    that holds two trials it asks 0.5 GPU per trial, and Ray holds four such shares at once."""
    import ray

    from lora_rank_search.analysis.results import load_experiment
    from lora_rank_search.contract import layout
    from lora_rank_search.search import runner
    from lora_rank_search.search.config import parse_config

    ray_session(num_cpus=4, num_gpus=2)  # Ray schedules these GPUs; torch never sees CUDA
    cfg = parse_config(raw_config(
        lora={"ranks": [1, 2, 4, 8]},
        train={"max_steps": 20, "eval_every": 10},
        scheduler={"type": "none"},
        resources={"gpus_per_trial": "auto"},
    ))
    prepared = runner.prepare(cfg, log=lambda _: None)
    lines: list[str] = []
    # No CUDA here or in the probe task Ray runs on a (logical) GPU: auto means CPU.
    assert runner.resolve_resources(cfg, prepared, lines.append) == {"cpu": 1, "gpu": 0.0}
    assert lines == ["resources: no GPU found; trials run on CPU"]

    estimate = runner.memory_estimate(cfg, prepared).total
    device = math.ceil(2 * estimate / 0.9)  # two trials fit in 90% of it, four do not
    monkeypatch.setattr(runner, "local_gpu_memory", lambda: device)

    lowest = [2.0]
    done = threading.Event()

    def watch():  # the status: GPU shares Ray holds for trials, sampled while the search runs
        while not done.wait(0.05):
            lowest[0] = min(lowest[0], ray.available_resources().get("GPU", 0.0))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    lines.clear()
    try:
        experiment = runner.run_search(cfg, log=lines.append)
    finally:
        done.set()
        watcher.join()
    assert any(line.endswith("-> 0.5 GPU per trial") for line in lines), lines
    assert layout.read_meta(experiment)["resources_per_trial"] == {"cpu": 1, "gpu": 0.5}
    trials, _ = load_experiment(experiment)
    assert len(trials) == 4 and trials["status"].eq("completed").all()
    assert lowest[0] == 0.0, "Ray never held four 0.5-GPU shares of the two GPUs at once"
    ids = trials["gpu_ids"].tolist()
    assert sorted(ids) == ["0", "0", "1", "1"], f"two trials per GPU: {ids}"


@pytest.mark.parametrize("env, joined, allowed", [
    ({}, False, False),
    ({"LORA_RANK_SEARCH_AUTOSCALING": "1"}, False, True),
    ({"LORA_RANK_SEARCH_AUTOSCALING": "0"}, False, False),
    ({"RAY_ADDRESS": "ray://head:10001"}, False, True),
    ({}, True, True),
])
def test_gpus_on_a_cluster_without_gpu_nodes_need_an_autoscaler(raw_config, monkeypatch, env, joined, allowed):
    """gpus_per_trial > 0 on a Ray cluster with no GPU yet is refused, unless the cluster may add
    GPU nodes: joined with --address, under `ray job submit` (RAY_ADDRESS), or LORA_RANK_SEARCH_AUTOSCALING=1."""
    import ray

    from lora_rank_search.search import runner
    from lora_rank_search.search.config import ConfigError, parse_config

    for key in ("LORA_RANK_SEARCH_AUTOSCALING", "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})  # a cluster of CPU nodes only
    cfg = parse_config(raw_config(resources={"gpus_per_trial": 1}))
    lines: list[str] = []
    if allowed:
        assert runner.resolve_resources(cfg, None, lines.append, joined=joined) == {"cpu": 1, "gpu": 1.0}
        assert lines == ["resources: no GPU node in the cluster yet; trials wait for the autoscaler to add GPU nodes"]
    else:
        with pytest.raises(ConfigError, match="1 GPUs asked for, but this Ray cluster has no GPUs"):
            runner.resolve_resources(cfg, None, lines.append, joined=joined)


def test_the_cluster_8b_configs_published_memory_estimate_is_what_the_code_computes(tmp_path):
    """configs/cluster-8b.yaml states the estimate for Qwen3-8B (r=128 on attention, batch 4 x 512,
    gradient checkpointing) part by part and concludes one trial per 24 GB GPU: recompute it from
    Qwen3-8B's published shape (a config only: the hub is not needed) and the config's own values."""
    import re

    import yaml
    from transformers import Qwen3Config

    from lora_rank_search.search.runner import _model_dims
    from lora_rank_search.trainables.lora import linear_layers, lora_param_count, resolve_targets
    from lora_rank_search.trainables.model import meta_model

    path = "configs/cluster-8b.yaml"
    text = open(path).read()
    cfg = yaml.safe_load(text)
    stated = re.search(r"([\d.]+) GiB base \+ ([\d.]+) GiB adapter/optimizer \+ ([\d.]+) GiB activations \+ ([\d.]+) GiB "
                       r"CUDA context\s*#\s*= ([\d.]+) GiB", text)
    assert stated, f"{path}: the estimate's comment moved"
    Qwen3Config(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False).save_pretrained(tmp_path / "qwen3-8b")
    meta = meta_model(str(tmp_path / "qwen3-8b"))
    shapes = linear_layers(meta)
    dims = _model_dims(meta, shapes)
    assert 8.1e9 < dims["total_params"] < 8.3e9, "Qwen3-8B's size"
    targets = resolve_targets(cfg["lora"]["target_modules"], shapes)
    est = estimate_trial_memory(shapes, dims["other_params"], lora_param_count(shapes, targets, max(cfg["lora"]["ranks"])),
                                hidden=dims["hidden"], layers=dims["layers"], vocab=dims["vocab"],
                                batch_size=cfg["train"]["batch_size"], seq_len=cfg["data"]["max_seq_len"],
                                gradient_checkpointing=cfg["train"]["gradient_checkpointing"])
    parts = (est.base_weights, est.adapter_and_optimizer, est.activations, est.context, est.total)
    assert [round(p / GIB, 1) for p in parts] == [float(v) for v in stated.groups()]
    assert gpu_fraction_for(est.total, 24 * 10**9) == 1.0 and cfg["resources"]["gpus_per_trial"] == 1, "one trial per 24 GB GPU"
    assert gpu_fraction_for(est.total, 80 * GIB) == 1 / 4  # and four on an 80 GB card
