"""Loading a search config: strict YAML, `--set` overrides, parsing against the schema
(`contract.config`) and the checks, every problem collected and raised once as a `ConfigError`,
each line naming the field path and the bad value (``lora.ranks[2]: rank must be a positive
integer, got 0``). Unknown keys are errors. Also the README's generated reference blocks.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from contract.config import (  # noqa: F401 - the schema, re-exported for the driver's modules
    ALPHA_RULES, BUDGET_FITS, COMPUTE_DTYPES, CONFIRM_MODES, DATA_FORMATS, DEFAULT_CONFIRM, GRACE_FRACTION, LR_SCHEDULES,
    METRIC_MODES, SCHEDULER_TYPES, TARGET_PRESETS, WANDB_MODES, BudgetConfig, ConfigError, DataConfig, EvalConfig,
    LoraConfig, MlflowConfig, ModelConfig, QuantizationConfig, ResourcesConfig, SchedulerConfig, SearchConfig,
    TrackingConfig, TrainConfig, TrialSettings, WandbConfig, _is_choice_list, _plain, arm_values, learning_rates,
    target_choices,
)


# --------------------------------------------------------------------------- parsing (types)

_ELEMENT_TYPES = {  # tuple-typed fields: element type
    ("lora", "ranks"): int,
    ("lora", "target_modules"): str,
    ("train", "seeds"): int,
    ("train", "learning_rate"): float,
    ("lora", "dropout"): float,
}


def _is_number_string(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def _coerce_scalar(value: Any, kind: type, path: str, errors: list[str]) -> Any:
    """Return value converted to `kind`, or the sentinel _BAD after recording an error."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        errors.append(f"{path}: expected true or false, got {value!r}")
        return _BAD
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            errors.append(f"{path}: expected an integer, got {value!r}")
            return _BAD
        if isinstance(value, str) and not _is_number_string(value):
            errors.append(f"{path}: expected an integer, got {value!r}")
            return _BAD
        number = float(value)
        if not math.isfinite(number) or number != int(number):
            errors.append(f"{path}: expected an integer, got {value!r}")
            return _BAD
        return int(number)
    if kind is float:
        if isinstance(value, bool) or not (isinstance(value, (int, float)) or _is_number_string(value)):
            errors.append(f"{path}: expected a number, got {value!r}")
            return _BAD
        number = float(value)
        if not math.isfinite(number):
            errors.append(f"{path}: expected a finite number, got {value!r}")
            return _BAD
        return number
    if kind is str:
        if isinstance(value, str):
            return value
        errors.append(f"{path}: expected a string, got {value!r}")
        return _BAD
    raise TypeError(kind)  # pragma: no cover - schema bug


class _Bad:
    def __repr__(self) -> str:
        return "<bad>"


_BAD = _Bad()


def _union_args(tp: Any) -> tuple:
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return typing.get_args(tp)
    return (tp,)


def _coerce(value: Any, tp: Any, key: tuple, path: str, errors: list[str]) -> Any:
    options = _union_args(tp)
    if value is None:
        if type(None) in options:
            return None
        errors.append(f"{path}: a value is required, got null")
        return _BAD
    options = tuple(o for o in options if o is not type(None))
    if key == ("lora", "target_modules") and isinstance(value, (list, tuple)):
        return _coerce_targets(value, path, errors)
    if tuple in options and isinstance(value, (list, tuple)):
        element = _ELEMENT_TYPES[key]
        items = [_coerce_scalar(v, element, f"{path}[{i}]", errors) for i, v in enumerate(value)]
        return _BAD if any(i is _BAD for i in items) else tuple(items)
    scalars = [o for o in options if o is not tuple]
    if not scalars:
        errors.append(f"{path}: expected a list, got {value!r}")
        return _BAD
    if len(scalars) == 1:
        return _coerce_scalar(value, scalars[0], path, errors)
    # Unions of scalars (float|str, bool|str): numbers (and numeric strings) become floats, bools
    # stay bools, other strings stay strings.
    if float in scalars and not isinstance(value, bool) and (isinstance(value, (int, float)) or _is_number_string(value)):
        return _coerce_scalar(value, float, path, errors)
    if int in scalars and not isinstance(value, bool) and (isinstance(value, (int, float)) or _is_number_string(value)):
        return _coerce_scalar(value, int, path, errors)
    if bool in scalars and isinstance(value, bool):
        return value
    if str in scalars and isinstance(value, str):
        return value
    names = " or ".join({bool: "true/false", float: "a number", str: "a string", int: "an integer"}[k] for k in scalars)
    errors.append(f"{path}: expected {names}, got {value!r}")
    return _BAD


