"""The per-machine cache of pre-quantized 4-bit checkpoints: written once, then loaded, same model."""

from __future__ import annotations

import dataclasses

import pytest

from lora_rank_search.search.config import QuantizationConfig
from lora_rank_search.trainables.model import load_base_model, prequantized_dir

QUANT = QuantizationConfig(load_in_4bit=True, quant_type="nf4", double_quant=True, compute_dtype="auto", prequantized_cache=True)


def test_second_load_reads_the_cached_4bit_checkpoint_and_matches(tiny_model, tmp_path, monkeypatch):
    import bitsandbytes as bnb
    import torch

    monkeypatch.setenv("LORA_RANK_SEARCH_CACHE", str(tmp_path / "cache"))
    target = prequantized_dir(tiny_model, QUANT, "cpu")
    assert not target.exists()
    first = load_base_model(tiny_model, QUANT, "cpu")
    assert (target / "config.json").is_file() and any(target.glob("*.safetensors"))
    stamp = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    second = load_base_model(tiny_model, QUANT, "cpu")
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == stamp, "cache reused, not rewritten"
    layers = [m for m in second.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.dtype == torch.uint8 for m in layers)
    ids = torch.randint(4, 60, (2, 12))
    with torch.no_grad():
        assert torch.equal(first(input_ids=ids).logits, second(input_ids=ids).logits)


def test_cache_key_changes_with_quantization_settings(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_RANK_SEARCH_CACHE", str(tmp_path / "cache"))
    base = prequantized_dir(tiny_model, QUANT, "cpu")
    assert prequantized_dir(tiny_model, dataclasses.replace(QUANT, quant_type="fp4"), "cpu") != base
    assert prequantized_dir(tiny_model, dataclasses.replace(QUANT, double_quant=False), "cpu") != base
    assert prequantized_dir(tiny_model, dataclasses.replace(QUANT, compute_dtype="bfloat16"), "cpu") != base
    assert prequantized_dir(tiny_model, QUANT, "cpu") == base


@pytest.mark.parametrize("change", [{"prequantized_cache": False}, {"load_in_4bit": False}], ids=["cache-off", "plain"])
def test_cache_off_or_plain_weights_write_nothing(tiny_model, tmp_path, monkeypatch, change):
    monkeypatch.setenv("LORA_RANK_SEARCH_CACHE", str(tmp_path / "cache"))
    load_base_model(tiny_model, dataclasses.replace(QUANT, **change), "cpu")
    assert not (tmp_path / "cache" / "prequantized").exists()
