"""Successive halving as a pure state machine on hand-made reports, and the step arithmetic
behind the scheduler defaults (no Ray)."""

from __future__ import annotations

import math

import pytest

from lora_rank_search.search.config import parse_config
from lora_rank_search.search.halving import decide, halving_rungs, halving_steps, halving_survivors
from lora_rank_search.search.space import grace_steps, rung_steps

NAN = math.nan
RANKS = {"t1": 1, "t2": 2, "t4": 4, "t8": 8, "t16": 16}


def test_rungs_are_geometric_whole_steps_below_max_steps():
    assert halving_rungs(30, 200, 3) == [30, 90]
    assert halving_rungs(10, 40, 2) == [10, 20]
    assert halving_rungs(9, 60, 3) == [9, 27]
    assert halving_rungs(40, 200, 5) == [40]
    assert halving_rungs(200, 200, 3) == [], "a grace period of max_steps is the full grid"
    assert halving_rungs(1, 10, 1.5) == [1, 2, 3, 4, 6, 8], "ceil(1.5^k): whole steps, never one twice"


def test_survivors_and_the_steps_a_search_spends():
    assert halving_survivors(5, 2, 3) == [2, 1]
    assert halving_survivors(7, 2, 3) == [3, 1]
    assert halving_survivors(1, 2, 3) == [1, 1]
    # The default on 5 ranks: 5 x 30 steps, 2 ranks 30 -> 90, 1 rank 90 -> 200: 380 of the grid's 1,000.
    assert halving_steps(5, 30, 200, 3) == 5 * 30 + 2 * 60 + 1 * 110 == 380
    # A lone survivor after the first rung trains straight to the end.
    assert halving_steps(5, 40, 200, 5) == 5 * 40 + 1 * 160
    assert halving_steps(3, 200, 200, 3) == 3 * 200


def test_default_grace_period_is_25_percent_of_max_steps_and_rungs_are_evaluated():
    from lora_rank_search.search.space import trial_settings

    def cfg(**train):
        return parse_config({"train": train, "scheduler": {"type": "sha"}})

    assert grace_steps(cfg(max_steps=200, eval_every=20)) == 50
    assert grace_steps(cfg(max_steps=60, eval_every=10)) == 15
    assert grace_steps(cfg(max_steps=1000, eval_every=50)) == 250
    assert grace_steps(parse_config({"scheduler": {"grace_period": 60}})) == 60
    assert rung_steps(parse_config({"scheduler": {"type": "none"}})) == []
    default = parse_config({})
    assert default.scheduler.type == "sha" and rung_steps(default) == [50, 150], "rungs at 50 and 150 of 200"
    assert trial_settings(default, "m", ["q_proj"]).rungs == (50, 150), "trials evaluate at the rungs"
    asha = parse_config({"scheduler": {"type": "asha", "grace_period": 25, "reduction_factor": 2}})
    assert rung_steps(asha) == [25, 50, 100], "ASHA's milestones, as Ray computes them"


def test_nothing_is_decided_while_a_rank_is_still_on_its_way_to_the_rung():
    scores = {"t16": {40: 2.5}, "t8": {40: 2.4}, "t4": {40: 2.6}, "t2": {40: 2.9}}
    d = decide(RANKS, scores, ended=[], rungs=[40, 120], reduction_factor=3)
    assert d.stopped == set() and d.survivors == {}
    assert all(level == 0 for level in d.level.values())


def test_the_best_third_of_the_ranks_goes_on_and_the_rest_stop():
    scores = {"t16": {40: 2.50}, "t8": {40: 2.40}, "t4": {40: 2.45}, "t2": {40: 2.90}, "t1": {40: 3.00}}
    d = decide(RANKS, scores, ended=[], rungs=[40, 120], reduction_factor=3)
    assert d.survivors == {0: [8, 4]}, "ceil(5 / 3) = 2 ranks, best first"
    assert d.stopped == {"t16", "t2", "t1"}
    assert d.level["t8"] == d.level["t4"] == 1 and d.level["t16"] == 0


