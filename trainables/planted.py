"""A planted-rank task: data whose best LoRA rank is known, to validate rank selection end to end.

The teacher is the student's own base, loaded in 4-bit exactly as a trial loads it, plus an exact
rank-k update ΔW = B·A on every targeted linear layer (attached as a PEFT LoRA of rank k with
scale 1, so it runs the same 4-bit compute path as the students). Training and eval sequences are
sampled from the teacher. A student LoRA of rank r >= k on the same targets can represent the
teacher exactly; a rank r < k cannot, and its eval loss stays measurably higher. So a rank search
over ranks spanning k should recommend k.

Making the knee real (measured while building this task):
- the base is initialised with a large weight std (default 0.3), so its next-token distributions
  are far from uniform and a change of the weights changes them a lot;
- the update has k equal singular values (each direction matters as much as the others: a rank
  k-1 student misses 1/k of it), sized relative to the spectral norm of the frozen weight;
- many sequences (thousands): with few, large ranks overfit and eval loss rises with r.

Planted in the MLP (`targets=MLP_TARGETS`): the update lives in gate/up/down, so a search over
target choices has a known answer too: the attention presets cannot represent it at any rank, `mlp`
can at the planted rank, and `all-linear` can but costs more parameters at the same rank.

`PlantedTask.base_loss - PlantedTask.teacher_loss` (nats/token on the eval sequences) is a
Monte-Carlo estimate of KL(teacher || base): how much there is to learn.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from lora_rank_search.contract.config import QuantizationConfig

QUANT_4BIT = QuantizationConfig(load_in_4bit=True, quant_type="nf4", double_quant=True, compute_dtype="float32")
DEFAULT_TARGETS = ("o_proj", "down_proj")  # layers that write into the residual stream: a strong effect per rank
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")  # the whole MLP: what the `mlp` preset adapts
TASK_FILE = "planted_task.json"


@dataclass
class PlantedTask:
    """Where a built planted-rank task lives and how strong its plant is.

    Attributes:
        model_dir: the base model folder (students load it in 4-bit, like any model).
        train_path: jsonl of {"text": ...} records sampled from the teacher.
        eval_path: jsonl of held-out {"text": ...} records sampled from the teacher.
        rank: k, the rank of the planted update on every targeted layer.
        targets: the targeted linear-layer names (students must target the same).
        seq_len: tokens per sequence (use it as data.max_seq_len: no EOS is added within it).
        teacher_loss: the teacher's own mean NLL on the eval sequences (nats/token): the floor.
        base_loss: the untouched 4-bit base's mean NLL on the same sequences (nats/token).
    """

    model_dir: str
    train_path: str
    eval_path: str
    rank: int
    targets: list
    seq_len: int
    teacher_loss: float
    base_loss: float

    @property
    def kl_estimate(self) -> float:
        """Monte-Carlo KL(teacher || base) per token (nats): base_loss - teacher_loss."""
        return self.base_loss - self.teacher_loss


def _orthonormal(rows: int, cols: int, generator):
    import torch

    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator))
    return q[:, :cols]


def attach_planted_update(base, targets: Sequence[str], k: int, strength: float, seed: int = 0):
    """Wrap a (4-bit) base in a PEFT model whose rank-k LoRA is the planted update.

    On each targeted layer with frozen weight W (out x in): ΔW = strength · ||W||_2 · U Vᵀ with U
    (out x k) and V (in x k) random orthonormal, i.e. k equal singular values. Returns the teacher.
    """
    import bitsandbytes.functional as bnbf
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=k, lora_alpha=k, lora_dropout=0.0, target_modules=list(targets), bias="none", task_type="CAUSAL_LM")
    teacher = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    for name, module in sorted(teacher.named_modules()):
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        weight = module.base_layer.weight
        dense = bnbf.dequantize_4bit(weight.data, weight.quant_state) if hasattr(weight, "quant_state") else weight.data
        out_features, in_features = dense.shape
        sigma = strength * float(torch.linalg.matrix_norm(dense.float(), ord=2))
        u, v = _orthonormal(out_features, k, gen), _orthonormal(in_features, k, gen)
        with torch.no_grad():
            module.lora_B["default"].weight.copy_(u * sigma)  # B: out x k
            module.lora_A["default"].weight.copy_(v.T)  # A: k x in
    teacher.eval()
    return teacher


def sample_sequences(model, vocab_size: int, n: int, length: int, seed: int = 0, batch: int = 512):
    """n sequences of `length` token ids: the first uniform over the vocabulary, the rest sampled
    from the model's next-token distribution (temperature 1, no truncation)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for start in range(0, n, batch):
            size = min(batch, n - start)
            ids = torch.randint(0, vocab_size, (size, 1), generator=gen)
            step_input, past = ids, None
            for _ in range(length - 1):
                result = model(input_ids=step_input, past_key_values=past, use_cache=True)
                past = result.past_key_values
                logits = result.logits[:, -1, :vocab_size].float()
                step_input = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)
                ids = torch.cat([ids, step_input], dim=1)
            out.append(ids)
    return torch.cat(out)


