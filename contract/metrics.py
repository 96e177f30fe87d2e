"""Every metric a trial reports, declared once: name, unit, meaning, and its TensorBoard tag.

`run_trial` reports these keys at every evaluation; the TensorBoard writer (`analysis.tb`) takes
its scalar tags from here, and the tests check every report against `REPORTED`. Pure data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


OK, DIVERGED, OOM = "ok", "diverged", "oom"  # values of the `trial_status` key (trainables.failures)


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    meaning: str
    tag: Optional[str] = None  # TensorBoard scalar tag (by optimizer step); None: not a curve


METRICS = (
    Metric("step", "optimizer steps", "steps done so far (the scheduler's clock)"),
    Metric("eval_loss", "nats/token", "mean cross-entropy on the eval split", "loss/eval"),
    Metric("best_eval_loss", "nats/token", "lowest eval_loss so far (what the verdict and the scheduler compare)", "loss/eval_best"),
    Metric("best_step", "optimizer steps", "the step of best_eval_loss"),
    Metric("base_eval_loss", "nats/token", "eval loss of the untouched base model (the trial's step-0 evaluation)", "loss/eval_base"),
    Metric("eval_perplexity", "", "exp(eval_loss)", "eval/perplexity"),
    Metric("train_loss", "nats/token", "mean training loss over the steps since the last evaluation", "loss/train"),
    Metric("tokens_seen", "tokens", "training tokens (non-padding) so far", "data/tokens_seen"),
    Metric("tokens_per_s", "tokens/s", "training throughput since the last evaluation", "speed/tokens_per_s"),
    Metric("lr", "", "the optimizer's learning rate at the last step (after warm-up and decay)", "optim/lr"),
    Metric("peak_memory_bytes", "bytes", "CUDA max allocated on GPU, process peak RSS on CPU", "memory/peak_bytes"),
    Metric("trainable_params", "parameters", "LoRA parameters being trained"),
    Metric("adapter_bytes", "bytes", "size of the saved adapter weights file"),
    Metric("r", "", "the LoRA rank of this arm"),
    Metric("learning_rate", "", "the peak learning rate of this arm"),
    Metric("seed", "", "the replicate's seed"),
    Metric("lora_alpha", "", "lora_alpha given to PEFT (by the alpha rule)"),
    Metric("alpha_rule", "", "the configured alpha rule (a number, r, 2r or rslora)"),
    Metric("target_modules", "", "the resolved LoRA target names, comma-separated"),
    Metric("train_pid", "", "the process that trained the arm: its own worker, or its pack's server"),
)

REPORTED = tuple(m.name for m in METRICS)  # keys present in every evaluation report
TENSORBOARD_TAGS = {m.name: m.tag for m in METRICS if m.tag}  # report key -> scalar tag


def describe_metrics() -> str:
    """Markdown table of the metrics (for the README)."""
    lines = ["| metric | unit | meaning |", "|---|---|---|"]
    lines += [f"| `{m.name}` | {m.unit or '-'} | {m.meaning} |" for m in METRICS]
    return "\n".join(lines)