def test_a_lone_survivor_trains_to_the_end_without_another_rung():
    scores = {"t16": {40: 2.5}, "t8": {40: 2.4}, "t4": {40: 2.6}, "t2": {40: 2.9}, "t1": {40: 3.0}}
    d = decide(RANKS, scores, ended=[], rungs=[40, 80, 160], reduction_factor=5)
    assert d.survivors == {0: [8]}
    assert d.level["t8"] == 3, "no pause at 80 or 160: there is nobody left to compare it with"
    single = decide({"a": 4}, {}, ended=[], rungs=[40, 120], reduction_factor=3)
    assert single.level["a"] == 2 and single.survivors == {}


def test_ties_go_to_the_smaller_rank():
    scores = {"t16": {40: 2.0}, "t8": {40: 2.0}, "t4": {40: 2.0}, "t2": {40: 3.0}, "t1": {40: 3.0}}
    d = decide(RANKS, scores, ended=[], rungs=[40], reduction_factor=3)
    assert d.survivors == {0: [4, 8]}


def test_seeds_of_a_rank_go_on_or_stop_together_by_their_mean():
    groups = {"a0": 4, "a1": 4, "b0": 8, "b1": 8, "c0": 16, "c1": 16}
    scores = {"a0": {40: 2.0}, "a1": {40: 2.6}, "b0": {40: 2.2}, "b1": {40: 2.2}, "c0": {40: 2.5}, "c1": {40: 2.5}}
    d = decide(groups, scores, ended=[], rungs=[40, 120], reduction_factor=3)
    assert d.survivors == {0: [8]}, "mean 2.2 beats r=4's mean 2.3 although r=4 has the best single seed"
    assert d.stopped == {"a0", "a1", "c0", "c1"}
    # One seed still training holds the rung open for everyone.
    del scores["a1"]
    assert decide(groups, scores, ended=[], rungs=[40, 120], reduction_factor=3).survivors == {}


def test_failed_trials_are_not_waited_for_and_non_finite_losses_never_survive():
    scores = {"t16": {40: NAN}, "t8": {40: 2.4}, "t4": {40: 2.45}, "t2": {40: 2.9}}
    d = decide(RANKS, scores, ended=["t1", "t16"], rungs=[40, 120], reduction_factor=3)
    # r=1 failed before the rung, r=16 diverged at it: 3 ranks compete, ceil(3 / 3) = 1 goes on.
    assert d.survivors == {0: [8]}
    assert {"t16", "t4", "t2"} <= d.stopped


def test_a_decided_rung_stands_when_a_late_report_arrives():
    scores = {"t16": {40: 2.5}, "t8": {40: 2.4}, "t4": {40: 2.45}, "t2": {40: 2.9}}
    first = decide(RANKS, scores, ended=["t1"], rungs=[40, 120], reduction_factor=3)
    assert first.survivors == {0: [8, 4]}
    # r=1 was retried and reports a better loss later: the cut already made is not undone.
    scores["t1"] = {40: 1.0}
    again = decide(RANKS, scores, ended=[], rungs=[40, 120], reduction_factor=3, frozen=first.survivors)
    assert again.survivors[0] == [8, 4] and "t1" in again.stopped


