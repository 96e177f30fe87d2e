"""The meaning checks of a parsed search config: ranges, presets and cross-field rules (`check`),
values no user can mean (`check_limits`: names and paths the filesystem refuses, sizes above a
field's `limit`, absurd rates) and accepted-but-unusual values (`config_warnings`).

Types, `Literal[...]` choices and list element types are checked while parsing (`search.config`);
limits and path-ness are read from each field's metadata (`contract.config._doc`), so a renamed
field keeps its checks.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional

from lora_rank_search.contract.config import (ALPHA_RULES, TARGET_PRESETS, SearchConfig, _is_choice_list, learning_rates,
                             schema_fields)
from lora_rank_search.contract.storage import is_uri as _is_uri

NAME_MAX_BYTES = 255  # one folder name (Linux, macOS)
PATH_MAX_BYTES = 3800  # a whole path, leaving room for the trial folders and files below it (PATH_MAX 4096)
MAX_STEPS_LIMIT = 10_000_000  # optimizer steps per trial beyond which no budget can be meant
MAX_SEED = 2**32 - 1  # numpy's and torch's seed range
LR_REFUSED = (1e-10, 1.0)  # a learning rate outside [low, high) cannot be meant for AdamW on an adapter
LR_USUAL = (1e-6, 0.1)  # outside this range: warned about
MIN_GPU_FRACTION = 0.01
_FIELDS = {dotted: f for dotted, f, _ in schema_fields()}


def _values(cfg: SearchConfig, rule: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every field that carries this rule in its metadata."""
    for dotted, f in _FIELDS.items():
        if f.metadata.get(rule):
            value: Any = cfg
            for part in dotted.split("."):
                value = getattr(value, part)
            yield dotted, value


