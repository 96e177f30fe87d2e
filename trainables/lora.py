"""LoRA specifics as pure functions: alpha rules, target presets, parameter counts, and attaching.

Target presets are resolved against the model's *actual* linear layer names, so the same preset
works on Llama (q_proj/v_proj), GPT-2 (c_attn), BERT-style (query/value) and fused-QKV models.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence, Union

RSLORA_ALPHA = 16.0  # lora_alpha used with the 'rslora' rule: scale = 16 / sqrt(r)

_OUTPUT_HEADS = {"lm_head", "embed_out", "output", "score", "classifier"}
_Q = {"q_proj", "query", "q", "wq", "q_lin"}
_V = {"v_proj", "value", "v", "wv", "v_lin"}
_FUSED_QKV = {"qkv_proj", "c_attn", "query_key_value", "Wqkv", "W_pack", "qkv"}
_ATTENTION_PARENTS = ("attn", "attention")


class TargetError(ValueError):
    """target_modules names something the model does not have."""


def lora_alpha(rule: Union[float, str], r: int) -> tuple[float, bool]:
    """(lora_alpha, use_rslora) for an alpha rule at rank r.

    'r' gives scale alpha/r = 1, '2r' gives scale 2 (the same effective step size at every rank,
    so early stopping compares ranks fairly); 'rslora' gives alpha 16 with PEFT's alpha/sqrt(r) scaling; a
    number is used as is (PEFT's default behaviour: the scale shrinks as r grows).
    """
    if rule == "r":
        return float(r), False
    if rule == "2r":
        return 2.0 * r, False
    if rule == "rslora":
        return RSLORA_ALPHA, True
    return float(rule), False


def lora_scale(rule: Union[float, str], r: int) -> float:
    """The factor PEFT multiplies B·A by: alpha/r, or alpha/sqrt(r) with rsLoRA."""
    alpha, rs = lora_alpha(rule, r)
    return alpha / (math.sqrt(r) if rs else r)


def linear_layers(model) -> dict[str, tuple[int, int]]:
    """Every linear-like layer of a model (meta device is fine): full name -> (in, out) features.

    Counts torch Linear (including bitsandbytes Linear4bit/Linear8bitLt, which subclass it) and
    GPT-2 style Conv1D. Output heads (lm_head, ...) are excluded: LoRA is not put there.
    """
    import torch

    out: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _OUTPUT_HEADS or not name:
            continue
        if isinstance(module, torch.nn.Linear):
            out[name] = (int(module.in_features), int(module.out_features))
        elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            weight = module.weight  # Conv1D stores (in, out)
            out[name] = (int(weight.shape[0]), int(weight.shape[1]))
    return out


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _is_attention(name: str) -> bool:
    parent = name.rsplit(".", 1)[0].lower() if "." in name else ""
    return any(part in parent for part in _ATTENTION_PARENTS)


def resolve_targets(spec: Union[str, Sequence[str]], layer_names: Iterable[str]) -> list[str]:
    """Resolve a preset or explicit list to the sorted leaf names PEFT should target.

    Raises TargetError (listing the model's linear layer names) when nothing matches.
    """
    names = list(layer_names)
    leaves = sorted({_leaf(n) for n in names})
    if isinstance(spec, str):
        attention = sorted({_leaf(n) for n in names if _is_attention(n)})
        if spec == "all-linear":
            chosen = leaves
        elif spec == "attention":
            chosen = attention
        elif spec == "attention-qv":
            chosen = sorted(x for x in attention if x in _Q | _V)
            if not chosen:
                chosen = sorted(x for x in attention if x in _FUSED_QKV)
        else:
            raise TargetError(f"unknown target preset {spec!r}")
        if not chosen:
            raise TargetError(
                f"preset {spec!r} matches no linear layer of this model; its linear layers are: {', '.join(leaves)}"
            )
        return chosen
    missing = [s for s in spec if s not in leaves and s not in names]
    if missing:
        raise TargetError(
            f"{', '.join(repr(m) for m in missing)} not found; the model's linear layers are: {', '.join(leaves)}"
        )
    return sorted(set(spec))


def targeted_layers(shapes: Mapping[str, tuple[int, int]], targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """The subset of `linear_layers` output that a resolved target list selects."""
    wanted = set(targets)  # PEFT's rule: a layer matches a target equal to its name or a dotted suffix of it
    return {n: s for n, s in shapes.items() if any(n == t or n.endswith("." + t) for t in wanted)}


def lora_param_count(shapes: Mapping[str, tuple[int, int]], targets: Sequence[str], r: int) -> int:
    """Trainable LoRA parameters: sum of r*(in+out) over targeted layers (A is r x in, B is out x r)."""
    return sum(r * (i + o) for i, o in targeted_layers(shapes, targets).values())


def peft_config(r: int, rule: Union[float, str], dropout: float, targets: Sequence[str]):
    """The peft.LoraConfig a trial uses."""
    from peft import LoraConfig

    alpha, rs = lora_alpha(rule, r)
    return LoraConfig(
        r=int(r),
        lora_alpha=alpha,
        use_rslora=rs,
        lora_dropout=float(dropout),
        target_modules=list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


def rank_problems(ranks: Sequence[int], shapes: Mapping[str, tuple[int, int]], targets: Sequence[str]) -> tuple[list[str], list[str]]:
    """(refusals, warnings) for ranks the targeted layers cannot use.

    A rank-r update B·A of a layer with `in` inputs and `out` outputs has rank at most
    min(in, out): a larger r adds parameters and no capacity. Ranks above that bound on *every*
    targeted layer are refused (naming the largest meaningful rank); ranks above it on some
    layers are warned about.
    """
    layers = targeted_layers(shapes, targets)
    if not layers:
        return [], []
    bounds = {name: min(i, o) for name, (i, o) in layers.items()}
    largest, smallest = max(bounds.values()), min(bounds.values())
    refused, warned = [], []
    for index, r in enumerate(ranks):
        if r > largest:
            refused.append(
                f"lora.ranks[{index}]: rank {r} is larger than the targeted layers allow; the largest meaningful rank is "
                f"{largest} (min(in, out) of the widest targeted layer; targets {', '.join(targets)})"
            )
        elif r > smallest:
            narrow = sorted({_leaf(n) for n, b in bounds.items() if b < r})
            warned.append(
                f"lora.ranks[{index}]: rank {r} exceeds min(in, out) = {smallest} of {', '.join(narrow)}: there it adds "
                "parameters but no capacity"
            )
    return refused, warned
