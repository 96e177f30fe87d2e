"""Data: hash split, loss masks per format, length-grouped resumable batch order, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from lora_rank_search.trainables.data import (
    IGNORE,
    BatchOrder,
    DataError,
    check_columns,
    collate,
    encode_record,
    prepare_data,
    read_records,
    split_records,
)
from lora_rank_search.trainables.model import load_tokenizer
from lora_rank_search.trainables.tiny import write_jsonl

_DATA = {
    "format": "instruction", "prompt_field": "prompt", "response_field": "response", "messages_field": "messages",
    "text_field": "text", "use_chat_template": "auto", "eval_fraction": 0.2, "eval_source": None,
    "max_eval_examples": None, "max_seq_len": 32,
}


def data_config(**over):
    """The typed data section (as a trial gets it) from _DATA and overrides."""
    from lora_rank_search.search.config import DataConfig

    return DataConfig(**{**_DATA, **over})
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)


@pytest.fixture
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model)


def _decode_masked(tokenizer, ids, labels):
    return tokenizer.convert_ids_to_tokens([i for i, l in zip(ids, labels) if l != IGNORE])


def test_instruction_loss_only_on_response_and_eos(tokenizer):
    ids, labels = encode_record({"prompt": "w1 w2", "response": "w3 w4"}, tokenizer, data_config(), template=False)
    assert _decode_masked(tokenizer, ids, labels) == ["w3", "w4", "</s>"]
    assert tokenizer.convert_ids_to_tokens(ids)[:2] == ["w1", "w2"]


def test_examples_whose_response_truncation_cuts_away_are_counted_per_split_and_warned_about(tokenizer):
    from lora_rank_search.trainables.data import tokenize_splits

    long_prompt = " ".join(["w1"] * 40)  # past max_seq_len 32: no response token is left
    cut_prompt = " ".join(["w1"] * 30)  # the response "w3 w4 w5" loses its end
    train = [{"prompt": "w1", "response": "w2"}] * 8 + [{"prompt": long_prompt, "response": "w2"}]
    held = [{"prompt": "w1", "response": "w3"}, {"prompt": cut_prompt, "response": "w3 w4 w5"}] + [{"prompt": long_prompt, "response": "w3"}] * 2
    data = tokenize_splits(train, held, tokenizer, data_config())
    assert (len(data.train_ids), len(data.eval_ids), data.dropped, data.dropped_eval, data.cut_eval) == (8, 2, 3, 2, 1)
    assert data.truncation_warning(32) == (
        "data.max_seq_len: 1 training and 2 eval examples lose every response token to truncation at 32 tokens and are left "
        "out (the eval set keeps 2); raise max_seq_len or shorten their prompts")
    assert tokenize_splits(train[:8], held[:1], tokenizer, data_config()).truncation_warning(32) is None
    # the minimum of training examples holds after truncation too (2 of 10 kept trained a "verdict")
    with pytest.raises(DataError, match=r"data.max_seq_len: only 2 training examples of 10 keep a response token within "
                                        r"max_seq_len=32; a rank search needs at least 8"):
        tokenize_splits(train[:2] + [train[-1]] * 8, held, tokenizer, data_config())


def test_instruction_through_a_chat_template(tokenizer):
    tokenizer.chat_template = TEMPLATE
    ids, labels = encode_record({"prompt": "w1", "response": "w2 w3"}, tokenizer, data_config(), template=True)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:3] == ["user", "w1", "</s>"] and tokens[-3:] == ["w2", "w3", "</s>"]
    assert _decode_masked(tokenizer, ids, labels) == ["w2", "w3", "</s>"]


def test_chat_format_trains_on_every_assistant_turn_only(tokenizer):
    tokenizer.chat_template = TEMPLATE
    record = {"messages": [
        {"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"},
        {"role": "user", "content": "w3"}, {"role": "assistant", "content": "w4 w5"},
    ]}
    ids, labels = encode_record(record, tokenizer, data_config(format="chat"), template=True)
    assert _decode_masked(tokenizer, ids, labels) == ["w2", "</s>", "w4", "w5", "</s>"]


def test_text_format_trains_on_everything(tokenizer):
    ids, labels = encode_record({"text": "w1 w2 w3"}, tokenizer, data_config(format="text"), template=False)
    assert list(ids) == list(labels)


def test_hash_split_is_deterministic_and_keeps_a_prompt_on_one_side():
    records = [{"prompt": f"q{i % 50}", "response": f"a{i}"} for i in range(500)]
    train, held = split_records(records, data_config())
    assert (train, held) == split_records(list(records), data_config())
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in held})
    assert 0.05 < len(held) / len(records) < 0.4


def test_prepare_truncates_and_drops_examples_without_response_tokens(tmp_path, tokenizer):
    long_prompt = " ".join(["w1"] * 40)
    rows = [{"prompt": "w1", "response": "w2"}] * 20 + [{"prompt": long_prompt, "response": "w3"}] * 5
    rows = [dict(r, prompt=f"{r['prompt']} w{i % 9}") for i, r in enumerate(rows)]
    path = write_jsonl(rows, tmp_path / "d.jsonl")
    data = prepare_data(data_config(source=str(path), eval_fraction=0.3), tokenizer)
    assert data.dropped == 5
    assert all(len(x) <= 32 for x in [*data.train_ids, *data.eval_ids])


def test_missing_columns_error_lists_the_columns_found(tmp_path):
    path = write_jsonl([{"question": "a", "answer": "b"}], tmp_path / "d.jsonl")
    with pytest.raises(DataError) as info:
        check_columns(read_records(str(path)), ["prompt", "response"], "data.source")
    assert "'prompt', 'response' not found; columns found: answer, question" in str(info.value)


def test_missing_file_and_empty_eval_split_are_clear(tmp_path, tokenizer):
    with pytest.raises(DataError, match="data file not found"):
        read_records(str(tmp_path / "nope.jsonl"))
    path = write_jsonl([{"prompt": "w1", "response": "w2"}], tmp_path / "one.jsonl")
    with pytest.raises(DataError, match="eval split is empty"):
        prepare_data(data_config(source=str(path), eval_fraction=0.01), tokenizer)


@pytest.mark.parametrize("suffix", ["csv", "parquet", "json"])
def test_other_file_types_read_the_same_records(tmp_path, suffix):
    import pandas as pd

    frame = pd.DataFrame({"prompt": ["w1", "w2"], "response": ["w3", "w4"]})
    path = tmp_path / f"d.{suffix}"
    if suffix == "csv":
        frame.to_csv(path, index=False)
    elif suffix == "parquet":
        frame.to_parquet(path)
    else:
        frame.to_json(path, orient="records")
    assert read_records(str(path)) == frame.to_dict("records")


def test_batch_order_resumes_exactly_and_covers_each_epoch():
    lengths = np.random.default_rng(0).integers(1, 100, size=103)
    a = BatchOrder(103, seed=3, lengths=lengths, batch_size=8)
    first = [a.next_indices(8) for _ in range(5)]
    b = BatchOrder.from_state(103, a.state(), lengths, 8)
    assert [a.next_indices(8) for _ in range(20)] == [b.next_indices(8) for _ in range(20)]
    fresh = BatchOrder(103, seed=3, lengths=lengths, batch_size=8)
    epoch = fresh.next_indices(103)
    assert sorted(epoch) == list(range(103))
    assert first[0] == epoch[:8]


def test_length_grouping_cuts_padding():
    lengths = np.random.default_rng(1).integers(5, 200, size=2000)

    def padding(order: BatchOrder) -> int:
        total = 0
        for _ in range(2000 // 16):
            batch = lengths[order.next_indices(16)]
            total += int((batch.max() - batch).sum())
        return total

    grouped = padding(BatchOrder(2000, 0, lengths=lengths, batch_size=16))
    plain = padding(BatchOrder(2000, 0))
    assert grouped < plain / 5


def test_collate_pads_right_and_masks_labels():
    batch = collate([np.array([5, 6, 7]), np.array([8])], [np.array([IGNORE, 6, 7]), np.array([8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]


def test_ragged_rows_behave_as_a_list_of_arrays():
    import pickle

    from lora_rank_search.trainables.data import Ragged

    rows = [[1, 2, 3], [], [4], [5, 6]]
    ragged = Ragged.from_rows(rows)
    assert len(ragged) == 4 and [r.tolist() for r in ragged] == rows
    assert ragged[-1].tolist() == [5, 6] and ragged[0].dtype == np.int32
    assert [r.tolist() for r in ragged[1:3]] == [[], [4]] and ragged.lengths() == [3, 0, 1, 2]
    with pytest.raises(IndexError):
        ragged[4]
    again = pickle.loads(pickle.dumps(ragged, protocol=5))
    assert again == ragged and again != Ragged.from_rows(rows[:3])
    assert len(Ragged.from_rows([])) == 0


@pytest.mark.slow
def test_a_ray_worker_maps_the_tokenized_data_without_a_copy_of_its_own(ray_session):
    """What every trial process (and pack server) of a search gets through Ray's object store: the
    rows as a list of small arrays cost a worker ~150 MiB of private memory at 60,000 rows of 24
    tokens; stored flat, the worker maps the store's one shared copy."""
    import ray

    from lora_rank_search.trainables.data import Ragged, TokenizedData

    ray_session(num_cpus=1)
    rows = [np.arange(i % 7, i % 7 + 24, dtype=np.int32) for i in range(60_000)]
    data = TokenizedData(*(Ragged.from_rows(rows) for _ in range(2)), Ragged.from_rows(rows[:10]), Ragged.from_rows(rows[:10]), 0)
    stored = ray.put(data)

    @ray.remote
    def private_growth(refs) -> tuple:
        import psutil

        me = psutil.Process()
        before = me.memory_full_info().uss
        got = ray.get(refs[0])
        grown = me.memory_full_info().uss - before
        return grown, got.train_ids[59_999].tolist(), len(got.train_labels)

    grown, last, count = ray.get(private_growth.remote([stored]))
    assert last == list(range(59_999 % 7, 59_999 % 7 + 24)) and count == 60_000
    assert grown < 20 * 2**20, f"the worker's own memory grew {grown / 2**20:.0f} MiB getting the data"
