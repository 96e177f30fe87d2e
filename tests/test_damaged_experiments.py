"""Issue 24: a damaged or changed experiment never yields a confident verdict.

Pure checks first (hand-made inputs, no Ray); then each class of damage on a copy of one real
experiment folder, written once per session by a real tiny search (2 ranks, 20 steps, no early
stop): the verdict refuses (exit 2, the folder named, no traceback) unless --allow-incomplete,
and the export never ships the damaged or non-finite trial. Last, a real search is resumed after
its data, model or stored config changed underneath.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket

import pandas as pd
import pytest
import yaml

from lora_rank_search.analysis.integrity import arm_mismatch, base_loss_outliers, duplicate_arms, nonfinite_eval
from lora_rank_search.search.cli import main
from lora_rank_search.search.fingerprints import changes, fingerprints

from conftest import BASE, merge

# --------------------------------------------------------------------------- pure checks


def test_a_nan_or_infinite_eval_is_found_with_its_step():
    assert nonfinite_eval(pd.DataFrame({"step": [10, 20, 30], "eval_loss": [2.0, 2.2, 2.5]})) is None
    assert nonfinite_eval(pd.DataFrame({"step": [10]})) is None
    step, value = nonfinite_eval(pd.DataFrame({"step": [10, 20, 30], "eval_loss": [2.0, "x", math.inf]}))
    assert step == 20 and math.isnan(value)
    for bad in (math.inf, -math.inf, math.nan):
        step, value = nonfinite_eval(pd.DataFrame({"step": [10, 20], "eval_loss": [2.0, bad]}))
        assert step == 20 and (value == bad or (math.isnan(value) and math.isnan(bad)))


def test_params_that_contradict_the_results_or_the_folder_name_are_named():
    history = pd.DataFrame({"r": [1, 1], "learning_rate": [3e-3, 3e-3], "seed": [0, 0]})
    assert arm_mismatch({"r": 1, "lr": 3e-3, "seed": 0}, history, {"r": 1, "lr": 3e-3, "seed": 0}) == []
    assert arm_mismatch({"r": 2, "lr": 3e-3, "seed": 0}, history, {"r": 1, "lr": 3e-3, "seed": 0}) == [
        "params.json says r=2 but result.json says r=1", "params.json says r=2 but the folder name says r=1"]
    assert arm_mismatch({"r": 1, "lr": 1e-3, "seed": 0}, history, None) == ["params.json says lr=1e-3 but result.json says learning_rate=3e-3"]


def test_two_folders_claiming_one_arm_are_both_named():
    rows = [{"trial_dir": "a", "trial_id": "t1", "r": 2, "lr": 1e-3, "seed": 0, "target_choice": ""},
            {"trial_dir": "b", "trial_id": "t2", "r": 2, "lr": 1e-3, "seed": 0, "target_choice": ""},
            {"trial_dir": "c", "trial_id": "t3", "r": 2, "lr": 1e-3, "seed": 1, "target_choice": ""}]
    found = duplicate_arms(rows)
    assert sorted(found) == ["a", "b"] and "r=2 lr=1e-3 seed=0 (b)" in found["a"]
    assert duplicate_arms(rows[:1] + [{**rows[2], "trial_id": "t1"}]) .keys() == {"a", "c"}  # one trial id in two folders


def test_a_trial_whose_base_loss_differs_from_the_others_is_named():
    rows = [{"trial_dir": name, "base_eval_loss": base} for name, base in (("a", 4.19), ("b", 4.1901), ("c", 4.02), ("d", math.nan))]
    assert list(base_loss_outliers(rows)) == ["c"]
    assert "its base eval loss 4.0200 differs from the other trials' 4.1900" in base_loss_outliers(rows)["c"]
    assert base_loss_outliers(rows[:1]) == {} and base_loss_outliers(rows[:2]) == {}


def test_fingerprint_changes_name_the_field_and_the_file(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    config = {"name": "x", "data": {"source": str(data)}, "resources": {"cpus_per_trial": 1}}
    before = fingerprints(config, str(model))
    assert changes(before, fingerprints({**config, "resources": {"cpus_per_trial": 2}}, str(model))) == []  # resources may change
    data.write_text('{"prompt": "a", "response": "c"}\n')
    (model / "model.safetensors").write_bytes(b"other weights")
    found = changes(before, fingerprints(config, str(model)))
    assert found[0].startswith(f"data.source: the contents of {data} changed since the search started")
    assert found[1].startswith(f"model.name_or_path: the contents of {model / 'model.safetensors'} changed")
    assert changes(before, fingerprints({**config, "name": "y"}, str(model)))[0].startswith("config: the experiment's config differs")


def test_an_address_that_does_not_answer_fails_fast_naming_what_was_tried(monkeypatch):
    from lora_rank_search.search.address import address_problem

    def silent(*args, timeout=None, **kwargs):
        raise socket.timeout("timed out")

    monkeypatch.setattr(socket, "create_connection", silent)
    assert address_problem("ray://10.1.2.3:10001", timeout_s=0.1).startswith(
        "--address: no Ray cluster answers at 'ray://10.1.2.3:10001' (tried a TCP connection to 10.1.2.3:10001 for up to 0.1 s: timed out)")
    assert address_problem("auto") is None and address_problem(None) is None


def test_target_choices_that_resolve_to_the_same_layers_are_merged_with_a_warning(raw_config, capsys):
    from lora_rank_search.search.config import parse_config
    from lora_rank_search.search.runner import prepare
    from lora_rank_search.search.space import num_trials

    cfg = parse_config(raw_config(lora={"ranks": [1, 2], "target_modules": ["attention", ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp"]}))
    prepared = prepare(cfg, log=lambda _: None)
    assert list(prepared.choices) == ["attention", "mlp"] and num_trials(prepared.cfg) == 2 * 2
    assert ("warning: lora.target_modules: target choice 'q_proj+k_proj+v_proj+o_proj' selects the same layers as 'attention'"
            in capsys.readouterr().err)


def _hand_made(root, lines: list[str]) -> str:
    """An experiment of one finished trial (r=2, 20 steps) whose result.json holds `lines`."""
    trial = root / "r0002_lr1e-3_seed0_t_00000"
    trial.mkdir(parents=True)
    (root / "lora_rank_search.yaml").write_text(yaml.safe_dump({"train": {"max_steps": 20}}))
    (trial / "params.json").write_text(json.dumps({"r": 2, "lr": 1e-3, "seed": 0}))
    (trial / "result.json").write_text("".join(line + "\n" for line in lines))
    return str(root)


def _line(step: int, restart: int = 0) -> str:
    return json.dumps({"trial_id": "t_00000", "r": 2, "seed": 0, "learning_rate": 1e-3, "step": step, "eval_loss": 2.0 - step / 100,
                       "iterations_since_restore": restart or step // 10})


def test_a_line_cut_by_a_killed_run_and_re_reported_after_the_resume_is_not_damage(tmp_path):
    from lora_rank_search.analysis.results import load_experiment

    cut = _line(20)[:25]
    resumed = _hand_made(tmp_path / "a", [_line(10), cut, _line(20, restart=1)])
    trials, _ = load_experiment(resumed)
    assert trials.attrs["incomplete"] == [] and trials.loc[0, "status"] == "completed"
    damaged = _hand_made(tmp_path / "b", [_line(10), cut, cut, _line(20)])  # no restart follows: damage
    trials, _ = load_experiment(damaged)
    assert trials.attrs["incomplete"] == ["r0002_lr1e-3_seed0_t_00000: result.json lines 2, 3 not a JSON report"]
    assert trials.loc[0, "status"] == "damaged"


# --------------------------------------------------------------------------- a real experiment, damaged

WINNER, LOSER = "r0002", "r0001"  # on the chain task, r=2 recovers far more of the gain than r=1 at 20 steps


@pytest.fixture(scope="session")
def real_experiment(tmp_path_factory, tiny_model, chain_data) -> str:
    """One real tiny search (ranks 1 and 2, one learning rate, 20 steps, no early stop), run once."""
    root = tmp_path_factory.mktemp("real-exp")
    raw = merge(BASE, {"storage_path": str(root / "runs"), "model": {"name_or_path": tiny_model}, "data": {"source": chain_data},
                       "lora": {"ranks": [1, 2]}, "train": {"max_steps": 20, "eval_every": 10}, "scheduler": {"type": "none"}})
    (root / "search.yaml").write_text(yaml.safe_dump(raw))
    assert main(["search", str(root / "search.yaml"), "--no-analyze"]) == 0
    return str(root / "runs" / "test")


@pytest.fixture
def experiment(real_experiment, tmp_path) -> str:
    """A copy of the real experiment, to damage."""
    return str(shutil.copytree(real_experiment, tmp_path / "exp"))


def _folder(experiment: str, prefix: str) -> str:
    (name,) = [n for n in os.listdir(experiment) if n.startswith(prefix)]
    return os.path.join(experiment, name)


def _rewrite_reports(folder: str, change) -> None:
    path = os.path.join(folder, "result.json")
    with open(path) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    with open(path, "w") as handle:
        handle.write("".join(json.dumps(change(i, row, len(rows))) + "\n" for i, row in enumerate(rows)))


def _refused(argv: list, capsys, *named: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "error: EXPERIMENT_DIR:" in err and "--allow-incomplete" in err
    for name in named:
        assert name in err, err
    return err


def _exported_trial(experiment: str, out: str, *extra: str) -> tuple[int, str]:
    code = main(["export", experiment, "--out", out, *extra])
    info = os.path.join(out, "lora_rank_export.json")
    return code, (json.load(open(info))["trial_dir"] if os.path.exists(info) else "")


@pytest.mark.slow
def test_the_undamaged_experiment_recommends_the_winner(real_experiment, tmp_path, capsys):
    assert main(["analyze", real_experiment, "--out", str(tmp_path / "a")]) == 0
    assert "recommended: r=2" in capsys.readouterr().out
    assert _exported_trial(real_experiment, str(tmp_path / "x"))[1].startswith(WINNER)


@pytest.mark.slow
def test_an_emptied_result_json_refuses_the_verdict_and_never_ships_the_loser_silently(experiment, tmp_path, capsys):
    winner = _folder(experiment, WINNER)
    open(os.path.join(winner, "result.json"), "w").close()  # a full disk, a partial sync: 0 bytes
    line = f"{os.path.basename(winner)}: result.json holds no report (0 bytes), though the trial has checkpoints"
    _refused(["analyze", experiment, "--out", str(tmp_path / "a")], capsys, line)
    _refused(["export", experiment, "--out", str(tmp_path / "x")], capsys, line)
    assert not os.path.exists(tmp_path / "x" / "adapter_model.safetensors")
    # Told to go on without it: the damaged trial is named in the report and left out of the evidence.
    assert main(["analyze", experiment, "--out", str(tmp_path / "b"), "--allow-incomplete"]) == 0
    report = (tmp_path / "b" / "REPORT.md").read_text()
    assert "Damaged trial folders (left out of the evidence)" in report and line in report
    assert json.load(open(tmp_path / "b" / "recommendation.json"))["damaged_trials"] == [line]
    code, shipped = _exported_trial(experiment, str(tmp_path / "y"), "--allow-incomplete")
    assert code == 0 and not shipped.startswith(WINNER)


@pytest.mark.slow
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_a_non_finite_eval_loss_is_divergence_and_its_adapter_is_never_shipped(value, experiment, tmp_path, capsys):
    from lora_rank_search.analysis.results import load_experiment

    winner = _folder(experiment, WINNER)
    _rewrite_reports(winner, lambda i, row, n: {**row, "eval_loss": value} if i == n - 1 else row)
    trials, _ = load_experiment(experiment)
    row = trials.set_index("r").loc[2]
    assert row["status"] == "diverged" and row["unstable"]
    assert row["failure"] == f"eval loss became {value} at step 20 (learning rate 3e-3 too high for r=2)"
    code = main(["analyze", experiment, "--out", str(tmp_path / "a")])
    out, err = capsys.readouterr()
    assert code in (0, 1) and "Traceback" not in err and "diverged" in out
    code, shipped = _exported_trial(experiment, str(tmp_path / "x"))
    err = capsys.readouterr().err
    assert not shipped.startswith(WINNER), "the diverged trial's adapter was exported"
    assert code == 0 or (code == 1 and "nothing to export" in err and "diverged" in err), err


@pytest.mark.slow
def test_two_folders_claiming_one_arm_are_not_averaged_as_seeds(experiment, tmp_path, capsys):
    loser = _folder(experiment, LOSER)
    twin = loser.rsplit("_", 2)[0] + "_zzzzz_00009"  # the same arm, synced from another run
    shutil.copytree(loser, twin)
    _rewrite_reports(twin, lambda i, row, n: {**row, "trial_id": "zzzzz_00009", "eval_loss": row["eval_loss"] - 0.01})
    err = _refused(["analyze", experiment, "--out", str(tmp_path / "a")], capsys, os.path.basename(loser), os.path.basename(twin))
    assert "another folder claims the same arm all-linear r=1 lr=3e-3 seed=0" in err
    assert main(["analyze", experiment, "--out", str(tmp_path / "b"), "--allow-incomplete"]) == 0
    report = (tmp_path / "b" / "REPORT.md").read_text()
    assert "Seed-to-seed noise" not in report and os.path.basename(twin) in report


@pytest.mark.slow
def test_params_swapped_between_two_folders_are_named_and_refused(experiment, tmp_path, capsys):
    winner, loser = _folder(experiment, WINNER), _folder(experiment, LOSER)
    a, b = (os.path.join(f, "params.json") for f in (winner, loser))
    left, right = open(a).read(), open(b).read()
    open(a, "w").write(right)
    open(b, "w").write(left)
    _refused(["analyze", experiment], capsys, f"{os.path.basename(winner)}: params.json says r=1 but result.json says r=2")
    _refused(["export", experiment, "--out", str(tmp_path / "x")], capsys, os.path.basename(loser))


# --------------------------------------------------------------------------- resume after a change


@pytest.mark.slow
def test_resume_after_the_data_model_or_stored_config_changed_is_refused_naming_it(tiny_model, chain_data, tmp_path, capsys):
    with open(chain_data) as handle:
        lines = handle.readlines()
    (tmp_path / "train.jsonl").write_text("".join(lines[:500]))
    (tmp_path / "eval.jsonl").write_text("".join(lines[500:]))
    model = shutil.copytree(tiny_model, tmp_path / "model")
    raw = merge(BASE, {"storage_path": str(tmp_path / "runs"), "model": {"name_or_path": str(model)},
                       "data": {"source": str(tmp_path / "train.jsonl"), "eval_source": str(tmp_path / "eval.jsonl")},
                       "lora": {"ranks": [2]}, "train": {"max_steps": 10, "eval_every": 10}, "scheduler": {"type": "none"}})
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(raw))
    search = ["search", str(config), "--no-analyze"]
    assert main(search) == 0
    experiment = tmp_path / "runs" / "test"
    capsys.readouterr()

    def refused(fragment: str) -> str:
        assert main([*search, "--resume"]) == 2
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err, err
        return err

    def swap(path, text: str) -> str:
        before = path.read_text()
        path.write_text(text)
        return before

    original = swap(tmp_path / "eval.jsonl", "".join(lines[500:530]))  # the eval file shortened, same path
    refused(f"error: data.eval_source: the contents of {tmp_path / 'eval.jsonl'} changed since the search started")
    swap(tmp_path / "eval.jsonl", original)
    original = swap(tmp_path / "train.jsonl", "".join(lines[:499]))
    refused(f"error: data.source: the contents of {tmp_path / 'train.jsonl'} changed since the search started")
    swap(tmp_path / "train.jsonl", original)
    weights = model / "model.safetensors"
    original_weights = weights.read_bytes()
    weights.write_bytes(original_weights[:-8] + bytes(8))
    refused(f"error: model.name_or_path: the contents of {weights} changed")
    weights.write_bytes(original_weights)

    stored = experiment / "lora_rank_search.yaml"
    saved = swap(stored, "")
    stored.unlink()
    err = refused(f"{stored}: the experiment's stored config is missing, so nothing says what this search was")
    assert "search_meta.json's copy" in err
    # The recovery the message names: search_meta.json's copy rebuilds it exactly.
    meta = json.load(open(experiment / "search_meta.json"))
    assert yaml.safe_load(saved) == meta["config"]
    stored.write_text(saved)

    # Nothing changed: the resume goes through and the finished trial's files are untouched.
    (trial,) = [p for p in experiment.iterdir() if p.name.startswith("r0002")]
    before = (trial / "result.json").read_bytes()
    assert main([*search, "--resume"]) == 0, capsys.readouterr().err
    assert (trial / "result.json").read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "nan"])
def test_an_adapter_whose_weights_are_damaged_is_never_exported(damage, experiment, tmp_path, capsys):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    winner = _folder(experiment, WINNER)
    for checkpoint in sorted(n for n in os.listdir(winner) if n.startswith("checkpoint_")):
        weights = os.path.join(winner, checkpoint, "adapter", "adapter_model.safetensors")
        if damage == "truncated":
            data = open(weights, "rb").read()
            open(weights, "wb").write(data[: len(data) // 2])
        else:
            tensors = load_file(weights)
            name = sorted(tensors)[0]
            tensors[name] = np.full_like(tensors[name], np.nan)
            save_file(tensors, weights, metadata={"format": "pt"})
    code = main(["export", experiment, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"error: EXPERIMENT_DIR: the adapter of trial {os.path.basename(winner)}" in err
    assert ("does not load" if damage == "truncated" else "has non-finite weights") in err
    assert not os.path.exists(tmp_path / "x" / "adapter_model.safetensors")


def test_a_resume_that_cannot_finish_the_experiment_exits_2_instead_of_asking_to_resume_again(raw_config, tmp_path, monkeypatch, capsys):
    import lora_rank_search.search.runner
    from lora_rank_search import search
    from conftest import FAKE_TRIALS, write_fake_experiment

    experiment = write_fake_experiment(tmp_path / "exp")  # 14 trials, two unfinished; no search_meta.json
    monkeypatch.setattr(search.runner, "run_search", lambda cfg, **kwargs: experiment)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw_config()))  # asks for 4 trials
    assert main(["search", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"error: name: the experiment {experiment!r} holds {len(FAKE_TRIALS)} trials but the config asks for 4; resuming cannot finish it" in err
    assert "Continue with" not in err


@pytest.mark.parametrize("status, checkpoints, expected", [
    ("RUNNING", ["checkpoint_000000"], "pending"),  # Ctrl-C between the worker's first checkpoint and the driver's record
    ("PAUSED", ["checkpoint_000000"], "pending"),
    ("RUNNING", ["checkpoint_000000", "checkpoint_000001"], "damaged"),  # earlier reports were recorded, then lost
    ("TERMINATED", ["checkpoint_000000"], "damaged"),  # an ended trial's reports were all recorded
])
def test_an_unrecorded_first_report_of_an_interrupted_trial_is_not_damage(tmp_path, status, checkpoints, expected):
    from lora_rank_search.analysis.results import load_experiment
    from lora_rank_search.contract import layout

    root = tmp_path / "exp"
    root.mkdir()
    layout.write_config(str(root), {"train": {"max_steps": 60}})
    config = {"r": 4, "lr": 1e-3, "seed": 0}
    folder = root / layout.trial_dirname(config, "ab12_00000")
    folder.mkdir()
    (folder / layout.PARAMS_FILE).write_text(json.dumps(config))
    (folder / layout.RESULT_FILE).write_text("")
    for name in checkpoints:
        (folder / name).mkdir()
    state = [json.dumps({"trial_id": "ab12_00000", "status": status}), json.dumps({"num_failures": 0})]
    (root / f"{layout.STATE_PREFIX}2026-12-06_00-00-00.json").write_text(json.dumps({"trial_data": [state]}))
    (root / layout.TUNER_FILE).write_bytes(b"")
    trials, _ = load_experiment(str(root))
    assert trials["status"].tolist() == [expected], trials["failure"].tolist()
