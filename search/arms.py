"""What a trial trains, and the three roles of its coordinates, named once for the whole tool.

A trial trains one *arm*: (rank, learning rate) here, with a seed. The coordinates play three roles,
and the scheduler (`search.halving`), the verdict (`analysis.selection`) and the report all read
them from this module:

- the **unit compared** (`UNIT_KEYS`): what the verdict recommends and successive halving keeps or
  cuts as a whole: the rank r;
- the **nuisance** (`NUISANCE_KEYS`): a choice every unit gets to make for itself: the learning
  rate. A unit is judged at its best one (the lowest seed-mean loss), so a rank is never blamed for
  a learning rate that did not suit it;
- the **replicate** (`REPLICATE_KEY`): the seed, averaged (mean and standard error).

Adding a dimension (e.g. target modules as part of the unit) is a change here. Pure Python, no Ray.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

UNIT_KEYS = ("r",)
NUISANCE_KEYS = ("lr",)
REPLICATE_KEY = "seed"
ARM_KEYS = UNIT_KEYS + NUISANCE_KEYS


def unit_of(config: Mapping[str, Any]) -> tuple:
    """The unit compared, from a trial's config (or a results row as a mapping)."""
    return tuple(config[k] for k in UNIT_KEYS)


def arm_of(config: Mapping[str, Any]) -> tuple:
    """The arm (unit + nuisance choice); trials of one arm differ only by their seed."""
    return tuple(config.get(k) for k in ARM_KEYS)


def format_lr(lr: Any) -> str:
    """A learning rate as people write it: 3e-04 -> '3e-4', 0.0005 -> '5e-4'."""
    try:
        value = float(lr)
    except (TypeError, ValueError):
        return str(lr)
    if not math.isfinite(value) or value == 0:
        return f"{value:g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def describe_arm(config: Mapping[str, Any]) -> str:
    """'r=8 lr=3e-4': how progress lines, names and reports show an arm."""
    return f"r={config['r']} lr={format_lr(config['lr'])}" if config.get("lr") is not None else f"r={config['r']}"
