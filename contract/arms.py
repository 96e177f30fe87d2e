"""What a trial trains, and the three roles of its coordinates, named once for the whole tool.

A trial trains one *arm*: (target choice, rank, learning rate), with a seed. The coordinates play
three roles, and the scheduler (`search.halving`), the verdict (`analysis.selection`) and the report
all read them from this module:

- the **unit compared** (`UNIT_KEYS`): what the verdict recommends and successive halving keeps or
  cuts as a whole: the adapter, (target choice, rank r). `CHOICE_KEY` is present in a trial's
  config only when the search has several target choices (one choice: the unit is the rank, and
  names and folders are as they always were); a unit's `family` is its target choice: ranks are
  compared within it, choices by their best rank;
- the **nuisance** (`NUISANCE_KEYS`): a choice every unit gets to make for itself: the learning
  rate. A unit is judged at its best one (the lowest seed-mean loss), so a rank is never blamed for
  a learning rate that did not suit it;
- the **replicate** (`REPLICATE_KEY`): the seed, averaged (mean and standard error).

Pure Python, no Ray.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

CHOICE_KEY = "target_choice"  # the target choice's label: a preset name, or 'q_proj+v_proj' for an explicit list
UNIT_KEYS = (CHOICE_KEY, "r")
NUISANCE_KEYS = ("lr",)
REPLICATE_KEY = "seed"


def unit_of(config: Mapping[str, Any]) -> tuple:
    """The unit compared, from a trial's config (or a results row as a mapping): (choice, r),
    the choice '' when the search has one target choice."""
    return tuple(config.get(k) or "" if k == CHOICE_KEY else config[k] for k in UNIT_KEYS)


def family_of(config: Mapping[str, Any]) -> str:
    """The unit's target choice ('' with one choice): ranks are compared within it."""
    return config.get(CHOICE_KEY) or ""


def choice_label(spec: Any) -> str:
    """A target choice's short label: the preset name, or the explicit names joined by '+'."""
    return spec if isinstance(spec, str) else "+".join(str(s) for s in spec)


def arm_of(config: Mapping[str, Any]) -> tuple:
    """The arm (unit + nuisance choice); trials of one arm differ only by their seed."""
    return unit_of(config) + tuple(config.get(k) for k in NUISANCE_KEYS)


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
