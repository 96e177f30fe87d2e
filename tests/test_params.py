"""`lora-rank params`: counts equal PEFT's on real tiny models of several architectures (dense and
mixture-of-experts, every preset), adapter sizes equal the real safetensors files, the presets
select what PEFT's own `all-linear` selects, and 8B/70B-shaped configs are counted in seconds."""

from __future__ import annotations

import os

import pytest

from lora_rank_search.trainables.params import adapter_file_bytes, format_params, parameter_table
from lora_rank_search.search.cli import main

TINY = dict(vocab_size=96, max_position_embeddings=64)


def _configs():
    from transformers import (
        GemmaConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    moe = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, **TINY)
    return {
        "qwen3": Qwen3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=8, **TINY),
        "gemma": GemmaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=8, pad_token_id=0, **TINY),
        "qwen3_moe": Qwen3MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_experts=4, head_dim=8, **moe),
        # layer 0 dense: its gate/up/down_proj are layers PEFT cannot target on Qwen-MoE models (see test below)
        "qwen3_moe_dense0": Qwen3MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_experts=4, head_dim=8,
                                           mlp_only_layers=[0], **moe),
        "mixtral": MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=4, **moe),
        "qwen2_moe": Qwen2MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                    num_experts=4, **moe),
        "llama": LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **TINY),
        "mistral": MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, **TINY),
        "qwen2": Qwen2Config(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **TINY),
        "gpt2": GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64),
        "gpt_neox": GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **TINY),
        "phi3": Phi3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                           pad_token_id=0, **TINY),
    }


DENSE = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "gpt_neox"]
MOE = ["qwen3_moe", "qwen3_moe_dense0", "mixtral", "qwen2_moe"]
DENSE_PRESETS = ["attention-qv", "attention", "mlp", "all-linear"]
MOE_PRESETS = DENSE_PRESETS + ["experts"]


def _adapted(peft_model) -> set:
    """Names of the modules (linear layers) and parameters (expert / router weights) PEFT put a LoRA on."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    out = set()
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, ParamWrapper):
            out.add(f"{name.replace('.base_layer', '')}.{module.parameter_name}")
        elif isinstance(module, LoraLayer):
            out.add(name)
    return out


@pytest.mark.parametrize("arch", DENSE + MOE)
def test_counts_and_sizes_equal_peft_on_real_tiny_models(arch, tmp_path):
    """Every preset, three ranks: the calculator's count and file size equal what PEFT trains and
    saves with the trial's own LoraConfig (trainables.lora.peft_config), on real (CPU) models."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_rank_search.trainables.lora import peft_config

    config = _configs()[arch]
    folder = tmp_path / arch
    config.save_pretrained(folder)  # the calculator sees only this config.json
    presets = MOE_PRESETS if arch in MOE else DENSE_PRESETS
    rows, facts = parameter_table(str(folder), [1, 4, 8], presets)
    assert len(rows) == 3 * len(presets) and facts["model_type"] == config.model_type
    for row in rows:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        peft_model = get_peft_model(model, peft_config(row.r, "2r", 0.0, row.targets))
        trainable, total = peft_model.get_nb_trainable_parameters()
        assert row.params == trainable, (arch, row.targets_spec, row.r)
        assert row.base_params == total - trainable
        assert row.layers == len(_adapted(peft_model))
        if row.r == 4:
            out = tmp_path / f"{arch}-{row.targets_spec}"
            peft_model.save_pretrained(out)
            assert row.adapter_bytes == os.path.getsize(out / "adapter_model.safetensors"), "exact file size"


@pytest.mark.parametrize("arch", DENSE + MOE)
def test_all_linear_adapts_what_peft_all_linear_adapts(arch):
    """Our all-linear = PEFT's own `target_modules="all-linear"` (same layers, same count), except on
    Qwen2-MoE, where PEFT 0.21 leaves the experts and the router out and ours adapts them too."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_rank_search.trainables.lora import linear_layers, lora_param_count, peft_config, resolve_targets

    config = _configs()[arch]
    with init_empty_weights():
        ours = AutoModelForCausalLM.from_config(config)
        theirs = AutoModelForCausalLM.from_config(config)
    shapes = linear_layers(ours)
    targets = resolve_targets("all-linear", shapes)
    ours = get_peft_model(ours, peft_config(8, 16.0, 0.0, targets))
    theirs = get_peft_model(theirs, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    mine, peft_own = _adapted(ours), _adapted(theirs)
    if arch == "qwen2_moe":
        assert mine - peft_own == {n for n in shapes.params}, "the difference is exactly the experts and routers"
        assert peft_own < mine
    else:
        assert mine == peft_own
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert lora_param_count(shapes, targets, 8) == ours.get_nb_trainable_parameters()[0]


def test_presets_select_by_place_on_gpt2_and_moe():
    """GPT-2's `attention` is attn.c_attn + attn.c_proj (not the MLP's c_proj); `mlp` is c_fc + mlp.c_proj;
    on MoE models `mlp`/`experts` are the experts' weights and only all-linear adds the router."""
    from accelerate import init_empty_weights
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config

    from lora_rank_search.trainables.lora import linear_layers, peft_config, resolve_targets

    def adapted(config, spec):
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        targets = resolve_targets(spec, linear_layers(model))
        return targets, _adapted(get_peft_model(model, peft_config(4, "2r", 0.0, targets)))

    gpt2 = GPT2Config(n_embd=32, n_layer=12, n_head=4, vocab_size=96, n_positions=64)
    targets, layers = adapted(gpt2, "attention")
    assert targets == ["attn.c_proj", "c_attn"] and len(layers) == 24
    assert all(".attn." in n for n in layers)
    targets, layers = adapted(gpt2, "mlp")
    assert targets == ["c_fc", "mlp.c_proj"] and len(layers) == 24 and all(".mlp." in n for n in layers)
    assert adapted(gpt2, ["attn.c_proj"])[1] == {f"transformer.h.{i}.attn.c_proj" for i in range(12)}
    assert len(adapted(gpt2, ["c_proj"])[1]) == 24, "a bare name matches as in PEFT: both c_proj"
    moe = _configs()["mixtral"]
    assert adapted(moe, "experts")[1] == {f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")}
    assert adapted(moe, "mlp")[1] == adapted(moe, "experts")[1]
    assert {f"model.layers.{i}.mlp.gate.weight" for i in range(2)} <= adapted(moe, "all-linear")[1]


def test_moe_table_names_what_it_does_and_what_peft_cannot_reach(tmp_path):
    _configs()["qwen3_moe_dense0"].save_pretrained(tmp_path / "moe")
    rows, facts = parameter_table(str(tmp_path / "moe"), [8], ["all-linear", "experts"])
    assert facts["expert_weights"] == 2 and facts["expert_params"] > 0
    text = format_params(rows, facts)
    assert "expert weight tensors" in text and "note: mixture of experts" in text and "lora.dropout must be 0" in text
    assert "not adaptable here: 3 linear layers (model.layers.0.mlp.down_proj" in text
    with pytest.raises(ValueError, match="'gate_proj' selects model.layers.0.mlp.gate_proj, which PEFT cannot adapt"):
        parameter_table(str(tmp_path / "moe"), [8], [["gate_proj"]])
    _configs()["llama"].save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="--targets experts: preset 'experts' matches no layer of this model"):
        parameter_table(str(tmp_path / "llama"), [8], ["experts"])


