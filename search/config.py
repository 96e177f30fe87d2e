"""Loading a search config: strict YAML, `--set` overrides, parsing against the schema
(`contract.config`: types, `Literal[...]` choices and list element types come from each field's
annotation) and the meaning checks (`search.checks`), every problem collected and raised once as a
`ConfigError`, each line naming the field path and the bad value (``lora.ranks[2]: rank must be a
positive integer, got 0``). Unknown keys are errors. Also the README's generated reference blocks.
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

from lora_rank_search.contract.config import (  # noqa: F401 - the schema, re-exported for the driver's modules
    ALPHA_RULES, BUDGET_FITS, COMPUTE_DTYPES, CONFIRM_MODES, DATA_FORMATS, DEFAULT_CONFIRM, GRACE_FRACTION, LR_SCHEDULES,
    METRIC_MODES, SCHEDULER_TYPES, TARGET_PRESETS, WANDB_MODES, BudgetConfig, ConfigError, DataConfig, EvalConfig,
    LoraConfig, MlflowConfig, ModelConfig, QuantizationConfig, ResourcesConfig, SchedulerConfig, SearchConfig,
    TrackingConfig, TrainConfig, TrialSettings, WandbConfig, _is_choice_list, _plain, arm_values, learning_rates,
    target_choices,
)
from lora_rank_search.contract.storage import is_uri as _is_uri
from lora_rank_search.search.checks import check, check_limits, config_warnings, idle_settings  # noqa: F401 - config_warnings: re-exported


# --------------------------------------------------------------------------- parsing (types)

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


_YAML_BOOL_WORDS = {False: ("off", "no", "false"), True: ("on", "yes", "true")}


def _coerce(value: Any, tp: Any, f: dataclasses.Field, path: str, errors: list[str]) -> Any:
    """The value converted to the field's type (`tuple[T, ...]`: a list of T; `Literal[...]`: one
    of those strings), or _BAD after recording the problem."""
    options = _union_args(tp)
    if value is None:
        if type(None) in options:
            return None
        errors.append(f"{path}: a value is required, got null")
        return _BAD
    options = tuple(o for o in options if o is not type(None))
    if f.metadata.get("targets") and isinstance(value, (list, tuple)):
        return _coerce_targets(value, path, errors)
    lists = [o for o in options if o is tuple or typing.get_origin(o) is tuple]
    if lists and isinstance(value, (list, tuple)):
        element = (typing.get_args(lists[0]) or (str,))[0]
        items = [_coerce_scalar(v, element, f"{path}[{i}]", errors) for i, v in enumerate(value)]
        return _BAD if any(i is _BAD for i in items) else tuple(items)
    literal = next((o for o in options if typing.get_origin(o) is typing.Literal), None)
    if literal is not None:
        allowed = typing.get_args(literal)
        if isinstance(value, bool):  # YAML 1.1 reads `off`, `no`, `on`, `yes` as booleans: the word was meant
            value = next((word for word in _YAML_BOOL_WORDS[value] if word in allowed), value)
        if not isinstance(value, str) or value not in allowed:
            errors.append(f"{path}: must be one of {' | '.join(allowed)}, got {value!r}")
            return _BAD
        return value
    scalars = [o for o in options if o not in lists]
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
        value = _coerce(raw[name], tp, f, where, errors)
        if value is not _BAD:
            values[name] = value
    return cls(**values)


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
    errors.extend(p for p in check(cfg) + check_limits(cfg) if not any(b in p for b in bad))
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
    for line in config_warnings(cfg) + idle_settings(raw, cfg):
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
    from lora_rank_search.contract.metrics import describe_metrics

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


# --------------------------------------------------------------------------- reading the file


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
