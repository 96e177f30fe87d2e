"""Issue 14 without Ray: warnings for what is merely unusual, the truth after a Ctrl-C during
preparation, incomplete experiment folders in analyze/export/tensorboard, and the checkpoint a
resumed trial falls back on."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml

from lora_rank_search.analysis.export import stop_note
from lora_rank_search.analysis.results import check_complete, load_experiment
from lora_rank_search.search.cli import main
from lora_rank_search.search.config import config_warnings, parse_config
from lora_rank_search.search.runner import prepare


def test_unusual_but_possible_inputs_are_warned_about_on_stderr(raw_config, chain_data, capsys):
    cfg = parse_config(raw_config(
        data={"eval_source": chain_data},  # the training file itself
        lora={"ranks": [1, 48], "target_modules": "all-linear"},
        train={"learning_rate": 0.5},
    ))
    assert config_warnings(cfg) == ["train.learning_rate: 0.5 is unusually high for LoRA with AdamW (usual: 1e-06 to 0.1)"]
    prepare(cfg, log=lambda _: None)
    err = capsys.readouterr().err.splitlines()
    assert "warning: data.eval_source: is the training file: 600 of 600 eval examples also appear in the training data;" \
           " their eval loss measures memorization, not generalization" in err
    assert any(line.startswith("warning: lora.ranks[1]: rank 48 exceeds min(in, out) = ") for line in err), err


def test_a_batch_larger_than_the_training_data_is_warned_about(raw_config, capsys):
    prepare(parse_config(raw_config(train={"batch_size": 1500})), log=lambda _: None)
    err = capsys.readouterr().err
    assert "warning: train.batch_size: 1500 is more than the 542 training examples: every micro-batch repeats examples" in err, err
    prepare(parse_config(raw_config(train={"batch_size": 16})), log=lambda _: None)
    assert "train.batch_size" not in capsys.readouterr().err


@pytest.mark.parametrize("over, warned", [
    ({"scheduler": {"type": "asha", "confirm": "full"}},
     ["scheduler.confirm: 'full' has no effect: confirmations run under successive halving only (scheduler.type sha), not asha"]),
    ({"scheduler": {"type": "none", "confirm": "tail", "grace_period": 10}},
     ["scheduler.confirm: 'tail' has no effect: confirmations run under successive halving only (scheduler.type sha), not none",
      "scheduler.grace_period: 10 has no effect: scheduler.type none stops no trial early",
      "scheduler.reduction_factor: 2.0 has no effect: scheduler.type none stops no trial early"]),  # conftest's base writes it
    ({"scheduler": {"type": "asha", "confirm": "off"}}, []),
    ({"scheduler": {"type": "sha", "confirm": "full"}}, []),
    ({"quantization": {"load_in_4bit": False, "quant_type": "fp4"}},
     ["quantization.quant_type: 'fp4' has no effect: quantization.load_in_4bit is false"]),
    ({"eval": {"max_new_tokens": 8}}, ["eval.max_new_tokens: 8 has no effect: eval.metric is not set"]),
    ({"budget": {"fit": "shrink"}},
     ["budget.fit: 'shrink' has no effect: no budget is set (budget.gpu_hours, cpu_hours, wall_minutes)"]),
    ({"budget": {"fit": "shrink", "wall_minutes": 30}}, []),
    ({"tracking": {"wandb": {"mode": "offline"}}},
     ["tracking.wandb.mode: 'offline' has no effect: tracking.wandb.project is not set (W&B is off)"]),
    ({"data": {"split": "validation"}}, ["data.split: 'validation' has no effect: data.source '{source}' is a file or a builtin, which has no splits"]),
])
def test_a_written_setting_that_does_nothing_with_the_rest_of_the_config_is_warned_about(raw_config, over, warned):
    """scheduler.confirm under ASHA was ignored without a word; the class: every key that acts only
    together with another (`checks.IDLE_WHEN`), warned about only where the user wrote it."""
    from lora_rank_search.search.config import idle_settings

    raw = raw_config(**over)
    assert idle_settings(raw, parse_config(raw)) == [w.format(source=raw["data"]["source"]) for w in warned]


def test_idle_settings_are_printed_when_the_config_is_loaded(raw_config, tmp_path, capsys):
    from lora_rank_search.search.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw_config()))
    load_config(str(path), ["scheduler.confirm=full"])  # conftest's base config runs ASHA
    assert ("warning: scheduler.confirm: 'full' has no effect: confirmations run under successive halving only "
            "(scheduler.type sha), not asha") in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["sha", "asha"])
def test_a_grace_period_as_long_as_the_training_is_warned_about_as_no_halving(raw_config, kind):
    lines = config_warnings(parse_config(raw_config(train={"max_steps": 20}, scheduler={"type": kind, "grace_period": 20})))
    assert lines == [f"scheduler.grace_period: 20 steps, as many as train.max_steps: {kind} has no rung before the end, so it "
                     "stops no trial early and every arm trains 20 steps (the full grid); lower grace_period to compare the "
                     "arms earlier, or set scheduler.type none"]
    assert config_warnings(parse_config(raw_config(train={"max_steps": 20}, scheduler={"type": kind, "grace_period": 10}))) == []


@pytest.mark.parametrize("gpus, idle", [(2, "1 GPU per trial stays"), (4, "3 GPUs per trial stay"), (1, None), (0.5, None)])
def test_more_than_one_gpu_per_trial_is_warned_about_as_idle(raw_config, gpus, idle):
    """A trial's model is loaded on one device, never split: GPUs past the first sit idle."""
    lines = [w for w in config_warnings(parse_config(raw_config(resources={"gpus_per_trial": gpus}))) if "gpus_per_trial" in w]
    if idle is None:
        assert lines == []
    else:
        assert lines == [f"resources.gpus_per_trial: {gpus} GPUs per trial, but a trial trains on one: its model is loaded on "
                         f"one device, never split (`device_map={{'': device}}`), so {idle} reserved and idle; use 1, or a "
                         f"fraction to share a GPU"]


