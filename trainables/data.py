"""Training data: read records, split train/eval by hash, tokenize with loss masks, batch.

Tokenization happens once, in the driver; trials receive the token ids through Ray's object store.
Labels are -100 wherever no loss is taken (prompts, chat scaffolding, padding).
"""

from __future__ import annotations

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

from search.config import DataConfig

BUILTIN_DATA = ("builtin:chatterbot",)
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
IGNORE = -100


class DataError(ValueError):
    """The configured data cannot be read or lacks what the format needs."""


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


def read_records(source: str, field: str = "data.source") -> list[dict]:
    """All records of a file (by suffix), a builtin, or a hub dataset ('train' split)."""
    if source in BUILTIN_DATA:
        return _chatterbot_records()
    if source.startswith("builtin:"):
        raise DataError(f"{field}: unknown builtin dataset {source!r}; builtins: {', '.join(BUILTIN_DATA)}")
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in FILE_SUFFIXES or path.exists() or os.path.isabs(source) or source.startswith("."):
        if path.is_dir():
            raise DataError(f"{field}: {source!r} is a folder, not a data file (give one {', '.join(FILE_SUFFIXES)} file)")
        if not path.is_file():
            raise DataError(f"{field}: data file not found: {source!r}")
        return _read_file(path, suffix, field)
    return _read_hub(source, field)


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


def _read_hub(name: str, field: str) -> list[dict]:
    try:
        from datasets import load_dataset

        return list(load_dataset(name, split="train"))
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{field}: {name!r} is neither a local file nor a loadable hub dataset ({type(exc).__name__})") from None


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


def _chat_problem(messages: Any) -> Optional[str]:
    if not isinstance(messages, list) or not messages:
        return "is not a non-empty list of {role, content} messages"
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m):
            return "holds a message that is not {role, content}"
        if _is_null(m["content"]) or isinstance(m["content"], (dict, list)):
            return "holds a message whose content is null or not text"
    if not any(m["role"] == "assistant" and str(m["content"]).strip() for m in messages):
        return "has no assistant turn with content (loss is taken on assistant turns only)"
    return None


def check_values(records: list, data_cfg: DataConfig, where: str) -> None:
    """Refuse records whose needed values are null (they would become the text 'None'), not text,
    or empty where the loss is taken; chat records need an assistant turn. Names the lines."""
    fmt = data_cfg.format
    if fmt == "instruction":
        columns = [(data_cfg.prompt_field, False), (data_cfg.response_field, True)]
    elif fmt == "text":
        columns = [(data_cfg.text_field, True)]
    else:
        columns = []
        column = data_cfg.messages_field
        found: dict[str, list[int]] = {}
        for i, record in enumerate(records):
            problem = _chat_problem(record[column])
            if problem:
                found.setdefault(problem, []).append(i)
        for problem, indices in found.items():
            raise DataError(f"{where}: {column!r} {problem} in {_count(len(indices), 'record')} ({_places(records, indices)})")
    for column, trained in columns:
        found = {}
        for i, record in enumerate(records):
            problem = _value_problem(record[column], trained)
            if problem:
                found.setdefault(problem, []).append(i)
        for problem, indices in found.items():
            raise DataError(f"{where}: {column!r} {problem} in {_count(len(indices), 'record')} ({_places(records, indices)})")


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
    fmt = data_cfg.format
    if fmt == "instruction":
        return str(record[data_cfg.prompt_field])
    if fmt == "chat":
        messages = record[data_cfg.messages_field]
        users = [m.get("content", "") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[0] if users else messages)
    return str(record[data_cfg.text_field])


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


def _render(tokenizer, messages: list[dict], generation_prompt: bool, template: bool) -> str:
    if template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if generation_prompt else "")


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


