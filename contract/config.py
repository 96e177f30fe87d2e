"""The search config's schema: one typed dataclass per section, the only place defaults live.

Loading and checking a config file is the driver's (`search.config`); the trainables and the
analysis read the parsed `SearchConfig` (plain data, `to_dict`, so it travels to Ray workers) and
the `TrialSettings` built from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

ALPHA_RULES = ("r", "2r", "rslora")
TARGET_PRESETS = ("attention-qv", "attention", "mlp", "experts", "all-linear")  # resolved by trainables.lora
PARAM_PREFIX = "param:"  # a resolved target that is a parameter (LoraConfig.target_parameters), not a module


FUSED_PARAMS = {"gate_up_proj": 2}  # PEFT's rank (and alpha) multiplier for fused expert weights


def fused_patterns(params) -> dict[str, int]:
    """{regex of a targeted parameter: PEFT's multiplier of its rank and alpha} for the fused expert
    weights among `params` (LoraConfig's rank_pattern / alpha_pattern keys)."""
    import re

    return {re.escape(p): FUSED_PARAMS[p.rsplit(".", 1)[-1]] for p in params if p.rsplit(".", 1)[-1] in FUSED_PARAMS}


def split_targets(targets) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) of a resolved target list (as trials record it)."""
    modules = [t for t in targets if not t.startswith(PARAM_PREFIX)]
    params = [t[len(PARAM_PREFIX):] for t in targets if t.startswith(PARAM_PREFIX)]
    return modules, params


def describe_targets(targets) -> str:
    """A resolved target list as people read it: 'q_proj,v_proj', or with expert / router weights
    'parameters down_proj,gate_up_proj' (after the modules, if any)."""
    modules, params = split_targets(targets)
    parts = ([",".join(modules)] if modules else []) + ([f"parameters {','.join(params)}"] if params else [])
    return " + ".join(parts)
DATA_FORMATS = ("auto", "instruction", "completion", "alpaca", "chat", "sharegpt", "text")  # = trainables.formats.FORMATS + auto
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANT_TYPES = ("nf4", "fp4")
LR_SCHEDULES = ("constant", "linear", "cosine")
SCHEDULER_TYPES = ("sha", "asha", "none")
CONFIRM_MODES = ("off", "tail", "full")  # scheduler.confirm (search.confirm)
DEFAULT_CONFIRM = "tail"
BUDGET_FITS = ("refuse", "shrink")
METRIC_MODES = ("max", "min")
WANDB_MODES = ("online", "offline", "disabled")
GRACE_FRACTION = 0.25  # scheduler.grace_period: null = this share of train.max_steps (bench/halving_replay.py)


class ConfigError(ValueError):
    """One or more config problems; `problems` holds one line per problem."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        self.source = source
        n = len(self.problems)
        head = f"{source}: {n} problem{'s' if n != 1 else ''}"
        super().__init__(head + "\n" + "\n".join(f"  - {p}" for p in self.problems))


def _doc(text: str, *, limit: Optional[int] = None, path: bool = False, targets: bool = False, **kw: Any) -> Any:
    """A schema field and its rules: its one-line help (`doc`, the README's reference), the largest
    value that can be meant (`limit`), whether it is a name or path the filesystem must accept
    (`path`), whether it holds target choices (`targets`). Its type annotation carries the rest:
    `Literal[...]` lists the values allowed, `tuple[T, ...]` the type of a list's elements."""
    return field(metadata={"doc": text, "limit": limit, "path": path, "targets": targets}, **kw)


@dataclass(frozen=True)
class ModelConfig:
    """The base model every trial loads."""

    name_or_path: str = _doc(
        "hub id, local folder, or 'builtin:smollm2-135m-instruct' (shipped on PyPI, offline)",
        default="builtin:smollm2-135m-instruct", path=True,
    )
    gguf_file: Optional[str] = _doc("GGUF file name inside name_or_path (dequantized on load)", default=None, path=True)
    trust_remote_code: bool = _doc("run the model repo's own Python code (off unless you trust it)", default=False)


@dataclass(frozen=True)
class QuantizationConfig:
    """How the frozen base is stored: bitsandbytes 4-bit (QLoRA) or plain."""

    load_in_4bit: bool = _doc("NF4/FP4 via bitsandbytes; false = plain weights (for comparison)", default=True)
    quant_type: Literal[QUANT_TYPES] = _doc("nf4 | fp4", default="nf4")
    double_quant: bool = _doc("also quantize the quantization constants (~0.4 bits/param saved)", default=True)
    compute_dtype: Literal[COMPUTE_DTYPES] = _doc("auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16", default="auto")
    prequantized_cache: bool = _doc(
        "quantize once per machine, save the 4-bit checkpoint in the cache, load that in every trial", default=True
    )


@dataclass(frozen=True)
class DataConfig:
    """Training and evaluation data."""

    source: str = _doc(
        "jsonl/json/csv/parquet/txt file, a dataset folder (datasets' save_to_disk, or a Hugging Face dataset folder), "
        "hub dataset name, or 'builtin:chatterbot' (shipped on PyPI)",
        default="builtin:chatterbot", path=True,
    )
    format: Literal[DATA_FORMATS] = _doc(
        "auto (detected from the columns, and said) | instruction {prompt, response} | completion {prompt, completion} | "
        "alpaca {instruction, input, output} | chat {messages} | sharegpt {conversations: [{from, value}]} | text {text}",
        default="auto",
    )
    split: str = _doc("dataset folder or hub name: the split trained on", default="train")
    eval_split: Optional[str] = _doc("dataset folder or hub name: a split held out for eval (instead of the hash split)", default=None)
    subset: Optional[str] = _doc("dataset folder or hub name: the subset (configuration name)", default=None)
    prompt_field: str = _doc("instruction format: the prompt column", default="prompt")
    response_field: str = _doc("instruction format: the response column (the only tokens with loss)", default="response")
    messages_field: str = _doc("chat format: column of [{role, content}, ...] lists", default="messages")
    text_field: str = _doc("text format: the text column", default="text")
    use_chat_template: Union[bool, str] = _doc(
        "instruction, alpaca, chat, sharegpt: render through the tokenizer's chat template (auto = if it has one)", default="auto"
    )
    eval_source: Optional[str] = _doc("separate eval file; otherwise a deterministic hash split", default=None, path=True)
    eval_fraction: float = _doc("share of examples (by hash of the prompt) held out for eval", default=0.1)
    max_eval_examples: Optional[int] = _doc("cap on eval examples (a fixed subset, the same for every trial)", default=None)
    max_seq_len: int = _doc("tokens per example; longer examples are truncated", default=256, limit=1_048_576)


@dataclass(frozen=True)
class LoraConfig:
    """The adapter: one trial per rank and seed."""

    ranks: tuple[int, ...] = _doc("candidate ranks r (positive integers)", default=(4, 8, 16, 32, 64))
    alpha: Union[float, str] = _doc(
        "lora_alpha: a number (fixed: scale alpha/r) | 'r' (scale 1) | '2r' (scale 2) | 'rslora' (alpha 16, scale 16/sqrt(r))",
        default=16.0,
    )
    dropout: Union[float, tuple[float, ...]] = _doc(
        "LoRA dropout, in [0, 1), or a list: each rank is trained at each (and each learning rate) and judged at its best arm",
        default=0.05)
    target_modules: Union[str, tuple] = _doc(
        "attention-qv | attention | mlp | experts (MoE) | all-linear (on MoE: + experts and router) | explicit "
        "list of names, matched as PEFT does (a name or a dotted suffix such as attn.c_proj) | a list of such "
        "choices, searched as a dimension ([attention, mlp, all-linear], [[q_proj, v_proj], all-linear]): the "
        "verdict is then the cheapest adequate (targets, rank) pair", default="attention", targets=True
    )


@dataclass(frozen=True)
class TrainConfig:
    """The per-trial training loop (steps are optimizer steps)."""

    learning_rate: Union[float, tuple[float, ...]] = _doc(
        "peak learning rate, or a list: each rank is trained at each and judged at its best one", default=(1.0e-4, 3.0e-4, 1.0e-3)
    )
    lr_schedule: Literal[LR_SCHEDULES] = _doc("constant | linear | cosine (decay to 0 at max_steps, after warmup)", default="cosine")
    warmup_steps: int = _doc("linear warm-up, in steps", default=0)
    weight_decay: float = _doc("AdamW weight decay on the adapter", default=0.0)
    max_grad_norm: Optional[float] = _doc("gradient clipping norm; null = off", default=1.0)
    batch_size: int = _doc("examples per micro-batch", default=8, limit=65536)
    eval_batch_size: Optional[int] = _doc("examples per eval batch (default: 2 x batch_size)", default=None, limit=65536)
    grad_accum: int = _doc("micro-batches per optimizer step", default=1, limit=65536)
    max_steps: int = _doc("optimizer steps per trial (the scheduler's max_t)", default=200)
    eval_every: int = _doc("steps between evaluations and checkpoints (trials also evaluate at the scheduler's rungs)", default=20)
    seeds: tuple[int, ...] = _doc("one trial per seed and rank; several seeds give error bars", default=(0,))
    gradient_checkpointing: bool = _doc("trade compute for activation memory", default=False)


@dataclass(frozen=True)
class SchedulerConfig:
    """Early stopping of poor ranks."""

    type: Literal[SCHEDULER_TYPES] = _doc(
        "sha (successive halving: all ranks compared at each rung) | asha (asynchronous halving) | none (full grid)",
        default="sha",
    )
    grace_period: Optional[int] = _doc(
        "steps every rank trains before any can be stopped; null = 25% of max_steps",
        default=None,
    )
    reduction_factor: float = _doc("keep the best 1/reduction_factor of the ranks at each rung (>= 2)", default=3)
    confirm: Literal[CONFIRM_MODES] = _doc(
        "sha only: tail (idle capacity in the search's tail trains the near-miss cheaper unit and the strongest costlier"
        " unit on to max_steps, stopping when the last kept arm ends) | full (a started confirmation runs to max_steps)"
        " | off (cut arms stop at once). See docs/confirmations.md",
        default=DEFAULT_CONFIRM,
    )


@dataclass(frozen=True)
class ResourcesConfig:
    """What one trial asks Ray for."""

    gpus_per_trial: Union[float, str] = _doc(
        "fraction like 0.25, 1, 0 for CPU, or auto (fit by a memory estimate; 0 without GPUs); a trial trains on one GPU, so more than 1 is warned about (the rest sit idle)",
        default="auto",
    )
    cpus_per_trial: int = _doc("CPU cores per trial (also torch threads on CPU)", default=1)
    max_concurrent: Optional[int] = _doc("cap on trials running at once; null = as many as fit", default=None)
    arms_per_worker: Union[int, str] = _doc(
        "arms trained together on one shared 4-bit base (a pack per GPU, per core on CPU): auto (on a GPU sized by the"
        " memory estimate; on CPU one arm per worker, measured faster there) or a number; 1 = one arm per worker"
        " process, each with its own base",
        default="auto",
    )
    max_failures: int = _doc("retries of a failed trial, each from its last checkpoint", default=1, limit=100)


@dataclass(frozen=True)
class BudgetConfig:
    """A cap on the whole search, checked before any training: a short probe times optimizer steps
    on this machine and the halving arithmetic turns them into the search's cost."""

    gpu_hours: Optional[float] = _doc("GPU-hours the whole search may use (trial time x GPUs per trial); null = no cap", default=None)
    cpu_hours: Optional[float] = _doc("on CPU: CPU-hours the whole search may use (trial time x CPUs per trial); null = no cap", default=None)
    wall_minutes: Optional[float] = _doc("minutes of wall clock the whole search may take; null = no cap", default=None)
    fit: Literal[BUDGET_FITS] = _doc(
        "over the budget: refuse (exit 2 with the estimate, before training) | shrink (lower train.max_steps until it "
        "fits, never putting the first rung below the validated 30 steps, and say so)", default="refuse"
    )
    probe_steps: int = _doc("optimizer steps the probe times (after one untimed warm-up step)", default=3)




@dataclass(frozen=True)
class EvalConfig:
    """A downstream metric as the verdict's quantity (the eval loss stays beside it)."""

    metric: Optional[str] = _doc(
        "exact_match | contains (on greedy generations of the eval prompts) | module:function (called with the "
        "generations and the references, returning a number); null = the verdict uses the eval loss. Needs eval "
        "examples with a prompt before the answer (not data.format text)", default=None
    )
    metric_mode: Literal[METRIC_MODES] = _doc("max (higher is better) | min", default="max")
    max_new_tokens: int = _doc("tokens generated per eval prompt for the metric", default=32)


@dataclass(frozen=True)
class MlflowConfig:
    """MLflow: one run per trial, nested under one run for the search (which gets the verdict)."""

    tracking_uri: Optional[str] = _doc("a local folder, an sqlite:///FILE.db, or an http(s):// server; null = off", default=None)
    experiment_name: Optional[str] = _doc("the MLflow experiment; null = the search's name", default=None)


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases: one run per trial in a group named for the search, plus a verdict run."""

    project: Optional[str] = _doc("the W&B project; null = off", default=None)
    entity: Optional[str] = _doc("the W&B entity (user or team); null = your default", default=None)
    mode: Literal[WANDB_MODES] = _doc("online | offline (files only; `wandb sync` uploads them) | disabled", default="online")
    dir: Optional[str] = _doc("where W&B writes its run folders; null = the experiment folder", default=None)


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment trackers, through Ray Tune's logger callbacks (optional: pip install 'lora-rank-search[tracking]')."""

    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass(frozen=True)
class SearchConfig:
    """A whole rank search."""

    name: str = _doc("experiment name: the folder under storage_path", default="rank-search", path=True)
    storage_path: str = _doc("local folder, shared filesystem, or s3:// / gs:// URI", default="./runs", path=True)
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (lists, not tuples), round-trips through `parse_config`."""
        return _plain(dataclasses.asdict(self))

    @property
    def experiment_path(self) -> str:
        """`storage_path/name`: the experiment directory (a path or a URI)."""
        return self.storage_path.rstrip("/") + "/" + self.name


@dataclass(frozen=True)
class TrialSettings:
    """Everything a trial needs besides its arm (r, lr, seed): the typed config sections themselves
    (frozen dataclasses pickle to Ray workers as they are) plus what the driver worked out.

    Attributes:
        model_path: where the driver resolved the model (a per-machine cache folder for builtin and
            GGUF models); a trial on another node resolves `model` again on its own machine.
        targets: the LoRA target list resolved against the model (PEFT's target names); with
            several target choices, the first choice's.
        choices: (label, resolved targets) per target choice when the search has several (a
            trial's config names its choice: `targets_for`); () with one.
        rungs: optimizer steps where the scheduler compares arms: trials evaluate there too.
        storage_marker: {'path', 'token', 'storage_path'} of the marker the driver wrote into the
            experiment folder; every trial checks its node sees it (None outside a search).
    """

    model_path: str
    model: ModelConfig
    quantization: QuantizationConfig
    lora: LoraConfig
    train: TrainConfig
    targets: tuple
    cpus_per_trial: int = 1
    rungs: tuple = ()
    storage_marker: Optional[dict] = None
    choices: tuple = ()
    eval: Optional[EvalConfig] = None  # eval.metric: the downstream metric a trial evaluates (issue 22)

    def for_arm(self, config: Any) -> "TrialSettings":
        """These settings with the arm's nuisance values in their config fields (`contract.arms`:
        a nuisance searched over a field such as lora.dropout): the arm's value where its config
        names one, else the field's first value when it holds a list (a bare run without an arm)."""
        from lora_rank_search.contract.arms import DIMENSIONS, NUISANCE

        out = self
        for f in DIMENSIONS:
            section_name, key = (f.metadata["source"] or ".").split(".")
            section = getattr(out, section_name, None)
            if f.metadata["role"] != NUISANCE or not dataclasses.is_dataclass(section):
                continue
            value = config.get(f.name) if hasattr(config, "get") else None
            if value is None:
                value = getattr(section, key)
                if not isinstance(value, (list, tuple)):
                    continue
                value = value[0]
            out = dataclasses.replace(out, **{section_name: dataclasses.replace(section, **{key: value})})
        return out

    def targets_for(self, config: Any) -> tuple:
        """The resolved targets of a trial's target choice (its config's `target_choice`)."""
        from lora_rank_search.contract.arms import family_of

        label = family_of(config)
        if not label or not self.choices:
            return self.targets
        for name, targets in self.choices:
            if name == label:
                return tuple(targets)
        raise KeyError(f"target choice {label!r} is not one of this search's: {', '.join(n for n, _ in self.choices)}")


def target_choices(cfg: SearchConfig) -> list[tuple[str, Union[str, tuple]]]:
    """lora.target_modules as (label, spec) pairs, in the order given: one pair for a preset or a
    flat list of module names (one explicit choice); one per element for a list of choices (a list
    holding a preset name or a nested list). Labels: the preset, or the names joined by '+'."""
    from lora_rank_search.contract.arms import choice_label

    spec = cfg.lora.target_modules
    if isinstance(spec, str):
        return [(spec, spec)]
    if not _is_choice_list(spec):
        return [(choice_label(spec), tuple(spec))]
    return [(choice_label(c), c if isinstance(c, str) else tuple(c)) for c in spec]


def _is_choice_list(spec: Any) -> bool:
    """A list of choices (not one explicit list): it holds a nested list or a preset name."""
    return isinstance(spec, (list, tuple)) and any(isinstance(c, (list, tuple)) or c in TARGET_PRESETS for c in spec)


def learning_rates(cfg: SearchConfig) -> list[float]:
    """train.learning_rate as a list (one value or several), in the order given."""
    lr = cfg.train.learning_rate
    return [float(v) for v in lr] if isinstance(lr, (tuple, list)) else [float(lr)]


def schema_fields(cls: type = None, prefix: str = ""):
    """(dotted key, field, resolved type) of every leaf field of the schema (`SearchConfig` by
    default): the rules each field carries (`_doc`) are read from here."""
    import typing

    cls = cls or SearchConfig
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from schema_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, hints[f.name]


def arm_values(cfg: SearchConfig) -> dict[str, list]:
    """Every arm dimension's searched values (`contract.arms`), in the order given: the target
    choices' labels, the ranks, the learning rates, the seeds, and each further dimension's list."""
    from lora_rank_search.contract.arms import CHOICE_KEY, DIMENSIONS

    out = {}
    for f in DIMENSIONS:
        if f.name == CHOICE_KEY:
            out[f.name] = [label for label, _ in target_choices(cfg)]
            continue
        section, key = f.metadata["source"].split(".")
        value = getattr(getattr(cfg, section), key)
        out[f.name] = list(value) if isinstance(value, (list, tuple)) else [value]
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
