"""Rank selection and diagnosis as pure functions on hand-made results tables."""

from __future__ import annotations

import math
import random

import numpy as np
import pandas as pd
import pytest

from analysis.diagnosis import diagnose
from analysis.selection import check_tolerance, knee_rank, recommend


def tables(curves: dict, max_steps: int = 40, status: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, history) from {(r, seed): {step: eval_loss}}; status defaults from the last step."""
    trials, history = [], []
    for (r, seed), curve in curves.items():
        trial_id = f"t{r}_{seed}"
        steps = max(curve) if curve else 0
        state = (status or {}).get((r, seed)) or ("completed" if steps >= max_steps else "stopped")
        trials.append({"trial_id": trial_id, "trial_dir": f"r{r:04d}_seed{seed}_{trial_id}", "r": r, "seed": seed,
                       "status": state, "stopped_early": state == "stopped", "steps": steps, "max_steps": max_steps,
                       "lora_alpha": 2.0 * r, "alpha_rule": "2r", "targets": "q_proj,v_proj"})
        for step, loss in curve.items():
            history.append({"trial_id": trial_id, "step": step, "eval_loss": loss, "train_loss": 3.0 - 0.01 * step})
    return pd.DataFrame(trials), pd.DataFrame(history)


def final(values: dict, step: int = 40) -> dict:
    """{r: loss} -> one seed, evaluated at 10..step with the loss falling to `loss`."""
    return {(r, 0): {s: loss + 0.5 * (step - s) / step for s in range(10, step + 1, 10)} for r, loss in values.items()}


def test_clear_knee_recommends_the_smallest_rank_within_tolerance():
    rec = recommend(*tables(final({1: 3.0, 2: 2.5, 4: 2.015, 8: 2.005, 16: 2.0})))
    assert rec.rank == 4 and rec.best_rank == 16 and rec.evidence_step == 40
    assert rec.loss == pytest.approx(2.015) and rec.threshold == pytest.approx(2.0 * 1.01)
    assert rec.knee == 4
    assert rec.lora_alpha == 8.0 and rec.alpha_rule == "2r" and rec.targets == ["q_proj", "v_proj"]
    assert rec.trial_id == "t4_0"
    assert [e.adequate for e in rec.ranks] == [False, False, True, True, True]


def test_tolerance_moves_the_answer_monotonically():
    trials, history = tables(final({1: 3.0, 2: 2.5, 4: 2.015, 8: 2.005, 16: 2.0}))
    assert recommend(trials, history, 0.0).rank == 16
    assert recommend(trials, history, 0.005).rank == 8
    assert recommend(trials, history, 0.3).rank == 2
    assert recommend(trials, history, 1.0).rank == 1
    with pytest.raises(ValueError, match=r"tolerance: .* got -0.1"):
        recommend(trials, history, -0.1)
    with pytest.raises(ValueError, match="got 'abc'"):
        check_tolerance("abc")


def test_asha_stopped_rank_is_judged_at_its_own_last_step():
    # r=16 and r=8 ran to 40; r=4 was stopped at 20 and r=2 at 10 (as ASHA would).
    curves = {
        (16, 0): {10: 2.60, 20: 2.30, 30: 2.10, 40: 2.00},
        (8, 0): {10: 2.62, 20: 2.31, 30: 2.12, 40: 2.01},
        (4, 0): {10: 2.63, 20: 2.32},  # +0.87% of the best at step 20, +16% of the best at step 40
        (2, 0): {10: 2.75},  # +5.8% of the best at step 10
    }
    rec = recommend(*tables(curves))
    assert rec.rank == 4 and rec.evidence_step == 20
    four, two = rec.evidence(4), rec.evidence(2)
    assert four.ref_rank == 16 and four.ref_loss == pytest.approx(2.30) and four.stopped_early
    assert two.evidence_step == 10 and two.ref_loss == pytest.approx(2.60) and not two.adequate
    kinds = [f.kind for f in diagnose(rec, *tables(curves))]
    assert "judged-early" in kinds, "a recommendation resting on an early stop is flagged"


def test_a_smaller_rank_cut_early_near_the_tolerance_is_flagged():
    curves = {
        (16, 0): {10: 2.60, 20: 2.30, 40: 2.00},
        (8, 0): {10: 2.61, 20: 2.31, 40: 2.005},
        (4, 0): {10: 2.64},  # +1.5%: outside 1%, but only narrowly, and judged at step 10
    }
    trials, history = tables(curves)
    rec = recommend(trials, history)
    assert rec.rank == 8
    found = [f for f in diagnose(rec, trials, history) if f.kind == "smaller-rank-cut-early"]
    assert found and "r=4 (+1.54% at step 10)" in found[0].text


def test_best_so_far_is_used_so_an_overfitting_trial_keeps_its_best_checkpoint():
    curves = {(16, 0): {10: 2.5, 20: 2.0, 30: 2.2, 40: 2.4}, (4, 0): {10: 2.6, 20: 2.3, 30: 2.1, 40: 2.05}}
    trials, history = tables(curves)
    rec = recommend(trials, history)
    assert rec.evidence(16).loss == pytest.approx(2.0) and rec.best_rank == 16
    assert rec.rank == 16, "r=4's 2.05 is 2.5% above r=16's best so far"
    overfit = [f for f in diagnose(rec, trials, history) if f.kind == "overfitting"]
    assert len(overfit) == 1 and "r=16" in overfit[0].text and "step 20" in overfit[0].text


def seeds_table(r4: list, r8: list) -> dict:
    out = {}
    for seed, loss in enumerate(r4):
        out[(4, seed)] = {10: loss + 0.5, 40: loss}
    for seed, loss in enumerate(r8):
        out[(8, seed)] = {10: loss + 0.5, 40: loss}
    return out


def test_several_seeds_use_the_mean_and_the_one_standard_error_rule():
    # Noisy seeds: r=8's standard error (sd 0.1 / sqrt 3 = 0.058) is looser than 1% (0.02): r=4 (mean 2.05) passes.
    noisy = seeds_table([2.05, 2.10, 2.00], [2.1, 2.0, 1.9])
    rec = recommend(*tables(noisy))
    eight = rec.evidence(8)
    assert eight.loss == pytest.approx(2.0) and eight.se == pytest.approx(0.1 / math.sqrt(3))
    assert rec.rank == 4 and rec.threshold == pytest.approx(2.0 + 0.1 / math.sqrt(3))
    assert rec.evidence(4).seeds == [0, 1, 2]
    assert rec.trial_id == "t4_2", "the best seed of the recommended rank (2.00)"
    assert "one standard error" in rec.reason
    # Tight seeds: the 1% tolerance decides, and r=4 (3% worse) is not adequate.
    tight = seeds_table([2.06, 2.061, 2.059], [2.0, 2.001, 1.999])
    assert recommend(*tables(tight)).rank == 8


def test_a_seed_stopped_earlier_sets_the_rank_s_evidence_step():
    curves = {(8, 0): {10: 2.5, 20: 2.2, 40: 2.0}, (8, 1): {10: 2.5, 20: 2.25}, (16, 0): {10: 2.4, 20: 2.2, 40: 1.9}}
    rec = recommend(*tables(curves))
    eight = rec.evidence(8)
    assert eight.evidence_step == 20 and eight.loss == pytest.approx(2.225) and eight.max_step == 40


def test_ties_go_to_the_smaller_rank():
    rec = recommend(*tables(final({4: 2.0, 8: 2.0, 16: 2.0})), tolerance=0.0)
    assert rec.rank == 4 and rec.best_rank == 4
    kinds = [f.kind for f in diagnose(rec, *tables(final({4: 2.0, 8: 2.0, 16: 2.0})))]
    assert "rank-does-not-matter" in kinds


def test_one_rank():
    trials, history = tables(final({16: 2.0}))
    rec = recommend(trials, history)
    assert rec.rank == 16 and rec.knee is None
    assert [f.kind for f in diagnose(rec, trials, history)] == ["single-rank"]


def test_failed_trials_are_left_out_and_named():
    curves = final({2: 1.0, 8: 2.01, 16: 2.0})
    trials, history = tables(curves, status={(2, 0): "error"})
    rec = recommend(trials, history)
    assert rec.rank == 8, "the failed r=2 (however low its loss) is not a candidate"
    assert [e.r for e in rec.ranks] == [8, 16]
    assert rec.excluded == ["r=2 seed 0: the trial failed; left out"]
    assert any(f.kind == "excluded" for f in diagnose(rec, trials, history))


def test_all_nan_and_empty_inputs_give_no_recommendation():
    trials, history = tables({(4, 0): {10: math.nan, 20: math.inf}, (8, 0): {10: math.nan}})
    rec = recommend(trials, history)
    assert rec.rank is None and "no trial produced a finite eval loss" in rec.reason
    assert rec.to_dict()["loss"] is None, "NaN becomes null in JSON"
    assert [f.kind for f in diagnose(rec, trials, history)] == ["no-result"]
    empty = recommend(pd.DataFrame(), pd.DataFrame())
    assert empty.rank is None
    # A NaN evaluation in the middle of a curve is skipped; the rest still counts.
    rec = recommend(*tables({(4, 0): {10: 2.5, 20: math.nan, 30: 2.1, 40: 2.0}}))
    assert rec.rank == 4 and rec.loss == pytest.approx(2.0)


def test_grid_too_small_and_grid_too_large():
    trials, history = tables(final({4: 3.0, 8: 2.5, 16: 2.0}))
    rec = recommend(trials, history)
    assert rec.rank == 16
    assert "grid-too-small" in [f.kind for f in diagnose(rec, trials, history)]
    trials, history = tables(final({2: 2.5, 4: 2.0, 8: 2.01, 16: 2.02, 32: 2.05, 64: 2.1}))
    rec = recommend(trials, history)
    assert rec.rank == 4
    found = [f for f in diagnose(rec, trials, history) if f.kind == "grid-too-large"]
    assert found and "r=16, r=32, r=64" in found[0].text


def test_extend_downward_when_the_smallest_rank_suffices_but_not_all_do():
    trials, history = tables(final({4: 2.0, 8: 2.01, 16: 2.1}))
    rec = recommend(trials, history)
    assert rec.rank == 4
    assert "extend-downward" in [f.kind for f in diagnose(rec, trials, history)]


def test_knee_rank():
    assert knee_rank([1, 2, 4, 8, 16], [0.5, 0.3, 0.01, 0.005, 0.0]) == 4
    assert knee_rank([1, 2, 4, 8, 16], [0.4, 0.3, 0.2, 0.1, 0.0]) is None, "a straight line has no knee"
    assert knee_rank([4, 8], [0.1, 0.0]) is None
    assert knee_rank([1, 2, 4, 8], [0.5, 0.01, 0.0, 0.02]) == 2, "ranks past the best are ignored"


def test_invariants_on_random_tables():
    rng = random.Random(0)
    for _ in range(200):
        ranks = sorted(rng.sample([1, 2, 4, 8, 16, 32, 64], rng.randint(1, 6)))
        curves = {}
        for r in ranks:
            for seed in range(rng.randint(1, 3)):
                last = rng.choice([10, 20, 40])
                curves[(r, seed)] = {s: 2.0 + rng.random() for s in range(10, last + 1, 10)}
        trials, history = tables(curves)
        tol = rng.choice([0.0, 0.01, 0.05])
        rec = recommend(trials, history, tol)
        chosen = rec.evidence(rec.rank)
        assert chosen.loss <= chosen.threshold + 1e-9, "the recommended rank is never worse than the tolerance allows"
        assert all(not e.adequate for e in rec.ranks if e.r < rec.rank), "no smaller rank was adequate"
        for e in rec.ranks:
            assert e.ref_loss <= e.loss + 1e-12, "the reference is the best at that step"
            assert e.threshold == pytest.approx(e.ref_loss + max(tol * e.ref_loss, e.ref_se))
        assert np.isfinite(rec.best_loss)
