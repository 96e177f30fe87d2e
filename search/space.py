"""From a validated config to what Tune needs: the param space, per-trial settings, the scheduler."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from lora_rank_search.contract.arms import CHOICE_KEY, DIMENSIONS, RANK_KEY
from lora_rank_search.search.config import GRACE_FRACTION, SearchConfig, TrialSettings, arm_values
from lora_rank_search.trainables.lora import alpha_label

METRIC = "eval_loss"
MODE = "min"
TIME_ATTR = "step"  # the scheduler's clock: optimizer steps, the same on any hardware


def rank_order(ranks: Sequence[int]) -> list[int]:
    """Largest rank first: the most expensive trials start first (better packing), and under
    ASHA they set the bar at each rung so clearly worse small ranks can be stopped early."""
    return sorted((int(r) for r in ranks), reverse=True)


def param_space(cfg: SearchConfig) -> dict[str, Any]:
    """One trial per arm and seed: every dimension of `contract.arms.Arm` searched over its values
    (a dimension searched only sometimes, such as the target choice, only when it has several);
    the alpha rule rides along as a label, and so does the target choice when there is only one."""
    from ray import tune

    values = arm_values(cfg)
    space: dict[str, Any] = {}
    # dimensions searched only sometimes come last, so a search without them expands as it always did
    for f in sorted(DIMENSIONS, key=lambda f: f.metadata["optional"]):
        if f.name == CHOICE_KEY:
            space["alpha_rule"] = alpha_label(cfg.lora.alpha)
        grid = values[f.name]
        if f.metadata["optional"] and len(grid) == 1:
            continue
        space[f.name] = tune.grid_search(rank_order(grid) if f.name == RANK_KEY else grid)
    if len(values[CHOICE_KEY]) == 1:
        spec = cfg.lora.target_modules
        space["target_preset"] = spec if isinstance(spec, str) else ",".join(spec)
    return space


def num_trials(cfg: SearchConfig) -> int:
    return math.prod(len(v) for v in arm_values(cfg).values())


def trial_settings(cfg: SearchConfig, model_path: str, targets: Union[Sequence[str], Mapping[str, Sequence[str]]]) -> TrialSettings:
    """Everything a trial needs besides its (r, lr, seed), typed (`TrialSettings`).

    `model_path` is where the driver resolved the model (a per-machine cache folder for builtin and
    GGUF models); `model` is the configured source, which a trial on a cluster node resolves again
    on its own machine (`trainables.trial.on_this_node`). `targets`: the resolved target list, or
    {choice label: resolved targets} (several target choices; one behaves as a list).
    """
    choices: tuple = ()
    if isinstance(targets, Mapping):
        choices = tuple((str(k), tuple(v)) for k, v in targets.items())
        targets = choices[0][1] if choices else ()
        if len(choices) == 1:
            choices = ()
    return TrialSettings(
        model_path=model_path, model=cfg.model, quantization=cfg.quantization, lora=cfg.lora, train=cfg.train,
        targets=tuple(targets), cpus_per_trial=cfg.resources.cpus_per_trial, rungs=tuple(rung_steps(cfg)),
        choices=choices, eval=cfg.eval,
    )


def grace_steps(cfg: SearchConfig) -> int:
    """The grace period in optimizer steps: as configured, or GRACE_FRACTION of max_steps (every
    rank trains that long before any can be stopped)."""
    if cfg.scheduler.grace_period is not None:
        return int(cfg.scheduler.grace_period)
    return max(1, math.ceil(cfg.train.max_steps * GRACE_FRACTION))


def rung_steps(cfg: SearchConfig) -> list[int]:
    """The steps at which the scheduler compares ranks (empty for the full grid). Trials evaluate
    at these steps besides every eval_every, so a rung never waits for the next evaluation."""
    return scheduler_for(cfg).rungs(cfg)


def make_scheduler(cfg: SearchConfig) -> Optional[Any]:
    """The configured scheduler on `step` (grace period and max_t in optimizer steps), or None for
    the full grid. Metric and mode come from TuneConfig."""
    return scheduler_for(cfg).make(cfg)


@dataclass(frozen=True)
class Scheduler:
    """One `scheduler.type`: its Tune scheduler (None: the full grid) and the steps where it compares arms."""

    make: Callable[[SearchConfig], Optional[Any]]
    rungs: Callable[[SearchConfig], list]


def _sha_rungs(cfg: SearchConfig) -> list[int]:
    from lora_rank_search.search.halving import halving_rungs

    return halving_rungs(grace_steps(cfg), cfg.train.max_steps, cfg.scheduler.reduction_factor)


def _asha_rungs(cfg: SearchConfig) -> list[int]:
    """ASHA's milestones, as Ray's bracket computes them."""
    t, s, grace = cfg.train, cfg.scheduler, grace_steps(cfg)
    count = int(math.log(t.max_steps / grace) / math.log(s.reduction_factor) + 1)
    return [int(grace * s.reduction_factor**k) for k in range(count) if grace * s.reduction_factor**k < t.max_steps]


def _make_sha(cfg: SearchConfig) -> Any:
    from lora_rank_search.search.halving import SuccessiveHalving

    return SuccessiveHalving(
        time_attr=TIME_ATTR,
        max_t=cfg.train.max_steps,
        rungs=rung_steps(cfg),
        reduction_factor=cfg.scheduler.reduction_factor,
        score_attr="best_eval_loss",  # best so far, as the selection rule compares ranks
        confirm=cfg.scheduler.confirm,
        max_concurrent=cfg.resources.max_concurrent,  # capped by the scheduler (Tune's cap would cut unmade trials)
    )


def _make_asha(cfg: SearchConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr=TIME_ATTR,
        max_t=cfg.train.max_steps,
        grace_period=grace_steps(cfg),
        reduction_factor=cfg.scheduler.reduction_factor,
        brackets=1,
    )


# scheduler.type -> its scheduler: the config's Literal lists the same names (a test compares them)
SCHEDULERS = {
    "sha": Scheduler(make=_make_sha, rungs=_sha_rungs),  # synchronous successive halving (search.halving), the default
    "asha": Scheduler(make=_make_asha, rungs=_asha_rungs),  # Ray's asynchronous halving
    "none": Scheduler(make=lambda cfg: None, rungs=lambda cfg: []),  # the full grid
}


def scheduler_for(cfg: SearchConfig) -> Scheduler:
    """The registered scheduler of `scheduler.type`; an unregistered one is an error, not a fallback."""
    try:
        return SCHEDULERS[cfg.scheduler.type]
    except KeyError:
        raise ValueError(f"scheduler.type: no scheduler is registered as {cfg.scheduler.type!r} "
                         f"(registered: {' | '.join(SCHEDULERS)})") from None
