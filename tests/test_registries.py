"""Tables instead of if-chains: schedulers and plots are registries; a name not registered is an
error, never a silent fallback (data formats: tests/test_formats.py)."""

from __future__ import annotations

import dataclasses

import pytest

from lora_rank_search.contract.config import SCHEDULER_TYPES


def test_every_scheduler_the_config_allows_is_registered_and_nothing_else():
    from lora_rank_search.search.space import SCHEDULERS

    assert set(SCHEDULERS) == set(SCHEDULER_TYPES)


def test_an_unregistered_scheduler_is_an_error(raw_config):
    from lora_rank_search.search.config import parse_config
    from lora_rank_search.search.space import make_scheduler, rung_steps

    cfg = parse_config(raw_config())
    bogus = dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler, type="hyperband"))
    for use in (make_scheduler, rung_steps):
        with pytest.raises(ValueError, match="no scheduler is registered as 'hyperband'"):
            use(bogus)


def test_every_figure_drawn_is_registered_and_shown_with_its_caption(fake_experiment, tmp_path):
    from lora_rank_search.analysis.pipeline import run_analysis
    from lora_rank_search.analysis.plots import PLOTS

    result = run_analysis(fake_experiment, out=str(tmp_path / "out"))
    report = (tmp_path / "out" / "REPORT.md").read_text()
    drawn = [p for p in PLOTS if (tmp_path / "out" / "plots" / f"{p.name}.png").exists()]
    assert drawn, "the fake experiment draws figures"
    for p in drawn:
        assert p.caption in report, p.name
    assert result.recommendation.rank is not None


def test_a_figure_that_is_not_registered_is_an_error():
    from lora_rank_search.analysis.plots import plot
    from lora_rank_search.analysis.report import build_blocks

    with pytest.raises(KeyError, match="no plot is registered as 'loss_vs_moon'"):
        plot("loss_vs_moon")
    from lora_rank_search.analysis.selection import Recommendation

    rec = Recommendation(rank=None, tolerance=0.05, reason="")
    import pandas as pd

    with pytest.raises(KeyError, match="loss_vs_moon"):
        build_blocks("x", pd.DataFrame(), rec, [], "", None, {"loss_vs_moon": {"png": "a", "svg": "b"}}, "", {})
