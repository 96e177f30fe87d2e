"""Tiny Llama models and synthetic tasks for tests and benchmarks (built from a config, seconds on CPU).

`build_tiny_llama` writes a real `LlamaForCausalLM` folder with a word-level tokenizer, loadable in
4-bit like any hub model. `chain_records` makes a task whose difficulty grows with the LoRA rank it
needs: each word is followed by its image under a fixed random permutation, so predicting the next
word means learning a vocabulary-sized mapping that a rank-r update can only approximate.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]


def word_list(n: int) -> list[str]:
    """n distinct lowercase pseudo-words (w0 ... w{n-1})."""
    return [f"w{i}" for i in range(n)]


def build_tokenizer(words: list[str], folder: Path):
    """A word-level fast tokenizer over `words` + specials, saved to `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + [w for w in words if w not in SPECIAL])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_tiny_llama(
    folder: str | Path,
    words: Optional[list[str]] = None,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    seed: int = 0,
    init_std: float = 0.02,
) -> Path:
    """Save a randomly initialised LlamaForCausalLM + word-level tokenizer to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = words or word_list(60)
    tokenizer = build_tokenizer(words, folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        initializer_range=init_std,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return folder


def build_tiny_moe(folder: str | Path, words: Optional[list[str]] = None, seed: int = 0) -> Path:
    """Save a randomly initialised 2-layer Qwen3-MoE (4 experts, 2 per token; the experts' weights
    fused 3-D parameters, as transformers 5 holds them) + word-level tokenizer to `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(words or word_list(60), folder)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                            num_experts_per_tok=2, head_dim=16, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def chain_records(words: list[str], n: int, length: int = 12, seed: int = 0, perm_seed: int = 1234) -> list[dict]:
    """Instruction records: prompt = a start word, response = the next `length` words of its
    chain under a fixed permutation of `words` (the same permutation for every record)."""
    perm_rng = random.Random(perm_seed)
    image = words[:]
    perm_rng.shuffle(image)
    successor = dict(zip(words, image))
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        start = rng.choice(words)
        chain = [start]
        for _ in range(length):
            chain.append(successor[chain[-1]])
        records.append({"prompt": start, "response": " ".join(chain[1:])})
    return records


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
