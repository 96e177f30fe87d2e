"""What a trial trains, and the three roles of its coordinates, named once for the whole tool.

A trial trains one *arm*, a typed `Arm`: (target choice, rank, learning rate), with a seed. Each
coordinate is a field of `Arm` whose metadata says its role, how names and folders spell it and the
config field it is searched over; trial names and folders (`Arm.name`, `Arm.dirname`,
`Arm.parse_dirname`), the param space (`search.space`), the scheduler's groups (`search.halving`:
`unit_of`, `arm_of`), the verdict's tables (`analysis.selection`), the report and TensorBoard's
HParams all read them from here, so a new dimension is one field. The roles:

- the **unit compared** (`UNIT_KEYS`): what the verdict recommends and successive halving keeps or
  cuts as a whole: the adapter, (target choice, rank r). `CHOICE_KEY` is present in a trial's
  config only when the search has several target choices (one choice: the unit is the rank, and
  names and folders are as they always were); a unit's `family` is its target choice: ranks are
  compared within it, choices by their best rank;
- the **nuisance** (`NUISANCE_KEYS`): choices every unit gets to make for itself: the learning
  rate, and the LoRA dropout when `lora.dropout` lists several. A unit is judged at its best arm (the lowest seed-mean loss), so a rank is never blamed for
  a learning rate that did not suit it;
- the **replicate** (`REPLICATE_KEY`): the seed, averaged (mean and standard error).

Pure Python, no Ray.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

UNIT, NUISANCE, REPLICATE = "unit", "nuisance", "replicate"


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


def _number(text: Any) -> float:
    return float(text)


def _dimension(role: str, tag: str, pattern: str, parse: Callable[[str], Any], show: Callable[[Any], str] = str,
               folder: Optional[Callable[[Any], str]] = None, source: Optional[str] = None, optional: bool = False,
               label: str = "", default: Any = dataclasses.MISSING) -> Any:
    """A coordinate of the arm. tag: what precedes its value in names ('r' in r8; '' leads the name);
    pattern/parse: its value in a folder name; show/folder: its value in a trial name / a folder name;
    source: the config field it is searched over (a list there: one arm per value); optional: left
    out of names and trial configs when the search has one value; label: how reports name it."""
    meta = {"role": role, "tag": tag, "pattern": pattern, "parse": parse, "show": show, "folder": folder or show,
            "source": source, "optional": optional, "label": label}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Arm:
    """One trial's coordinates, in the order names spell them (units first, the replicate last)."""

    target_choice: str = _dimension(UNIT, "", r"[^/]+?", str, source="lora.target_modules", optional=True,
                                    label="target choice", default="")  # '' with one target choice
    r: int = _dimension(UNIT, "r", r"\d+", int, folder=lambda r: f"{int(r):04d}", source="lora.ranks", label="rank",
                        default=0)
    lr: Optional[float] = _dimension(NUISANCE, "lr", r"[^_]+", _number, show=format_lr, source="train.learning_rate",
                                     label="learning rate", default=None)  # None in folders from before lr lists
    dropout: Optional[float] = _dimension(NUISANCE, "do", r"[^_]+", _number, show=lambda v: f"{float(v):g}",
                                          source="lora.dropout", optional=True, label="LoRA dropout",
                                          default=None)  # in names only when lora.dropout lists several
    seed: int = _dimension(REPLICATE, "seed", r"-?\d+", int, source="train.seeds", label="seed", default=0)

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> "Arm":
        """The arm of a trial's config (or of a results row as a mapping)."""
        values = {}
        for f in DIMENSIONS:
            value = config.get(f.name)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            values[f.name] = f.metadata["parse"](value)
        return cls(**values)

    @property
    def unit(self) -> tuple:
        return tuple(getattr(self, k) for k in UNIT_KEYS)

    @property
    def nuisance(self) -> tuple:
        return tuple(getattr(self, k) for k in NUISANCE_KEYS)

    def _parts(self, spell: str) -> list[str]:
        parts = []
        for f in DIMENSIONS:
            value = getattr(self, f.name)
            if value is None or value == "" and f.metadata["optional"]:
                continue
            parts.append(f.metadata["tag"] + f.metadata[spell](value))
        return parts

    def name(self) -> str:
        """'r8-lr3e-4-seed0' ('mlp-r8-lr3e-4-seed0' with several target choices): how progress lines
        and Tune name a trial."""
        return "-".join(self._parts("show"))

    def dirname(self, trial_id: str) -> str:
        """'r0008_lr3e-4_seed0_<trial id>' ('mlp_r0008_...' with several target choices): trial folders
        sort by target choice, rank, then the nuisance."""
        return "_".join(self._parts("folder") + [str(trial_id)])

    @classmethod
    def parse_dirname(cls, name: str) -> Optional[tuple["Arm", str]]:
        """(arm, trial id) of a trial folder name, or None when the name is not one of ours."""
        match = _DIRNAME.match(name)
        if not match:
            return None
        values = {f.name: f.metadata["parse"](match[f.name]) for f in DIMENSIONS if match[f.name] is not None}
        return cls(**values), match["trial_id"]


