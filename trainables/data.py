"""Training data: read records, split train/eval by hash, tokenize with loss masks, batch.

Tokenization happens once, in the driver; trials receive the token ids through Ray's object store.
Labels are -100 wherever no loss is taken (prompts, chat scaffolding, padding).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from contract.config import DataConfig
from trainables.formats import DataError, describe_shapes, get_format, shape_of

BUILTIN_DATA = ("builtin:chatterbot",)
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
from trainables.formats import IGNORE  # noqa: E402,F401 - one definition


@dataclass
class TokenizedData:
    """Token ids and labels per example (int32 arrays), plus counts for the report."""

    train_ids: list
    train_labels: list
    eval_ids: list
    eval_labels: list
    pad_id: int
    dropped: int = 0  # examples with no loss token left after truncation

    @property
    def eval_tokens(self) -> int:
        return int(sum(int((lab != IGNORE).sum()) for lab in self.eval_labels))


# --------------------------------------------------------------------------- reading


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
    """`data.eval_source: ...` when eval examples also appear in the training data, with the count."""
    if not data_cfg.eval_source:
        return None

    def key(record: dict) -> str:
        return json.dumps([record.get(f) for f in required_fields(data_cfg)], sort_keys=True, default=str)

    seen = {key(r) for r in train_records}
    shared = sum(1 for r in eval_records if key(r) in seen)
    if not shared:
        return None
    same = os.path.realpath(str(data_cfg.eval_source)) == os.path.realpath(str(data_cfg.source))
    what = "is the training file: " if same else ""
    return (f"data.eval_source: {what}{shared} of {len(eval_records)} eval examples also appear in the training data; "
            "their eval loss measures memorization, not generalization")


# --------------------------------------------------------------------------- splitting


def split_key(record: dict, data_cfg: DataConfig) -> str:
    """What the hash split keys on: the prompt, the first user message, or the text."""
    return get_format(data_cfg.format).split_key(record, data_cfg)


def hash_fraction(key: str) -> float:
    """Deterministic position of a key in [0, 1), the same on every machine and Python run."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:12], 16) / float(16**12)


def split_records(records: list[dict], data_cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """(train, eval) by hash of split_key: duplicates of one prompt land on the same side."""
    keyed = [(hash_fraction(split_key(r, data_cfg)), r) for r in records]
    train = [r for h, r in keyed if h >= data_cfg.eval_fraction]
    held = sorted(((h, i, r) for i, (h, r) in enumerate(keyed) if h < data_cfg.eval_fraction), key=lambda x: x[:2])
    return train, [r for _, _, r in held]


# --------------------------------------------------------------------------- tokenizing


def _uses_template(tokenizer, setting: Any) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if setting == "auto":
        return has
    if setting and not has:
        raise DataError("data.use_chat_template: true, but the tokenizer has no chat template")
    return bool(setting)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _segments_to_example(tokenizer, segments: list[tuple[str, bool]], add_bos: bool) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    if add_bos and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE)
    for text, trained in segments:
        if not text:
            continue
        piece = _encode(tokenizer, text)
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE] * len(piece))
    return ids, labels


def encode_record(record: dict, tokenizer, data_cfg: DataConfig, template: bool) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one record, untruncated: loss only on the format's trained pieces."""
    fmt = get_format(data_cfg.format)
    segments = fmt.segments(record, tokenizer, data_cfg, template and fmt.templated)
    # Chat templates carry their own special tokens; plain text gets the tokenizer's BOS if it uses one.
    plain_bos = fmt.messages is None and not (template and fmt.templated) and bool(getattr(tokenizer, "add_bos_token", False))
    return _segments_to_example(tokenizer, segments, plain_bos)


def required_fields(data_cfg: DataConfig) -> list[str]:
    return get_format(data_cfg.format).columns(data_cfg)


def _tokenize(records: list[dict], tokenizer, data_cfg: DataConfig, template: bool) -> tuple[list, list, int]:
    ids_out, labels_out, dropped = [], [], 0
    limit = data_cfg.max_seq_len
    for record in records:
        ids, labels = encode_record(record, tokenizer, data_cfg, template)
        ids, labels = ids[:limit], labels[:limit]
        if not any(lab != IGNORE for lab in labels[1:]):  # position 0 never gets loss after the shift
            dropped += 1
            continue
        ids_out.append(np.asarray(ids, dtype=np.int32))
        labels_out.append(np.asarray(labels, dtype=np.int32))
    return ids_out, labels_out, dropped


