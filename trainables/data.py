"""Training data: split train/eval by hash, tokenize with loss masks, batch (reading and checking
the records is `trainables.records`).

Tokenization happens once, in the driver; trials receive the token ids through Ray's object store.
Labels are -100 wherever no loss is taken (prompts, chat scaffolding, padding).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from lora_rank_search.contract.config import DataConfig
from lora_rank_search.trainables.formats import IGNORE, DataError, get_format  # noqa: F401 - IGNORE: one definition, re-exported
from lora_rank_search.trainables.records import (  # noqa: F401 - reading and checking records: re-exported where callers look for them
    BUILTIN_DATA, FILE_SUFFIXES, MIN_TRAIN_EXAMPLES, Records, _count, check_columns, check_values, detect_format,
    is_dataset_source, overlap_warning, read_records, required_fields,
)


class Ragged(Sequence):
    """Rows of different lengths (int32), stored flat: `values` and the rows' `offsets` (n + 1).

    A row is a view into `values`. Ray moves the two arrays through its object store without
    copying them: every trial process of a node maps one shared copy of the data, read-only. A list
    of per-row arrays cost each process ~150 MiB of its own for 60,000 rows of 24 tokens (measured
    in a Ray worker; the flat form: nothing), for every trial and pack server of the search.
    """

    __slots__ = ("values", "offsets")

    def __init__(self, values: np.ndarray, offsets: np.ndarray):
        self.values, self.offsets = values, offsets

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[int]]) -> "Ragged":
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.concatenate([np.asarray(r, dtype=np.int32) for r in rows]) if len(rows) else np.zeros(0, np.int32)
        return cls(values.astype(np.int32, copy=False), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} of {n}")
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self) -> list[int]:
        return np.diff(self.offsets).tolist()

    def __reduce__(self):
        return (Ragged, (self.values, self.offsets))

    def __eq__(self, other) -> bool:
        if not isinstance(other, Ragged):
            return NotImplemented
        return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.values, other.values)

    __hash__ = None

    def __repr__(self) -> str:
        return f"Ragged({len(self)} rows, {len(self.values)} values)"


@dataclass
class TokenizedData:
    """Token ids and labels per example (`Ragged` int32 rows), plus counts for the report."""

    train_ids: Ragged
    train_labels: Ragged
    eval_ids: Ragged
    eval_labels: Ragged
    pad_id: int
    dropped: int = 0  # examples with no loss token left after truncation
    dropped_eval: int = 0  # of which eval examples
    cut_eval: int = 0  # eval examples kept whose response truncation shortened (eval.metric's reference is cut too)

    def truncation_warning(self, max_seq_len: int) -> Optional[str]:
        """`data.max_seq_len: ...` when truncation left examples without a response token (they are left out)."""
        if not self.dropped:
            return None
        train, held = self.dropped - self.dropped_eval, self.dropped_eval
        parts = [f"{n} {side}" for n, side in ((train, "training"), (held, "eval")) if n]
        return (f"data.max_seq_len: {' and '.join(parts)} example{'s' if self.dropped > 1 else ''} lose every response token to "
                f"truncation at {max_seq_len} tokens and are left out (the eval set keeps {len(self.eval_ids)}); "
                "raise max_seq_len or shorten their prompts")

    @property
    def eval_tokens(self) -> int:
        return int(sum(int((lab != IGNORE).sum()) for lab in self.eval_labels))


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


def _tokenize(records: list[dict], tokenizer, data_cfg: DataConfig, template: bool) -> tuple[list, list, int, int]:
    """(ids, labels, examples dropped: no response token left, examples cut: some response tokens lost) after truncation."""
    ids_out, labels_out, dropped, cut = [], [], 0, 0
    limit = data_cfg.max_seq_len
    for record in records:
        full_ids, full_labels = encode_record(record, tokenizer, data_cfg, template)
        ids, labels = full_ids[:limit], full_labels[:limit]
        if not any(lab != IGNORE for lab in labels[1:]):  # position 0 never gets loss after the shift
            dropped += 1
            continue
        cut += any(lab != IGNORE for lab in full_labels[limit:])
        ids_out.append(np.asarray(ids, dtype=np.int32))
        labels_out.append(np.asarray(labels, dtype=np.int32))
    return ids_out, labels_out, dropped, cut


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
    train_ids, train_labels, dropped_t, _ = _tokenize(train_records, tokenizer, data_cfg, template)
    eval_ids, eval_labels, dropped_e, cut_e = _tokenize(eval_records, tokenizer, data_cfg, template)
    if not train_ids or not eval_ids:
        side = "train" if not train_ids else "eval"
        raise DataError(
            f"data.max_seq_len: no {side} example keeps a response token within max_seq_len={data_cfg.max_seq_len}"
        )
    if len(train_ids) < MIN_TRAIN_EXAMPLES:  # the minimum load_data checks, after truncation
        raise DataError(
            f"data.max_seq_len: only {_count(len(train_ids), 'training example')} of {len(train_records)} keep a response token "
            f"within max_seq_len={data_cfg.max_seq_len}; a rank search needs at least {MIN_TRAIN_EXAMPLES} (raise max_seq_len)"
        )
    rows = [Ragged.from_rows(part) for part in (train_ids, train_labels, eval_ids, eval_labels)]
    return TokenizedData(*rows, int(tokenizer.pad_token_id), dropped_t + dropped_e, dropped_e, cut_e)


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
        "mean_train_len": float(np.mean(data.train_ids.lengths())),
        "dropped_examples": data.dropped,
    }


PAD_SHARE = 0.2  # an eval batch is cut early where padding would pass this share of its tokens


def eval_batches(data: TokenizedData, batch_size: int):
    """Eval batches in a fixed order, longest first (so a memory problem shows at once), of at most
    `batch_size` rows. A batch also ends early where its padding would pass PAD_SHARE of its tokens:
    a few long examples then form a short batch of their own instead of padding fifteen short ones
    (the quickstart's eval: 1,984 padded tokens in batches of 16, 1,488 so; time on CPU and memory
    on a GPU grow with the padded tokens)."""
    lengths = data.eval_ids.lengths()
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    real = 0
    for i in order:
        n = lengths[i]
        batch = batches[-1] if batches else []
        if not batch or len(batch) >= batch_size or lengths[batch[0]] * (len(batch) + 1) * (1 - PAD_SHARE) > real + n:
            batches.append([])
            real = 0
        batches[-1].append(i)
        real += n
    for idx in batches:
        yield collate([data.eval_ids[j] for j in idx], [data.eval_labels[j] for j in idx], data.pad_id)
