"""The downstream metric (issue 22): built-ins and a user's function scored on texts, the eval
prompts and references cut from the loss masks, failures named; a trial reports the metric at
every evaluation and the untouched base's value, and a raising function leaves the trial recorded."""

from __future__ import annotations

import math
import random
import sys

import pytest

from trainables.downstream import (
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
    from search.config import parse_config
    from search.runner import prepare
    from search.space import trial_settings
    from trainables.trial import run_trial

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