def load_data(data_cfg: DataConfig) -> tuple[list[dict], list[dict], DataConfig, list[str]]:
    """Read the records, detect their shape (`format: auto`), check them and split them.

    Returns (train, eval, the data config with its format resolved, notes): the notes say which
    shape was detected and which values were converted. Raises DataError on any problem."""
    dataset = is_dataset_source(data_cfg.source)
    records = read_records(data_cfg.source, "data.source", data_cfg.split if dataset else "train", data_cfg.subset)
    notes = []
    if data_cfg.format == "auto":
        fmt = detect_format(records, data_cfg, "data.source")
        data_cfg = dataclasses.replace(data_cfg, format=fmt)
        found = ", ".join(sorted({str(k) for r in records[:50] for k in r}))
        notes.append(f"data.format: auto: detected the {fmt} shape (columns {found})")
    fields = required_fields(data_cfg)
    check_columns(records, fields, "data.source")
    notes += check_values(records, data_cfg, "data.source")
    held_out = data_cfg.eval_source or data_cfg.eval_split
    if held_out:
        train_records = records
        if data_cfg.eval_split:
            if not dataset:
                raise DataError(f"data.eval_split: {data_cfg.source!r} is a file, not a dataset folder or hub name with "
                                f"splits (use data.eval_source for a separate eval file), got {data_cfg.eval_split!r}")
            where = "data.eval_split"
            eval_records = read_records(data_cfg.source, where, data_cfg.eval_split, data_cfg.subset)
        else:
            where = "data.eval_source"
            eval_records = read_records(data_cfg.eval_source, where)
        check_columns(eval_records, fields, where)
        notes += check_values(eval_records, data_cfg, where)
    else:
        train_records, eval_records = split_records(records, data_cfg)
    if data_cfg.max_eval_examples:
        eval_records = eval_records[: data_cfg.max_eval_examples]
    if not train_records:
        raise DataError(f"data.eval_fraction: the train split is empty ({len(records)} records, eval_fraction {data_cfg.eval_fraction})")
    if not eval_records:
        raise DataError(
            f"data.eval_fraction: the eval split is empty ({len(records)} records, eval_fraction {data_cfg.eval_fraction}); "
            "raise eval_fraction or give data.eval_source"
        )
    if len(train_records) < MIN_TRAIN_EXAMPLES:
        where = "data.source" if held_out else "data.eval_fraction"
        raise DataError(
            f"{where}: the training set has {_count(len(train_records), 'example')}; a rank search needs at least "
            f"{MIN_TRAIN_EXAMPLES} (with so few, every rank memorizes them and the comparison means nothing)"
        )
    return train_records, eval_records, data_cfg, notes


def load_splits(data_cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """Read the records and split them into (train, eval); raises DataError on any problem."""
    train_records, eval_records, _, _ = load_data(data_cfg)
    return train_records, eval_records


def tokenize_splits(train_records: list[dict], eval_records: list[dict], tokenizer, data_cfg: DataConfig) -> TokenizedData:
    """Token ids and loss masks for both splits, truncated to max_seq_len."""
    template = get_format(data_cfg.format).templated and _uses_template(tokenizer, data_cfg.use_chat_template)
    train_ids, train_labels, dropped_t = _tokenize(train_records, tokenizer, data_cfg, template)
    eval_ids, eval_labels, dropped_e = _tokenize(eval_records, tokenizer, data_cfg, template)
    if not train_ids or not eval_ids:
        side = "train" if not train_ids else "eval"
        raise DataError(
            f"data.max_seq_len: no {side} example keeps a response token within max_seq_len={data_cfg.max_seq_len}"
        )
    return TokenizedData(train_ids, train_labels, eval_ids, eval_labels, int(tokenizer.pad_token_id), dropped_t + dropped_e)


def prepare_data(data_cfg: DataConfig, tokenizer) -> TokenizedData:
    """Read, split and tokenize according to the `data` section of the config."""
    train_records, eval_records, data_cfg, _ = load_data(data_cfg)
    return tokenize_splits(train_records, eval_records, tokenizer, data_cfg)


# --------------------------------------------------------------------------- batching


def collate(ids: list, labels: list, pad_id: int) -> dict:
    """Right-padded torch batch: input_ids, attention_mask, labels (-100 on padding)."""
    import torch

    width = max(len(x) for x in ids)
    batch_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    batch_labels = np.full((len(ids), width), IGNORE, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, (x, y) in enumerate(zip(ids, labels)):
        batch_ids[row, : len(x)] = x
        batch_labels[row, : len(y)] = y
        mask[row, : len(x)] = 1
    return {
        "input_ids": torch.from_numpy(batch_ids),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.from_numpy(batch_labels),
    }


class BatchOrder:
    """Seeded epoch-by-epoch order of training examples with a resumable position.

    With `lengths` and `batch_size`, examples are grouped by length: each epoch's permutation is
    cut into windows of 64 batches, each window sorted by length and cut into batches, and the
    batches shuffled again, so a batch holds examples of similar length and little compute goes
    to padding (on CPU the step time grows with padded tokens, on GPU the memory does).
    """

    GROUP_BATCHES = 64

    def __init__(self, n: int, seed: int, epoch: int = 0, position: int = 0, lengths=None, batch_size: int = 0):
        self.n, self.seed, self.epoch, self.position = n, seed, epoch, position
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.batch_size = batch_size
        self._order = self._epoch_order(epoch)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(self.n)
        if self.lengths is None or self.batch_size <= 1:
            return perm
        window = self.batch_size * self.GROUP_BATCHES
        batches = []
        for start in range(0, self.n, window):
            chunk = perm[start : start + window]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        return np.concatenate([batches[i] for i in rng.permutation(len(batches))])

    def next_indices(self, size: int) -> list[int]:
        out: list[int] = []
        while len(out) < size:
            if self.position >= self.n:
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(size - len(out), self.n - self.position)
            out.extend(int(i) for i in self._order[self.position : self.position + take])
            self.position += take
        return out

    def state(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    @classmethod
    def from_state(cls, n: int, state: dict, lengths=None, batch_size: int = 0) -> "BatchOrder":
        return cls(n, state["seed"], state["epoch"], state["position"], lengths, batch_size)


def describe(data: TokenizedData) -> dict[str, Any]:
    """Counts for logs and reports."""
    return {
        "train_examples": len(data.train_ids),
        "eval_examples": len(data.eval_ids),
        "eval_tokens": data.eval_tokens,
        "mean_train_len": float(np.mean([len(x) for x in data.train_ids])),
        "dropped_examples": data.dropped,
    }


def eval_batches(data: TokenizedData, batch_size: int):
    """Eval batches in a fixed order, longest first (so a memory problem shows at once)."""
    order = sorted(range(len(data.eval_ids)), key=lambda i: -len(data.eval_ids[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield collate([data.eval_ids[i] for i in idx], [data.eval_labels[i] for i in idx], data.pad_id)