@pytest.mark.parametrize("rf", [2, 3, 4])
def test_invariants_over_a_whole_run(rf):
    """Rung by rung on made-up curves: survivors shrink by ceil(n / rf), the best rank at each rung
    always survives it, and the final survivor is the rank with the best last-rung loss."""
    ranks = {f"t{r}": r for r in (1, 2, 4, 8, 16, 32, 64)}
    rungs = halving_rungs(20, 400, rf)

    def loss(r: int, step: int) -> float:
        return 2.0 + 1.0 / (1 + r) + 50.0 / (step + 10 * r)

    scores: dict = {}
    frozen: dict = {}
    alive = set(ranks)
    for k, rung in enumerate(rungs):
        for t in alive:
            scores.setdefault(t, {})[rung] = loss(ranks[t], rung)
        d = decide(ranks, scores, ended=[], rungs=rungs, reduction_factor=rf, frozen=frozen)
        frozen = d.survivors
        assert len(d.survivors[k]) == max(1, math.ceil(len(alive) / rf))
        best = min(alive, key=lambda t: scores[t][rung])
        assert ranks[best] in d.survivors[k]
        alive = {t for t in alive if ranks[t] in d.survivors[k]}
        if len(alive) == 1:
            assert d.level[next(iter(alive))] == len(rungs)
            break


# --------------------------------------------------------------------------- arms: (rank, learning rate)

def arm_groups(ranks=(2, 4, 8), lrs=(1e-4, 3e-4, 1e-3)) -> tuple[dict, dict]:
    """trial -> rank, trial -> (rank, lr) for one seed per arm."""
    groups, arms = {}, {}
    for r in ranks:
        for lr in lrs:
            groups[f"r{r}-{lr}"] = r
            arms[f"r{r}-{lr}"] = (r, lr)
    return groups, arms


def test_a_rank_is_scored_by_its_best_learning_rate_and_only_its_best_rates_go_on():
    groups, arms = arm_groups()
    scores = {
        "r2-0.0001": {30: 3.0}, "r2-0.0003": {30: 2.8}, "r2-0.001": {30: 2.7},
        "r4-0.0001": {30: 2.9}, "r4-0.0003": {30: 2.4}, "r4-0.001": {30: 2.6},
        "r8-0.0001": {30: 2.95}, "r8-0.0003": {30: 2.45}, "r8-0.001": {30: 2.5},
    }
    d = decide(groups, scores, ended=[], rungs=[30, 90], reduction_factor=3, arms=arms)
    # ranks by their best arm: r=4 (2.4), r=8 (2.45), r=2 (2.7): ceil(3/3) = 1 rank; within it ceil(3/3) = 1 rate
    assert d.survivors == {0: [(4, 3e-4)]}
    assert d.stopped == set(groups) - {"r4-0.0003"}
    assert d.level["r4-0.0003"] == 2, "a lone arm trains to the end"


def test_with_a_gentler_factor_several_rates_of_a_kept_rank_go_on():
    groups, arms = arm_groups(ranks=(4, 8), lrs=(1e-4, 3e-4, 1e-3))
    scores = {t: {30: loss} for t, loss in zip(groups, [2.9, 2.4, 2.6, 2.95, 2.45, 2.5])}
    d = decide(groups, scores, ended=[], rungs=[30, 90], reduction_factor=2, arms=arms)
    assert d.survivors == {0: [(4, 3e-4), (4, 1e-3)]}, "ceil(2/2) = 1 rank, ceil(3/2) = 2 of its rates"
    # At the next rung the two rates of r=4 are compared with each other.
    scores["r4-0.0003"][90], scores["r4-0.001"][90] = 2.2, 2.1
    d = decide(groups, scores, ended=[], rungs=[30, 90], reduction_factor=2, arms=arms, frozen=d.survivors)
    assert d.survivors[1] == [(4, 1e-3)] and d.level["r4-0.001"] == 2


def test_an_unstable_rate_does_not_sink_its_rank():
    groups, arms = arm_groups(ranks=(4, 8), lrs=(3e-4, 1e-3))
    scores = {"r4-0.0003": {30: 2.3}, "r4-0.001": {30: NAN}, "r8-0.0003": {30: 2.5}, "r8-0.001": {30: 2.6}}
    d = decide(groups, scores, ended=["r4-0.001"], rungs=[30, 90], reduction_factor=2, arms=arms)
    assert d.survivors == {0: [(4, 3e-4)]}


