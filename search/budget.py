"""A budget for the whole search (`budget.gpu_hours`, `budget.cpu_hours`, `budget.wall_minutes`).

Before any training the driver runs a short probe (`trainables.probe`: load the base with the
largest adapter, time a few optimizer steps and an eval pass). With the halving arithmetic (how
many arms train how far between rungs, `stages`) that gives what the configured search would cost
(`estimate`). Over the budget, the search is refused with the numbers (`budget.fit: refuse`, the
default) or `max_steps` is shrunk until it fits (`budget.fit: shrink`), never so far that the first
rung falls below MIN_FIRST_RUNG steps (or the configured one, when that is smaller).

Pure arithmetic: the probe's numbers come in, nothing here touches a model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from lora_rank_search.trainables.probe import Probe  # noqa: F401 - what `estimate` and `fit` take (re-exported)
from lora_rank_search.contract.arms import CHOICE_KEY, NUISANCE_KEYS, RANK_KEY
from lora_rank_search.search.config import GRACE_FRACTION, BudgetConfig, ConfigError, SearchConfig, arm_values, warn

# The first rung the planted-task benchmarks validate: on tests/test_planted.py (200 steps, rf 3)
# successive halving found the planted rank with its first rung at 30 steps and missed it at 20
# (bench/RESULTS.md, the planted-rank table). Shrinking never puts the first rung below it.
MIN_FIRST_RUNG = 30
TRIAL_START_S = 10.0  # a new Ray worker's start and imports before its first trial loads the model (s; bench: ~44 s for 8 tiny trials on 2 workers)
REUSED_START_S = 2.0  # a later trial in the same worker (reuse_actors): Tune's reset, the trial's set-up (s; measured 0.5-0.8 s between trials in one worker at load 3.5, tests/test_search.py)
FIXED_S = 30.0  # the analysis and report after the search, Ray's shutdown (s)
SHRINK_TARGET = 0.9  # fit: shrink aims at this share of each limit: the probe's timings drift with the machine's load


@dataclass(frozen=True)
class Estimate:
    """What a search would cost: steps of all arms, trial-seconds (the sum of every trial's time),
    wall seconds (with `slots` trials at once), and the resource hours they mean."""

    max_steps: int
    steps: int
    evals: int
    trial_seconds: float
    wall_seconds: float
    gpu_hours: float
    cpu_hours: float
    slots: int

    @property
    def wall_minutes(self) -> float:
        return self.wall_seconds / 60.0


def stages(cfg: SearchConfig) -> list[tuple[int, int]]:
    """(arms training, steps) between consecutive rungs, per seed: the halving arithmetic of
    `search.halving.halving_steps` (whose total is the sum of arms x steps), kept per stage so the
    wall time can count how many arms run at once. The full grid is one stage."""
    from lora_rank_search.search.space import grace_steps
    from lora_rank_search.search.halving import halving_rungs

    t, s = cfg.train, cfg.scheduler
    values = arm_values(cfg)
    units, choices = len(values[RANK_KEY]), len(values[CHOICE_KEY])
    per_unit = math.prod(len(values[k]) for k in NUISANCE_KEYS)
    if s.type == "none":
        return [(choices * units * per_unit, t.max_steps)]
    out, done = [], 0
    for rung in halving_rungs(grace_steps(cfg), t.max_steps, s.reduction_factor):
        out.append((choices * units * per_unit, rung - done))
        done = rung
        if choices * units * per_unit == 1:
            break
        choices = max(1, math.ceil(choices / s.reduction_factor))
        units = max(1, math.ceil(units / s.reduction_factor))
        per_unit = max(1, math.ceil(per_unit / s.reduction_factor))
        if choices * units * per_unit == 1:
            break
    out.append((choices * units * per_unit, t.max_steps - done))
    return [(a, n) for a, n in out if n > 0]


def estimate(cfg: SearchConfig, probe: Probe, resources: dict, slots: int, elapsed_s: float = 0.0) -> Estimate:
    """What the configured search costs with the probe's timings.

    Every trial loads its model once, evaluates at step 0, at every rung and every eval_every
    steps; a stage of `a` arms runs ceil(a / slots) waves, and an arm that goes on past a rung
    starts again (paused there while the rung waits: a worker's start and a model load more). Each
    slot's worker starts once (TRIAL_START_S) and runs its later trials (REUSED_START_S each).
    elapsed_s (the driver's time so far, the probe included) and FIXED_S are added to the wall time."""
    from lora_rank_search.search.space import num_trials, rung_steps

    seeds = len(cfg.train.seeds)
    trials = num_trials(cfg)
    per_seed = stages(cfg)
    steps = seeds * sum(a * n for a, n in per_seed)
    evals = math.ceil(steps / cfg.train.eval_every) + trials * (1 + len(rung_steps(cfg)))
    slots = max(1, int(slots))
    start = probe.load_s + REUSED_START_S
    first_starts = min(trials, slots) * (TRIAL_START_S - REUSED_START_S)
    restarts = seeds * sum(arms for arms, _ in per_seed[1:])
    trial_seconds = steps * probe.step_s + evals * probe.eval_s + (trials + restarts) * start + first_starts
    wall = elapsed_s + FIXED_S + (TRIAL_START_S - REUSED_START_S) + math.ceil(trials / slots) * (start + probe.eval_s)
    for stage, (arms, n) in enumerate(per_seed):
        waves = math.ceil(arms * seeds / slots)
        wall += waves * (n * probe.step_s + math.ceil(n / cfg.train.eval_every) * probe.eval_s + (start if stage else 0.0))
    gpu = float(resources.get("gpu", 0) or 0)
    cpus = float(resources.get("cpu", 1) or 1)
    return Estimate(
        max_steps=cfg.train.max_steps, steps=steps, evals=evals, trial_seconds=trial_seconds, wall_seconds=wall,
        gpu_hours=trial_seconds * gpu / 3600.0, cpu_hours=0.0 if gpu > 0 else trial_seconds * cpus / 3600.0, slots=slots,
    )


def over_budget(est: Estimate, budget: BudgetConfig, on_gpu: bool, share: float = 1.0) -> list[str]:
    """One line per limit the estimate exceeds (empty: it fits); share < 1 checks against that
    share of each limit."""
    out = []
    if on_gpu and budget.gpu_hours is not None and est.gpu_hours > share * budget.gpu_hours:
        out.append(f"budget.gpu_hours: the search would use ~{est.gpu_hours:.3g} GPU-hours, over the {budget.gpu_hours:g} allowed")
    if not on_gpu and budget.cpu_hours is not None and est.cpu_hours > share * budget.cpu_hours:
        out.append(f"budget.cpu_hours: the search would use ~{est.cpu_hours:.3g} CPU-hours, over the {budget.cpu_hours:g} allowed")
    if budget.wall_minutes is not None and est.wall_minutes > share * budget.wall_minutes:
        out.append(f"budget.wall_minutes: the search would take ~{est.wall_minutes:.1f} min, over the {budget.wall_minutes:g} allowed")
    return out


def with_max_steps(cfg: SearchConfig, max_steps: int) -> SearchConfig:
    """The config with train.max_steps set (eval_every and warmup_steps clipped to fit it)."""
    t = cfg.train
    train = dataclasses.replace(
        t, max_steps=max_steps, eval_every=min(t.eval_every, max_steps), warmup_steps=min(t.warmup_steps, max_steps - 1)
    )
    return dataclasses.replace(cfg, train=train)


def min_max_steps(cfg: SearchConfig) -> int:
    """The fewest max_steps shrinking may set: the first rung stays at MIN_FIRST_RUNG steps (or
    the configured first rung, when smaller); a configured grace_period stays as it is."""
    from lora_rank_search.search.space import grace_steps

    t, s = cfg.train, cfg.scheduler
    if s.type == "none":
        return min(t.max_steps, math.ceil(MIN_FIRST_RUNG / GRACE_FRACTION))
    if s.grace_period is not None:
        return min(t.max_steps, max(s.grace_period, math.ceil(s.grace_period * s.reduction_factor)))
    first = min(MIN_FIRST_RUNG, grace_steps(cfg))
    return min(t.max_steps, math.ceil(first / GRACE_FRACTION))


def floor_reason(cfg: SearchConfig, floor: int) -> str:
    """Why shrinking stops at `floor` (min_max_steps), in the words of the config."""
    from lora_rank_search.search.space import grace_steps

    t, s = cfg.train, cfg.scheduler
    if floor >= t.max_steps:
        return "the configured max_steps: nothing to shrink"
    if s.type != "none" and s.grace_period is not None:
        return (f"the configured scheduler.grace_period {s.grace_period} kept, and one rung above it "
                f"(x reduction_factor {s.reduction_factor:g})")
    if s.type != "none" and grace_steps(cfg) < MIN_FIRST_RUNG:
        return f"the first rung kept at its {grace_steps(cfg)} steps, already below the validated minimum of {MIN_FIRST_RUNG}"
    return f"the first rung at the validated minimum of {MIN_FIRST_RUNG} steps"


def describe(est: Estimate, on_gpu: bool) -> str:
    hours = f"~{est.gpu_hours:.3g} GPU-hours" if on_gpu else f"~{est.cpu_hours:.3g} CPU-hours"
    return (f"{est.steps:,} training steps + {est.evals:,} evaluations at max_steps {est.max_steps}: "
            f"{hours}, ~{est.wall_minutes:.1f} min wall with {est.slots} trial(s) at once")


def fit(cfg: SearchConfig, probe: Probe, resources: dict, slots: int, elapsed_s: float = 0.0,
        log=print) -> tuple[SearchConfig, Estimate]:
    """Check the configured search against its budget: returns (the config to run, its estimate).

    Over the budget: refuse (ConfigError with the numbers) or, with `budget.fit: shrink`, the
    largest max_steps (not below `min_max_steps`) whose estimate fits SHRINK_TARGET of the budget,
    said in one line."""
    on_gpu = float(resources.get("gpu", 0) or 0) > 0
    b = cfg.budget
    log(f"budget: probe: {probe.step_s:.3g} s per optimizer step, {probe.eval_s:.3g} s per evaluation, "
        f"{probe.load_s:.3g} s to load (on {probe.device}, {probe.steps} steps timed)")
    if on_gpu and b.gpu_hours is None and b.cpu_hours is not None:
        warn(f"budget.cpu_hours: {b.cpu_hours:g} has no effect: trials run on GPU (set budget.gpu_hours)")
    if not on_gpu and b.gpu_hours is not None and b.cpu_hours is None:
        warn(f"budget.gpu_hours: {b.gpu_hours:g} has no effect: trials run on CPU (set budget.cpu_hours)")
    est = estimate(cfg, probe, resources, slots, elapsed_s)
    log(f"budget: estimate: {describe(est, on_gpu)}")
    problems = over_budget(est, b, on_gpu)
    if not problems:
        return cfg, est
    floor = min_max_steps(cfg)
    if b.fit == "shrink":
        low, high, best = floor, cfg.train.max_steps - 1, None
        while low <= high:  # the estimate grows with max_steps: the largest that fits
            mid = (low + high) // 2
            trial = estimate(with_max_steps(cfg, mid), probe, resources, slots, elapsed_s)
            if over_budget(trial, b, on_gpu, SHRINK_TARGET):
                high = mid - 1
            else:
                best, low = mid, mid + 1
        if best is not None:
            shrunk = with_max_steps(cfg, best)
            est2 = estimate(shrunk, probe, resources, slots, elapsed_s)
            log(f"budget: fit: shrink: train.max_steps {cfg.train.max_steps} -> {best} to fit {SHRINK_TARGET:.0%} of the budget "
                f"({describe(est2, on_gpu)})")
            return shrunk, est2
        least = estimate(with_max_steps(cfg, floor), probe, resources, slots, elapsed_s)
        problems.append(f"budget.fit: shrink: even train.max_steps {floor} ({floor_reason(cfg, floor)}) would need "
                        f"{describe(least, on_gpu)}; raise the budget or search fewer arms")
    else:
        problems.append(f"budget.fit: refuse (the default): estimate {describe(est, on_gpu)}; set budget.fit: shrink to "
                        f"shrink train.max_steps (not below {floor}), raise the budget, or search fewer arms")
    raise ConfigError(problems, "input")


def slots_for(resources: dict, cluster: dict, max_concurrent: Optional[int]) -> int:
    """Trials at once: what the cluster's CPUs (and GPUs) hold, capped by resources.max_concurrent."""
    cpus = float(cluster.get("CPU", 1) or 1)
    slots = int(cpus // max(1.0, float(resources.get("cpu", 1) or 1)))
    gpu = float(resources.get("gpu", 0) or 0)
    if gpu > 0:
        slots = min(slots, int(float(cluster.get("GPU", 0) or 0) // gpu) or 1)
    if max_concurrent:
        slots = min(slots, max_concurrent)
    return max(1, slots)