def test_an_eval_file_that_overlaps_the_training_file_is_warned_about_with_the_count(raw_config, chain_data, tmp_path, capsys):
    with open(chain_data) as handle:
        lines = handle.readlines()
    (tmp_path / "eval.jsonl").write_text("".join(lines[:7]) + json.dumps({"prompt": "w1 w2", "response": "w3"}) + "\n")
    prepare(parse_config(raw_config(data={"eval_source": str(tmp_path / "eval.jsonl")})), log=lambda _: None)
    err = capsys.readouterr().err
    assert "warning: data.eval_source: 7 of 8 eval examples also appear in the training data;" in err
    # and 8 examples are few to judge ranks on (a 1-example eval set was accepted without a word)
    assert "warning: data.eval_source: the eval set has 8 examples (" in err and "hold out at least 20" in err
    prepare(parse_config(raw_config()), log=lambda _: None)  # the fixture's hash split holds out 58
    assert "the eval set has" not in capsys.readouterr().err


def test_an_eval_split_that_is_the_training_split_is_warned_about_like_an_eval_file():
    from lora_rank_search.search.config import DataConfig
    from lora_rank_search.trainables.data import overlap_warning

    records = [{"prompt": f"w{i}", "response": "w1"} for i in range(5)]
    same = DataConfig(source="/d", format="instruction", split="validation", eval_split="validation")
    assert overlap_warning(records, records[:2], same) == (
        "data.eval_split: is the training split (data.split 'validation'): 2 of 2 eval examples also appear in the training "
        "data; their eval loss measures memorization, not generalization")
    other = DataConfig(source="/d", format="instruction", split="train", eval_split="test")
    assert overlap_warning(records, records[:1] + [{"prompt": "w9", "response": "w2"}], other).startswith(
        "data.eval_split: 1 of 2 eval examples also appear")
    assert overlap_warning(records, [{"prompt": "w9", "response": "w2"}], other) is None