def test_steps_a_search_over_ranks_and_learning_rates_spends():
    # 5 ranks x 3 rates, rungs 30 and 90 of 200: 15 x 30, then 2 ranks x 1 rate to 90, then 1 arm to 200.
    assert halving_steps(5, 30, 200, 3, num_lrs=3) == 15 * 30 + 2 * 60 + 1 * 110 == 680
    assert halving_steps(5, 30, 200, 3, num_lrs=3) / (5 * 3 * 200) < 0.25
    assert halving_steps(5, 30, 200, 3) == halving_steps(5, 30, 200, 3, num_lrs=1) == 380
    assert halving_steps(1, 30, 200, 3, num_lrs=3) == 3 * 30 + 1 * 170


# ---- target choices: ranks compared within a choice, choices by their best rank


def choice_groups(choices=("attention", "mlp", "all-linear"), ranks=(2, 4, 8)) -> tuple[dict, dict]:
    """trial -> unit (choice, r), trial -> family (choice): one trial per unit."""
    groups = {f"{c}-r{r}": (c, r) for c in choices for r in ranks}
    return groups, {t: u[0] for t, u in groups.items()}


def test_choices_are_compared_by_their_best_rank_and_ranks_within_a_choice():
    groups, families = choice_groups()
    losses = {"attention": {2: 2.9, 4: 2.8, 8: 2.7}, "mlp": {2: 2.6, 4: 2.3, 8: 2.31}, "all-linear": {2: 2.4, 4: 2.29, 8: 2.2}}
    scores = {t: {30: losses[c][r]} for t, (c, r) in groups.items()}
    d = decide(groups, scores, ended=[], rungs=[30, 90], reduction_factor=2, families=families)
    # 2 of 3 choices go on (all-linear best 2.2, mlp best 2.3); within each, 2 of its 3 ranks
    assert sorted(d.survivors[0]) == [("all-linear", 4), ("all-linear", 8), ("mlp", 4), ("mlp", 8)]
    assert {t for t in groups if t.startswith("attention")} <= d.stopped, "a choice whose best rank loses is cut whole"
    assert "mlp-r2" in d.stopped and "all-linear-r2" in d.stopped


def test_a_choice_is_not_cut_for_its_weak_ranks_when_its_best_rank_is_competitive():
    groups, families = choice_groups(("mlp", "all-linear"), (1, 2, 4))
    # mlp's small ranks are far behind every all-linear rank, but its best (r=4) leads the choices
    losses = {"mlp": {1: 3.0, 2: 2.9, 4: 2.1}, "all-linear": {1: 2.5, 2: 2.3, 4: 2.2}}
    scores = {t: {30: losses[c][r]} for t, (c, r) in groups.items()}
    d = decide(groups, scores, ended=[], rungs=[30, 90], reduction_factor=2, families=families)
    assert sorted(d.survivors[0]) == [("mlp", 2), ("mlp", 4)], "1 of 2 choices (mlp by its best rank), 2 of its 3 ranks"
    # units of one choice only: comparing every unit across choices (mlp r=2 at 2.9) would have cut it


def test_one_choice_decides_as_ranks_alone():
    scores = {"t1": {40: 2.9}, "t2": {40: 2.7}, "t4": {40: 2.3}, "t8": {40: 2.31}, "t16": {40: 2.32}}
    alone = decide(RANKS, scores, ended=[], rungs=[40, 120], reduction_factor=3)
    labelled = decide({t: ("mlp", r) for t, r in RANKS.items()}, scores, ended=[], rungs=[40, 120], reduction_factor=3,
                      families={t: "mlp" for t in RANKS})
    assert [u[1] for u in labelled.survivors[0]] == alone.survivors[0] and labelled.stopped == alone.stopped


