"""`lora-rank analyze` as a library call: experiment dir -> tables -> selection -> plots -> report."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import pandas as pd

from lora_rank_search.analysis.confirmations import apply as apply_confirmations
from lora_rank_search.analysis.diagnosis import Finding, diagnose
from lora_rank_search.analysis.results import load_experiment
from lora_rank_search.analysis.selection import DEFAULT_RULE, Recommendation, recommend, recommend_by_metric
from lora_rank_search.contract import layout, storage
from lora_rank_search.contract.layout import read_config


@dataclass
class Analysis:
    experiment: str
    trials: pd.DataFrame
    history: pd.DataFrame
    recommendation: Recommendation
    findings: list = field(default_factory=list)
    effective: pd.DataFrame = field(default_factory=pd.DataFrame)
    config: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)


class ExperimentNotFound(FileNotFoundError):
    """The experiment folder does not exist or holds no trials."""


def experiment_path(path: str) -> str:
    """A URI as is; a local path made absolute (pyarrow needs absolute local paths)."""
    return path.rstrip("/") if storage.is_uri(path) else os.path.abspath(os.path.expanduser(path))


def load(experiment: str, tolerance: Optional[float] = None, rule: str = DEFAULT_RULE) -> Analysis:
    """Read the experiment and select the rank (no files written)."""
    experiment = experiment_path(experiment)
    try:
        trials, history = load_experiment(experiment)
    except FileNotFoundError as exc:
        raise ExperimentNotFound(f"EXPERIMENT_DIR: {exc}") from None
    if trials.empty:
        raise ExperimentNotFound(f"EXPERIMENT_DIR: {experiment!r} holds no trial folders (is it storage_path/name of a search?)")
    config = read_config(experiment)
    ev = config.get("eval") or {}
    if ev.get("metric"):  # eval.metric: the verdict on the downstream metric, the eval loss beside it
        rec = recommend_by_metric(trials, history, ev["metric"], ev.get("metric_mode") or "max", tolerance, rule)
    else:
        rec = recommend(trials, history, tolerance, rule)
        apply_confirmations(rec, trials, history, layout.read_confirmations(experiment), tolerance, rule)
    return Analysis(experiment, trials, history, rec, diagnose(rec, trials, history), config=config)


def default_out(experiment: str) -> str:
    """`<experiment>/analysis` for a local experiment; ./analysis-<name> for a remote one."""
    if storage.is_uri(experiment):
        return os.path.abspath(f"analysis-{experiment.rstrip('/').rsplit('/', 1)[-1]}")
    return os.path.join(experiment, layout.ANALYSIS_DIR)


def check_out(out: str, given: bool) -> None:
    """Create the output folder, or raise ValueError naming --out (or the default) and why not."""
    name = "--out" if given else "the default output folder (choose another with --out)"
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{name}: {out!r} is a file; give a folder")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".lora-rank-write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise ValueError(f"{name}: cannot write to {out!r} ({exc.strerror or type(exc).__name__})") from None


def run_analysis(experiment: str, tolerance: Optional[float] = None, out: Optional[str] = None,
                 rule: str = DEFAULT_RULE) -> Analysis:
    """Everything `lora-rank analyze` writes: results.csv/.parquet, recommendation.json, plots,
    REPORT.md, report.html (into `out`, default `<experiment>/analysis`)."""
    from lora_rank_search.analysis.effective_rank import effective_rank_table, evidence_sentence
    from lora_rank_search.analysis.plots import all_plots
    from lora_rank_search.analysis.report import PLOTS_DIR, write_outputs

    given = out
    out = out or default_out(experiment_path(experiment))
    result = load(experiment, tolerance, rule)
    check_out(out, given is not None)
    result.effective = effective_rank_table(result.experiment, result.trials, result.history)
    plots = all_plots(result.trials, result.history, result.recommendation, result.effective, os.path.join(out, PLOTS_DIR))
    sentence = evidence_sentence(result.effective, result.recommendation.rank)
    if not result.effective.empty:
        result.findings.append(Finding("effective-rank", sentence))
    result.files = write_outputs(out, result.experiment, result.trials, result.recommendation, result.findings,
                                 result.effective, sentence, plots, result.config)
    result.files["plots"] = plots
    return result
