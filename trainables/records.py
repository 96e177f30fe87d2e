"""Reading training records (files, dataset folders, the hub, the builtin data) and checking them:
columns, values, the detected shape, eval examples that also appear in training. Every problem is
a `DataError` naming the field and the place (`data.source: line 3 ...`).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from lora_rank_search.contract.config import DataConfig
from lora_rank_search.trainables.formats import DataError, describe_shapes, get_format, shape_of

BUILTIN_DATA = ("builtin:chatterbot",)
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def _chatterbot_records() -> list[dict]:
    """Question/answer pairs of chatterbot-corpus (English), consecutive turns of each dialogue."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        raise DataError("data.source: 'builtin:chatterbot' needs the PyPI package chatterbot-corpus")
    folder = Path(spec.origin).parent / "data" / "english"
    records = []
    for path in sorted(glob.glob(str(folder / "*.yml"))):
        with open(path, encoding="utf-8") as handle:
            doc = yaml.safe_load(handle) or {}
        for convo in doc.get("conversations") or []:
            turns = [str(t).strip() for t in convo if t is not None]
            for prompt, response in zip(turns, turns[1:]):
                if prompt and response:
                    records.append({"prompt": prompt, "response": response})
    return records


def read_records(source: str, field: str = "data.source", split: str = "train", subset: Optional[str] = None) -> list[dict]:
    """All records of a file (by suffix), a builtin, a dataset folder (`datasets.load_from_disk`
    or a Hugging Face dataset folder) or a hub dataset: its `split` (and `subset`, the config name)."""
    if source in BUILTIN_DATA:
        return _chatterbot_records()
    if source.startswith("builtin:"):
        raise DataError(f"{field}: unknown builtin dataset {source!r}; builtins: {', '.join(BUILTIN_DATA)}")
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_dir():
        return _read_dataset(source, field, split, subset)
    if suffix in FILE_SUFFIXES or path.exists() or os.path.isabs(source) or source.startswith("."):
        if not path.is_file():
            raise DataError(f"{field}: data file not found: {source!r}")
        return _read_file(path, suffix, field)
    return _read_dataset(source, field, split, subset)


def is_dataset_source(source: Optional[str]) -> bool:
    """A dataset folder or hub name (it has splits and subsets), not a file or a builtin."""
    if not source or source.startswith("builtin:"):
        return False
    path = Path(source)
    if path.is_dir():
        return True
    return not (path.suffix.lower() in FILE_SUFFIXES or path.exists() or os.path.isabs(source) or source.startswith("."))


def _read_dataset(name: str, field: str, split: str, subset: Optional[str]) -> list[dict]:
    """A `save_to_disk` folder (`datasets.load_from_disk`), else `load_dataset(name, subset,
    split=split)`: a local dataset folder of data files, or a hub name."""
    import datasets

    folder = Path(name)
    saved = folder.is_dir() and any((folder / f).is_file() for f in ("dataset_dict.json", "state.json"))
    try:
        if saved:
            if subset:  # save_to_disk keeps one configuration: a subset asked for would be ignored
                raise DataError(f"data.subset: {name!r} is a save_to_disk folder, which holds no subsets (configurations); "
                                f"remove data.subset, got {subset!r}")
            loaded = datasets.load_from_disk(str(folder))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{field}: no split {split!r} in {name!r} (splits: {', '.join(loaded)})")
                loaded = loaded[split]
            elif split != "train":
                raise DataError(f"{field}: {name!r} holds one dataset, not named splits; there is no split {split!r}")
            return [dict(r) for r in loaded]
        # A local folder is read afresh: datasets' cache keys it by folder name and layout, not by
        # content, and would serve an edited folder's old rows.
        fresh = {"download_mode": "force_redownload", "verification_mode": "no_checks"} if folder.is_dir() else {}
        return [dict(r) for r in datasets.load_dataset(name, subset, split=split, **fresh)]
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - the library's errors become one line naming the field
        first = (str(exc).splitlines() or [""])[0][:200]
        why = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        if folder.is_dir():
            raise DataError(f"{field}: cannot load the dataset folder {name!r} (split {split!r}"
                            f"{f', subset {subset!r}' if subset else ''}; {why})") from None
        raise DataError(f"{field}: {name!r} is neither a local file nor a loadable hub dataset ({why})") from None


