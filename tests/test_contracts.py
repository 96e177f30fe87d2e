"""The contracts are enforced: every report key and every recommendation.json field is declared with
its kind, a count is an integer, and each experiment-folder and PEFT file name is defined once."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

from lora_rank_search.contract.metrics import DECLARED, REPORTED, checked_report, report_problems
from lora_rank_search.contract.recommendation import FIELDS, problems

ROOT = Path(__file__).resolve().parent.parent


def _good_report() -> dict:
    values = {int: 3, float: 1.5, str: "ok", bool: False}
    return {name: values[m.kind] for name, m in DECLARED.items()}


def test_a_report_of_declared_keys_passes():
    assert report_problems(_good_report()) == []
    assert set(REPORTED) <= set(DECLARED)


def test_an_undeclared_report_key_fails():
    assert report_problems({**_good_report(), "train_pidd": 1}) == [
        "train_pidd: not a declared report key (declare it in contract/metrics.py)"]
    with pytest.raises(ValueError, match="train_pidd"):
        checked_report({"step": 1, "train_pidd": 1})


@pytest.mark.parametrize("key,value", [("trainable_params", 8704.0), ("step", True), ("eval_loss", "1.0"), ("failure", None)])
def test_a_report_value_of_another_kind_fails(key, value):
    assert [p.split(":")[0] for p in report_problems({key: value})] == [key]


def test_the_trial_reports_only_declared_keys():
    """The keys the trainables write into their reports (literal keys of dicts and `metrics[...]`
    assignments in trial.py, pack.py and pack_server.py) are all declared."""
    written = set()
    for name in ("trial.py", "pack.py", "pack_server.py"):
        tree = ast.parse((ROOT / "trainables" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in ("report", "failure_report", "process_metrics", "add", "run_trial",
                                                                   "train_in_pack", "advance"):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Dict) and any(isinstance(k, ast.Constant) and k.value in DECLARED for k in inner.keys):
                        written |= {k.value for k in inner.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
                    if (isinstance(inner, ast.Subscript) and isinstance(inner.ctx, ast.Store) and isinstance(inner.value, ast.Name)
                            and inner.value.id == "metrics" and isinstance(inner.slice, ast.Constant)):
                        written.add(inner.slice.value)
    assert {"trial_status", "train_pid", "node_id", "adapter_bytes"} <= written, "the scan sees the reports"
    assert sorted(written - set(DECLARED)) == []


def _document(fake_experiment, tmp_path) -> dict:
    from lora_rank_search.analysis.pipeline import run_analysis

    run_analysis(fake_experiment, out=str(tmp_path / "out"))
    return json.loads((tmp_path / "out" / "recommendation.json").read_text())


def test_recommendation_json_keeps_its_contract(fake_experiment, tmp_path):
    from lora_rank_search.analysis.selection import Recommendation
    import dataclasses

    document = _document(fake_experiment, tmp_path)
    assert problems(document) == []
    assert isinstance(document["trainable_params"], int) and document["units"][0]["r"] == int(document["units"][0]["r"])
    declared = {f.name for f in dataclasses.fields(Recommendation)} - {"curves"}
    assert declared <= set(FIELDS), "every field of the verdict is declared"


def test_an_undeclared_field_or_a_non_integer_count_breaks_recommendation_json(fake_experiment, tmp_path):
    document = _document(fake_experiment, tmp_path)
    assert problems({**document, "rank_guess": 8}) == ["rank_guess: not a declared field of recommendation.json"]
    assert problems({**document, "trainable_params": 8704.0}) == ["trainable_params: expected a count, got 8704.0",
                                                                 "trainable_params: a count must be an integer, got 8704.0"]
    units = [dict(document["units"][0], adapter_bytes=19856.5)] + document["units"][1:]
    assert problems({**document, "units": units}) == ["units[0].adapter_bytes: a count must be an integer, got 19856.5"]


def test_the_analysis_refuses_to_write_a_broken_recommendation(fake_experiment, tmp_path, monkeypatch):
    from lora_rank_search.analysis import selection
    from lora_rank_search.analysis.pipeline import run_analysis

    original = selection.Recommendation.to_dict
    monkeypatch.setattr(selection.Recommendation, "to_dict", lambda self: {**original(self), "rank_guess": 8})
    with pytest.raises(ValueError, match="rank_guess: not a declared field"):
        run_analysis(fake_experiment, out=str(tmp_path / "out"))


FILE_NAMES = ("result.json", "params.json", "error.txt", "progress.csv", "tuner.pkl", "search_meta.json", "confirmations.json",
              "lora_rank_search.yaml", "trainer_state.pt", "adapter_model.safetensors", "adapter_config.json",
              "recommendation.json")


@pytest.mark.parametrize("name", FILE_NAMES)
def test_each_experiment_folder_and_peft_file_name_is_defined_once(name):
    """A name appears as a string literal in one source module only (its definition); docstrings,
    comments and messages that mention it are not literals of their own."""
    holders = []
    for package in ("contract", "search", "trainables", "analysis"):
        for path in sorted((ROOT / package).glob("*.py")):
            tree = ast.parse(path.read_text())
            docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
                    and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
            literal = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value == name and id(n) not in docs]
            if literal:
                holders.append(os.path.relpath(path, ROOT))
    assert len(holders) == 1, f"{name!r} is a literal in {holders}"