def test_a_metric_over_eval_answers_cut_by_max_seq_len_is_warned_about(raw_config, tmp_path, capsys):
    """exact_match compared the generations with answers truncation had cut: a learned task scored 0."""
    rows = [{"prompt": " ".join(["w1"] * 30), "response": "w3 w4 w5"}] * 3 + [{"prompt": "w1", "response": "w3"}] * 2
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = raw_config(data={"eval_source": str(tmp_path / "eval.jsonl")}, eval={"metric": "exact_match"})
    prepare(parse_config(raw), log=lambda _: None)
    assert ("warning: eval.metric: 3 of 5 eval examples have their answer cut at data.max_seq_len=32: exact_match compares "
            "each generation with the cut answer") in capsys.readouterr().err
    prepare(parse_config(raw_config(data={"eval_source": str(tmp_path / "eval.jsonl")})), log=lambda _: None)
    assert "eval.metric" not in capsys.readouterr().err, "the eval loss is not a comparison with the whole answer"


def test_the_cli_prints_config_warnings_and_goes_on(raw_config, tmp_path, capsys):
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw_config(train={"learning_rate": 1e-8}, model={"name_or_path": str(tmp_path / "none")})))
    assert main(["search", str(path)]) == 2  # refused later, for the model; the warning came first
    err = capsys.readouterr().err
    assert "warning: train.learning_rate: 1e-08 is unusually low for LoRA with AdamW" in err and "Traceback" not in err


def test_ctrl_c_while_preparing_says_nothing_was_written_and_not_to_resume(raw_config, tmp_path, capsys, monkeypatch):
    import lora_rank_search.search.runner
    from lora_rank_search import search

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(search.runner, "prepare", interrupted)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw_config()))
    assert main(["search", str(path)]) == 130
    err = capsys.readouterr().err
    assert "interrupted before the search started; nothing was written. Start again with:" in err
    assert "--resume" not in err
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- incomplete experiments

def _report(trial_id: str, r: int, step: int, loss: float) -> dict:
    return {"trial_id": trial_id, "r": r, "seed": 0, "step": step, "eval_loss": loss, "train_loss": loss, "lora_alpha": 2.0 * r,
            "trainable_params": 100 * r, "adapter_bytes": 400 * r, "peak_memory_bytes": 1, "tokens_per_s": 1.0,
            "time_total_s": 1.0, "timestamp": 1.0, "trial_status": "ok", "failure": "", "target_modules": "q_proj"}


@pytest.fixture
def experiment(tmp_path) -> str:
    """A finished-looking experiment of three trials (r = 1, 2, 4), made by hand."""
    root = tmp_path / "exp"
    root.mkdir()
    (root / "lora_rank_search.yaml").write_text(yaml.safe_dump({"train": {"max_steps": 20}}))
    for r, loss in ((1, 2.0), (2, 1.5), (4, 1.4)):
        trial = root / f"r{r:04d}_seed0_t{r}_00000"
        trial.mkdir()
        (trial / "params.json").write_text(json.dumps({"r": r, "seed": 0}))
        (trial / "result.json").write_text("".join(json.dumps(_report(f"t{r}_00000", r, s, loss + 1 / s)) + "\n" for s in (10, 20)))
        (trial / "progress.csv").write_text("step\n10\n20\n")
    return str(root)


def test_a_complete_experiment_has_no_incomplete_folders(experiment):
    assert check_complete(experiment) == []