def _read_file(path: Path, suffix: str, field: str) -> list[dict]:
    import pandas as pd

    try:
        if suffix == ".txt":
            text = path.read_text(encoding="utf-8")
            blocks = [b.strip() for b in text.split("\n\n")]
            return [{"text": b} for b in blocks if b]
        if suffix == ".jsonl":
            return _read_jsonl(path, field)
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
                data = next(iter(data.values()))
            if not isinstance(data, list):
                raise DataError(f"{field}: {str(path)!r} must hold a list of records")
            return data
        if suffix == ".csv":
            return pd.read_csv(path).to_dict("records")
        if suffix == ".parquet":
            return pd.read_parquet(path).to_dict("records")
    except DataError:
        raise
    except UnicodeDecodeError as exc:
        raise DataError(f"{field}: {str(path)!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{field}: cannot parse {str(path)!r}: line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except Exception as exc:  # noqa: BLE001 - any parse error becomes one clear line
        raise DataError(f"{field}: cannot parse {str(path)!r} ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    raise DataError(f"{field}: unsupported file type {suffix!r} (use {', '.join(FILE_SUFFIXES)})")


def check_columns(records: list[dict], fields: list[str], where: str) -> None:
    """Raise DataError naming the missing column(s) and listing the columns found; a column that
    only some records lack is named with the first of those records (every record is read)."""
    if not records:
        raise DataError(f"{where}: dataset is empty")
    _check_mappings(records, where)
    found = sorted({k for r in records for k in r})
    missing = [f for f in fields if f not in found]
    if missing:
        raise DataError(f"{where}: column(s) {', '.join(repr(m) for m in missing)} not found; columns found: {', '.join(found) or 'none'}")
    for f in fields:
        lacking = [i for i, r in enumerate(records) if f not in r]
        if lacking:
            raise DataError(f"{where}: {_count(len(lacking), 'record')} lack{'s' if len(lacking) == 1 else ''} the column {f!r} "
                            f"({_places(records, lacking)})")


MIN_TRAIN_EXAMPLES = 8  # fewer training examples cannot tell ranks apart


class Records(list):
    """Records read from a file, with the file line each came from (`lines`, 1-based) when known."""

    lines: Optional[list] = None


def _read_jsonl(path: Path, field: str) -> Records:
    """One JSON value per non-blank line; a broken line is reported by its line number in the file."""
    records, lines = Records(), []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{field}: cannot parse {str(path)!r}: line {number} is not valid JSON ({exc.msg}, column {exc.colno})") from None
            lines.append(number)
    records.lines = lines
    return records


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _places(records: list, indices: list[int], shown: int = 3) -> str:
    """'line 1203, line 1500 and 2 more' (file lines when known, else record numbers, 1-based)."""
    lines = getattr(records, "lines", None)
    names = [f"line {lines[i]}" if lines else f"record {i + 1}" for i in indices[:shown]]
    more = f" and {len(indices) - shown} more" if len(indices) > shown else ""
    return ", ".join(names) + more


def _check_mappings(records: list, where: str) -> None:
    odd = [i for i, r in enumerate(records) if not isinstance(r, dict)]
    if odd:
        first = records[odd[0]]
        raise DataError(f"{where}: every record must be a mapping of columns; {_count(len(odd), 'record')} "
                        f"{'is' if len(odd) == 1 else 'are'} not ({_places(records, odd)}: {str(first)[:40]!r})")


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _value_problem(value: Any, trained: bool) -> Optional[str]:
    """Why one text value cannot be used, or None: null, not text, or (where loss is taken) empty."""
    if _is_null(value):
        return "is null"
    if isinstance(value, (dict, list)):
        return "is not text"
    if trained and not str(value).strip():
        return "is empty"
    return None


def _kind(value: Any) -> Optional[str]:
    """'true/false' or 'number' for a value that is not text but would be trained as its text."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return "true/false value"
    if isinstance(value, (int, float)) or type(value).__module__ == "numpy":
        return "number"
    return None


def check_values(records: list, data_cfg: DataConfig, where: str) -> list[str]:
    """Refuse records whose needed values are null (they would become the text 'None'), not text,
    or empty where the loss is taken; message lists need an assistant turn. Names the lines.

    Numbers and true/false values (`42`, `True`) are converted to their text, and said: returns
    one warning per column naming the count and the first lines."""
    fmt = get_format(data_cfg.format)
    if fmt.messages is not None:
        column, checker = fmt.messages(data_cfg)
        found: dict[str, list[int]] = {}
        for i, record in enumerate(records):
            problem = checker(record[column])
            if problem:
                found.setdefault(problem, []).append(i)
        for problem, indices in found.items():
            raise DataError(f"{where}: {column!r} {problem} in {_count(len(indices), 'record')} ({_places(records, indices)})")
    warnings = []
    for column, trained in fmt.texts(data_cfg):
        found = {}
        converted: dict[str, list[int]] = {}
        for i, record in enumerate(records):
            if column in fmt.optional and _is_null(record.get(column)):
                continue
            value = record[column]
            problem = _value_problem(value, trained)
            if problem:
                found.setdefault(problem, []).append(i)
            elif _kind(value):
                converted.setdefault(_kind(value), []).append(i)
        for problem, indices in found.items():
            raise DataError(f"{where}: {column!r} {problem} in {_count(len(indices), 'record')} ({_places(records, indices)})")
        for kind, indices in converted.items():
            first = records[indices[0]][column]
            warnings.append(f"{where}: {column!r} holds {_count(len(indices), kind)}, not text ({_places(records, indices)}: "
                            f"{first!r}); trained as their text ({str(first)!r}); quote them in the file if that is meant")
    return warnings


def detect_format(records: list, data_cfg: DataConfig, where: str) -> str:
    """The shape of the records (`data.format: auto`): that of the first record; every record must
    have it. A record that fits no shape, or another shape, is named with the columns it has."""
    if not records:
        raise DataError(f"{where}: dataset is empty")
    _check_mappings(records, where)
    name = None
    for i, record in enumerate(records):
        shape = shape_of(record, data_cfg)
        if shape is None:
            raise DataError(f"{where}: {_places(records, [i])} fits no record shape: columns found: "
                            f"{', '.join(map(str, record)) or 'none'}; shapes: {describe_shapes(data_cfg)} (or set data.format)")
        if name is None:
            name = shape
        elif shape != name:
            raise DataError(f"{where}: {_places(records, [i])} has the {shape} shape (columns {', '.join(map(str, record))}) "
                            f"but {_places(records, [0])} has the {name} shape; one file holds one shape (or set data.format)")
    return name


def overlap_warning(train_records: list, eval_records: list, data_cfg: DataConfig) -> Optional[str]:
    """`data.eval_source: ...` (or `data.eval_split: ...`) when eval examples also appear in the
    training data, with the count."""
    if not (data_cfg.eval_source or data_cfg.eval_split):
        return None

    def key(record: dict) -> str:
        return json.dumps([record.get(f) for f in required_fields(data_cfg)], sort_keys=True, default=str)

    seen = {key(r) for r in train_records}
    shared = sum(1 for r in eval_records if key(r) in seen)
    if not shared:
        return None
    if data_cfg.eval_source:
        field = "data.eval_source"
        same = os.path.realpath(str(data_cfg.eval_source)) == os.path.realpath(str(data_cfg.source))
        what = "is the training file: " if same else ""
    else:
        field = "data.eval_split"
        what = f"is the training split (data.split {data_cfg.split!r}): " if data_cfg.eval_split == data_cfg.split else ""
    return (f"{field}: {what}{shared} of {len(eval_records)} eval examples also appear in the training data; "
            "their eval loss measures memorization, not generalization")


def required_fields(data_cfg: DataConfig) -> list[str]:
    return get_format(data_cfg.format).columns(data_cfg)