def mean_nll(model, sequences, batch: int = 512) -> float:
    """Mean next-token NLL (nats/token) of `model` on positions 1.. of `sequences`."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(sequences), batch):
            ids = sequences[start : start + batch]
            logits = model(input_ids=ids).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
    return total / count


def _write_text_records(path: Path, sequences, tokenizer) -> None:
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    lines = (json.dumps({"text": " ".join(vocab[int(t)] for t in row)}) for row in sequences)
    path.write_text("\n".join(lines) + "\n")


def build_planted_task(
    folder: str | Path,
    *,
    rank: int = 4,
    targets: Sequence[str] = DEFAULT_TARGETS,
    strength: float = 0.5,
    n_train: int = 3000,
    n_eval: int = 500,
    seq_len: int = 24,
    words: int = 64,
    hidden: int = 64,
    layers: int = 2,
    init_std: float = 0.3,
    seed: int = 0,
) -> PlantedTask:
    """Build (or reuse, if `folder` already holds one with the same settings) a planted-rank task.

    Writes `folder/base/` (a tiny Llama + word tokenizer), `train.jsonl`, `eval.jsonl` and
    `planted_task.json`. Seconds on CPU at the default sizes.
    """
    import torch

    from lora_rank_search.trainables.model import load_base_model, load_tokenizer
    from lora_rank_search.trainables.tiny import build_tiny_llama, word_list
    from lora_rank_search.trainables.trial import keep_4bit_layout_fixed

    folder = Path(folder)
    settings = dict(rank=rank, targets=list(targets), strength=strength, n_train=n_train, n_eval=n_eval,
                    seq_len=seq_len, words=words, hidden=hidden, layers=layers, init_std=init_std, seed=seed)
    saved = folder / TASK_FILE
    if saved.is_file():
        data = json.loads(saved.read_text())
        if data.get("settings") == settings:
            return PlantedTask(**data["task"])
    folder.mkdir(parents=True, exist_ok=True)
    model_dir = build_tiny_llama(folder / "base", word_list(words), hidden=hidden, layers=layers,
                                 intermediate=2 * hidden, seed=seed, init_std=init_std)
    tokenizer = load_tokenizer(str(model_dir))
    torch.manual_seed(seed)
    base = load_base_model(str(model_dir), QUANT_4BIT, "cpu")
    keep_4bit_layout_fixed(base)  # the layout the trials use (see trainables/trial.py)
    teacher = attach_planted_update(base, targets, rank, strength, seed)
    vocab = len(tokenizer)
    train = sample_sequences(teacher, vocab, n_train, seq_len, seed=seed + 1)
    held = sample_sequences(teacher, vocab, n_eval, seq_len, seed=seed + 2)
    teacher_loss = mean_nll(teacher, held)
    with teacher.disable_adapter():
        base_loss = mean_nll(teacher, held)
    _write_text_records(folder / "train.jsonl", train, tokenizer)
    _write_text_records(folder / "eval.jsonl", held, tokenizer)
    task = PlantedTask(str(model_dir), str(folder / "train.jsonl"), str(folder / "eval.jsonl"), rank, list(targets),
                       seq_len, teacher_loss, base_loss)
    saved.write_text(json.dumps({"settings": settings, "task": asdict(task)}, indent=2))
    return task


def planted_config(task: PlantedTask, ranks: Sequence[int], storage_path: str, name: str = "planted",
                   **overrides: Optional[dict]) -> dict:
    """A raw search config (YAML-like dict) for a planted task: text format, the task's targets,
    max_seq_len = the sequence length; `overrides` merge into the top-level sections."""
    raw = {
        "name": name,
        "storage_path": storage_path,
        "model": {"name_or_path": task.model_dir},
        "quantization": {"compute_dtype": "float32"},
        "data": {"source": task.train_path, "eval_source": task.eval_path, "format": "text", "max_seq_len": task.seq_len},
        "lora": {"ranks": list(ranks), "alpha": "2r", "dropout": 0.0, "target_modules": list(task.targets)},
        "train": {"learning_rate": 2e-2, "lr_schedule": "cosine", "batch_size": 32, "max_steps": 200, "eval_every": 20},
        "scheduler": {"type": "none"},
        "resources": {"gpus_per_trial": 0, "cpus_per_trial": 1},
    }
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    return raw
