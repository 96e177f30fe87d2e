"""The downstream metric (issue 22): built-ins and a user's function scored on texts, the eval
prompts and references cut from the loss masks, failures named; a trial reports the metric at
every evaluation and the untouched base's value, and a raising function leaves the trial recorded."""

from __future__ import annotations

import math
import os
import random
import sys

import pytest

from lora_rank_search.trainables.downstream import (
    BASE_METRIC_KEY, METRIC_ERROR_KEY, METRIC_KEY, MetricError, eval_pairs, metric_problem, score,
)

IGNORE = -100


def test_builtins_score_stripped_texts():
    gens, refs = [" w1 ", "w2 w3", "w9"], ["w1", "w2", "w4"]
    assert score("exact_match", gens, refs) == pytest.approx(1 / 3)
    assert score("contains", gens, refs) == pytest.approx(2 / 3)


def _module(tmp_path, monkeypatch, body: str, name: str = "user_metrics") -> str:
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    return name


def test_a_user_function_is_called_with_generations_and_references(tmp_path, monkeypatch):
    mod = _module(tmp_path, monkeypatch, "def length_gap(gens, refs):\n    return sum(len(g) - len(r) for g, r in zip(gens, refs))\n"
                  "def broken(gens, refs):\n    raise ValueError('no answers')\n"
                  "def wordy(gens, refs):\n    return 'good'\n")
    assert score(f"{mod}:length_gap", ["abc", "a"], ["a", "a"]) == 2.0
    with pytest.raises(MetricError, match=rf"the metric function '{mod}:broken' raised ValueError: no answers"):
        score(f"{mod}:broken", ["a"], ["a"])
    with pytest.raises(MetricError, match=rf"the metric function '{mod}:wordy' returned 'good', not a finite number"):
        score(f"{mod}:wordy", ["a"], ["a"])
    assert metric_problem(f"{mod}:length_gap") is None
    assert "cannot import the metric function 'user_metrics:nope'" in metric_problem(f"{mod}:nope")
    assert "must be exact_match | contains or module:function" in metric_problem("bleu")


def test_prompts_and_references_are_cut_from_the_loss_masks():
    ids = [[2, 10, 11, 12, 13, 3], [2, 20, 21, 22]]
    labels = [[IGNORE, IGNORE, IGNORE, 12, 13, 3], [IGNORE, IGNORE, 21, IGNORE]]
    prompts, refs = eval_pairs(ids, labels)
    assert prompts == [[2, 10, 11], [2, 20]] and refs == [[12, 13, 3], [21]]


def test_eval_examples_without_a_prompt_are_refused_when_all_lack_one_and_are_empty_generations_otherwise(tiny_model):
    """data.format text puts loss on every token: every trial crashed generating from an empty prompt."""
    from lora_rank_search.trainables.downstream import generate, prompts_check
    from lora_rank_search.trainables.model import load_tokenizer
    from transformers import AutoModelForCausalLM

    no_prompt = ([[2, 10, 11, 3]], [[10, 11, 3, IGNORE]])
    problem, note = prompts_check(*no_prompt, "text")
    assert note is None and "needs a prompt before the answer" in problem and "data.format 'text' (loss on every token)" in problem
    ids, labels = [[2, 10, 11, 3], [2, 20, 21, 3]], [[IGNORE, 10, 11, 3], [2, 20, 21, 3]]
    problem, note = prompts_check(ids, labels, "completion")
    assert problem is None and note.startswith("eval.metric: 1 of 2 eval examples have no prompt"), note
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = load_tokenizer(tiny_model, False)
    out = generate(model, [[], [2]], 3, None, tokenizer.pad_token_id, "cpu")  # no EOS: 3 tokens each
    assert out[0] == [] and len(out[1]) == 3, "the empty prompt gives an empty generation; the other is generated"