def test_steps_a_search_over_choices_and_ranks_spends():
    # 3 choices x 5 ranks, default rungs of 200 steps: 15 x 30, then 1 choice x 2 ranks to 90, 1 arm to 200
    assert halving_steps(5, 30, 200, 3, num_choices=3) == 15 * 30 + 2 * 60 + 110 == 680
    assert halving_steps(5, 30, 200, 3, num_choices=3) / (3 * 5 * 200) <= 0.40, "the issue's cost bound"
    assert halving_steps(5, 30, 200, 3, num_choices=1) == halving_steps(5, 30, 200, 3)


BASE = 3.0  # the untouched model's loss: gains are measured from here


def test_a_rank_close_to_the_best_gain_is_kept_though_it_is_not_among_the_fastest():
    # at the first rung the larger ranks lead; r=4 (the answer at the end) has 85% of the best gain
    scores = {"t1": {40: 2.7}, "t2": {40: 2.5}, "t4": {40: 2.15}, "t8": {40: 2.05}, "t16": {40: 2.0}}
    base = {t: BASE for t in RANKS}
    plain = decide(RANKS, scores, ended=[], rungs=[40, 120], reduction_factor=3)
    assert sorted(plain.survivors[0]) == [8, 16] and "t4" in plain.stopped, "by loss alone the best 2 of 5 go on"
    d = decide(RANKS, scores, ended=[], rungs=[40, 120], reduction_factor=3, base=base)
    assert sorted(d.survivors[0]) == [4, 8, 16], "r=4 recovers 85% >= KEEP_SHARE of the best gain"
    assert d.stopped == {"t1", "t2"}, "r=2 (50%) and r=1 (30%) are far from it"
    # keep_share (bench/halving_replay.py --keep-share) moves that line; the default is KEEP_SHARE
    assert sorted(decide(RANKS, scores, ended=[], rungs=[40, 120], reduction_factor=3, base=base, keep_share=0.9).survivors[0]) == [8, 16]
    assert sorted(decide(RANKS, scores, ended=[], rungs=[40, 120], reduction_factor=3, base=base, keep_share=0.5).survivors[0]) == [2, 4, 8, 16]


def test_a_larger_rank_that_is_no_better_than_a_kept_smaller_one_is_not_kept_for_its_share():
    # r=4 and r=8 lead; r=16 is within KEEP_SHARE but worse than r=4, which is kept and cheaper
    scores = {"t1": {40: 2.9}, "t2": {40: 2.6}, "t4": {40: 2.0}, "t8": {40: 2.01}, "t16": {40: 2.05}}
    d = decide(RANKS, scores, ended=[], rungs=[40, 120], reduction_factor=3, base={t: BASE for t in RANKS})
    assert sorted(d.survivors[0]) == [4, 8] and d.stopped == {"t1", "t2", "t16"}


def test_keep_share_needs_a_gain_and_keeps_whole_units_at_their_best_rates():
    groups = {f"r{r}-{lr}": r for r in (2, 4, 8) for lr in ("a", "b", "c")}
    arms = {t: (r, t[-1]) for t, r in groups.items()}
    losses = {2: (2.6, 2.5, 2.55), 4: (2.2, 2.12, 2.3), 8: (2.1, 2.0, 2.3)}
    scores = {t: {30: losses[r]["abc".index(t[-1])]} for t, r in groups.items()}
    d = decide(groups, scores, ended=[], rungs=[30, 90], reduction_factor=3, arms=arms, base={t: BASE for t in groups})
    # by loss 1 of 3 ranks (r=8) at its best rate; r=4 (88%) goes on too, at its best rate only; and
    # at the first rung the leading rank keeps its close rates (r=8 "a": 90%; "c": 70% is cut)
    assert sorted(d.survivors[0]) == [(4, "b"), (8, "a"), (8, "b")]
    worse = decide(groups, scores, ended=[], rungs=[30, 90], reduction_factor=3, arms=arms, base={t: 1.5 for t in groups})
    assert worse.survivors[0] == [(8, "b")], "every rank worse than the base: no gain to share, loss alone decides"
    missing = decide(groups, scores, ended=[], rungs=[30, 90], reduction_factor=3, arms=arms, base={t: NAN for t in groups})
    assert missing.survivors[0] == [(8, "b")], "no finite base loss reported: loss alone decides"