@pytest.fixture
def meta_models(monkeypatch) -> list:
    """Every model the parameter calculator builds (instead of a wall-clock bound: a model with no
    weight in memory is what makes an 8B or 70B count take seconds on a laptop)."""
    import lora_rank_search.trainables.model
    from lora_rank_search import trainables

    built: list = []
    original = trainables.model.meta_model

    def recording(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(trainables.model, "meta_model", recording)
    return built


def _all_on_meta(models: list) -> bool:
    return bool(models) and all(t.device.type == "meta" for m in models for t in m.parameters())


def test_llama_3_1_8b_shape_attention_r16_is_13_631_488(tmp_path, meta_models):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, vocab_size=128256).save_pretrained(tmp_path / "8b")
    rows, facts = parameter_table(str(tmp_path / "8b"), [4, 8, 16, 32, 64], ["attention", ["q_proj", "k_proj", "v_proj", "o_proj"]])
    assert _all_on_meta(meta_models), "the calculator materialized weights"
    by = {(r.targets_spec, r.r): r for r in rows}
    assert by[("attention", 16)].params == 13_631_488
    assert by[("q_proj,k_proj,v_proj,o_proj", 16)].params == 13_631_488
    assert [by[("attention", r)].params for r in (4, 8, 16, 32, 64)] == [13_631_488 * r // 16 for r in (4, 8, 16, 32, 64)]
    assert by[("attention", 16)].layers == 128
    assert facts["base_params"] == 8_030_261_248  # Llama-3.1-8B's published size
    # fp32 data plus the safetensors header (a few KB)
    assert 0 < by[("attention", 16)].adapter_bytes - 4 * 13_631_488 < 64_000


def test_70b_shape_is_counted_without_weights_in_memory(tmp_path, meta_models):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                intermediate_size=28672, vocab_size=128256).save_pretrained(tmp_path / "70b")
    rows, facts = parameter_table(str(tmp_path / "70b"), [16], ["all-linear"])
    assert _all_on_meta(meta_models), "the calculator materialized weights"
    # per layer: q,o 8192x8192; k,v 8192x1024; gate,up 8192->28672; down 28672->8192
    per_layer = 16 * (2 * (8192 + 8192) + 2 * (8192 + 1024) + 3 * (8192 + 28672))
    assert rows[0].params == 80 * per_layer
    assert facts["base_params"] > 70e9


def test_adapter_file_bytes_header_is_padded_to_8():
    size = adapter_file_bytes({"model.layers.0.self_attn.q_proj": (8, 8)}, 2)
    assert (size - 8 - 2 * 16 * 4) % 8 == 0


def test_cli_prints_the_table_and_names_bad_input(tmp_path, capsys):
    _configs()["llama"].save_pretrained(tmp_path / "llama")
    assert main(["params", str(tmp_path / "llama"), "--ranks", "4", "16", "--targets", "attention", "q_proj,v_proj"]) == 0
    out = capsys.readouterr().out
    assert "trainable params" in out and "q_proj,v_proj" in out and "no weights loaded" in out
    # a config.json by its absolute path, as the help says (it was refused as 'a file, not a model folder')
    assert main(["params", str(tmp_path / "llama" / "config.json"), "--ranks", "4", "16", "--targets", "attention", "q_proj,v_proj"]) == 0
    by_file = capsys.readouterr().out
    assert "trainable params" in by_file and "q_proj,v_proj" in by_file
    assert main(["params", str(tmp_path / "llama"), "--targets", "q_proj,qkv"]) == 2
    err = capsys.readouterr().err
    assert "'qkv' not found" in err and "down_proj" in err
    assert main(["params", str(tmp_path / "llama"), "--ranks", "0"]) == 2
    assert "--ranks: ranks must be positive integers, got [0]" in capsys.readouterr().err
    assert main(["params", str(tmp_path / "missing")]) == 2
    assert "MODEL: model folder not found" in capsys.readouterr().err