def check(cfg: SearchConfig) -> list[str]:
    """Problems that need more than one field's type: ranges, presets, cross-field rules (a value
    outside a field's `Literal[...]` is refused when it is parsed)."""
    p: list[str] = []

    def choice(path: str, value: Any, options: tuple) -> None:
        if value not in options:
            p.append(f"{path}: must be one of {' | '.join(options)}, got {value!r}")

    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):
        p.append(f"name: must be a non-empty folder name without '/', got {cfg.name!r}")
    if not cfg.storage_path:
        p.append(f"storage_path: must not be empty, got {cfg.storage_path!r}")

    m = cfg.model
    if not m.name_or_path:
        p.append(f"model.name_or_path: must not be empty, got {m.name_or_path!r}")

    d = cfg.data
    if isinstance(d.use_chat_template, str) and d.use_chat_template != "auto":
        p.append(f"data.use_chat_template: must be true, false or auto, got {d.use_chat_template!r}")
    if d.eval_source is not None and d.eval_split is not None:
        p.append(f"data.eval_split: give data.eval_source or data.eval_split, not both, got {d.eval_split!r}")
    if d.eval_source is None and d.eval_split is None and not (0.0 < d.eval_fraction < 1.0):
        p.append(f"data.eval_fraction: must be in (0, 1) when no eval_source is given, got {d.eval_fraction!r}")
    if d.max_seq_len <= 0:
        p.append(f"data.max_seq_len: must be a positive integer, got {d.max_seq_len!r}")
    if d.max_eval_examples is not None and d.max_eval_examples <= 0:
        p.append(f"data.max_eval_examples: must be positive or null, got {d.max_eval_examples!r}")

    lo = cfg.lora
    if not lo.ranks:
        p.append("lora.ranks: must list at least one rank, got []")
    seen: set[int] = set()
    for i, r in enumerate(lo.ranks):
        if r <= 0:
            p.append(f"lora.ranks[{i}]: rank must be a positive integer, got {r}")
        elif r in seen:
            p.append(f"lora.ranks[{i}]: duplicate rank {r}")
        seen.add(r)
    if isinstance(lo.alpha, str):
        if lo.alpha not in ALPHA_RULES:
            p.append(f"lora.alpha: must be a number or one of {' | '.join(ALPHA_RULES)}, got {lo.alpha!r}")
    elif lo.alpha <= 0:
        p.append(f"lora.alpha: must be positive, got {lo.alpha!r}")
    dropouts = lo.dropout if isinstance(lo.dropout, tuple) else (lo.dropout,)
    if not dropouts:
        p.append("lora.dropout: must list at least one dropout, got []")
    for i, dropout in enumerate(dropouts):
        where = f"lora.dropout[{i}]" if isinstance(lo.dropout, tuple) else "lora.dropout"
        if not (0.0 <= dropout < 1.0):
            p.append(f"{where}: must be in [0, 1), got {dropout!r}")
    if len(set(dropouts)) < len(dropouts):
        p.append(f"lora.dropout: duplicate values in {list(dropouts)}")
    if isinstance(lo.target_modules, str):
        choice("lora.target_modules", lo.target_modules, TARGET_PRESETS)
    elif not lo.target_modules:
        p.append("lora.target_modules: an explicit list must name at least one module, got []")
    elif _is_choice_list(lo.target_modules):
        labels: set = set()
        for i, c in enumerate(lo.target_modules):
            where = f"lora.target_modules[{i}]"
            if isinstance(c, str) and c not in TARGET_PRESETS:
                p.append(f"{where}: in a list of target choices each is a preset ({' | '.join(TARGET_PRESETS)}) or a "
                         f"list of module names (write [{c}] for one module), got {c!r}")
            elif not isinstance(c, str) and not c:
                p.append(f"{where}: an explicit list must name at least one module, got []")
            else:
                label = c if isinstance(c, str) else "+".join(c)
                if label in labels:
                    p.append(f"{where}: duplicate target choice {label!r}")
                labels.add(label)

    t = cfg.train
    rates = learning_rates(cfg)
    if not rates:
        p.append("train.learning_rate: must list at least one learning rate, got []")
    for i, lr in enumerate(rates):
        where = f"train.learning_rate[{i}]" if isinstance(t.learning_rate, tuple) else "train.learning_rate"
        if lr <= 0:
            p.append(f"{where}: must be positive, got {lr!r}")
    if len(set(rates)) != len(rates):
        p.append(f"train.learning_rate: duplicate learning rates in {list(rates)}")
    for name in ("batch_size", "grad_accum", "max_steps", "eval_every"):
        value = getattr(t, name)
        if value <= 0:
            p.append(f"train.{name}: must be a positive integer, got {value!r}")
    if t.eval_batch_size is not None and t.eval_batch_size <= 0:
        p.append(f"train.eval_batch_size: must be a positive integer or null, got {t.eval_batch_size!r}")
    if t.warmup_steps < 0:
        p.append(f"train.warmup_steps: must be >= 0, got {t.warmup_steps!r}")
    elif t.max_steps > 0 and t.warmup_steps >= t.max_steps:
        p.append(f"train.warmup_steps: must be below train.max_steps ({t.max_steps}), got {t.warmup_steps!r}")
    if t.weight_decay < 0:
        p.append(f"train.weight_decay: must be >= 0, got {t.weight_decay!r}")
    if t.max_grad_norm is not None and t.max_grad_norm <= 0:
        p.append(f"train.max_grad_norm: must be positive or null, got {t.max_grad_norm!r}")
    if t.eval_every > 0 and t.max_steps > 0 and t.eval_every > t.max_steps:
        p.append(f"train.eval_every: must be <= train.max_steps ({t.max_steps}), got {t.eval_every!r}")
    if not t.seeds:
        p.append("train.seeds: must list at least one seed, got []")
    if len(set(t.seeds)) != len(t.seeds):
        p.append(f"train.seeds: duplicate seeds in {list(t.seeds)}")

    s = cfg.scheduler
    if s.type in ("asha", "sha") and s.grace_period is not None:
        if s.grace_period <= 0:
            p.append(f"scheduler.grace_period: must be a positive number of steps, got {s.grace_period!r}")
        elif t.max_steps > 0 and s.grace_period > t.max_steps:
            p.append(f"scheduler.grace_period: must be <= train.max_steps ({t.max_steps}), got {s.grace_period!r}")
    if s.type in ("asha", "sha"):
        if s.reduction_factor < 2:
            p.append(f"scheduler.reduction_factor: must be >= 2, got {s.reduction_factor!r}")

    b = cfg.budget
    for name in ("gpu_hours", "cpu_hours", "wall_minutes"):
        value = getattr(b, name)
        if value is not None and value <= 0:
            p.append(f"budget.{name}: must be a positive number or null, got {value!r}")
    if b.probe_steps <= 0:
        p.append(f"budget.probe_steps: must be a positive integer, got {b.probe_steps!r}")

    ev = cfg.eval
    if ev.max_new_tokens <= 0:
        p.append(f"eval.max_new_tokens: must be a positive integer, got {ev.max_new_tokens!r}")
    if ev.metric is not None and ev.metric not in ("exact_match", "contains") and ":" not in ev.metric:
        p.append(f"eval.metric: must be exact_match | contains | module:function, got {ev.metric!r}")

    tr = cfg.tracking
    if tr.mlflow.tracking_uri is not None and not tr.mlflow.tracking_uri.strip():
        p.append(f"tracking.mlflow.tracking_uri: must not be empty (null = off), got {tr.mlflow.tracking_uri!r}")
    if tr.wandb.project is not None and not tr.wandb.project.strip():
        p.append(f"tracking.wandb.project: must not be empty (null = off), got {tr.wandb.project!r}")

    r = cfg.resources
    g = r.gpus_per_trial
    if isinstance(g, str):
        if g != "auto":
            p.append(f"resources.gpus_per_trial: must be a number or auto, got {g!r}")
    elif g < 0:
        p.append(f"resources.gpus_per_trial: must be >= 0, got {g!r}")
    elif g > 1 and g != int(g):
        p.append(f"resources.gpus_per_trial: above 1 it must be a whole number of GPUs, got {g!r}")
    if r.cpus_per_trial <= 0:
        p.append(f"resources.cpus_per_trial: must be a positive integer, got {r.cpus_per_trial!r}")
    if r.max_concurrent is not None and r.max_concurrent <= 0:
        p.append(f"resources.max_concurrent: must be a positive integer or null, got {r.max_concurrent!r}")
    if r.max_failures < 0:
        p.append(f"resources.max_failures: must be >= 0, got {r.max_failures!r}")
    a = r.arms_per_worker
    if isinstance(a, str) and a != "auto" or not isinstance(a, str) and a < 1:
        p.append(f"resources.arms_per_worker: must be a positive whole number or auto, got {a!r}")
    return p


