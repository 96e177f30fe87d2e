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

from search.cli import main
from trainables.tiny import chain_records, write_jsonl

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
    ("model folder without weights", {"model": {"name_or_path": "{bad}/no-weights"}}, [], "model.name_or_path: no weights (model.safetensors, pytorch_model.bin) in '{bad}/no-weights'"),
    ("GGUF file missing", {"model": {"gguf_file": "missing.gguf"}}, [], "model.gguf_file: 'missing.gguf' not found in"),
    ("unknown builtin model", {"model": {"name_or_path": "builtin:gpt-5"}}, [], "unknown builtin model 'builtin:gpt-5'; builtins: builtin:smollm2-135m-instruct"),
    ("encoder-decoder model", {"model": {"name_or_path": "{bad}/t5"}}, [], NOT_CAUSAL % ("t5", "t5", "an encoder-decoder model")),
    ("encoder model", {"model": {"name_or_path": "{bad}/bert"}}, [], NOT_CAUSAL % ("bert", "bert", "a bidirectional encoder")),
    # --- the data
    ("data file missing", {"data": {"source": "{bad}/missing.jsonl"}}, [], "data.source: data file not found: '{bad}/missing.jsonl'"),
    ("data file of unknown type", {"data": {"source": "{bad}/data.xlsx"}}, [], "data.source: unsupported file type '.xlsx'"),
    ("data file unparsable", {"data": {"source": "{bad}/broken.jsonl"}}, [], "data.source: cannot parse '{bad}/broken.jsonl' (JSONDecodeError"),
    ("prompt/response columns missing", {"data": {"source": "{bad}/qa.jsonl"}}, [], "data.source: column(s) 'prompt', 'response' not found; columns found: answer, question"),
    ("text column missing", {"data": {"format": "text"}}, [], "data.source: column(s) 'text' not found; columns found: prompt, response"),
    ("messages column missing", {"data": {"format": "chat"}}, [], "data.source: column(s) 'messages' not found; columns found: prompt, response"),
    ("empty dataset", {"data": {"source": "{bad}/empty.jsonl"}}, [], "data.source: dataset is empty"),
    ("empty eval split", {"data": {"eval_fraction": 0.01}}, [], "data.eval_fraction: the eval split is empty (600 records, eval_fraction 0.01)"),
    ("empty eval file", {"data": {"eval_source": "{bad}/empty.jsonl"}}, [], "data.eval_source: dataset is empty"),
    ("unknown builtin dataset", {"data": {"source": "builtin:alpaca"}}, [], "data.source: unknown builtin dataset 'builtin:alpaca'"),
    ("unknown data format", {"data": {"format": "alpaca"}}, [], "data.format: must be one of instruction | chat | text, got 'alpaca'"),
    ("eval_fraction above 1", {"data": {"eval_fraction": 1.5}}, [], "data.eval_fraction: must be in (0, 1) when no eval_source is given, got 1.5"),
    ("max_seq_len zero", {"data": {"max_seq_len": 0}}, [], "data.max_seq_len: must be a positive integer, got 0"),
    ("max_seq_len leaves no response", {"data": {"max_seq_len": 1}}, [], "data.max_seq_len: no train example keeps a response token within max_seq_len=1"),
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
    ("experiment exists", {"storage_path": "{bad}/runs", "name": "done"}, [], "name: experiment '{bad}/runs/done' already exists; add --resume to continue it, or choose another name"),
    ("folder of a run that died at once", {"storage_path": "{bad}/runs", "name": "died"}, [], "name: folder '{bad}/runs/died' already exists but holds no resumable search"),
    ("resume of nothing", {}, ["--resume"], "name: nothing to resume at '{tmp}/runs/test' (no experiment there; start without --resume)"),
    ("resume of a run that died at once", {"storage_path": "{bad}/runs", "name": "died"}, ["--resume"], "(the run stopped before its first snapshot; delete the folder and start without --resume)"),
    ("resume with a changed config", {"storage_path": "{bad}/runs", "name": "done", "lora": {"ranks": [1, 2]}}, ["--resume"], "lora.ranks: [1, 2] differs from [1, 2, 16, 32] in the experiment being resumed"),
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
    (root / "model.gguf").write_bytes(b"GGUF")
    (root / "a-file").write_text("not a folder")
    (root / "empty.jsonl").write_text("")
    (root / "broken.jsonl").write_text('{"prompt": "w1", "response": "w2"}\n{"prompt": \n')
    (root / "data.xlsx").write_bytes(b"PK")
    write_jsonl([{"question": r["prompt"], "answer": r["response"]} for r in chain_records(WORDS, 20)], root / "qa.jsonl")
    died = root / "runs" / "died"  # what a driver killed in its first seconds leaves: no experiment state
    died.mkdir(parents=True)
    (died / "lora_rank_search.yaml").write_text("name: died\n")
    (died / "tuner.pkl").write_bytes(b"")
    return str(root)


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
    from search.config import parse_config

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
    assert not (tmp_path / "runs" / "test").exists(), "an experiment folder was written"
    assert not (tmp_path / "pwned").exists()


def test_the_catalogue_is_large_and_its_cases_distinct():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)
    assert len({c[3] for c in CASES}) == len(CASES)
