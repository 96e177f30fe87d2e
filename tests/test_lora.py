"""LoRA pure logic (alpha rules, target presets, parameter counts) and the real 4-bit + PEFT model."""

from __future__ import annotations

import math

import pytest

from lora_rank_search.trainables.lora import (
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
    assert resolve_targets("attention", GPT2) == ["attn.c_proj", "c_attn"]  # not the MLP's c_proj
    assert resolve_targets("mlp", GPT2) == ["c_fc", "mlp.c_proj"]
    assert resolve_targets(["attn.c_proj"], GPT2) == ["attn.c_proj"]  # a dotted suffix, as PEFT accepts it
    assert resolve_targets(["c_proj"], GPT2) == ["c_proj"]


def test_presets_are_the_config_schema_presets_and_mlp_is_the_mlp():
    from lora_rank_search.search.config import TARGET_PRESETS
    from lora_rank_search.trainables.lora import PRESETS

    assert TARGET_PRESETS == PRESETS
    assert resolve_targets("mlp", LLAMA) == ["down_proj", "gate_proj", "up_proj"]
    with pytest.raises(TargetError, match="preset 'experts' matches no layer"):
        resolve_targets("experts", LLAMA)
    with pytest.raises(TargetError, match="unknown target preset 'ffn'"):
        resolve_targets("ffn", LLAMA)


def test_expert_weights_go_to_target_parameters_without_dropout():
    from lora_rank_search.trainables.lora import dropout_problems, peft_config

    targets = ["q_proj", "param:experts.down_proj", "param:experts.gate_up_proj"]
    config = peft_config(4, "2r", 0.0, targets)
    assert config.target_modules == {"q_proj"}
    assert set(config.target_parameters) == {"experts.down_proj", "experts.gate_up_proj"}
    assert config.rank_pattern == {r"experts\.gate_up_proj": 8} and config.alpha_pattern == {r"experts\.gate_up_proj": 16.0}
    assert dropout_problems(targets, 0.05) == [
        "lora.dropout: must be 0 when the targets include MoE expert or router weights (experts.down_proj, "
        "experts.gate_up_proj): PEFT applies no dropout to target_parameters, got 0.05"]
    assert dropout_problems(["q_proj"], 0.05) == []
    assert dropout_problems(targets, (0.0,)) == [] and len(dropout_problems(targets, (0.0, 0.1))) == 1, "a list: each value"
    with pytest.raises(ValueError, match="lora.dropout: must be 0"):
        peft_config(4, "2r", 0.05, targets)


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
    from lora_rank_search.trainables.model import load_base_model

    from lora_rank_search.search.config import QuantizationConfig

    quant = QuantizationConfig(load_in_4bit=True, quant_type="nf4", double_quant=True, compute_dtype="auto")
    return lambda: load_base_model(tiny_model, quant, "cpu")


@pytest.mark.parametrize("preset", ["attention-qv", "attention", "mlp", "all-linear"])
def test_real_4bit_model_with_peft_matches_the_count_and_targets(quantized, preset):
    import bitsandbytes as bnb
    import torch
    from peft import get_peft_model

    from lora_rank_search.trainables.lora import peft_config

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
    assert adapted == {t.rsplit(".", 1)[-1] for t in targets}
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert frozen == [], "only LoRA weights train"