def _shown(value: str, limit: int = 60) -> str:
    """repr of a string, shortened when long (the length is said)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def _path_problem(where: str, value: str) -> Optional[str]:
    """Why the filesystem would refuse this name or path, or None."""
    if "\x00" in value:
        return f"{where}: must not contain a NUL byte, got {_shown(value)}"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return f"{where}: must not contain control characters (newline, tab, ...), got {_shown(value)}"
    try:
        encoded = os.fsencode(value)
    except UnicodeError:
        return f"{where}: cannot be written as a file name on this system, got {_shown(value)}"
    if _is_uri(value):
        return None
    if where == "name":
        if len(encoded) > NAME_MAX_BYTES:
            return f"name: must be at most {NAME_MAX_BYTES} bytes (a folder name), got {_shown(value)}"
        return None
    if len(encoded) > PATH_MAX_BYTES:
        return f"{where}: path too long ({len(encoded)} bytes; at most {PATH_MAX_BYTES}), got {_shown(value)}"
    for part in encoded.split(b"/"):
        if len(part) > NAME_MAX_BYTES:
            return f"{where}: a folder or file name in it is longer than {NAME_MAX_BYTES} bytes, got {_shown(value)}"
    return None


def check_limits(cfg: SearchConfig) -> list[str]:
    """Values no user can mean: names and paths the filesystem refuses, absurd sizes and rates."""
    p: list[str] = []
    for dotted, value in _values(cfg, "path"):
        if isinstance(value, str) and value:
            problem = _path_problem(dotted, value)
            if problem:
                p.append(problem)
    experiment = cfg.experiment_path
    if not _is_uri(experiment) and not p and len(os.fsencode(os.path.abspath(os.path.expanduser(experiment)))) > PATH_MAX_BYTES:
        p.append(f"name: storage_path/name is too long a path (more than {PATH_MAX_BYTES} bytes), got {_shown(cfg.name)}")

    t = cfg.train
    if t.max_steps > MAX_STEPS_LIMIT:
        p.append(f"train.max_steps: at most {MAX_STEPS_LIMIT:,} steps per trial can be meant, got {t.max_steps!r}")
    low, high = LR_REFUSED
    for i, lr in enumerate(learning_rates(cfg)):
        where = "train.learning_rate" + (f"[{i}]" if isinstance(t.learning_rate, (list, tuple)) else "")
        if isinstance(lr, (int, float)) and lr > 0 and not (low <= lr < high):
            p.append(f"{where}: a learning rate must be in [{low:g}, {high:g}) to be meant for AdamW on an adapter, got {lr!r}")
    for i, seed in enumerate(t.seeds):
        if not (0 <= seed <= MAX_SEED):
            p.append(f"train.seeds[{i}]: a seed must be in [0, {MAX_SEED}], got {seed!r}")
    for dotted, value in _values(cfg, "limit"):
        limit = _FIELDS[dotted].metadata["limit"]
        if isinstance(value, int) and value > limit:
            p.append(f"{dotted}: at most {limit:,} can be meant, got {value!r}")
    g = cfg.resources.gpus_per_trial
    if not isinstance(g, str) and 0 < g < MIN_GPU_FRACTION:
        p.append(f"resources.gpus_per_trial: a fraction below {MIN_GPU_FRACTION:g} GPU per trial cannot be meant, got {g!r}")
    return p


def config_warnings(cfg: SearchConfig) -> list[str]:
    """Accepted but unusual values: one line each, `<field>: ...` (printed as warnings)."""
    out: list[str] = []
    t = cfg.train
    low, high = LR_USUAL
    for i, lr in enumerate(learning_rates(cfg)):
        where = "train.learning_rate" + (f"[{i}]" if isinstance(t.learning_rate, (list, tuple)) else "")
        if isinstance(lr, (int, float)) and lr > 0 and not (low <= lr <= high):
            side = "high" if lr > high else "low"
            out.append(f"{where}: {lr:g} is unusually {side} for LoRA with AdamW (usual: {low:g} to {high:g})")
    if t.eval_every > 0 and t.max_steps // t.eval_every > 1000:
        out.append(
            f"train.eval_every: {t.max_steps // t.eval_every:,} evaluations and checkpoints per trial "
            f"(max_steps {t.max_steps} / eval_every {t.eval_every}); each one costs an eval pass and a checkpoint write"
        )
    if cfg.scheduler.type != "none" and t.max_steps > 0:
        from lora_rank_search.search.space import grace_steps, rung_steps

        if not rung_steps(cfg):
            out.append(
                f"scheduler.grace_period: {grace_steps(cfg)} steps, as many as train.max_steps: {cfg.scheduler.type} has no rung "
                f"before the end, so it stops no trial early and every arm trains {t.max_steps} steps (the full grid); "
                "lower grace_period to compare the arms earlier, or set scheduler.type none"
            )
    g = cfg.resources.gpus_per_trial
    if not isinstance(g, str) and g > 1:
        idle = int(g) - 1
        out.append(
            f"resources.gpus_per_trial: {g:g} GPUs per trial, but a trial trains on one: its model is loaded on one "
            f"device, never split (`device_map={{'': device}}`), so {idle} GPU{'s' if idle > 1 else ''} per trial "
            f"stay{'' if idle > 1 else 's'} reserved and idle; use 1, or a fraction to share a GPU"
        )
    return out


# Settings that only act together with another: (dotted keys, are they idle in this config?, why).
# A key the user wrote whose setting does nothing here is warned about (`idle_settings`).
IDLE_WHEN = (
    (("scheduler.confirm",), lambda c: c.scheduler.type != "sha" and c.scheduler.confirm != "off",
     lambda c: f"confirmations run under successive halving only (scheduler.type sha), not {c.scheduler.type}"),
    (("scheduler.grace_period", "scheduler.reduction_factor"), lambda c: c.scheduler.type == "none",
     lambda c: "scheduler.type none stops no trial early"),
    (("quantization.quant_type", "quantization.double_quant", "quantization.prequantized_cache"),
     lambda c: not c.quantization.load_in_4bit, lambda c: "quantization.load_in_4bit is false"),
    (("eval.metric_mode", "eval.max_new_tokens"), lambda c: not c.eval.metric, lambda c: "eval.metric is not set"),
    (("budget.fit", "budget.probe_steps"), lambda c: not _budgeted(c),
     lambda c: "no budget is set (budget.gpu_hours, cpu_hours, wall_minutes)"),
    (("data.split",), lambda c: not _dataset(c), lambda c: f"data.source {c.data.source!r} is a file or a builtin, which has no splits"),
    (("data.subset",), lambda c: not _dataset(c), lambda c: f"data.source {c.data.source!r} is a file or a builtin, which has no subsets"),
    (("data.eval_fraction",), lambda c: bool(c.data.eval_source or c.data.eval_split),
     lambda c: "the eval examples come from " + ("data.eval_source" if c.data.eval_source else "data.eval_split")),
    (("tracking.mlflow.experiment_name",), lambda c: not c.tracking.mlflow.tracking_uri,
     lambda c: "tracking.mlflow.tracking_uri is not set (MLflow is off)"),
    (("tracking.wandb.entity", "tracking.wandb.mode", "tracking.wandb.dir"), lambda c: not c.tracking.wandb.project,
     lambda c: "tracking.wandb.project is not set (W&B is off)"),
)


def _dataset(cfg: SearchConfig) -> bool:
    from lora_rank_search.trainables.records import is_dataset_source

    return is_dataset_source(cfg.data.source)


def _budgeted(cfg: SearchConfig) -> bool:
    b = cfg.budget
    return any(v is not None for v in (b.gpu_hours, b.cpu_hours, b.wall_minutes))


def _written(raw: Any, dotted: str) -> bool:
    """Whether the raw (YAML, after --set) config holds this key with a value other than null."""
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return node is not None


def idle_settings(raw: Any, cfg: SearchConfig) -> list[str]:
    """Keys the user wrote that do nothing with the rest of this config: one warning line each,
    `<key>: <value> has no effect: <why>`, so a setting that reads as doing something is never silently idle."""
    out = []
    for keys, idle, why in IDLE_WHEN:
        for dotted in keys:
            if _written(raw, dotted) and idle(cfg):
                section, name = dotted.rsplit(".", 1)
                value = getattr(_section(cfg, section), name)
                out.append(f"{dotted}: {value!r} has no effect: {why(cfg)}")
    return out


def _section(cfg: SearchConfig, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node