DIMENSIONS = dataclasses.fields(Arm)
UNIT_KEYS = tuple(f.name for f in DIMENSIONS if f.metadata["role"] == UNIT)
NUISANCE_KEYS = tuple(f.name for f in DIMENSIONS if f.metadata["role"] == NUISANCE)
REPLICATE_KEY = next(f.name for f in DIMENSIONS if f.metadata["role"] == REPLICATE)
ARM_KEYS = UNIT_KEYS + NUISANCE_KEYS  # trials of one arm differ only by their replicate
CHOICE_KEY = "target_choice"  # the target choice's label: a preset name, or 'q_proj+v_proj' for an explicit list
RANK_KEY = "r"
LR_KEY = "lr"  # the learning rate: a nuisance in every search (absent from folders from before learning-rate lists)
_BY_NAME = {f.name: f for f in DIMENSIONS}


def show_value(key: str, value: Any) -> str:
    """A coordinate's value as names and reports write it ('3e-4' for a learning rate)."""
    if key not in _BY_NAME:
        return f"{value}"
    meta = _BY_NAME[key].metadata
    return meta["show"](meta["parse"](value))


def _dirname_pattern() -> re.Pattern:
    parts = []
    for f in DIMENSIONS:
        tag, value = f.metadata["tag"], f"(?P<{f.name}>{f.metadata['pattern']})"
        part = f"{tag}{value}_" if tag or not f.metadata["optional"] else f"{value}_"
        # a dimension absent from a name (one target choice, no learning rate before lr lists, a
        # dimension added later) leaves its part out
        optional = f.metadata["optional"] or f.default is None
        parts.append(f"(?:{part})?" if optional else part)
    return re.compile("^" + "".join(parts) + r"(?P<trial_id>.+)$")


_DIRNAME = _dirname_pattern()


def unit_of(config: Mapping[str, Any]) -> tuple:
    """The unit compared, from a trial's config (or a results row as a mapping): (choice, r),
    the choice '' when the search has one target choice."""
    return Arm.of(config).unit


def family_of(config: Mapping[str, Any]) -> str:
    """The unit's target choice ('' with one choice): ranks are compared within it."""
    return config.get(CHOICE_KEY) or ""


def choice_label(spec: Any) -> str:
    """A target choice's short label: the preset name, or the explicit names joined by '+'."""
    return spec if isinstance(spec, str) else "+".join(str(s) for s in spec)


def arm_of(config: Mapping[str, Any]) -> tuple:
    """The arm (unit + nuisance choice); trials of one arm differ only by their seed."""
    arm = Arm.of(config)
    return arm.unit + arm.nuisance


def with_arm(config: Mapping[str, Any], values: Mapping[str, Any]) -> dict:
    """A plain config (nested dict) with an arm's nuisance values in the fields they are searched
    over (lora.dropout: 0.1 for an arm of a search over [0.0, 0.1]): what that arm was trained with."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}
    for key, value in values.items():
        f = _BY_NAME.get(key)
        if f is None or f.metadata["role"] != NUISANCE or value is None:
            continue
        section, name = f.metadata["source"].split(".")
        out.setdefault(section, {})[name] = value
    return out


def describe_nuisance(values: Mapping[str, Any]) -> str:
    """'lr 3e-4' (and ', dropout 0.1' for each further nuisance searched): an arm's nuisance as reports write it."""
    return ", ".join(f"{f.name} {show_value(f.name, values[f.name])}" for f in DIMENSIONS
                     if f.metadata["role"] == NUISANCE and values.get(f.name) is not None)