def _mapping_task(path, n: int = 240, seed: int = 0) -> str:
    """prompt 'wI' -> response 'wJ' under a fixed permutation of 40 words: exact_match is checkable."""
    import json

    rng = random.Random(seed)
    perm = list(range(40))
    rng.shuffle(perm)
    rows = [{"prompt": f"w{i % 40}", "response": f"w{perm[i % 40]}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.slow
def test_a_trial_reports_the_metric_and_the_base_value_and_survives_a_raising_function(raw_config, tmp_path, monkeypatch):
    from lora_rank_search.search.config import parse_config
    from lora_rank_search.search.runner import prepare
    from lora_rank_search.search.space import trial_settings
    from lora_rank_search.trainables.trial import run_trial

    source = _mapping_task(tmp_path / "map.jsonl")
    mod = _module(tmp_path, monkeypatch, "def broken(gens, refs):\n    raise ZeroDivisionError('oops')\n", "raising_metric")
    for metric in ("exact_match", f"{mod}:broken"):
        cfg = parse_config(raw_config(data={"source": source, "eval_fraction": 0.2},
                                      train={"max_steps": 30, "eval_every": 15, "learning_rate": 1e-2},
                                      scheduler={"type": "none"}, eval={"metric": metric, "max_new_tokens": 3}))
        prepared = prepare(cfg, log=lambda _: None)
        settings = trial_settings(cfg, prepared.model_path, prepared.targets)
        reports = []
        run_trial({"r": 8, "seed": 0}, settings, prepared.data, lambda m, f: reports.append(dict(m)))
        assert [m["step"] for m in reports] == [15, 30]
        if metric == "exact_match":
            assert all(0.0 <= m[METRIC_KEY] <= 1.0 for m in reports)
            assert all(m[BASE_METRIC_KEY] == reports[0][BASE_METRIC_KEY] for m in reports)
            assert reports[0][BASE_METRIC_KEY] == 0.0, "the untouched tiny model answers nothing right"
            assert all(math.isfinite(m["eval_loss"]) for m in reports)
        else:
            assert all(math.isnan(m[METRIC_KEY]) for m in reports), "the failed evaluation has no value"
            assert all(m[METRIC_ERROR_KEY] == f"the metric function '{mod}:broken' raised ZeroDivisionError: oops" for m in reports)
            assert math.isfinite(reports[-1]["eval_loss"]), "the trial trained on and reported"


def _experiment(root, curves: dict, metric: dict, dropouts=None) -> str:
    """A hand-made experiment folder (contract.layout): r -> {step: eval loss} and {step: metric};
    with `dropouts` (a list searched as lora.dropout) every rank has one trial per dropout."""
    import json
    from pathlib import Path

    from lora_rank_search.contract import layout

    root = Path(root)
    root.mkdir(parents=True)
    layout.write_config(str(root), {"model": {"name_or_path": "tiny"}, "lora": {"dropout": list(dropouts) if dropouts else 0.0},
                                    "train": {"max_steps": 100, "learning_rate": 1e-3},
                                    "eval": {"metric": "exact_match", "metric_mode": "max", "max_new_tokens": 4}})
    states = []
    arms = [(r, dropout) for r in sorted(curves) for dropout in (dropouts or [None])]
    for i, (r, dropout) in enumerate(arms):
        trial_id = f"fake_{i:05d}"
        config = {"r": r, "lr": 1e-3, "seed": 0, "alpha_rule": "16", "target_preset": "attention",
                  **({"dropout": dropout} if dropout is not None else {})}
        folder = root / layout.trial_dirname(config, trial_id)
        folder.mkdir()
        (folder / layout.PARAMS_FILE).write_text(json.dumps(config))
        lines, best = [], float("inf")
        for step, loss in sorted(curves[r].items()):
            best = min(best, loss)
            lines.append(json.dumps({
                "trial_id": trial_id, "step": step, "r": r, "seed": 0, "learning_rate": 1e-3, "lora_alpha": 16.0,
                "alpha_rule": "16", "target_modules": "q_proj,v_proj", "base_eval_loss": 4.0, "eval_loss": loss,
                "best_eval_loss": best, "train_loss": loss, "lr": 1e-3, "tokens_seen": 100 * step, "tokens_per_s": 1000.0,
                "trainable_params": 1000 * r, "adapter_bytes": 4000 * r, "peak_memory_bytes": 2**20,
                "time_total_s": float(step), "timestamp": 1e9 + step, "started_at": 1e9, "trial_status": "ok", "failure": "",
                "eval_metric": metric[r][step], "base_eval_metric": 0.0, **({"dropout": dropout} if dropout is not None else {})}))
        (folder / layout.RESULT_FILE).write_text("\n".join(lines) + "\n")
        states.append([json.dumps({"trial_id": trial_id, "status": "TERMINATED"}), json.dumps({"num_failures": 0})])
    (root / f"{layout.STATE_PREFIX}2026-12-02_00-00-00.json").write_text(json.dumps({"trial_data": states}))
    (root / layout.TUNER_FILE).write_bytes(b"")
    return str(root)


def test_the_verdict_follows_the_metric_where_loss_and_metric_disagree(tmp_path):
    """Base: loss 4.0, exact_match 0.0. By loss r=8 is far ahead (r=2 recovers 52% of its gain);
    by exact_match r=2 recovers 98% of r=8's gain: the loss says r=8, the metric r=2."""
    import json

    from lora_rank_search.analysis.pipeline import run_analysis
    from lora_rank_search.analysis.selection import recommend

    curves = {1: {50: 3.2, 100: 3.0}, 2: {50: 3.1, 100: 2.95}, 8: {50: 2.5, 100: 2.0}}
    metric = {1: {50: 0.05, 100: 0.10}, 2: {50: 0.50, 100: 0.60}, 8: {50: 0.55, 100: 0.61}}
    experiment = _experiment(tmp_path / "exp", curves, metric)
    result = run_analysis(experiment)
    rec = result.recommendation
    assert recommend(result.trials, result.history).rank == 8, "by the eval loss"
    assert rec.rank == 2 and rec.quantity == "eval_metric:exact_match"
    assert rec.gain_share == pytest.approx(0.60 / 0.61)
    saved = json.loads(open(result.files["json"]).read())
    assert saved["base_eval_metric"] == 0.0 and saved["eval_metric"] == pytest.approx(0.60)
    assert saved["base_eval_loss_measured"] == 4.0 and saved["quantity"] == "eval_metric:exact_match"
    report = open(result.files["md"]).read()
    assert "Judged by the downstream metric `exact_match` (max is better), not the eval loss." in report


def test_evaluations_whose_metric_failed_are_named_in_the_diagnosis(tmp_path):
    from lora_rank_search.analysis.pipeline import run_analysis

    curves = {1: {50: 3.2, 100: 3.0}, 2: {50: 3.1, 100: 2.95}}
    metric = {1: {50: 0.1, 100: float("nan")}, 2: {50: 0.5, 100: 0.6}}
    experiment = _experiment(tmp_path / "exp", curves, metric)
    import json
    from pathlib import Path

    for result_file in Path(experiment).glob("*/result.json"):
        rows = [json.loads(line) for line in result_file.read_text().splitlines()]
        for row in rows:
            row["eval_metric_error"] = "the metric function 'm:f' raised ValueError: x" if row["eval_metric"] != row["eval_metric"] else ""
        result_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = run_analysis(experiment)
    notes = [f.text for f in result.findings]
    assert any("1 evaluation(s) without a exact_match value, left out of the verdict: the metric function 'm:f' raised "
               "ValueError: x" in n for n in notes), notes
    assert result.recommendation.rank is not None, "the search's verdict still comes out"


def test_a_metric_that_failed_at_every_evaluation_is_the_reason_given_not_the_eval_loss(tmp_path):
    """The eval losses were finite; the verdict's reason said "no trial produced a finite eval loss"."""
    import json
    from pathlib import Path

    from lora_rank_search.analysis.pipeline import run_analysis

    curves = {1: {50: 3.2, 100: 3.0}, 2: {50: 3.1, 100: 2.95}}
    metric = {r: {50: float("nan"), 100: float("nan")} for r in curves}
    experiment = _experiment(tmp_path / "exp", curves, metric)
    for result_file in Path(experiment).glob("*/result.json"):
        rows = [json.loads(line) for line in result_file.read_text().splitlines()]
        for row in rows:
            row["eval_metric_error"] = "the metric function 'm:f' raised TypeError: x"
        result_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = run_analysis(experiment)
    rec = result.recommendation
    assert rec.rank is None
    report = open(result.files["md"]).read()
    assert "Judged by the downstream metric `exact_match`" in report and "the recommended adapter:" not in report
    assert rec.reason == ("no evaluation produced a value of exact_match (the eval losses were finite; the metric failed every time: "
                          "the metric function 'm:f' raised TypeError: x), so no rank can be recommended"), rec.reason
    assert "eval loss" not in rec.reason.replace("the eval losses were finite", "")


@pytest.mark.slow
def test_a_real_search_is_judged_by_the_metric_and_one_whose_function_raises_finishes(raw_config, tmp_path, monkeypatch, capsys):
    import json

    import yaml

    from lora_rank_search.search.cli import main

    # every prompt answered 'w7': learnable for the held-out prompts too (eval is split by prompt), so
    # exact_match leaves the base's 0; on the permutation task it stays 0 there, which is no signal
    source = tmp_path / "constant.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"w{i % 40}", "response": "w7"}) + "\n" for i in range(240)))
    source = str(source)
    mod = _module(tmp_path, monkeypatch, "def broken(gens, refs):\n    raise KeyError('answer')\n", "search_metric")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")  # for the Ray workers
    for name, metric in (("judged", "exact_match"), ("raising", f"{mod}:broken")):
        raw = raw_config(name=name, data={"source": source, "eval_fraction": 0.2}, lora={"ranks": [1, 8]},
                         train={"max_steps": 30, "eval_every": 15, "learning_rate": 1e-2}, scheduler={"type": "none"},
                         eval={"metric": metric, "max_new_tokens": 3})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        code = main(["search", str(path)])
        out, err = capsys.readouterr()
        assert code == 0, err[-3000:]
        analysis = tmp_path / "runs" / name / "analysis"
        saved = json.loads((analysis / "recommendation.json").read_text())
        report = (analysis / "REPORT.md").read_text()
        if name == "judged":
            assert saved["quantity"] == "eval_metric:exact_match" and saved["base_eval_metric"] == 0.0
            assert saved["rank"] in (1, 8) and 0.5 <= saved["eval_metric"] <= 1.0, saved["reason"]
            assert "Judged by the downstream metric `exact_match`" in report
        else:
            assert f"the metric function '{mod}:broken' raised KeyError: 'answer'" in report


def test_a_metric_no_adapter_moved_off_the_base_is_no_signal_in_its_own_words(tmp_path):
    """exact_match of an untuned model is often 0; when no adapter raises it, the base's 0 left the
    no-signal check no slack (a share of 0) and the cheapest rank was recommended for a gain of 0."""
    import json

    from lora_rank_search.analysis.pipeline import run_analysis

    curves = {1: {50: 3.2, 100: 3.0}, 2: {50: 3.1, 100: 2.95}, 8: {50: 2.5, 100: 2.0}}
    metric = {r: {50: 0.0, 100: 0.0} for r in curves}
    result = run_analysis(_experiment(tmp_path / "exp", curves, metric, dropouts=[0.0, 0.1]))
    rec = result.recommendation
    assert rec.rank is None and rec.no_signal
    assert "reaches exact_match 0.0000 against the untouched base's 0.0000" in rec.reason, rec.reason
    assert "nats" not in rec.reason and "-0.0000" not in rec.reason
    saved = json.loads(open(result.files["json"]).read())
    assert saved["rank"] is None and saved["lora_dropout"] is None, "no arm chosen: no arm's dropout"


def test_a_metric_verdict_gives_the_metric_not_its_negation(tmp_path):
    from lora_rank_search.analysis.pipeline import run_analysis

    curves = {1: {50: 3.2, 100: 3.0}, 2: {50: 3.1, 100: 2.95}, 8: {50: 2.5, 100: 2.0}}
    metric = {1: {50: 0.05, 100: 0.10}, 2: {50: 0.50, 100: 0.60}, 8: {50: 0.55, 100: 0.61}}
    rec = run_analysis(_experiment(tmp_path / "exp", curves, metric)).recommendation
    assert rec.rank == 2
    assert "(exact_match 0.6000 vs r=8's 0.6100; base 0.0000)" in rec.reason, rec.reason
    absolute = run_analysis(str(tmp_path / "exp"), rule="absolute", tolerance=0.02).recommendation
    assert absolute.rank == 2 and "within 0.02 of exact_match of the best" in absolute.reason and "nats" not in absolute.reason, absolute.reason


def test_the_table_of_trials_has_a_column_for_each_further_dimension_searched(tmp_path):
    from lora_rank_search.analysis.results import format_table, load_experiment

    curves = {1: {50: 3.2, 100: 3.0}, 8: {50: 2.5, 100: 2.0}}
    metric = {r: {50: 0.1, 100: 0.2} for r in curves}
    trials, _ = load_experiment(_experiment(tmp_path / "exp", curves, metric, dropouts=[0.0, 0.1]))
    lines = format_table(trials).splitlines()
    assert lines[0].split()[:5] == ["r", "alpha", "lr", "dropout", "seed"]
    rows = [line.split()[:4] for line in lines[2:]]
    assert sorted(rows) == [["1", "16", "1e-3", "0"], ["1", "16", "1e-3", "0.1"], ["8", "16", "1e-3", "0"], ["8", "16", "1e-3", "0.1"]]
    one, _ = load_experiment(_experiment(tmp_path / "one", curves, metric))
    assert "dropout" not in format_table(one).splitlines()[0], "one dropout: no column"


def test_the_lora_config_snippet_of_moe_expert_weights_is_what_the_trial_trained(tiny_model):
    """Expert weights are target_parameters, and PEFT gives a fused gate_up_proj 2r and 2 alpha:
    the pasted snippet must build that, not target_modules=['param:...']."""
    from lora_rank_search.analysis.report import lora_config_snippet
    from lora_rank_search.analysis.selection import Recommendation
    from lora_rank_search.trainables.lora import peft_config

    targets = ["q_proj", "param:mlp.experts.down_proj", "param:mlp.experts.gate_up_proj"]
    rec = Recommendation(4, 0.05, "", targets=targets, lora_alpha=16.0, alpha_rule="16")
    namespace: dict = {}
    exec(lora_config_snippet(rec, 0.0).split("# trained at")[0], namespace)
    pasted, trained = namespace["lora_config"], peft_config(4, 16.0, 0.0, targets)
    for field in ("r", "lora_alpha", "target_parameters", "rank_pattern", "alpha_pattern"):
        assert getattr(pasted, field) == getattr(trained, field), field
    assert set(pasted.target_modules) == set(trained.target_modules) == {"q_proj"}
