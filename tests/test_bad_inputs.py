"""A catalogue of bad inputs, each refused by the real CLI before any model loads or Ray starts:
exit code 2, one `error:` line naming the field and the value, no traceback, nothing written.

Adding a case is one line in CASES: (id, config, extra CLI args, expected fragment of the error).
`config` is a dict of overrides on the tiny test config, raw YAML text, or None (no config file);
strings may use {bad} (a folder of broken models, data and experiments) and {tmp} (this test's
folder).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml

from lora_rank_search.search.cli import main
from lora_rank_search.trainables.tiny import chain_records, write_jsonl

from conftest import WORDS

MORE_GPUS = torch.cuda.device_count() + 1  # more GPUs than this machine has (1 on a CPU machine)
MORE_CPUS = (os.cpu_count() or 1) + 1
NOT_CAUSAL = "model.name_or_path: '{bad}/%s' is not a causal language model (model_type '%s': %s"

CASES = [
    # --- the config file itself
    ("config file missing", None, [], "cannot read config file"),
    ("not valid YAML", "lora: [unclosed\n", [], "not valid YAML"),
    ("YAML with a python tag", "!!python/object/apply:os.system ['touch {tmp}/pwned']\n", [], "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("top level is a list", "- name\n- x\n", [], "expected a mapping of keys at the top level, got list"),
    ("--set without =", {}, ["--set", "lora.ranks"], "--set lora.ranks: expected key.sub=value"),
    # --- keys and types
    ("unknown top-level key", {"nmae": "x"}, [], "nmae: unknown key (valid keys: name, storage_path"),
    ("unknown section key", {"lora": {"rank": [8]}}, [], "lora.rank: unknown key (valid keys: ranks"),
    ("section not a mapping", {"train": 5}, [], "train: expected a mapping of keys, got 5"),
    ("number as text", {"train": {"learning_rate": "fast"}}, [], "train.learning_rate: expected a number, got 'fast'"),
    ("bool as text", {"model": {"trust_remote_code": "yes"}}, [], "model.trust_remote_code: expected true or false, got 'yes'"),
    ("fractional step count", {"train": {"max_steps": 10.5}}, [], "train.max_steps: expected an integer, got 10.5"),
    ("null where a value is required", {"train": {"batch_size": None}}, [], "train.batch_size: a value is required, got null"),
    # --- lora
    ("ranks empty", {"lora": {"ranks": []}}, [], "lora.ranks: must list at least one rank, got []"),
    ("rank zero", {"lora": {"ranks": [0]}}, [], "lora.ranks[0]: rank must be a positive integer, got 0"),
    ("rank negative", {"lora": {"ranks": [4, -8]}}, [], "lora.ranks[1]: rank must be a positive integer, got -8"),
    ("rank not an integer", {"lora": {"ranks": [4, 2.5]}}, [], "lora.ranks[1]: expected an integer, got 2.5"),
    ("rank is a word", {"lora": {"ranks": ["eight"]}}, [], "lora.ranks[0]: expected an integer, got 'eight'"),
    ("ranks duplicated", {"lora": {"ranks": [8, 4, 8]}}, [], "lora.ranks[2]: duplicate rank 8"),
    ("ranks not a list", {"lora": {"ranks": 8}}, [], "lora.ranks: expected a list, got 8"),
    ("alpha unparsable", {"lora": {"alpha": "3r"}}, [], "lora.alpha: must be a number or one of r | 2r | rslora, got '3r'"),
    ("alpha negative", {"lora": {"alpha": -16}}, [], "lora.alpha: must be positive, got -16.0"),
    ("dropout 1", {"lora": {"dropout": 1.0}}, [], "lora.dropout: must be in [0, 1), got 1.0"),
    ("dropout negative", {"lora": {"dropout": -0.1}}, [], "lora.dropout: must be in [0, 1), got -0.1"),
    ("unknown target preset", {"lora": {"target_modules": "attn"}}, [], "lora.target_modules: must be one of attention-qv | attention | mlp | experts | all-linear, got 'attn'"),
    ("target module the model lacks", {"lora": {"target_modules": ["q_proj", "qkv"]}}, [], "lora.target_modules: 'qkv' not found; the model's linear layers are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
    ("empty target list", {"lora": {"target_modules": []}}, [], "lora.target_modules: an explicit list must name at least one module, got []"),
    # --- the model
    ("model folder missing", {"model": {"name_or_path": "{bad}/no-such-model"}}, [], "model.name_or_path: model folder not found: '{bad}/no-such-model'"),
    ("model path is a GGUF file", {"model": {"name_or_path": "{bad}/model.gguf"}}, [], "is a file, not a model folder (for a GGUF file, set model.name_or_path to its folder"),
    ("model folder without config.json", {"model": {"name_or_path": "{bad}/no-config"}}, [], "model.name_or_path: no config.json in '{bad}/no-config'"),
    ("model config without model_type", {"model": {"name_or_path": "{bad}/bad-config"}}, [], "model.name_or_path: cannot read the model config of '{bad}/bad-config'"),
    ("model with its own code, not trusted", {"model": {"name_or_path": "{bad}/custom-code"}}, [],
     "contains custom code which must be executed to correctly load the model. You can inspect the repository content at {bad}/custom-code .); if you trust this repository's code, set model.trust_remote_code: true"),
    ("model folder without weights", {"model": {"name_or_path": "{bad}/no-weights"}}, [], "model.name_or_path: no weights (model.safetensors, pytorch_model.bin) in '{bad}/no-weights'"),
    ("GGUF file missing", {"model": {"gguf_file": "missing.gguf"}}, [], "model.gguf_file: 'missing.gguf' not found in"),
    ("unknown builtin model", {"model": {"name_or_path": "builtin:gpt-5"}}, [], "unknown builtin model 'builtin:gpt-5'; builtins: builtin:smollm2-135m-instruct"),
    ("encoder-decoder model", {"model": {"name_or_path": "{bad}/t5"}}, [], NOT_CAUSAL % ("t5", "t5", "an encoder-decoder model")),
    ("encoder model", {"model": {"name_or_path": "{bad}/bert"}}, [], NOT_CAUSAL % ("bert", "bert", "a bidirectional encoder")),
    # --- the data
    ("data file missing", {"data": {"source": "{bad}/missing.jsonl"}}, [], "data.source: data file not found: '{bad}/missing.jsonl'"),
    ("data file of unknown type", {"data": {"source": "{bad}/data.xlsx"}}, [], "data.source: unsupported file type '.xlsx'"),
    ("data file unparsable", {"data": {"source": "{bad}/broken.jsonl"}}, [], "data.source: cannot parse '{bad}/broken.jsonl': line 3 is not valid JSON"),
    ("prompt/response columns missing", {"data": {"source": "{bad}/qa.jsonl", "format": "instruction"}}, [], "data.source: column(s) 'prompt', 'response' not found; columns found: answer, question"),
    ("records that fit no shape", {"data": {"source": "{bad}/qa.jsonl"}}, [], "data.source: line 1 fits no record shape: columns found: question, answer; shapes: conversations (sharegpt), messages (chat), instruction+output (alpaca), prompt+completion (completion), prompt+response (instruction), text (text)"),
    ("text column missing", {"data": {"format": "text"}}, [], "data.source: column(s) 'text' not found; columns found: prompt, response"),
    ("messages column missing", {"data": {"format": "chat"}}, [], "data.source: column(s) 'messages' not found; columns found: prompt, response"),
    ("empty dataset", {"data": {"source": "{bad}/empty.jsonl"}}, [], "data.source: dataset is empty"),
    ("empty eval split", {"data": {"eval_fraction": 0.01}}, [], "data.eval_fraction: the eval split is empty (600 records, eval_fraction 0.01)"),
    ("empty eval file", {"data": {"eval_source": "{bad}/empty.jsonl"}}, [], "data.eval_source: dataset is empty"),
    ("unknown builtin dataset", {"data": {"source": "builtin:alpaca"}}, [], "data.source: unknown builtin dataset 'builtin:alpaca'"),
    ("unknown data format", {"data": {"format": "alpacca"}}, [], "data.format: must be one of auto | instruction | completion | alpaca | chat | sharegpt | text, got 'alpacca'"),
    ("eval_split of a file", {"data": {"eval_split": "test"}}, [], "data.eval_split: "),
    ("eval_split and eval_source", {"data": {"eval_split": "test", "eval_source": "{bad}/qa.jsonl"}}, [], "data.eval_split: give data.eval_source or data.eval_split, not both, got 'test'"),
    ("eval_fraction above 1", {"data": {"eval_fraction": 1.5}}, [], "data.eval_fraction: must be in (0, 1) when no eval_source is given, got 1.5"),
    ("max_seq_len zero", {"data": {"max_seq_len": 0}}, [], "data.max_seq_len: must be a positive integer, got 0"),
    ("max_seq_len leaves no response", {"data": {"max_seq_len": 1}}, [], "data.max_seq_len: no train example keeps a response token within max_seq_len=1"),
    ("a metric on text data", {"data": {"source": "{bad}/text.jsonl", "format": "text"}, "eval": {"metric": "exact_match"}}, [],
     "eval.metric: needs a prompt before the answer in the eval examples (a format with a response: instruction, completion, "
     "alpaca, chat or sharegpt); the one eval example has none in data.format 'text' (loss on every token)"),
    # --- training and the scheduler
    ("batch_size zero", {"train": {"batch_size": 0}}, [], "train.batch_size: must be a positive integer, got 0"),
    ("batch_size negative", {"train": {"batch_size": -8}}, [], "train.batch_size: must be a positive integer, got -8"),
    ("learning rate zero", {"train": {"learning_rate": 0}}, [], "train.learning_rate: must be positive, got 0.0"),
    ("eval_every above max_steps", {"train": {"eval_every": 50}}, [], "train.eval_every: must be <= train.max_steps (40), got 50"),
    ("warm-up as long as training", {"train": {"warmup_steps": 40}}, [], "train.warmup_steps: must be below train.max_steps (40), got 40"),
    ("seeds duplicated", {"train": {"seeds": [0, 0]}}, [], "train.seeds: duplicate seeds in [0, 0]"),
    ("grace_period above max_steps", {"scheduler": {"grace_period": 80}}, [], "scheduler.grace_period: must be <= train.max_steps (40), got 80"),
    ("grace_period zero", {"scheduler": {"grace_period": 0}}, [], "scheduler.grace_period: must be a positive number of steps, got 0"),
    ("reduction_factor below 2", {"scheduler": {"reduction_factor": 1}}, [], "scheduler.reduction_factor: must be >= 2, got 1.0"),
    ("unknown scheduler", {"scheduler": {"type": "hyperband"}}, [], "scheduler.type: must be one of sha | asha | none, got 'hyperband'"),
    ("unknown quant type", {"quantization": {"quant_type": "int3"}}, [], "quantization.quant_type: must be one of nf4 | fp4, got 'int3'"),
    ("unknown compute dtype", {"quantization": {"compute_dtype": "fp8"}}, [], "quantization.compute_dtype: must be one of auto | float32 | bfloat16 | float16, got 'fp8'"),
    # --- resources
    ("GPU fraction above 1", {"resources": {"gpus_per_trial": 1.5}}, [], "resources.gpus_per_trial: above 1 it must be a whole number of GPUs, got 1.5"),
    ("GPUs negative", {"resources": {"gpus_per_trial": -1}}, [], "resources.gpus_per_trial: must be >= 0, got -1.0"),
    ("GPUs as a word", {"resources": {"gpus_per_trial": "half"}}, [], "resources.gpus_per_trial: must be a number or auto, got 'half'"),
    ("more GPUs than the machine has", {"resources": {"gpus_per_trial": MORE_GPUS}}, [], f"resources.gpus_per_trial: {MORE_GPUS} GPU(s) asked for per trial, but this machine has"),
    ("more CPUs than the machine has", {"resources": {"cpus_per_trial": MORE_CPUS}}, [], f"resources.cpus_per_trial: {MORE_CPUS} CPUs asked for per trial, but this machine has"),
    ("CPUs zero", {"resources": {"cpus_per_trial": 0}}, [], "resources.cpus_per_trial: must be a positive integer, got 0"),
    ("max_failures negative", {"resources": {"max_failures": -1}}, [], "resources.max_failures: must be >= 0, got -1"),
    # --- the experiment folder
    ("name with a slash", {"name": "a/b"}, [], "name: must be a non-empty folder name without '/', got 'a/b'"),
    ("storage path is a file", {"storage_path": "{bad}/a-file"}, [], "storage_path: cannot write to '{bad}/a-file'"),
    ("storage path under a file", {"storage_path": "{bad}/a-file/runs"}, [], "storage_path: cannot write to '{bad}/a-file/runs'"),
    # os.access says yes to root there; the folder cannot be made (a traceback after preparing, before)
    ("storage path in /proc", {"storage_path": "/proc/lrs-nope"}, [], "storage_path: cannot write to '/proc/lrs-nope'"),
    ("experiment exists", {"storage_path": "{bad}/runs", "name": "done"}, [], "name: experiment '{bad}/runs/done' already exists; add --resume to continue it, or choose another name"),
    ("folder of a run that died at once", {"storage_path": "{bad}/runs", "name": "died"}, [], "name: folder '{bad}/runs/died' already exists but holds no resumable search"),
    ("resume of nothing", {}, ["--resume"], "name: nothing to resume at '{tmp}/runs/test' (no experiment there; start without --resume)"),
    ("resume of a run that died at once", {"storage_path": "{bad}/runs", "name": "died"}, ["--resume"], "(the run stopped before its first snapshot; delete the folder and start without --resume)"),
    ("resume with a changed config", {"storage_path": "{bad}/runs", "name": "done", "lora": {"ranks": [1, 2]}}, ["--resume"], "lora.ranks: [1, 2] differs from [1, 2, 16, 32] in the experiment being resumed"),
    # --- issue 14, class 1: what used to end in a traceback
    ("config file not UTF-8", b"name: caf\xe9\n", [], "not UTF-8 text (byte 0xe9 on line 1)"),
    ("config path is a folder", "{tmp}", [], "is a folder, not a config file"),
    ("a column missing after the first 1,000 rows", {"data": {"source": "{bad}/late-missing.jsonl", "format": "instruction"}}, [], "data.source: 2 records lack the column 'prompt' (line 1201, line 1302)"),
    ("name with a NUL byte", {"name": "a\x00b"}, [], "name: must not contain a NUL byte, got 'a\\x00b'"),
    ("name of 300 characters", {"name": "n" * 300}, [], "name: must be at most 255 bytes (a folder name), got 'nnnn"),
    ("name with a newline", {"name": "a\nb"}, [], "name: must not contain control characters"),
    ("storage path with a NUL byte", {"storage_path": "{tmp}/ru\x00ns"}, [], "storage_path: must not contain a NUL byte"),
    ("storage path with an over-long folder name", {"storage_path": "{tmp}/" + "s" * 300}, [], "storage_path: a folder or file name in it is longer than 255 bytes"),
    ("data path with a NUL byte", {"data": {"source": "{bad}/a\x00.jsonl"}}, [], "data.source: must not contain a NUL byte"),
    ("model path of 300 characters", {"model": {"name_or_path": "{bad}/" + "m" * 300}}, [], "model.name_or_path: a folder or file name in it is longer than 255 bytes"),
    # --- class 2: accepted though it should have been refused
    ("empty config file", "", [], "the config is empty; an empty config would run the whole default search"),
    ("config of only comments", "# to do\n", [], "{tmp}/search.yaml: the config is empty"),
    ("config of an empty mapping", "{{}}\n", [], "the config is empty; an empty config would run the whole default search. Give at least model:"),
    ("data: null", {"data": None}, [], "data: a mapping of keys is required, got null"),
    ("a section null", {"train": None}, [], "train: a mapping of keys is required, got null"),
    ("top-level key given twice", "train:\n  max_steps: 5\nname: x\ntrain:\n  max_steps: 6\n", [], "train: key given twice in one mapping (lines 1 and 4)"),
    ("nested key given twice", "lora:\n  ranks: [1]\n  ranks: [2]\n", [], "ranks: key given twice in one mapping (lines 2 and 3)"),
    ("rank above the layers' width", {"lora": {"ranks": [8, 4096]}}, [], "lora.ranks[1]: rank 4096 is larger than the targeted layers allow; the largest meaningful rank is 64"),
    ("max_steps absurd", {"train": {"max_steps": 10**12}}, [], "train.max_steps: at most 10,000,000 steps per trial can be meant, got 1000000000000"),
    ("learning rate absurd", {"train": {"learning_rate": 1e6}}, [], "train.learning_rate: a learning rate must be in [1e-10, 1) to be meant for AdamW on an adapter, got 1000000.0"),
    ("learning rate vanishing", {"train": {"learning_rate": 1e-30}}, [], "train.learning_rate: a learning rate must be in [1e-10, 1)"),
    ("seed negative", {"train": {"seeds": [0, -1]}}, [], "train.seeds[1]: a seed must be in [0, 4294967295], got -1"),
    ("batch size absurd", {"train": {"batch_size": 10**9}}, [], "train.batch_size: at most 65,536 can be meant, got 1000000000"),
    ("GPU fraction vanishing", {"resources": {"gpus_per_trial": 1e-6}}, [], "resources.gpus_per_trial: a fraction below 0.01 GPU per trial cannot be meant"),
    ("null responses", {"data": {"source": "{bad}/null-response.jsonl"}}, [], "data.source: 'response' is null in 2 records (line 5, line 9)"),
    ("empty response", {"data": {"source": "{bad}/empty-response.jsonl"}}, [], "data.source: 'response' is empty in 1 record (line 3)"),
    ("response not text", {"data": {"source": "{bad}/list-response.jsonl"}}, [], "data.source: 'response' is not text in 1 record (line 2)"),
    ("empty text (text format)", {"data": {"format": "text", "source": "{bad}/empty-text.jsonl"}}, [], "data.source: 'text' is empty in 1 record (line 4)"),
    ("null response in the eval file", {"data": {"eval_source": "{bad}/null-response.jsonl"}}, [], "data.eval_source: 'response' is null in 2 records"),
    ("a record that is not a mapping", {"data": {"source": "{bad}/not-a-record.jsonl"}}, [], "data.source: every record must be a mapping of columns; 1 record is not (line 2"),
    ("one-row training set", {"data": {"source": "{bad}/one.jsonl", "eval_source": "{bad}/eval.jsonl"}}, [], "data.source: the training set has 1 example; a rank search needs at least 8"),
    ("chat without an assistant turn", {"data": {"format": "chat", "source": "{bad}/chat-no-assistant.jsonl"}}, [], "data.source: 'messages' has no assistant turn with content (loss is taken on assistant turns only) in 1 record (line 2)"),
    ("data source is a folder", {"data": {"source": "{bad}"}}, [], "data.source: cannot load the dataset folder '{bad}' (split 'train'"),
    ("data file not UTF-8", {"data": {"source": "{bad}/latin1.jsonl"}}, [], "data.source: '{bad}/latin1.jsonl' is not UTF-8 text (byte 0xe9"),
    ("broken line in a .json file", {"data": {"source": "{bad}/broken.json"}}, [], "data.source: cannot parse '{bad}/broken.json': line 3 column"),
    # --- issue 24: tracebacks and silent acceptances of the search command
    ("storage path with an unknown scheme", {"storage_path": "foo://bucket/runs"}, [], "storage_path: cannot open 'foo://bucket/runs' (Unrecognized filesystem type"),
    ("unreachable --address", {}, ["--address", "127.0.0.1:1"], "--address: no Ray cluster answers at '127.0.0.1:1' (tried a TCP connection to 127.0.0.1:1 for up to 10 s"),
    ("resume with the stored config deleted", {"storage_path": "{bad}/runs", "name": "no-config"}, ["--resume"], "{bad}/runs/no-config/lora_rank_search.yaml: the experiment's stored config is missing, so nothing says what this search was"),
    ("resume with the stored config emptied", {"storage_path": "{bad}/runs", "name": "empty-config"}, ["--resume"], "{bad}/runs/empty-config/lora_rank_search.yaml: the experiment's stored config is empty or not a mapping"),
]

# The other commands: (id, argv, expected fragment of the one error line). {exp}: a hand-made
# experiment folder (no search_meta.json), {file}: a YAML file, {bad}, {model}: the tiny model.
OTHER_CASES = [
    ("analyze given a file", ["analyze", "{file}"], "EXPERIMENT_DIR: '{file}' is a file, not an experiment folder"),
    ("analyze of an unknown URI scheme", ["analyze", "foo://bucket/exp"], "EXPERIMENT_DIR: cannot read 'foo://bucket/exp' (Unrecognized filesystem type"),
    ("analyze --out an existing file", ["analyze", "{exp}", "--out", "{file}"], "--out: '{file}' is a file; give a folder"),
    ("analyze --out an unwritable path", ["analyze", "{exp}", "--out", "{file}/out"], "--out: cannot write to '{file}/out' (Not a directory)"),
    ("export given a file", ["export", "{file}", "--out", "{tmp}/out"], "EXPERIMENT_DIR: '{file}' is a file, not an experiment folder"),
    ("tensorboard given a YAML file", ["tensorboard", "{file}", "--no-serve"], "EXPERIMENT_DIR: '{file}' is a file, not an experiment folder"),
    ("tensorboard --logdir an existing file", ["tensorboard", "{exp}", "--no-serve", "--logdir", "{file}"], "--logdir: '{file}' is a file; give a folder"),
    ("tensorboard --logdir an unwritable path", ["tensorboard", "{exp}", "--no-serve", "--logdir", "{file}/tb"], "--logdir: cannot write '{file}/tb'"),
    ("params: a non-numeric size", ["params", "{bad}/size-word"], "MODEL: {bad}/size-word/config.json hidden_size: expected a positive integer, got 'big'"),
    ("params: a config lacking hidden_size", ["params", "{bad}/no-hidden"], "MODEL: {bad}/no-hidden/config.json lacks hidden_size; transformers would fill in a default"),
    ("params: another field of the wrong type", ["params", "{bad}/intermediate-word"], "MODEL: cannot read the model config of '{bad}/intermediate-word': Validation error for field 'intermediate_size'"),
    ("params: an empty --targets", ["params", "{model}", "--targets", ""], "--targets: an empty value names no layer"),
]


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_model, chain_data) -> str:
    """Broken models, data and experiment folders, made once."""
    from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=80)).save_pretrained(root / "bert")
    T5ForConditionalGeneration(T5Config(d_model=16, d_kv=8, num_layers=1, num_heads=2, d_ff=32, vocab_size=80)).save_pretrained(root / "t5")
    shutil.copytree(tiny_model, root / "no-weights", ignore=shutil.ignore_patterns("model.safetensors"))
    shutil.copytree(tiny_model, root / "no-config", ignore=shutil.ignore_patterns("config.json"))
    shutil.copytree(tiny_model, root / "bad-config")
    (root / "bad-config" / "config.json").write_text(json.dumps({"hidden_size": 64}))
    shutil.copytree(tiny_model, root / "custom-code")  # a repository that ships its own config class
    config = json.loads((root / "custom-code" / "config.json").read_text())
    config.update(model_type="tinycustom", auto_map={"AutoConfig": "configuration_tinycustom.TinyCustomConfig"})
    (root / "custom-code" / "config.json").write_text(json.dumps(config))
    (root / "custom-code" / "configuration_tinycustom.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass TinyCustomConfig(LlamaConfig):\n    model_type = 'tinycustom'\n")
    (root / "model.gguf").write_bytes(b"GGUF")
    (root / "a-file").write_text("not a folder")
    (root / "empty.jsonl").write_text("")
    (root / "broken.jsonl").write_text('{"prompt": "w1", "response": "w2"}\n\n{"prompt": \n')  # the file's line 3
    (root / "data.xlsx").write_bytes(b"PK")
    write_jsonl([{"question": r["prompt"], "answer": r["response"]} for r in chain_records(WORDS, 20)], root / "qa.jsonl")
    rows = chain_records(WORDS, 1400)
    late = [dict(r) for r in rows]
    for i in (1200, 1301):  # past the first 1,000 rows
        del late[i]["prompt"]
    write_jsonl(late, root / "late-missing.jsonl")
    _jsonl(root / "null-response.jsonl", rows[:20], {4: {"response": None}, 8: {"response": None}})
    _jsonl(root / "empty-response.jsonl", rows[:20], {2: {"response": "  "}})
    _jsonl(root / "list-response.jsonl", rows[:20], {1: {"response": ["w1", "w2"]}})
    write_jsonl([{"text": f"{r['prompt']} {r['response']}"} for r in rows[:20]], root / "text.jsonl")
    _jsonl(root / "empty-text.jsonl", [{"text": f"{r['prompt']} {r['response']}"} for r in rows[:20]], {3: {"text": ""}})
    (root / "not-a-record.jsonl").write_text(json.dumps(rows[0]) + "\n[1, 2]\n" + json.dumps(rows[1]) + "\n")
    write_jsonl(rows[:1], root / "one.jsonl")
    write_jsonl(rows[100:160], root / "eval.jsonl")
    chats = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]} for r in rows[:20]]
    chats[1] = {"messages": [{"role": "user", "content": "w1"}, {"role": "user", "content": "w2"}]}
    write_jsonl(chats, root / "chat-no-assistant.jsonl")
    (root / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "response": "w1"}\n')
    (root / "broken.json").write_text('[\n  {"prompt": "w1", "response": "w2"},\n  {"prompt": }\n]\n')
    died = root / "runs" / "died"  # what a driver killed in its first seconds leaves: no experiment state
    died.mkdir(parents=True)
    (died / "lora_rank_search.yaml").write_text("name: died\n")
    (died / "tuner.pkl").write_bytes(b"")
    for name, saved in (("no-config", None), ("empty-config", "")):  # resumable, but the stored config is gone or empty
        folder = root / "runs" / name
        folder.mkdir(parents=True)
        (folder / "tuner.pkl").write_bytes(b"")
        (folder / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
        if saved is not None:
            (folder / "lora_rank_search.yaml").write_text(saved)
    with open(os.path.join(tiny_model, "config.json")) as handle:
        model_config = json.load(handle)
    for name, change in (("size-word", {"hidden_size": "big"}), ("no-hidden", {"hidden_size": None}),
                         ("intermediate-word", {"intermediate_size": "big"})):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({k: v for k, v in {**model_config, **change}.items() if v is not None}))
    return str(root)


def _jsonl(path, rows: list, changes: dict) -> None:
    """Write rows as jsonl, with row i (0-based; file line i + 1) updated by changes[i]."""
    write_jsonl([{**row, **changes.get(i, {})} for i, row in enumerate(rows)], path)


def _expand(value, names: dict):
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, dict):
        return {k: _expand(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, names) for v in value]
    return value


def _done_experiment(bad: str, raw: dict) -> None:
    """A resumable-looking experiment `done` whose saved config is this one with ranks [1, 2, 16, 32]."""
    from lora_rank_search.search.config import parse_config

    folder = os.path.join(bad, "runs", "done")
    os.makedirs(folder, exist_ok=True)
    saved = parse_config({**raw, "lora": {**raw["lora"], "ranks": [1, 2, 16, 32]}}).to_dict()
    with open(os.path.join(folder, "lora_rank_search.yaml"), "w") as handle:
        yaml.safe_dump(saved, handle)
    for name in ("tuner.pkl", "experiment_state-2026-01-01_00-00-00.json"):
        open(os.path.join(folder, name), "w").close()


@pytest.mark.parametrize("case, config, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_any_model_loads_or_ray_starts(case, config, argv, expected, bad, raw_config, tmp_path, capsys, weight_loads):
    import ray

    names = {"bad": bad, "tmp": str(tmp_path)}
    path = tmp_path / "search.yaml"
    if isinstance(config, dict):
        raw = raw_config(**_expand(config, names))
        if raw.get("name") == "done":
            _done_experiment(bad, raw)
        path.write_text(yaml.safe_dump(raw))
    elif isinstance(config, bytes):
        path.write_bytes(config)
    elif isinstance(config, str) and config.startswith("{tmp}"):
        path = tmp_path  # the config path itself is the bad input
    elif isinstance(config, str):
        path.write_text(_expand(config, names))
    code = main(["search", str(path), *argv])
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err + out
    assert len(errors) == 1 and _expand(expected, names) in errors[0], err
    assert "Traceback" not in err + out
    assert not ray.is_initialized(), "Ray was started"
    assert weight_loads == [], "model weights were loaded"
    assert not (tmp_path / "runs").exists(), "the storage folder was created"
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("case, argv, expected", OTHER_CASES, ids=[c[0] for c in OTHER_CASES])
def test_bad_input_to_the_other_commands_is_one_line_and_exit_2(case, argv, expected, bad, tiny_model, tmp_path, capsys):
    from conftest import write_fake_experiment

    names = {"bad": bad, "tmp": str(tmp_path), "model": tiny_model, "exp": write_fake_experiment(tmp_path / "exp"),
             "file": str(tmp_path / "search.yaml")}
    (tmp_path / "search.yaml").write_text("name: x\n")
    code = main(_expand(argv, names))
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err + out
    assert len(errors) == 1 and _expand(expected, names) in errors[0], err
    assert "Traceback" not in err + out


WINNER = "r0004_lr1e-3_seed0_fake_00005"  # the hand-made experiment's best trial (conftest.FAKE_TRIALS)


def _empty_results(exp: str) -> None:
    open(os.path.join(exp, WINNER, "result.json"), "w").close()


def _twin_folder(exp: str) -> None:
    shutil.copytree(os.path.join(exp, WINNER), os.path.join(exp, "r0004_lr1e-3_seed0_copy_00099"))


def _contradicting_params(exp: str) -> None:
    with open(os.path.join(exp, WINNER, "params.json"), "w") as handle:
        json.dump({"r": 8, "lr": 1e-3, "seed": 0, "alpha_rule": "16", "target_preset": "attention"}, handle)


def _other_eval_data(exp: str) -> None:
    path = os.path.join(exp, WINNER, "result.json")
    with open(path) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    with open(path, "w") as handle:  # evaluated on a shortened eval file after a resume: another base loss
        handle.write("".join(json.dumps({**row, "base_eval_loss": 2.7}) + "\n" for row in rows))


# Damaged experiment folders: (id, damage, expected fragment). analyze and export refuse them.
DAMAGE_CASES = [
    ("empty result.json of a trial that ran", _empty_results, f"{WINNER}: result.json holds no report (0 bytes), though the trial ran (Ray recorded it as TERMINATED)"),
    ("two folders claiming one arm", _twin_folder, f"{WINNER}: another folder claims the same arm attention r=4 lr=1e-3 seed=0 (r0004_lr1e-3_seed0_copy_00099)"),
    ("a trial evaluated on other data", _other_eval_data, f"{WINNER}: its base eval loss 2.7000 differs from the other trials' 3.0000: evaluated on other data"),
    ("params.json contradicting the results", _contradicting_params, f"{WINNER}: params.json says r=8 but result.json says r=4; params.json says r=8 but the folder name says r=4"),
]


@pytest.mark.parametrize("case, damage, expected", DAMAGE_CASES, ids=[c[0] for c in DAMAGE_CASES])
def test_a_damaged_experiment_folder_is_refused_by_analyze_and_export(case, damage, expected, tmp_path, capsys):
    from conftest import write_fake_experiment

    exp = write_fake_experiment(tmp_path / "exp")
    damage(exp)
    for argv in (["analyze", exp, "--out", str(tmp_path / "a")], ["export", exp, "--out", str(tmp_path / "x")]):
        code = main(argv)
        out, err = capsys.readouterr()
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2, err + out
        assert len(errors) == 1 and "EXPERIMENT_DIR:" in errors[0] and any(line.startswith(f"  {expected}") for line in err.splitlines()), err
        assert "Traceback" not in err + out
    assert not (tmp_path / "x").exists() and not (tmp_path / "a").exists()


def test_analyze_without_search_meta_json_is_no_traceback(tmp_path, capsys):
    from conftest import write_fake_experiment

    exp = write_fake_experiment(tmp_path / "exp")
    assert not os.path.exists(os.path.join(exp, "search_meta.json"))
    assert main(["analyze", exp, "--out", str(tmp_path / "out")]) == 0
    assert "Traceback" not in "".join(capsys.readouterr())


def test_the_catalogue_is_large_and_its_cases_distinct():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)
    assert len({c[3] for c in CASES}) == len(CASES)
