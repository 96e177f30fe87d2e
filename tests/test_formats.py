"""Record shapes (issue 22): each shape as a file of a few rows is detected, carries loss only on its
response / assistant tokens, and a malformed file of it gets one clear error; dataset folders
(save_to_disk and Hugging Face data folders) with split / eval_split / subset; the format table."""

from __future__ import annotations

import json

import pytest

from lora_rank_search.search.config import DATA_FORMATS, DataConfig
from lora_rank_search.trainables.data import IGNORE, encode_record, load_data, tokenize_splits
from lora_rank_search.trainables.formats import FORMATS, DataError, get_format
from lora_rank_search.trainables.model import load_tokenizer

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)
N = 16  # rows per file: enough for the minimum training set after the hash split


def _rows(shape: str, i: int) -> dict:
    """Row i of a file of the given shape; its response (the words with loss) is 'w{i} w{i+1}'."""
    p, r = f"w{20 + i}", f"w{i} w{i + 1}"
    return {
        "instruction": {"prompt": p, "response": r},
        "completion": {"prompt": p, "completion": " " + r},
        "alpaca": {"instruction": p, "input": "" if i % 2 else "w40", "output": r},
        "chat": {"messages": [{"role": "system", "content": "w50"}, {"role": "user", "content": p}, {"role": "assistant", "content": r}]},
        "sharegpt": {"conversations": [{"from": "system", "value": "w50"}, {"from": "human", "value": p}, {"from": "gpt", "value": r}]},
        "text": {"text": r},
    }[shape]


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def data_config(**over) -> DataConfig:
    return DataConfig(**{"eval_fraction": 0.25, "max_seq_len": 64, **over})


@pytest.fixture
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model)


def _loss_tokens(tokenizer, ids, labels) -> list:
    return tokenizer.convert_ids_to_tokens([int(i) for i, lab in zip(ids, labels) if lab != IGNORE])


def test_every_configured_format_has_one_table_entry():
    assert set(FORMATS) == set(DATA_FORMATS) - {"auto"}
    with pytest.raises(DataError, match="data.format: no record shape 'nope'"):
        get_format("nope")


@pytest.mark.parametrize("template", [False, True], ids=["plain", "chat-template"])
@pytest.mark.parametrize("shape", sorted(FORMATS))
def test_each_shape_is_detected_and_only_its_response_tokens_carry_loss(shape, template, tokenizer, tmp_path):
    tokenizer.chat_template = TEMPLATE if template else None
    source = _write(tmp_path / f"{shape}.jsonl", [_rows(shape, i) for i in range(N)])
    train, held, cfg, notes = load_data(data_config(source=source))
    assert cfg.format == shape
    assert any(f"detected the {shape} shape" in n for n in notes), notes
    data = tokenize_splits(train, held, tokenizer, cfg)
    assert len(data.train_ids) == len(train)
    for record, ids, labels in zip(train, data.train_ids, data.train_labels):
        response = {"instruction": "response", "completion": "completion", "alpaca": "output", "text": "text"}.get(shape)
        words = (record[response] if response else record[list(record)[0]][-1].get("content", record[list(record)[0]][-1].get("value"))).split()
        # every answer ends with EOS, chat turns rendered as plain "role: content" lines too (without it an
        # adapter never learns where an answer ends, and eval.metric's generations ran on: exact_match 0)
        assert _loss_tokens(tokenizer, ids, labels) == words + ["</s>"], (shape, record)


def test_alpaca_prompt_holds_instruction_and_input_plain_and_templated(tokenizer):
    record = {"instruction": "w1", "input": "w2", "output": "w3"}
    cfg = data_config(format="alpaca")
    ids, labels = encode_record(record, tokenizer, cfg, template=False)
    assert tokenizer.convert_ids_to_tokens(ids).count("w2") == 1 and _loss_tokens(tokenizer, ids, labels) == ["w3", "</s>"]
    tokenizer.chat_template = TEMPLATE
    ids, labels = encode_record(record, tokenizer, cfg, template=True)
    assert tokenizer.convert_ids_to_tokens(ids)[:3] == ["user", "w1", "w2"]
    assert _loss_tokens(tokenizer, ids, labels) == ["w3", "</s>"]


