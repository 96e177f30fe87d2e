"""`lora-rank params`: counts equal PEFT's on real tiny models of several architectures, adapter
sizes equal the real safetensors files, and 8B/70B-shaped configs are counted in seconds."""

from __future__ import annotations

import os
import time

import pytest

from analysis.params import adapter_file_bytes, parameter_table
from search.cli import main

TINY = dict(vocab_size=96, max_position_embeddings=64)


def _configs():
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    return {
        "llama": LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **TINY),
        "mistral": MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, **TINY),
        "qwen2": Qwen2Config(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **TINY),
        "gpt2": GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64),
        "gpt_neox": GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **TINY),
        "phi3": Phi3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                           pad_token_id=0, **TINY),
    }


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2", "gpt_neox", "phi3"])
def test_counts_and_sizes_equal_peft_on_real_tiny_models(arch, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = _configs()[arch]
    folder = tmp_path / arch
    config.save_pretrained(folder)  # the calculator sees only this config.json
    presets = ["attention-qv", "attention", "all-linear"]
    rows, facts = parameter_table(str(folder), [1, 4, 8], presets)
    assert len(rows) == 9 and facts["model_type"] == config.model_type
    for row in rows:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        peft_model = get_peft_model(model, LoraConfig(r=row.r, lora_alpha=2 * row.r, target_modules=row.targets, task_type="CAUSAL_LM"))
        trainable, total = peft_model.get_nb_trainable_parameters()
        assert row.params == trainable, (arch, row.targets_spec, row.r)
        assert row.base_params == total - trainable
        if row.r == 4:
            out = tmp_path / f"{arch}-{row.targets_spec}"
            peft_model.save_pretrained(out)
            assert row.adapter_bytes == os.path.getsize(out / "adapter_model.safetensors"), "exact file size"


def test_llama_3_1_8b_shape_attention_r16_is_13_631_488(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, vocab_size=128256).save_pretrained(tmp_path / "8b")
    started = time.perf_counter()
    rows, facts = parameter_table(str(tmp_path / "8b"), [4, 8, 16, 32, 64], ["attention", ["q_proj", "k_proj", "v_proj", "o_proj"]])
    assert time.perf_counter() - started < 20
    by = {(r.targets_spec, r.r): r for r in rows}
    assert by[("attention", 16)].params == 13_631_488
    assert by[("q_proj,k_proj,v_proj,o_proj", 16)].params == 13_631_488
    assert [by[("attention", r)].params for r in (4, 8, 16, 32, 64)] == [13_631_488 * r // 16 for r in (4, 8, 16, 32, 64)]
    assert by[("attention", 16)].layers == 128
    assert facts["base_params"] == 8_030_261_248  # Llama-3.1-8B's published size
    # fp32 data plus the safetensors header (a few KB)
    assert 0 < by[("attention", 16)].adapter_bytes - 4 * 13_631_488 < 64_000


def test_70b_shape_is_counted_in_seconds(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                intermediate_size=28672, vocab_size=128256).save_pretrained(tmp_path / "70b")
    started = time.perf_counter()
    rows, facts = parameter_table(str(tmp_path / "70b"), [16], ["all-linear"])
    assert time.perf_counter() - started < 30
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
    assert main(["params", str(tmp_path / "llama"), "--targets", "q_proj,qkv"]) == 2
    err = capsys.readouterr().err
    assert "'qkv' not found" in err and "down_proj" in err
    assert main(["params", str(tmp_path / "llama"), "--ranks", "0"]) == 2
    assert "--ranks: ranks must be positive integers, got [0]" in capsys.readouterr().err
    assert main(["params", str(tmp_path / "missing")]) == 2
    assert "MODEL: model folder not found" in capsys.readouterr().err
