"""What the real clients get from our files: PEFT and transformers load the exported adapter (and
it names the user's base), transformers' adapter API works with the PEFT we can install,
TensorBoard reads every trial status, and a 4-bit MoE trial trains what the calculator counts.

The experiments here are written by hand in the layout `analysis.results` reads (params.json,
result.json, experiment_state-*.json, checkpoint_NNNNNN/adapter), with a real PEFT adapter saved
from the trial's own 4-bit model, so no Ray is started."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from lora_rank_search.search.cli import main

STATUSES = {  # trial status -> (Ray status in experiment_state, last reported step, trial_status, error.txt)
    "completed": ("TERMINATED", 20, "", False),
    "stopped": ("TERMINATED", 10, "", False),
    "error": ("ERROR", 10, "", True),
    "interrupted": ("RUNNING", 10, "", False),
    "pending": ("PENDING", 0, "", False),
    "diverged": ("TERMINATED", 10, "diverged", False),
    "oom": ("TERMINATED", 10, "oom", False),
}
MAX_STEPS = 20


def _experiment(root: Path, base: str, statuses: dict, adapter=None) -> str:
    """An experiment folder holding one trial per status (r = 1, 2, ...); `adapter` (a folder) is
    copied into the completed trial's checkpoint."""
    root.mkdir(parents=True)
    config = {"name": root.name, "model": {"name_or_path": base}, "train": {"max_steps": MAX_STEPS}, "lora": {"alpha": "2r"}}
    (root / "lora_rank_search.yaml").write_text(yaml.safe_dump(config))
    trial_data = []
    for r, (status, (ray_status, steps, reported, error)) in enumerate(statuses.items(), start=1):
        trial_id = f"abc_{r:05d}"
        folder = root / f"r{r}_seed0_{trial_id}"
        folder.mkdir()
        (folder / "params.json").write_text(json.dumps({"r": r, "seed": 0, "alpha_rule": "2r", "target_preset": "attention"}))
        rows = []
        for step in range(0, steps + 1, 10):
            row = {"step": step, "eval_loss": 3.0 - 0.05 * step - 0.01 * r, "train_loss": 3.1 - 0.05 * step, "trial_id": trial_id,
                   "lora_alpha": 2.0 * r, "target_modules": "q_proj,v_proj", "trainable_params": 100 * r, "lr": 1e-3,
                   "training_iteration": step // 10 + 1}
            if step == steps and reported:
                row["trial_status"] = reported
                row["failure"] = f"{reported} at step {step}"
            if step == steps and adapter is not None and status == "completed":
                row["checkpoint_dir_name"] = "checkpoint_000001"
            rows.append(row)
        (folder / "result.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
        if error:
            (folder / "error.txt").write_text("Traceback ...\nRuntimeError: boom\n")
        if adapter is not None and status == "completed":
            target = folder / "checkpoint_000001" / "adapter"
            target.mkdir(parents=True)
            for item in Path(adapter).iterdir():
                (target / item.name).write_bytes(item.read_bytes())
        trial_data.append([json.dumps({"trial_id": trial_id, "status": ray_status}), json.dumps({"num_failures": 0})])
    (root / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": trial_data}))
    return str(root)


def test_tensorboard_writes_every_trial_status_and_tensorboard_reads_it_back(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    from lora_rank_search.analysis.results import load_experiment
    from lora_rank_search.analysis.tb import SESSION_STATUS

    experiment = _experiment(tmp_path / "exp", "/nowhere/base", STATUSES)
    trials, _ = load_experiment(experiment)
    assert sorted(trials["status"]) == sorted(STATUSES), "the hand-made experiment holds every status"
    assert set(SESSION_STATUS) == set(STATUSES)
    logdir = tmp_path / "tb"
    assert main(["tensorboard", experiment, "--logdir", str(logdir), "--no-serve"]) == 0
    assert f"wrote {len(STATUSES)} runs" in capsys.readouterr().out
    expected = {"completed": "STATUS_SUCCESS", "stopped": "STATUS_SUCCESS", "error": "STATUS_FAILURE", "diverged": "STATUS_FAILURE",
                "oom": "STATUS_FAILURE", "interrupted": "STATUS_UNKNOWN", "pending": "STATUS_UNKNOWN"}
    for row in trials.itertuples():
        acc = EventAccumulator(str(logdir / row.trial_dir))
        acc.Reload()
        start, end = None, None
        for content in acc.PluginTagToContent("hparams").values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                start = data.session_start_info
            if data.HasField("session_end_info"):
                end = data.session_end_info
        assert start.hparams["status"].string_value == row.status
        assert api_pb2.Status.Name(end.status) == expected[row.status], row.status
        assert "loss/eval" in acc.Tags()["scalars"]



def _settings(model_path: str, targets) -> "TrialSettings":
    """A trial's settings for a 4-bit (float32 compute) model with these resolved targets."""
    from lora_rank_search.search.config import parse_config
    from lora_rank_search.search.space import trial_settings

    cfg = parse_config({"model": {"name_or_path": model_path}, "quantization": {"compute_dtype": "float32"},
                        "lora": {"alpha": "2r", "dropout": 0.0}})
    return trial_settings(cfg, model_path, targets)

@pytest.fixture(scope="module")
def exported_adapter(tiny_model, tmp_path_factory):
    """A real adapter of the trial's own 4-bit model (r=4 on attention, B made non-zero), saved as
    the trial saves it: its adapter_config.json names the per-machine prequantized cache."""
    import torch

    from lora_rank_search.trainables.lora import linear_layers, resolve_targets
    from lora_rank_search.trainables.model import meta_model
    from lora_rank_search.trainables.trial import build_model

    root = tmp_path_factory.mktemp("adapter")
    old = os.environ.get("LORA_RANK_SEARCH_CACHE")
    os.environ["LORA_RANK_SEARCH_CACHE"] = str(root / "cache")
    try:
        targets = resolve_targets("attention", linear_layers(meta_model(tiny_model)))
        settings = _settings(tiny_model, targets)
        build_model(settings, 4, "cpu")  # the first trial on a machine quantizes and fills the cache
        model = build_model(settings, 4, "cpu")  # every later one loads the cache
    finally:
        if old is None:
            os.environ.pop("LORA_RANK_SEARCH_CACHE")
        else:
            os.environ["LORA_RANK_SEARCH_CACHE"] = old
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    model.save_pretrained(root / "adapter")
    return root / "adapter"


def _export(tmp_path, tiny_model, exported_adapter, *extra) -> Path:
    experiment = _experiment(tmp_path / "exp", tiny_model, {"completed": STATUSES["completed"]}, adapter=exported_adapter)
    out = tmp_path / "export"
    assert main(["export", experiment, "--out", str(out), *extra]) == 0
    return out


def test_export_names_the_configured_base_and_peft_loads_it(tiny_model, exported_adapter, tmp_path):
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    trained_on = json.loads((exported_adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert "prequantized" in trained_on, "the trial's own adapter names the 4-bit cache"
    out = _export(tmp_path, tiny_model, exported_adapter)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_model
    info = json.loads((out / "lora_rank_export.json").read_text())
    assert info["base_model_name_or_path"] == tiny_model and info["trained_on"] == trained_on
    ids = torch.tensor([[4, 5, 6, 7, 8, 9]])
    auto = AutoPeftModelForCausalLM.from_pretrained(str(out))
    assert auto.base_model.model.config._name_or_path == tiny_model, "AutoPeftModel loaded the user's base"
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        plain = base(ids).logits
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(out))
    saved = {n: p for n, p in peft.named_parameters() if "lora_B" in n}
    assert saved and all(p.abs().sum() > 0 for p in saved.values()), "the trained (non-zero) B weights were loaded"
    with torch.no_grad():
        adapted, via_auto = peft(ids).logits, auto(ids).logits
    assert torch.allclose(adapted, via_auto) and not torch.allclose(adapted, plain)


def _adapter_api(tiny_model: str, out: str) -> None:
    """transformers' own adapter API on the exported folder: load_adapter, set_adapter,
    active_adapters, disable_adapters / enable_adapters."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[4, 5, 6, 7, 8, 9]])
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        plain = model(ids).logits
    model.load_adapter(out, adapter_name="rank")
    model.set_adapter("rank")
    assert model.active_adapters() == ["rank"]
    with torch.no_grad():
        adapted = model(ids).logits
    assert not torch.allclose(adapted, plain)
    model.disable_adapters()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, plain)
    model.enable_adapters()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, adapted)


def test_transformers_adapter_api_works_on_the_export(tiny_model, exported_adapter, tmp_path):
    """Fails on transformers 5.24 with PEFT 0.21 (its integration wants PEFT >= 0.22: set_adapter and
    active_adapters raise), which is why pyproject pins transformers < 5.24."""
    import peft
    import transformers

    from transformers.integrations.peft import MIN_PEFT_VERSION
    from packaging.version import Version

    out = _export(tmp_path, tiny_model, exported_adapter)
    assert Version(peft.__version__) >= Version(MIN_PEFT_VERSION), (
        f"transformers {transformers.__version__} wants PEFT >= {MIN_PEFT_VERSION}, installed {peft.__version__}: "
        "reinstall within pyproject's transformers pin")
    _adapter_api(tiny_model, str(out))


def test_export_refuses_to_replace_an_earlier_export_without_force(tiny_model, exported_adapter, tmp_path, capsys):
    out = _export(tmp_path, tiny_model, exported_adapter)
    (out / "adapter_model.safetensors").write_bytes(b"changed")
    experiment = str(tmp_path / "exp")
    assert main(["export", experiment, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out: {str(out)!r} holds an earlier export (r=1, trial r1_seed0_abc_00001" in err and "--force" in err
    assert (out / "adapter_model.safetensors").read_bytes() == b"changed", "left untouched"
    (out / "stale.bin").write_bytes(b"x")
    info = json.loads((out / "lora_rank_export.json").read_text())
    info["files"].append("stale.bin")  # a file the earlier export wrote and this one does not
    (out / "lora_rank_export.json").write_text(json.dumps(info))
    assert main(["export", experiment, "--out", str(out), "--force"]) == 0
    assert (out / "adapter_model.safetensors").read_bytes() == (exported_adapter / "adapter_model.safetensors").read_bytes()
    assert not (out / "stale.bin").exists()


def test_builtin_and_gguf_bases_name_what_a_peft_user_loads():
    from lora_rank_search.analysis.export import base_for_peft

    base, note = base_for_peft({"name_or_path": "builtin:smollm2-135m-instruct"})
    assert base == "HuggingFaceTB/SmolLM2-135M-Instruct" and "Q4_1" in note
    base, note = base_for_peft({"name_or_path": "/models/x", "gguf_file": "x.Q8_0.gguf"})
    assert base == "/models/x" and "gguf_file='x.Q8_0.gguf'" in note
    assert base_for_peft({"name_or_path": "org/model"}) == ("org/model", "")


@pytest.mark.slow
def test_4bit_moe_trial_trains_what_the_calculator_counts(tmp_path, monkeypatch):
    """A tiny Qwen3-MoE loaded in 4-bit as a trial loads it: the trial's trainable_params equals
    `lora-rank params` for every preset; attention layers are Linear4bit, the experts' fused 3-D
    weights stay in the compute dtype (bitsandbytes quantizes only nn.Linear) and their LoRA trains."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from lora_rank_search.trainables.params import parameter_table
    from lora_rank_search.trainables.tiny import build_tokenizer, word_list
    from lora_rank_search.trainables.trial import build_model

    monkeypatch.setenv("LORA_RANK_SEARCH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "moe"
    tokenizer = build_tokenizer(word_list(60), folder)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                            head_dim=16, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    rows, _ = parameter_table(str(folder), [4], ["attention", "mlp", "experts", "all-linear"])
    for row in rows:
        settings = _settings(str(folder), row.targets)
        model = build_model(settings, row.r, "cpu")
        params = [p for p in model.parameters() if p.requires_grad]
        assert sum(p.numel() for p in params) == row.params, row.targets_spec  # as run_trial reports trainable_params
        assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 8, "q/k/v/o of 2 layers are 4-bit"
        experts = [p for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj")) and "lora" not in n]
        assert experts and all(p.dtype == torch.float32 and p.dim() == 3 for p in experts), "experts are not quantized"
        ids = torch.randint(4, 60, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is not None for p in params), "every adapter weight gets a gradient"