def _coerce_targets(value: list, path: str, errors: list[str]) -> Any:
    """lora.target_modules as a list: names (one explicit choice), or choices (names or lists of names)."""
    items: list = []
    for i, v in enumerate(value):
        if isinstance(v, (list, tuple)):
            inner = [_coerce_scalar(x, str, f"{path}[{i}][{j}]", errors) for j, x in enumerate(v)]
            items.append(_BAD if any(x is _BAD for x in inner) else tuple(inner))
        else:
            items.append(_coerce_scalar(v, str, f"{path}[{i}]", errors))
    return _BAD if any(i is _BAD for i in items) else tuple(items)


def _parse_section(cls: type, raw: Any, path: str, errors: list[str]) -> Any:
    if raw is None and path:
        errors.append(f"{path}: a mapping of keys is required, got null (leave the section out to use its defaults)")
        return cls()
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{path or 'config'}: expected a mapping of keys, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            where = f"{path}.{key}" if path else str(key)
            errors.append(f"{where}: unknown key (valid keys: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        where = f"{path}.{name}" if path else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _parse_section(tp, raw[name], where, errors)
            continue
        section = path.split(".")[-1] if path else ""
        value = _coerce(raw[name], tp, (section, name), where, errors)
        if value is not _BAD:
            values[name] = value
    return cls(**values)


# --------------------------------------------------------------------------- checks (meaning)


from contract.storage import is_uri as _is_uri  # noqa: E402 - beside its only users


def _check(cfg: SearchConfig) -> list[str]:
    """Problems that need more than one field's type: ranges, choices, cross-field rules."""
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

    q = cfg.quantization
    choice("quantization.quant_type", q.quant_type, ("nf4", "fp4"))
    choice("quantization.compute_dtype", q.compute_dtype, COMPUTE_DTYPES)

    d = cfg.data
    choice("data.format", d.format, DATA_FORMATS)
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
    choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
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
    choice("scheduler.type", s.type, SCHEDULER_TYPES)
    choice("scheduler.confirm", s.confirm, CONFIRM_MODES)
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
    choice("budget.fit", b.fit, BUDGET_FITS)
    if b.probe_steps <= 0:
        p.append(f"budget.probe_steps: must be a positive integer, got {b.probe_steps!r}")

    ev = cfg.eval
    choice("eval.metric_mode", ev.metric_mode, METRIC_MODES)
    if ev.max_new_tokens <= 0:
        p.append(f"eval.max_new_tokens: must be a positive integer, got {ev.max_new_tokens!r}")
    if ev.metric is not None and ev.metric not in ("exact_match", "contains") and ":" not in ev.metric:
        p.append(f"eval.metric: must be exact_match | contains | module:function, got {ev.metric!r}")

    tr = cfg.tracking
    choice("tracking.wandb.mode", tr.wandb.mode, WANDB_MODES)
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


# --------------------------------------------------------------------------- entry points


def _absolutize(cfg: SearchConfig, base: Path) -> SearchConfig:
    """Local relative paths are relative to the working directory; made absolute for Ray workers."""

    def fix(path: Optional[str]) -> Optional[str]:
        if path is None or _is_uri(path) or path.startswith("builtin:"):
            return path
        expanded = os.path.expanduser(path)
        candidate = base / expanded
        if os.path.isabs(expanded) or candidate.exists() or path.startswith((".", "~")):
            return str(candidate.resolve())
        return path  # a hub id like org/name

    storage = cfg.storage_path
    if storage and not _is_uri(storage):
        storage = str((base / os.path.expanduser(storage)).resolve())
    return dataclasses.replace(
        cfg,
        storage_path=storage,
        model=dataclasses.replace(cfg.model, name_or_path=fix(cfg.model.name_or_path)),
        data=dataclasses.replace(cfg.data, source=fix(cfg.data.source), eval_source=fix(cfg.data.eval_source)),
    )


def apply_overrides(raw: dict, overrides: list[str], errors: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML) onto a raw config dict."""
    out = dict(raw)
    for item in overrides:
        if "=" not in item:
            errors.append(f"--set {item}: expected key.sub=value")
            continue
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def parse_config(raw: Any, source: str = "config", base_dir: Optional[Path] = None) -> SearchConfig:
    """Parse and validate a raw (YAML-loaded) mapping; raises ConfigError listing every problem."""
    errors: list[str] = []
    cfg = _parse_section(SearchConfig, raw, "", errors)
    # Fields with a type error keep their default; skip meaning checks that involve them.
    bad = {e.split(":", 1)[0].split("[", 1)[0] for e in errors}
    errors.extend(p for p in _check(cfg) + _check_limits(cfg) if not any(b in p for b in bad))
    if errors:
        raise ConfigError(errors, source)
    return _absolutize(cfg, base_dir or Path.cwd())


def load_config(path: str | os.PathLike, overrides: Optional[list[str]] = None) -> SearchConfig:
    """Read a YAML config file (safe loader), apply ``--set`` overrides, validate."""
    path = Path(path)
    source = str(path)
    raw = _read_yaml(path)
    errors: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}"], source)
    raw = apply_overrides(raw, overrides or [], errors)
    try:
        cfg = parse_config(raw, source)
    except ConfigError as exc:
        errors.extend(exc.problems)
        raise ConfigError(errors, source) from None
    if errors:
        raise ConfigError(errors, source)
    for line in config_warnings(cfg):
        warn(line)
    return cfg


def describe_schema() -> str:
    """Markdown table of every key, its default and its description (for the README)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")
                continue
            shown = yaml.safe_dump(_plain(default), default_flow_style=True).strip().removesuffix("...").strip()
            doc = f.metadata.get("doc", "").replace("|", "\\|")
            lines.append(f"| `{prefix}{f.name}` | `{shown}` | {doc} |")

    walk(SearchConfig, "")
    return "\n".join(lines)


README_MARKERS = ("<!-- config-reference:start -->", "<!-- config-reference:end -->")
METRICS_MARKERS = ("<!-- metrics-reference:start -->", "<!-- metrics-reference:end -->")


def readme_blocks() -> dict:
    """(start, end) markers -> the generated text between them."""
    from contract.metrics import describe_metrics

    return {README_MARKERS: describe_schema(), METRICS_MARKERS: describe_metrics()}


def update_readme(path: str | os.PathLike = "README.md") -> bool:
    """Rewrite the generated blocks (config and metrics reference) between the README markers;
    True if anything changed (`make docs`)."""
    text = original = Path(path).read_text()
    for (start, end), body in readme_blocks().items():
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{body}\n{end}{tail}"
    if text != original:
        Path(path).write_text(text)
    return text != original


# --------------------------------------------------------------------------- reading the file, limits, warnings

NAME_MAX_BYTES = 255  # one folder name (Linux, macOS)
PATH_MAX_BYTES = 3800  # a whole path, leaving room for the trial folders and files below it (PATH_MAX 4096)
MAX_STEPS_LIMIT = 10_000_000  # optimizer steps per trial beyond which no budget can be meant
MAX_SEED = 2**32 - 1  # numpy's and torch's seed range
LR_REFUSED = (1e-10, 1.0)  # a learning rate outside [low, high) cannot be meant for AdamW on an adapter
LR_USUAL = (1e-6, 0.1)  # outside this range: warned about
SIZE_LIMITS = {  # (section, key): the largest value that can be meant
    ("train", "batch_size"): 65536,
    ("train", "eval_batch_size"): 65536,
    ("train", "grad_accum"): 65536,
    ("data", "max_seq_len"): 1_048_576,
    ("resources", "max_failures"): 100,
}
MIN_GPU_FRACTION = 0.01
PATH_FIELDS = ("name", "storage_path", "model.name_or_path", "model.gguf_file", "data.source", "data.eval_source")


def warn(line: str) -> None:
    """Print one `warning: <field>: ...` line to stderr: accepted, but probably not what was meant."""
    import sys

    print(f"warning: {line}", file=sys.stderr)


class _StrictLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping (YAML would keep the last silently)."""

    duplicates: list


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        try:
            key = loader.construct_object(key_node, deep=True)
            hash(key)
        except TypeError:
            continue  # an unhashable key: the base constructor reports it
        if key in seen:
            loader.duplicates.append(
                f"{key}: key given twice in one mapping (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                "YAML would silently keep the last"
            )
        else:
            seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> dict:
    """The config file as a mapping; ConfigError for an unreadable, non-UTF-8, invalid, duplicated-key
    or empty file."""
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        what = "is a folder, not a config file" if path.is_dir() else f"cannot read config file ({exc.strerror or exc})"
        raise ConfigError([f"{path}: {what}"], source) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            [f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); save the config as UTF-8"], source
        ) from None
    loader = _StrictLoader(text)
    loader.duplicates = []
    try:
        raw = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML ({str(exc).splitlines()[0]})"], source) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise ConfigError(loader.duplicates, source)
    if raw is None or raw == {}:
        raise ConfigError(
            [f"{path}: the config is empty; an empty config would run the whole default search. Give at least "
             "model: and data: (configs/quickstart.yaml is a complete example)"],
            source,
        )
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}"], source)
    return raw


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


def _check_limits(cfg: SearchConfig) -> list[str]:
    """Values no user can mean: names and paths the filesystem refuses, absurd sizes and rates."""
    p: list[str] = []
    plain = cfg.to_dict()
    for dotted in PATH_FIELDS:
        value: Any = plain
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
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
    for (section, key), limit in SIZE_LIMITS.items():
        value = getattr(getattr(cfg, section), key)
        if isinstance(value, int) and value > limit:
            p.append(f"{section}.{key}: at most {limit:,} can be meant, got {value!r}")
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
    return out
