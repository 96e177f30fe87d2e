"""LoRA pure logic (alpha rules, target presets, parameter counts) and the real 4-bit + PEFT model."""

from __future__ import annotations

import math

import pytest

from trainables.lora import (
    TargetError,
    linear_layers,
    lora_alpha,
    lora_param_count,
    lora_scale,
    resolve_targets,
)

LLAMA = [f"model.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
GPT2 = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def test_alpha_rules_give_the_documented_scale():
    for r in (1, 4, 64):
        assert lora_scale("r", r) == 1.0
        assert lora_scale("2r", r) == 2.0
        assert lora_scale("rslora", r) == pytest.approx(16 / math.sqrt(r))
        assert lora_scale(16.0, r) == pytest.approx(16 / r)
    assert lora_alpha("rslora", 8) == (16.0, True)
    assert lora_alpha("2r", 8) == (16.0, False)


def test_presets_resolve_against_llama_names():
    assert resolve_targets("attention-qv", LLAMA) == ["q_proj", "v_proj"]
    assert resolve_targets("attention", LLAMA) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert resolve_targets("all-linear", LLAMA) == sorted({n.rsplit(".", 1)[1] for n in LLAMA})


def test_presets_resolve_against_gpt2_names():
    assert resolve_targets("attention-qv", GPT2) == ["c_attn"]  # fused q/k/v
    assert resolve_targets("attention", GPT2) == ["c_attn", "c_proj"]


def test_explicit_targets_are_checked_and_the_error_lists_the_model_layers():
    assert resolve_targets(["q_proj", "down_proj"], LLAMA) == ["down_proj", "q_proj"]
    with pytest.raises(TargetError) as info:
        resolve_targets(["q_proj", "query_key"], LLAMA)
    message = str(info.value)
    assert "'query_key' not found" in message and "gate_proj" in message and "v_proj" in message


def test_param_count_is_sum_of_r_times_in_plus_out_and_linear_in_r():
    shapes = {"a.attn.q_proj": (64, 64), "a.attn.v_proj": (64, 32), "a.mlp.up_proj": (64, 128)}
    assert lora_param_count(shapes, ["q_proj", "v_proj"], 4) == 4 * (128 + 96)
    counts = [lora_param_count(shapes, ["q_proj", "up_proj"], r) for r in (1, 2, 4, 8)]
    assert counts == [counts[0] * r for r in (1, 2, 4, 8)]


@pytest.fixture(scope="module")
def quantized(tiny_model):
    from trainables.model import load_base_model

    quant = {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"}
    return lambda: load_base_model(tiny_model, quant, "cpu")


@pytest.mark.parametrize("preset", ["attention-qv", "attention", "all-linear"])
def test_real_4bit_model_with_peft_matches_the_count_and_targets(quantized, preset):
    import bitsandbytes as bnb
    import torch
    from peft import get_peft_model

    from trainables.lora import peft_config

    base = quantized()
    shapes = linear_layers(base)
    linear4 = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == len(shapes) > 0
    assert all(m.weight.dtype == torch.uint8 for m in linear4), "4-bit weights are packed uint8"
    assert not isinstance(base.lm_head, bnb.nn.Linear4bit)
    targets = resolve_targets(preset, shapes)
    r = 4
    model = get_peft_model(base, peft_config(r, "2r", 0.0, targets))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == lora_param_count(shapes, targets, r)
    adapted = {name.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for name, _ in model.named_modules() if name.endswith("lora_A")}
    assert adapted == set(targets)
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert frozen == [], "only LoRA weights train"
