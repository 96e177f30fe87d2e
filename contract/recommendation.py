"""recommendation.json: every field the verdict writes, with its kind, declared once.

`analysis.selection.Recommendation` is the object; this is the file's contract, read by people and
tools downstream (`lora-rank export`, a CI job choosing a rank). `problems` names what breaks it: a
field not declared here, a value of the wrong kind, a count that is not an integer (at any depth:
the per-rank evidence inside `units` and `ranks` holds counts too). Pure Python.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

# kinds: count (an integer, or null when unknown), number (null for NaN), text, flag, list, object (a mapping or null)
FIELDS = {
    "rank": "count", "tolerance": "number", "reason": "text", "rule_name": "text", "base_eval_loss": "number",
    "learning_rate": "number", "gain_share": "number", "evidence_step": "count", "loss": "number", "ref_rank": "count",
    "ref_loss": "number", "threshold": "number", "gap": "number", "best_rank": "count", "best_step": "count",
    "best_loss": "number", "knee": "count", "trial_id": "text", "lora_alpha": "number", "alpha_rule": "text",
    "targets": "list", "learning_rates": "list", "nuisance": "object", "searched": "list", "ranks": "list",
    "target_choice": "text", "trainable_params": "count", "adapter_bytes": "count", "best_choice": "text", "units": "list",
    "choices": "list", "close": "list", "excluded": "list", "no_signal": "flag", "rule": "text", "quantity": "text",
    "metric_mode": "text", "base_eval_metric": "number", "eval_metric": "number", "base_eval_loss_measured": "number",
    "metric_errors": "list", "confirm_mode": "text", "confirmations": "list", "confirm_why_none": "text",
    "without_confirmations": "object", "verdict_changed": "flag", "unopposed_without_confirmations": "flag",
    # beside the verdict (analysis.report)
    "experiment": "text", "lora_dropout": "number", "lora_config": "text", "damaged_trials": "list", "diagnosis": "list",
}
# keys that hold a count wherever they appear (the file's fields and the evidence nested in it): written as integers
COUNTS = frozenset({"trainable_params", "adapter_bytes", "step", "steps", "best_step", "evidence_step", "tokens_seen", "r",
                    "from_step", "rank", "max_step", "compared_step", "ref_rank", "best_rank", "knee", "failed_seeds"})

_KINDS = {
    "count": lambda v: v is None or (isinstance(v, numbers.Integral) and not isinstance(v, bool)),
    "number": lambda v: v is None or (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)),
    "text": lambda v: v is None or isinstance(v, str),
    "flag": lambda v: v is None or isinstance(v, bool),
    "list": lambda v: isinstance(v, list),
    "object": lambda v: v is None or isinstance(v, Mapping),
}


def json_safe(value: Any) -> Any:
    """JSON-safe: NaN -> None, numpy scalars -> Python, a finite count (`COUNTS`) -> int."""
    if isinstance(value, Mapping):
        return {k: _count(json_safe(v)) if k in COUNTS else json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(float(value)) else None
    if type(value).__name__ == "bool_":  # numpy's bool
        return bool(value)
    return value


def _count(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def problems(document: Mapping[str, Any]) -> list[str]:
    """What in a recommendation.json document breaks the contract (empty when nothing)."""
    out = [f"{key}: not a declared field of recommendation.json" for key in document if key not in FIELDS]
    for key, kind in FIELDS.items():
        if key not in document:
            out.append(f"{key}: missing")
        elif not _KINDS[kind](document[key]):
            out.append(f"{key}: expected a {kind}, got {document[key]!r}")
    out += _count_problems(document, "")
    return out


def _count_problems(value: Any, where: str) -> list[str]:
    out = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if key in COUNTS and not _KINDS["count"](item):
                out.append(f"{path}: a count must be an integer, got {item!r}")
            else:
                out += _count_problems(item, path)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _count_problems(item, f"{where}[{i}]")
    return out
