"""Exact LoRA parameter counts and adapter file sizes from a model's config alone.

The model is built on the meta device (names and shapes, no weights, no memory), the layers a
LoRA can sit on are listed (`trainables.lora.linear_layers`: linear layers, and on mixture-of-experts
models the experts' fused 3-D weights and the router), the target preset is resolved against them
exactly as a search does, and for each rank r the adapter has r * (in + out) parameters per targeted
linear layer (A is r x in, B is out x r), r' * E * (in + out) per targeted expert weight (E experts;
r' = 2r on the fused gate_up_proj, PEFT's rule) - what PEFT's `get_nb_trainable_parameters()`
reports for the trial's own LoraConfig (`trainables.lora.peft_config`); tests check it on real
models of several architectures.

Adapter size (bytes) is the size of PEFT's `adapter_model.safetensors`, computed exactly without
writing it: an 8-byte header length, the JSON header (one entry per tensor, named
`base_model.model.<module>.lora_{A,B}.weight`; for parameter targets the module holding the
parameter, nested as `<module>.base_layer.lora_*` when PEFT wraps two parameters of one module), dtype F32, shape, data offsets, plus PEFT's
`{"format": "pt"}` metadata; tensors sorted by name; padded with spaces to a multiple of 8), then
params x 4 bytes (fp32, PEFT's default adapter dtype). A test checks it against real files.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

BYTES_PER_PARAM = 4  # fp32: the dtype PEFT saves a LoRA adapter in by default
SAFETENSORS_METADATA = {"format": "pt"}  # what PEFT passes to safetensors' save_file


@dataclass
class ParamRow:
    """One (target preset, rank) line of the calculator; sizes in bytes."""

    targets_spec: str
    targets: list
    r: int
    layers: int  # number of adapted linear layers and expert / router weights
    params: int
    adapter_bytes: int
    base_params: int

    @property
    def percent_of_base(self) -> float:
        return 100.0 * self.params / self.base_params if self.base_params else float("nan")


def adapter_file_bytes(shapes: Mapping[str, tuple[int, int]], r: int, dtype_bytes: int = BYTES_PER_PARAM,
                       params: Optional[Mapping[str, tuple]] = None) -> int:
    """Exact size of PEFT's adapter_model.safetensors for rank r on these layers (name -> (in, out))
    and parameter targets (name -> (in, out, experts, index among the module's parameters))."""
    from lora_rank_search.trainables.lora import param_rank

    entries = []
    for name, (fan_in, fan_out) in shapes.items():
        prefix = f"base_model.model.{name}"
        entries.append((f"{prefix}.lora_A.weight", [r, fan_in]))
        entries.append((f"{prefix}.lora_B.weight", [fan_out, r]))
    by_module: dict = {}
    for name, (fan_in, fan_out, experts, index) in (params or {}).items():
        by_module.setdefault(name.rsplit(".", 1)[0], []).append((index, name, fan_in, fan_out, experts))
    for module, items in by_module.items():
        items.sort()  # PEFT wraps them in the module's parameter order: the first one ends up innermost
        for depth, (_, name, fan_in, fan_out, experts) in enumerate(items):
            rank = param_rank(name, r) * experts
            prefix = f"base_model.model.{module}" + ".base_layer" * (len(items) - 1 - depth)
            entries.append((f"{prefix}.lora_A.weight", [rank, fan_in]))
            entries.append((f"{prefix}.lora_B.weight", [fan_out, rank]))
    entries.sort()
    header: dict = {"__metadata__": SAFETENSORS_METADATA}
    offset = 0
    for tensor, shape in entries:
        size = shape[0] * shape[1] * dtype_bytes
        header[tensor] = {"dtype": "F32" if dtype_bytes == 4 else f"{dtype_bytes * 8}BIT", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"))
    padded = len(text) + (-len(text)) % 8
    return 8 + padded + offset


def parameter_table(
    model: str, ranks: Sequence[int], target_specs: Sequence[Union[str, Sequence[str]]], trust_remote_code: bool = False
) -> tuple[list[ParamRow], dict]:
    """Rows for every (target spec, rank) and facts about the model (no weights are loaded).

    Raises ValueError naming the bad rank or target (with the model's linear layers listed).
    """
    from lora_rank_search.trainables.lora import (
        TargetError,
        linear_layers,
        lora_param_count,
        resolve_targets,
        targeted_layers,
        targeted_params,
    )
    from lora_rank_search.trainables.model import meta_model, resolve_model

    bad = [r for r in ranks if not isinstance(r, int) or isinstance(r, bool) or r < 1]
    if bad or not ranks:
        raise ValueError(f"--ranks: ranks must be positive integers, got {list(ranks)!r}")
    empty = [spec for spec in target_specs if not spec]
    if empty or not target_specs:
        raise ValueError("--targets: an empty value names no layer; give a preset (attention, mlp, all-linear, ...) or "
                         "comma-separated layer names, got ''")
    started = time.perf_counter()
    # a config.json is read as it is (resolve_model wants a model folder, and refused one by absolute path)
    path = model if os.path.isfile(model) and model.endswith(".json") else resolve_model(model)
    problems = config_field_problems(path)
    if problems:
        raise ValueError("\n".join(problems))
    try:
        from huggingface_hub.errors import StrictDataclassError  # transformers 5's typed configs raise it
    except ImportError:  # pragma: no cover - older huggingface_hub
        StrictDataclassError = TypeError
    try:
        meta = meta_model(path, trust_remote_code)
    except (StrictDataclassError, TypeError) as exc:
        raise ValueError(f"MODEL: cannot read the model config of {model!r}: {' '.join(str(exc).split())}") from None
    shapes = linear_layers(meta)
    base = sum(p.numel() for p in meta.parameters())
    rows = []
    seen: dict = {}  # resolved targets -> the first spec that chose them
    notes: list[str] = []
    for spec in target_specs:
        try:
            targets = resolve_targets(spec, shapes)
        except TargetError as exc:
            problems.append(f"--targets {spec if isinstance(spec, str) else ','.join(spec)}: {exc}")
            continue
        chosen, params = targeted_layers(shapes, targets), targeted_params(shapes, targets)
        label = spec if isinstance(spec, str) else ",".join(spec)
        key = tuple(sorted(targets))
        if key in seen:
            notes.append(f"--targets {label} selects the same layers as {seen[key]}")
        seen.setdefault(key, label)
        for r in ranks:
            rows.append(ParamRow(label, targets, int(r), len(chosen) + len(params), lora_param_count(shapes, targets, r),
                                 adapter_file_bytes(chosen, r, params=params), int(base)))
    if problems:
        raise ValueError("\n".join(problems))
    config = meta.config
    facts = {
        "model": model,
        "model_type": getattr(config, "model_type", ""),
        "base_params": int(base),
        "linear_layers": len(shapes),
        "expert_weights": sum(1 for n in shapes.params if shapes.place.get(n) == "experts"),
        "expert_params": sum(i * o * e for n, (i, o, e, _) in shapes.params.items() if shapes.place.get(n) == "experts"),
        "notes": notes + _notes(shapes),
        "seconds": time.perf_counter() - started,
    }
    return rows, facts


SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")  # a count is wrong without them


def config_field_problems(path: str) -> list[str]:
    """What a local config.json lacks or holds wrongly among SIZE_FIELDS (under the model type's own
    names, e.g. GPT-2's n_embd): transformers would fill in its defaults and count another model.
    [] for a hub id, or a config whose model type transformers does not know (reported later)."""
    import os

    from transformers import CONFIG_MAPPING

    file = path if os.path.isfile(path) else os.path.join(path, "config.json")
    try:
        with open(file) as handle:
            raw = json.load(handle)
    except (OSError, ValueError):
        return []
    if not isinstance(raw, dict) or raw.get("model_type") not in CONFIG_MAPPING:
        return []
    sections = [raw] + [raw[k] for k in ("text_config",) if isinstance(raw.get(k), dict)]
    aliases = getattr(CONFIG_MAPPING[raw["model_type"]], "attribute_map", {}) or {}
    problems = []
    for name in SIZE_FIELDS:
        keys = [name] + ([aliases[name]] if name in aliases else [])
        found = [(key, section[key]) for section in sections for key in keys if key in section]
        if not found:
            problems.append(f"MODEL: {file} lacks {name}" + (f" (or {aliases[name]})" if name in aliases else "")
                            + "; transformers would fill in a default and count a different model")
            continue
        key, value = found[-1]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"MODEL: {file} {key}: expected a positive integer, got {value!r}")
    return problems


def _notes(shapes) -> list[str]:
    """What a reader of the table must know about this model's targets (MoE models)."""
    notes = []
    if shapes.params:
        notes.append("mixture of experts: the experts' fused weights (3-D, all experts of a layer in one tensor) are "
                     "adapted as PEFT target_parameters, one rank-r LoRA per expert (rank 2r on the fused gate_up_proj, "
                     "as PEFT's own all-linear does); bitsandbytes does not quantize them (they stay in the compute "
                     "dtype); PEFT allows no dropout on them (lora.dropout must be 0). mlp and experts select them, "
                     "all-linear adds the router")
    if shapes.renamed:
        names = sorted(shapes.renamed)
        notes.append(f"not adaptable here: {len(names)} linear layers ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): "
                     f"PEFT 0.21 on transformers 5 rewrites targets named {', '.join(sorted(set(shapes.renamed.values())))} "
                     f"on a {shapes.model_type} model into the experts' weights, so no preset selects them")
    return notes


def _count(n: int) -> str:
    return f"{n:,}"


def format_params(rows: list[ParamRow], facts: dict) -> str:
    """The calculator's table as text."""
    experts = (f", {facts['expert_weights']} expert weight tensors ({facts['expert_params']:,} parameters)"
               if facts.get("expert_weights") else "")
    head = (f"{facts['model']} ({facts['model_type']}, {facts['base_params']:,} parameters, "
            f"{facts['linear_layers']} linear layers{experts}; config only, no weights loaded)")
    headers = ["targets", "r", "layers", "trainable params", "% of base", "adapter (fp32 safetensors)"]
    body = [[row.targets_spec, str(row.r), str(row.layers), _count(row.params), f"{row.percent_of_base:.3f}%",
             f"{row.adapter_bytes / 1e6:,.2f} MB ({row.adapter_bytes:,} B)"] for row in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
    lines = [head, "", "  ".join(h.rjust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    resolved = {row.targets_spec: row.targets for row in rows}
    lines += [""] + [f"{spec}: {', '.join(t)}" for spec, t in resolved.items()]
    lines += [f"note: {note}" for note in facts.get("notes", [])]
    return "\n".join(lines)