MALFORMED = [
    ("instruction", {"prompt": "w1", "response": None}, "'response' is null in 1 record (line 3)"),
    ("completion", {"prompt": "w1", "completion": ""}, "'completion' is empty in 1 record (line 3)"),
    ("alpaca", {"instruction": "w1", "input": "", "output": {"a": 1}}, "'output' is not text in 1 record (line 3)"),
    ("chat", {"messages": [{"role": "user", "content": "w1"}]}, "'messages' has no assistant turn with content (loss is taken on assistant turns only) in 1 record (line 3)"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "w1"}, {"from": "bard", "value": "w2"}]},
     "'conversations' holds a turn from 'bard' (expected one of human, user, gpt, assistant, system) in 1 record (line 3)"),
    ("text", {"text": "   "}, "'text' is empty in 1 record (line 3)"),
]


@pytest.mark.parametrize("shape,bad,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_record_of_each_shape_gets_one_clear_error(shape, bad, message, tmp_path):
    rows = [_rows(shape, i) for i in range(N)]
    rows[2] = bad
    source = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_data(data_config(source=source))
    assert str(info.value) == f"data.source: {message}"


def test_a_record_that_fits_no_shape_is_named_with_its_columns(tmp_path):
    rows = [_rows("alpaca", i) for i in range(N)]
    rows[4] = {"question": "w1", "answer": "w2"}
    with pytest.raises(DataError, match=r"data.source: line 5 fits no record shape: columns found: question, answer; shapes: "):
        load_data(data_config(source=_write(tmp_path / "x.jsonl", rows)))
    rows[4] = _rows("sharegpt", 4)
    with pytest.raises(DataError, match=r"line 5 has the sharegpt shape \(columns conversations\) but line 1 has the alpaca shape"):
        load_data(data_config(source=_write(tmp_path / "x.jsonl", rows)))


def test_numbers_and_booleans_are_trained_as_text_only_with_a_counted_warning(tmp_path):
    rows = [_rows("instruction", i) for i in range(N)]
    rows[1]["response"], rows[3]["response"], rows[5]["response"] = 42, 7.5, True
    train, held, cfg, notes = load_data(data_config(source=_write(tmp_path / "n.jsonl", rows)))
    warned = [n for n in notes if "not text" in n]
    assert "data.source: 'response' holds 2 numbers, not text (line 2, line 4: 42)" in warned[0]
    assert "data.source: 'response' holds 1 true/false value, not text (line 6: True)" in warned[1]


def test_save_to_disk_folder_with_split_and_eval_split(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([_rows("completion", i) for i in range(N)]),
        "test": datasets.Dataset.from_list([_rows("completion", i) for i in range(3)]),
    }).save_to_disk(str(folder))
    train, held, cfg, _ = load_data(data_config(source=str(folder), eval_split="test"))
    assert (len(train), len(held), cfg.format) == (N, 3, "completion")
    with pytest.raises(DataError, match="data.source: the training set has 3 examples"):
        load_data(data_config(source=str(folder), split="test", eval_split="train"))
    with pytest.raises(DataError, match=r"data.source: no split 'validation' in .* \(splits: train, test\)"):
        load_data(data_config(source=str(folder), split="validation"))
    with pytest.raises(DataError, match=r"data.subset: .* is a save_to_disk folder, which holds no subsets .*got 'foo'"):
        load_data(data_config(source=str(folder), subset="foo"))  # was ignored: the search ran on the whole folder


def test_hugging_face_data_folder_with_subsets(tmp_path):
    folder = tmp_path / "hf"
    for subset, shape in (("short", "alpaca"), ("chat", "sharegpt")):
        (folder / subset).mkdir(parents=True)
        _write(folder / subset / "train.jsonl", [_rows(shape, i) for i in range(N)])
        _write(folder / subset / "dev.jsonl", [_rows(shape, i) for i in range(2)])
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        + "".join(f"- config_name: {s}\n  data_files:\n  - split: train\n    path: {s}/train.jsonl\n"
                  f"  - split: dev\n    path: {s}/dev.jsonl\n" for s in ("short", "chat"))
        + "---\n"
    )
    train, held, cfg, _ = load_data(data_config(source=str(folder), subset="chat", eval_split="dev"))
    assert (len(train), len(held), cfg.format) == (N, 2, "sharegpt")
    train, held, cfg, _ = load_data(data_config(source=str(folder), subset="short"))
    assert cfg.format == "alpaca" and len(train) + len(held) == N