def test_params_json_that_is_not_a_mapping_is_named_not_a_traceback(experiment, capsys):
    (open(os.path.join(experiment, "r0002_seed0_t2_00000", "params.json"), "w")).write("[1, 2]")
    for argv in (["analyze", experiment], ["export", experiment, "--out", os.path.join(experiment, "..", "out")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "r0002_seed0_t2_00000: params.json is not a mapping (it holds a list)" in err and "Traceback" not in err
        assert "--allow-incomplete" in err
    assert main(["tensorboard", experiment, "--no-serve", "--logdir", os.path.join(experiment, "..", "tb")]) == 0
    assert "warning: EXPERIMENT_DIR: incomplete trial folder r0002_seed0_t2_00000: params.json is not a mapping" in capsys.readouterr().err


def test_a_deleted_result_json_refuses_a_recommendation_unless_allowed(experiment, capsys):
    os.remove(os.path.join(experiment, "r0004_seed0_t4_00000", "result.json"))  # the best trial's results
    assert main(["analyze", experiment]) == 2
    err = capsys.readouterr().err
    assert "EXPERIMENT_DIR: 1 trial folder is incomplete or damaged, so a recommendation could be wrong:" in err
    assert "r0004_seed0_t4_00000: result.json is missing, though the trial ran (its folder holds its outputs)" in err
    lines = check_complete(experiment, allow_incomplete=True)
    assert lines == ["r0004_seed0_t4_00000: result.json is missing, though the trial ran (its folder holds its outputs)"]
    trials, _ = load_experiment(experiment)
    assert sorted(trials["r"]) == [1, 2, 4]


def test_a_truncated_result_json_line_is_named(experiment):
    with open(os.path.join(experiment, "r0001_seed0_t1_00000", "result.json"), "a") as handle:
        handle.write('{"trial_id": "t1_00000", "st')
    assert check_complete(experiment, allow_incomplete=True) == ["r0001_seed0_t1_00000: result.json line 3 not a JSON report"]


def test_a_trial_that_never_started_is_pending_not_incomplete(experiment):
    trial = os.path.join(experiment, "r0008_seed0_t8_00000")
    os.makedirs(trial)
    with open(os.path.join(trial, "params.json"), "w") as handle:
        json.dump({"r": 8, "seed": 0}, handle)
    assert check_complete(experiment) == []
    trials, _ = load_experiment(experiment)
    assert trials.set_index("r").loc[8, "status"] == "pending"


@pytest.mark.parametrize("status, reason", [
    ("stopped", "the scheduler stopped this trial at step 10 of 40"),
    ("interrupted", "the search was interrupted at step 10 of 40 (resume it with --resume"),
    ("error", "this trial failed with an error at step 10 of 40"),
])
def test_export_names_the_real_reason_a_trial_ended_early(status, reason):
    note = stop_note({"trial_status": status, "trial_steps": 10, "max_steps": 40})
    assert reason in note and note.endswith("train it fully before shipping)")
    assert stop_note({"trial_status": "completed", "trial_steps": 40, "max_steps": 40}) == ""


# --------------------------------------------------------------------------- checkpoint fallback

@pytest.mark.slow
def test_a_checkpoint_that_does_not_load_falls_back_to_the_previous_one(raw_config, tmp_path, capsys):
    from ray import tune

    from lora_rank_search.search.space import trial_settings
    from lora_rank_search.trainables.trial import CheckpointUnusable, restorable_checkpoint, run_trial, saved_step

    cfg = parse_config(raw_config(train={"max_steps": 4, "eval_every": 2}, scheduler={"type": "none"}))
    prepared = prepare(cfg, log=lambda _: None)
    settings = trial_settings(cfg, prepared.model_path, prepared.targets)
    trial = tmp_path / "trial"
    saved = []

    def keep(metrics, folder):
        target = trial / f"checkpoint_{len(saved):06d}"
        shutil.copytree(folder, target)
        saved.append(target)

    run_trial({"r": 2, "seed": 0}, settings, prepared.data, keep)
    newest = saved[-1] / "adapter" / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    local = restorable_checkpoint(tune.Checkpoint(str(saved[-1])))
    assert saved_step(local) == 2, "the previous evaluation's checkpoint"
    err = capsys.readouterr().err
    assert f"warning: checkpoint: {saved[-1]}/adapter/adapter_model.safetensors (" in err and "does not load" in err

    (saved[0] / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(CheckpointUnusable, match=r"no kept checkpoint of this trial loads: .*checkpoint_000001/adapter/adapter_model.safetensors .*checkpoint_000000/trainer_state.pt"):
        restorable_checkpoint(tune.Checkpoint(str(saved[-1])))
