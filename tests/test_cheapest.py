"""The cheapest adequate adapter as a pure function on hand-made tables: units are (target choice,
rank), the reference is the best unit of any choice, the verdict is the adequate unit with the fewest
trainable parameters, and each choice's smallest adequate rank is reported beside it."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lora_rank_search.analysis.selection import recommend

BASE = 3.0
COST = {"attention": 100, "mlp": 300, "all-linear": 500}  # trainable params per unit of rank


def tables(losses: dict, seeds=(0,), lrs=(1e-3,), steps=(10, 20, 40), max_steps: int = 40, cost=COST):
    """(trials, history) from {(choice, r[, lr][, seed]): final loss}: curves falling linearly from
    the base to the final loss; trainable params cost[choice] * r."""
    trials, history = [], []
    for key, loss in losses.items():
        choice, r = key[0], key[1]
        lr = key[2] if len(key) > 2 else lrs[0]
        for seed in ([key[3]] if len(key) > 3 else seeds):
            tid = f"{choice}_r{r}_lr{lr:g}_s{seed}"
            final = loss + (0.02 * seed if len(seeds) > 1 else 0.0) - (0.01 if len(seeds) > 1 else 0.0)
            trials.append({"trial_id": tid, "trial_dir": tid, "target_choice": choice, "r": r, "lr": lr, "seed": seed,
                           "status": "completed", "steps": max_steps, "max_steps": max_steps, "base_eval_loss": BASE,
                           "unstable": final > BASE, "trainable_params": cost[choice] * r, "adapter_bytes": 4 * cost[choice] * r,
                           "lora_alpha": 16.0, "alpha_rule": "16", "targets": choice.replace("-", "_") + "_proj"})
            for s in steps:
                history.append({"trial_id": tid, "step": s, "eval_loss": BASE + (final - BASE) * s / max_steps})
    return pd.DataFrame(trials), pd.DataFrame(history)


# base 3.0: attention recovers 30-45% of the gain at every rank, mlp r=4 95%, all-linear is the best
PLANTED_MLP = {("attention", 4): 2.70, ("attention", 8): 2.60, ("attention", 16): 2.55,
               ("mlp", 4): 2.05, ("mlp", 8): 2.01,
               ("all-linear", 4): 2.00, ("all-linear", 8): 2.00}


def test_the_cheapest_adequate_pair_wins_and_each_choice_has_its_own_verdict():
    rec = recommend(*tables(PLANTED_MLP))
    assert (rec.target_choice, rec.rank) == ("mlp", 4), rec.reason
    assert rec.trainable_params == 1200 and rec.adapter_bytes == 4800
    assert (rec.best_choice, rec.best_rank) == ("all-linear", 4), "ties in loss go to the smaller rank"
    assert rec.gain_share == pytest.approx(0.95)
    verdicts = {v.target_choice: v.rank for v in rec.choices}
    assert verdicts == {"attention": None, "mlp": 4, "all-linear": 4}
    assert "cheapest adequate adapter" in rec.reason and "on attention no rank is adequate" in rec.reason
    assert "on mlp the smallest adequate rank is 4" in rec.reason
    # the verdict has the fewest parameters of all adequate units, and is adequate itself
    adequate = [e for e in rec.units if e.adequate]
    assert rec.trainable_params == min(e.trainable_params for e in adequate)
    assert [e.r for e in rec.ranks] == [4, 8] and all(e.target_choice == "mlp" for e in rec.ranks), "per-rank view: its choice"
    assert rec.trial_id == "mlp_r4_lr0.001_s0" and rec.targets == ["mlp_proj"]


def test_a_larger_rank_on_a_cheaper_choice_can_be_the_cheapest():
    losses = {("attention", 4): 2.5, ("attention", 16): 2.03, ("all-linear", 4): 2.0, ("all-linear", 8): 2.0}
    rec = recommend(*tables(losses))
    assert (rec.target_choice, rec.rank) == ("attention", 16), "1,600 parameters beat all-linear r=4's 2,000"
    assert {v.target_choice: v.rank for v in rec.choices} == {"attention": 16, "all-linear": 4}


def test_ties_in_cost_go_to_the_smaller_rank_then_the_label():
    cost = {"a": 100, "b": 200, "c": 200}
    losses = {("a", 8): 2.0, ("b", 4): 2.0, ("c", 4): 2.0}
    rec = recommend(*tables(losses, cost=cost))
    assert (rec.target_choice, rec.rank) == ("b", 4), "800 parameters each: the smaller rank, then the label"


def test_seeds_are_averaged_before_the_rule():
    rec = recommend(*tables(PLANTED_MLP, seeds=(0, 1)))
    mlp4 = rec.evidence(4, "mlp")
    assert mlp4.seeds == [0, 1] and mlp4.se > 0
    assert mlp4.loss == pytest.approx(2.05), "the seeds' mean (2.04 and 2.06)"
    assert (rec.target_choice, rec.rank) == ("mlp", 4)


def test_each_unit_is_judged_at_its_best_learning_rate():
    losses = {("mlp", 4, 1e-3): 2.4, ("mlp", 4, 3e-3): 2.05, ("mlp", 8, 1e-3): 2.01, ("mlp", 8, 3e-3): 2.3,
              ("all-linear", 4, 1e-3): 2.0, ("all-linear", 4, 3e-3): 3.2}  # all-linear at 3e-3: worse than the base
    rec = recommend(*tables(losses))
    assert (rec.target_choice, rec.rank, rec.learning_rate) == ("mlp", 4, 3e-3)
    assert rec.evidence(8, "mlp").lr == 1e-3
    al = rec.evidence(4, "all-linear")
    assert al.lr == 1e-3 and [a.used for a in al.arms] == [True, False], "the unstable rate is left out"


def test_a_choice_with_no_adequate_rank_is_named_with_its_best():
    rec = recommend(*tables(PLANTED_MLP))
    attention = next(v for v in rec.choices if v.target_choice == "attention")
    assert attention.rank is None and attention.best_rank == 16 and attention.best_gain_share == pytest.approx(0.45)


def test_a_cheaper_pair_just_short_of_the_rule_is_named_as_a_close_call():
    losses = {**PLANTED_MLP, ("mlp", 4): 2.07, ("mlp", 8): 2.02}  # mlp r=4 recovers 93% of the gain, r=8 98%
    rec = recommend(*tables(losses))
    assert (rec.target_choice, rec.rank) == ("all-linear", 4), "2,000 parameters beat mlp r=8's 2,400"
    near = [c for c in rec.close if c.startswith("mlp r=4")]
    assert near and "93% of the best gain, 2 points short of 95%" in near[0] and "train longer" in near[0]
    assert not any(c.startswith("attention") for c in rec.close), "far below the rule: not a close call"


def test_one_target_choice_behaves_as_ranks_alone():
    losses = {("attention", 4): 2.3, ("attention", 8): 2.04, ("attention", 16): 2.0}
    with_choice = recommend(*tables(losses))
    plain = tables(losses)[0].drop(columns=["target_choice"]), tables(losses)[1]
    without = recommend(*plain)
    assert with_choice.rank == without.rank == 8 and not with_choice.several_choices
    assert with_choice.choices == [] and with_choice.close == []
    assert "smallest rank" in with_choice.reason and with_choice.reason == without.reason


def test_the_verdict_round_trips_to_json_with_its_choice_and_cost():
    data = json.loads(json.dumps(recommend(*tables(PLANTED_MLP)).to_dict()))
    assert data["target_choice"] == "mlp" and data["rank"] == 4 and data["trainable_params"] == 1200
    assert [c["target_choice"] for c in data["choices"]] == ["all-linear", "attention", "mlp"]
    assert {(u["target_choice"], u["r"]) for u in data["units"]} == set(PLANTED_MLP)


def test_no_gain_anywhere_is_no_signal_and_every_figure_still_draws_or_steps_aside(tmp_path):
    """Every unit ends at the base's loss (a metric such as exact_match that no adapter moved off 0
    looks the same): no verdict, and the gain-share figure, whose shares are all undefined, draws the
    loss instead of failing the whole analysis."""
    from lora_rank_search.analysis.plots import all_plots, cost_by_choice

    flat = {(choice, r): BASE for choice in ("attention", "mlp") for r in (4, 8)}
    trials, history = tables(flat)
    rec = recommend(trials, history)
    assert rec.rank is None and rec.no_signal, rec.reason
    assert "a gain of +0.0000 nats/token" in rec.reason
    figure = cost_by_choice(rec, str(tmp_path))
    assert figure and (tmp_path / "cost_by_choice.png").stat().st_size > 0
    assert "cost_by_choice" in all_plots(trials, history, rec, None, str(tmp_path / "all"))


def test_a_figure_that_cannot_be_drawn_costs_the_report_nothing_but_itself(tmp_path, monkeypatch, capsys):
    import lora_rank_search.analysis.plots as plots

    trials, history = tables(PLANTED_MLP)
    rec = recommend(trials, history)

    def broken(_inputs):
        raise ValueError("Data cannot be log-scaled because all values are <= 0.")

    monkeypatch.setattr(plots, "PLOTS", (plots.Plot("broken", "a figure that fails", broken),) + plots.PLOTS)
    drawn = plots.all_plots(trials, history, rec, None, str(tmp_path))
    assert "broken" not in drawn and "cost_by_choice" in drawn and "loss_vs_rank" in drawn
    assert "warning: the figure broken could not be drawn (ValueError: Data cannot be log-scaled" in capsys.readouterr().err
