"""Every metric a trial reports, declared once: name, unit, meaning, and its TensorBoard tag.

`run_trial` reports these keys at every evaluation (`REPORTED`), and the others declared here where
they apply; every report passes `checked_report` on its way to Tune, so an undeclared key or a
count that is not an integer fails the trial and the tests. The TensorBoard writer (`analysis.tb`)
takes its scalar tags from here. Pure Python.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Optional


OK, DIVERGED, OOM = "ok", "diverged", "oom"  # values of the `trial_status` key (trainables.failures)
PACK_ARMS, PACK_PARALLEL = "pack_arms", "pack_parallel"  # what the scheduler counts a packed search's free capacity by


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    meaning: str
    tag: Optional[str] = None  # TensorBoard scalar tag (by optimizer step); None: not a curve
    kind: type = float  # int (a count: an integer, never 8704.0), float (NaN allowed), str or bool
    always: bool = True  # in every evaluation report (`REPORTED`); False: in some (failures, eval.metric, Ray)


METRICS = (
    Metric("step", "optimizer steps", "steps done so far (the scheduler's clock)", kind=int),
    Metric("eval_loss", "nats/token", "mean cross-entropy on the eval split", "loss/eval"),
    Metric("best_eval_loss", "nats/token", "lowest eval_loss so far (what the verdict and the scheduler compare)", "loss/eval_best"),
    Metric("best_step", "optimizer steps", "the step of best_eval_loss", kind=int),
    Metric("base_eval_loss", "nats/token", "eval loss of the untouched base model (the trial's step-0 evaluation)", "loss/eval_base"),
    Metric("eval_perplexity", "", "exp(eval_loss)", "eval/perplexity"),
    Metric("train_loss", "nats/token", "mean training loss over the steps since the last evaluation", "loss/train"),
    Metric("tokens_seen", "tokens", "training tokens (non-padding) so far", "data/tokens_seen", kind=int),
    Metric("tokens_per_s", "tokens/s", "training throughput since the last evaluation", "speed/tokens_per_s"),
    Metric("lr", "", "the optimizer's learning rate at the last step (after warm-up and decay)", "optim/lr"),
    Metric("peak_memory_bytes", "bytes", "CUDA max allocated on GPU, process peak RSS on CPU (a packed arm: its pack's, shared by the arms in it)", "memory/peak_bytes", kind=int),
    Metric("trainable_params", "parameters", "LoRA parameters being trained", kind=int),
    Metric("adapter_bytes", "bytes", "size of the saved adapter weights file", kind=int),
    Metric("r", "", "the LoRA rank of this arm", kind=int),
    Metric("learning_rate", "", "the peak learning rate of this arm"),
    Metric("seed", "", "the replicate's seed", kind=int),
    Metric("lora_alpha", "", "lora_alpha given to PEFT (by the alpha rule)"),
    Metric("alpha_rule", "", "the configured alpha rule (a number, r, 2r or rslora)", kind=str),
    Metric("target_modules", "", "the resolved LoRA target names, comma-separated", kind=str),
    Metric("train_pid", "", "the process that trained the arm: its own worker, or its pack's server", kind=int),
    # the trial's status and where it ran
    Metric("trial_status", "", "ok, diverged or oom (trainables.failures)", kind=str, always=False),
    Metric("failure", "", "why a diverged or out-of-memory trial ended ('' when ok)", kind=str, always=False),
    Metric("use_rslora", "", "PEFT's use_rslora (the rslora alpha rule)", kind=bool, always=False),
    Metric("device", "", "cpu or cuda:N, as the trial saw it", kind=str, always=False),
    Metric("resumed_from_step", "optimizer steps", "the step of the checkpoint this run started from (0: from scratch)",
           kind=int, always=False),
    Metric("eval_seconds", "seconds", "the last evaluation's time (a pack's pass shared by its arms)", always=False),
    Metric("elapsed_s", "seconds", "since the trial's process started it", always=False),
    Metric("gpu_ids", "", "CUDA_VISIBLE_DEVICES of the trial's worker", kind=str, always=False),
    Metric("node_id", "", "the Ray node the trial ran on ('' outside Ray)", kind=str, always=False),
    Metric("pid", "", "the trial's worker process", kind=int, always=False),
    Metric("started_at", "seconds since the epoch", "when the trial's process started", always=False),
    Metric("load_seconds", "seconds", "loading the base and attaching the adapter", always=False),
    Metric("pack_arms", "arms", "packed trials: the arms its pack holds at most (resources.arms_per_worker)", kind=int, always=False),
    Metric("pack_parallel", "arms", "packed trials: the arms its pack trains at full speed at once (stacked on a GPU: "
           "pack_arms; taking turns, or on CPU: 1)", kind=int, always=False),
    # eval.metric (a downstream metric beside the loss)
    Metric("eval_metric", "", "eval.metric on greedy generations of the eval prompts", always=False),
    Metric("base_eval_metric", "", "eval.metric of the untouched base", always=False),
    Metric("eval_metric_error", "", "why eval.metric could not be computed at this evaluation", kind=str, always=False),
)

REPORTED = tuple(m.name for m in METRICS if m.always)  # keys present in every evaluation report
DECLARED = {m.name: m for m in METRICS}  # every key a trial may report
TENSORBOARD_TAGS = {m.name: m.tag for m in METRICS if m.tag}  # report key -> scalar tag


def report_problems(report: Mapping[str, Any]) -> list[str]:
    """What in a trial's report breaks the contract: a key not declared here, a value of another
    kind (a count that is not an integer, a number that is text, ...). Empty when nothing."""
    out = []
    for key, value in report.items():
        metric = DECLARED.get(key)
        if metric is None:
            out.append(f"{key}: not a declared report key (declare it in contract/metrics.py)")
        elif not _is_kind(value, metric.kind):
            out.append(f"{key}: expected {metric.kind.__name__}, got {value!r}")
    return out


def checked_report(report: Mapping[str, Any]) -> Mapping[str, Any]:
    """The report, or ValueError naming what breaks the contract (a bug in the trainable)."""
    problems = report_problems(report)
    if problems:
        raise ValueError("a trial report breaks contract/metrics.py: " + "; ".join(problems))
    return report


def _is_kind(value: Any, kind: type) -> bool:
    if kind is bool or kind is str:
        return isinstance(value, kind) or (kind is bool and type(value).__name__ == "bool_")
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, numbers.Integral)
    return isinstance(value, numbers.Real)


def describe_metrics() -> str:
    """Markdown table of the metrics (for the README)."""
    lines = ["| metric | unit | meaning |", "|---|---|---|"]
    lines += [f"| `{m.name}` | {m.unit or '-'} | {m.meaning} |" for m in METRICS]
    return "\n".join(lines)