def test_a_choice_cut_by_loss_keeps_a_rank_close_to_the_best_gain():
    groups, families = choice_groups(("attention", "mlp", "all-linear"), (2, 4, 8))
    # all-linear leads every rung-1 comparison; mlp r=4 has 90% of the best gain (the cheapest answer)
    losses = {"attention": {2: 2.9, 4: 2.85, 8: 2.8}, "mlp": {2: 2.7, 4: 2.1, 8: 2.12}, "all-linear": {2: 2.3, 4: 2.0, 8: 2.0}}
    scores = {t: {30: losses[c][r]} for t, (c, r) in groups.items()}
    plain = decide(groups, scores, ended=[], rungs=[30, 90], reduction_factor=3, families=families)
    assert plain.survivors[0] == [("all-linear", 4)]
    d = decide(groups, scores, ended=[], rungs=[30, 90], reduction_factor=3, families=families,
               base={t: BASE for t in groups})
    assert sorted(d.survivors[0]) == [("all-linear", 4), ("mlp", 4)], \
        "mlp r=4 (90%) goes on; mlp r=8 is no better than it; all-linear r=2 (70%) and attention (<20%) are far"


def test_with_costs_a_unit_kept_for_its_share_is_one_no_cheaper_unit_beats():
    groups, families = choice_groups(("mlp", "all-linear"), (2, 4, 8))
    params = {"mlp": 1000, "all-linear": 2500}  # trainable parameters per unit of rank
    costs = {t: params[c] * r for t, (c, r) in groups.items()}
    # all-linear r=8 leads; mlp r=4 (90%, 4,000 params) is the cheapest close one; all-linear r=2
    # (85%, 5,000 params) and r=4, mlp r=8 are dearer than mlp r=4 and no better
    losses = {"mlp": {2: 2.6, 4: 2.1, 8: 2.1}, "all-linear": {2: 2.15, 4: 2.1, 8: 2.0}}
    scores = {t: {30: losses[c][r]} for t, (c, r) in groups.items()}
    base = {t: BASE for t in groups}
    d = decide(groups, scores, ended=[], rungs=[30, 90], reduction_factor=3, families=families, base=base, costs=costs)
    assert sorted(d.survivors[0]) == [("all-linear", 8), ("mlp", 4)]
    # without costs, ranks are only comparable within a choice: all-linear r=2 and r=4 are kept too
    ranks_only = decide(groups, scores, ended=[], rungs=[30, 90], reduction_factor=3, families=families, base=base)
    assert sorted(ranks_only.survivors[0]) == [("all-linear", 2), ("all-linear", 4), ("all-linear", 8), ("mlp", 4)]



def test_the_leading_rank_keeps_its_close_learning_rates_at_the_first_rung_only():
    groups = {f"r{r}-{lr}": r for r in (4, 8) for lr in ("a", "b")}
    arms = {t: (r, t[-1]) for t, r in groups.items()}
    losses = {4: {30: (2.5, 2.6), 90: (2.3, 2.4)}, 8: {30: (2.0, 2.1), 90: (2.0, 2.05)}}
    scores = {t: {step: losses[r][step]["ab".index(t[-1])] for step in (30, 90)} for t, r in groups.items()}
    d = decide(groups, scores, ended=[], rungs=[30, 90], reduction_factor=2, arms=arms, base={t: BASE for t in groups})
    assert sorted(d.survivors[0]) == [(8, "a"), (8, "b")], "rung 1: r=8 leads; its rate b (90% of the gain) goes on"
    assert d.survivors[1] == [(8, "a")], "rung 2: the best half of its rates only"
