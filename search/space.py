"""From a validated config to what Tune needs: the param space, per-trial settings, the scheduler."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from search.config import SearchConfig

METRIC = "eval_loss"
MODE = "min"
TIME_ATTR = "step"  # ASHA's clock: optimizer steps, the same on any hardware


def rank_order(ranks: Sequence[int]) -> list[int]:
    """Largest rank first: the most expensive trials start first (better packing), and they set
    the bar at each ASHA rung so clearly worse small ranks can be stopped early."""
    return sorted((int(r) for r in ranks), reverse=True)


def param_space(cfg: SearchConfig) -> dict[str, Any]:
    """One trial per (rank, seed); the alpha rule and targets ride along as labels."""
    from ray import tune

    return {
        "r": tune.grid_search(rank_order(cfg.lora.ranks)),
        "seed": tune.grid_search([int(s) for s in cfg.train.seeds]),
        "alpha_rule": str(cfg.lora.alpha),
        "target_preset": cfg.lora.target_modules if isinstance(cfg.lora.target_modules, str) else ",".join(cfg.lora.target_modules),
    }


def num_trials(cfg: SearchConfig) -> int:
    return len(cfg.lora.ranks) * len(cfg.train.seeds)


def trial_settings(cfg: SearchConfig, model_path: str, targets: list[str]) -> dict[str, Any]:
    """Everything a trial needs besides its (r, seed), as plain data for Ray workers.

    `model_path` is where the driver resolved the model (a per-machine cache folder for builtin and
    GGUF models); `model` is the configured source, which a trial on a cluster node resolves again
    on its own machine (`trainables.trial.on_this_node`).
    """
    d = cfg.to_dict()
    return {
        "model_path": model_path,
        "model": {"name_or_path": cfg.model.name_or_path, "gguf_file": cfg.model.gguf_file},
        "trust_remote_code": cfg.model.trust_remote_code,
        "quantization": d["quantization"],
        "lora": d["lora"],
        "train": d["train"],
        "targets": list(targets),
        "cpus_per_trial": cfg.resources.cpus_per_trial,
    }


def asha_rungs(grace_period: int, max_steps: int, reduction_factor: float) -> list[int]:
    """The steps at which ASHA compares trials (ascending), as Ray's bracket computes them."""
    import math

    count = int(math.log(max_steps / grace_period) / math.log(reduction_factor) + 1)
    return [int(grace_period * reduction_factor**k) for k in range(count) if grace_period * reduction_factor**k < max_steps]


def make_scheduler(cfg: SearchConfig) -> Optional[Any]:
    """ASHA on `step` (grace period and max_t in optimizer steps), or None for the full grid."""
    if cfg.scheduler.type == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr=TIME_ATTR,
        max_t=cfg.train.max_steps,
        grace_period=cfg.scheduler.grace_period,
        reduction_factor=cfg.scheduler.reduction_factor,
        brackets=1,
    )