def _chat_segments(tokenizer, messages: list[dict], template: bool) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, has_loss) pieces: loss on assistant turns."""
    full = _render(tokenizer, messages, False, template)
    cuts: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], True, template) if i else ""
        upto = _render(tokenizer, messages[: i + 1], False, template)
        if not (full.startswith(prefix) and full.startswith(upto)):
            raise DataError("data.format: the chat template does not render conversations prefix by prefix")
        cuts.append((len(prefix), len(upto)))
    segments, pos = [], 0
    for start, end in cuts:
        segments.append((full[pos:start], False))
        segments.append((full[start:end], True))
        pos = end
    segments.append((full[pos:], False))
    return segments


def encode_record(record: dict, tokenizer, data_cfg: DataConfig, template: bool) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one record, untruncated."""
    fmt = data_cfg.format
    eos = tokenizer.eos_token or ""
    # Chat templates carry their own special tokens; plain text gets the tokenizer's BOS if it uses one.
    plain_bos = bool(getattr(tokenizer, "add_bos_token", False))
    if fmt == "instruction":
        prompt = str(record[data_cfg.prompt_field])
        response = str(record[data_cfg.response_field])
        if template:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return _segments_to_example(tokenizer, _chat_segments(tokenizer, messages, True), False)
        return _segments_to_example(tokenizer, [(prompt + "\n", False), (response + eos, True)], plain_bos)
    if fmt == "chat":
        messages = record[data_cfg.messages_field]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise DataError(f"data.messages_field: expected a list of {{role, content}} messages, got {str(messages)[:80]!r}")
        return _segments_to_example(tokenizer, _chat_segments(tokenizer, messages, template), False)
    text = str(record[data_cfg.text_field])
    return _segments_to_example(tokenizer, [(text + eos, True)], plain_bos)


def required_fields(data_cfg: DataConfig) -> list[str]:
    fmt = data_cfg.format
    if fmt == "instruction":
        return [data_cfg.prompt_field, data_cfg.response_field]
    if fmt == "chat":
        return [data_cfg.messages_field]
    return [data_cfg.text_field]


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


def load_splits(data_cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """Read the records and split them into (train, eval); raises DataError on any problem."""
    fields = required_fields(data_cfg)
    records = read_records(data_cfg.source)
    check_columns(records, fields, "data.source")
    check_values(records, data_cfg, "data.source")
    if data_cfg.eval_source:
        train_records = records
        eval_records = read_records(data_cfg.eval_source, "data.eval_source")
        check_columns(eval_records, fields, "data.eval_source")
        check_values(eval_records, data_cfg, "data.eval_source")
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
        where = "data.source" if data_cfg.eval_source else "data.eval_fraction"
        raise DataError(
            f"{where}: the training set has {_count(len(train_records), 'example')}; a rank search needs at least "
            f"{MIN_TRAIN_EXAMPLES} (with so few, every rank memorizes them and the comparison means nothing)"
        )
    return train_records, eval_records


def tokenize_splits(train_records: list[dict], eval_records: list[dict], tokenizer, data_cfg: DataConfig) -> TokenizedData:
    """Token ids and loss masks for both splits, truncated to max_seq_len."""
    template = data_cfg.format != "text" and _uses_template(tokenizer, data_cfg.use_chat_template)
    train_ids, train_labels, dropped_t = _tokenize(train_records, tokenizer, data_cfg, template)
    eval_ids, eval_labels, dropped_e = _tokenize(eval_records, tokenizer, data_cfg, template)
    if not train_ids or not eval_ids:
        side = "train" if not train_ids else "eval"
        raise DataError(
            f"data.max_seq_len: no {side} example keeps a response token within max_seq_len={data_cfg.max_seq_len}"
        )
    return TokenizedData(train_ids, train_labels, eval_ids, eval_labels, int(tokenizer.pad_token_id), dropped_t + dropped_e)


def prepare_data(data_cfg: DataConfig, tokenizer) -> TokenizedData:
    """Read, split and tokenize according to the `data` section of the config (as a dict)."""
    return tokenize_splits(*load_splits(data_cfg), tokenizer, data_cfg)


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
