"""Run a search: check everything that can be checked before Ray starts, then build and fit the Tuner.

Order matters: config → model (architecture only) → targets → data → storage are checked first,
every problem collected into one ConfigError; only then does Ray start and a GPU get touched.

Over 400 lines on purpose: every stage of a run (checks, resources, budget, packing plan, the
experiment folder, the Tuner) is here in the order `run_search` calls them, so the one rule above
(nothing expensive before every check) can be read off one file. A stage with more to it than
wiring lives in its own module (`budget`, `resources`, `fingerprints`, `storage`, `space`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import yaml

from lora_rank_search.search import ray_usage, storage
from lora_rank_search.contract.arms import format_lr
from lora_rank_search.contract import layout
from lora_rank_search.search.address import address_problem
from lora_rank_search.search.fingerprints import FINGERPRINTS, check_fingerprints, fingerprints, flatten, missing_config, recovery
from lora_rank_search.search.config import ConfigError, SearchConfig, learning_rates, target_choices, warn
from lora_rank_search.search.isolation import environ, isolated_ray_start
from lora_rank_search.search.resources import MemoryEstimate, cluster_gpu_memory, estimate_trial_memory, gpu_fraction_for, local_gpu_memory
from lora_rank_search.search.space import METRIC, MODE, make_scheduler, num_trials, param_space, rung_steps, trial_settings

@dataclass
class Prepared:
    """What the driver worked out before starting Ray."""

    cfg: SearchConfig
    model_path: str = ""
    targets: list = field(default_factory=list)  # the (first) target choice's resolved targets
    choices: dict = field(default_factory=dict)  # target choice label -> its resolved targets, in config order
    linear_shapes: dict = field(default_factory=dict)
    dims: dict = field(default_factory=dict)
    data: Any = None
    data_stats: dict = field(default_factory=dict)


def _model_dims(meta, shapes: dict) -> dict:
    config = meta.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    total = sum(p.numel() for p in meta.parameters())
    linear = sum(i * o for i, o in shapes.values())
    return {
        "hidden": int(getattr(text, "hidden_size", 0) or 0),
        "layers": int(getattr(text, "num_hidden_layers", 0) or 0),
        "vocab": int(getattr(text, "vocab_size", 0) or 0),
        "total_params": int(total),
        "other_params": int(total - linear),
        "model_type": getattr(config, "model_type", ""),
    }


def _check_storage(path: str) -> Optional[str]:
    """Can the storage folder be created and written? Checked without creating anything: a run
    refused later must leave nothing behind (the folder appears when the search starts)."""
    if storage.is_uri(path):
        return None  # remote storage is checked by Ray/pyarrow when the experiment starts
    return storage.writable_problem(path)


def local_resource_problems(cfg: SearchConfig) -> list[str]:
    """What a private local Ray could never give one trial (it would wait forever): more CPUs than
    this machine has, or GPUs that torch cannot see. Checked before Ray starts."""
    import torch

    problems = []
    cpus = _local_cpus()
    if cfg.resources.cpus_per_trial > cpus:
        problems.append(
            f"resources.cpus_per_trial: {cfg.resources.cpus_per_trial} CPUs asked for per trial, but this machine has {cpus}"
        )
    gpus = cfg.resources.gpus_per_trial
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus != "auto" and gpus > have:
        found = f"only {have} GPU(s)" if have else "no GPU that torch can use"
        problems.append(
            f"resources.gpus_per_trial: {gpus:g} GPU(s) asked for per trial, but this machine has {found}"
            " (use 0 or auto here, or --address to run on a Ray cluster with GPUs)"
        )
    return problems


def _local_cpus() -> int:
    """CPUs a local Ray sees (it honours cgroup quotas); falls back to the CPU affinity."""
    try:
        from ray._private.utils import get_num_cpus

        return int(get_num_cpus())
    except (ImportError, AttributeError):  # pragma: no cover - private API moved
        return len(os.sched_getaffinity(0))


SMALL_EVAL = 20  # eval examples below which the verdict is warned to rest on a handful


def small_eval_warning(data, d) -> Optional[str]:
    """`<field>: ...` when the eval set is so small that differences between ranks are mostly noise."""
    n = len(data.eval_ids)
    if n >= SMALL_EVAL:
        return None
    field = ("data.max_eval_examples" if d.max_eval_examples and d.max_eval_examples < SMALL_EVAL else
             "data.eval_source" if d.eval_source else "data.eval_split" if d.eval_split else "data.eval_fraction")
    return (f"{field}: the eval set has {n} example{'s' if n != 1 else ''} ({data.eval_tokens} tokens with loss): every rank is judged "
            f"on {'it' if n == 1 else 'them'}, and differences this small a sample shows are mostly noise; hold out at least {SMALL_EVAL}")


def prepare(cfg: SearchConfig, log: Callable[[str], None] = print, local_ray: bool = False) -> Prepared:
    """Resolve the model, the LoRA targets and the data; raise one ConfigError listing every problem.

    With local_ray (the search will start its own Ray on this machine) the resources per trial are
    checked against this machine too.
    """
    from lora_rank_search.trainables.data import DataError, load_data, tokenize_splits
    from lora_rank_search.trainables.data import overlap_warning
    from lora_rank_search.trainables.lora import TargetError, dropout_problems, linear_layers, rank_problems, resolve_targets
    from lora_rank_search.trainables.model import ModelSourceError, check_weights, load_tokenizer, meta_model, resolve_model

    problems: list[str] = local_resource_problems(cfg) if local_ray else []
    warnings: list[str] = []
    out = Prepared(cfg)
    d = cfg.data
    tokenizer = None
    try:
        out.model_path = resolve_model(cfg.model.name_or_path, cfg.model.gguf_file)
        meta = meta_model(out.model_path, cfg.model.trust_remote_code)
        check_weights(out.model_path)
        out.linear_shapes = linear_layers(meta)
        out.dims = _model_dims(meta, out.linear_shapes)
        note = base_dropout_note(meta.config)
        if note:
            log(note)
        choices = target_choices(cfg)
        for i, (label, spec) in enumerate(choices):
            where = "lora.target_modules" + (f"[{i}]" if len(choices) > 1 else "")
            try:
                out.choices[label] = resolve_targets(spec, out.linear_shapes)
                problems.extend(dropout_problems(out.choices[label], cfg.lora.dropout))  # PEFT: no dropout on expert weights
            except TargetError as exc:
                problems.append(f"{where}: {exc}")
                continue
            refused, warned = rank_problems(cfg.lora.ranks, out.linear_shapes, out.choices[label])
            tag = f" (target choice {label})" if len(choices) > 1 else ""
            problems.extend(p + tag for p in refused if p + tag not in problems)
            warnings.extend(w + tag for w in warned)
        if len(out.choices) == len(choices):
            out.choices, merged = merge_same_choices(out.choices)
            if merged:
                warnings.extend(merged)
                out.cfg = _keep_choices(cfg, choices, out.choices)
        out.targets = next(iter(out.choices.values()), [])
        tokenizer = load_tokenizer(out.model_path, cfg.model.trust_remote_code)
    except ModelSourceError as exc:
        problems.append(str(exc) if str(exc).startswith("model.") else f"model.name_or_path: {exc}")
    except OSError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        problems.append(f"model.name_or_path: cannot load {cfg.model.name_or_path!r} as a local folder or hub model ({first})")
    try:
        train_records, eval_records, d, notes = load_data(d)
        for note in notes:  # the detected shape is news; a converted value is a warning
            (log if note.startswith("data.format: auto") else warnings.append)(note)
        warnings.extend(filter(None, [overlap_warning(train_records, eval_records, d)]))
        if tokenizer is not None:
            out.data = tokenize_splits(train_records, eval_records, tokenizer, d)
            warnings.extend(filter(None, [out.data.truncation_warning(d.max_seq_len), small_eval_warning(out.data, d)]))
            if cfg.eval.metric and out.data.cut_eval:
                warnings.append(
                    f"eval.metric: {out.data.cut_eval} of {len(out.data.eval_ids)} eval examples have their answer cut at "
                    f"data.max_seq_len={d.max_seq_len}: {cfg.eval.metric} compares each generation with the cut answer "
                    "(an exact match cannot succeed there); raise data.max_seq_len")
    except DataError as exc:
        problems.append(str(exc))
    from lora_rank_search.search import tracking

    problems.extend(tracking.problems(cfg))
    if cfg.eval.metric:
        from lora_rank_search.trainables.downstream import metric_problem

        problem = metric_problem(cfg.eval.metric)
        if not problem and out.data is not None:
            from lora_rank_search.trainables.downstream import prompts_check

            problem, note = prompts_check(out.data.eval_ids, out.data.eval_labels, d.format)
            warnings.extend(filter(None, [note]))
        if problem:
            problems.append(f"eval.metric: {problem}")
    storage_problem = _check_storage(cfg.storage_path)
    if storage_problem:
        problems.append(storage_problem)
    if problems:
        raise ConfigError(problems, "input")
    for line in warnings:
        warn(line)
    from lora_rank_search.trainables.data import describe

    out.data_stats = {"format": d.format, **describe(out.data)}
    n_train, batch = out.data_stats.get("train_examples", 0), cfg.train.batch_size
    if n_train and batch > n_train:
        warn(f"train.batch_size: {batch} is more than the {n_train} training examples: every micro-batch repeats "
             f"examples ({batch / n_train:.1f} passes over the training data each)")
    return out


def merge_same_choices(choices: dict) -> tuple[dict, list[str]]:
    """Target choices (label -> resolved targets) without the ones that resolve to the same layers as
    an earlier choice (they would train the same adapters twice), and one warning per choice left out."""
    kept: dict = {}
    first: dict = {}
    notes = []
    for label, targets in choices.items():
        key = tuple(sorted(targets))
        if key in first:
            notes.append(f"lora.target_modules: target choice {label!r} selects the same layers as {first[key]!r} "
                         f"({', '.join(key)}); merged into it, so they are trained once")
            continue
        first[key] = label
        kept[label] = targets
    return kept, notes


def _keep_choices(cfg: SearchConfig, choices: list, kept: dict) -> SearchConfig:
    """The config with lora.target_modules reduced to the choices in `kept` (the search it runs)."""
    specs = [spec for label, spec in choices if label in kept]
    target_modules = specs[0] if len(specs) == 1 else tuple(specs)
    return dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, target_modules=target_modules))


def memory_estimate(cfg: SearchConfig, prepared: Prepared) -> MemoryEstimate:
    """One trial's GPU memory as `gpus_per_trial: auto` plans it, at the largest rank (bytes, by part)."""
    from lora_rank_search.trainables.lora import lora_param_count

    dims = prepared.dims
    return estimate_trial_memory(
        prepared.linear_shapes,
        dims["other_params"],
        max(lora_param_count(prepared.linear_shapes, t, max(cfg.lora.ranks)) for t in (prepared.choices or {"": prepared.targets}).values()),
        hidden=dims["hidden"],
        layers=dims["layers"],
        vocab=dims["vocab"],
        batch_size=cfg.train.batch_size,
        seq_len=cfg.data.max_seq_len,
        load_in_4bit=cfg.quantization.load_in_4bit,
        double_quant=cfg.quantization.double_quant,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
    )


def resolve_resources(
    cfg: SearchConfig, prepared: Prepared, log: Callable[[str], None] = print, joined: bool = False
) -> dict:
    """Ray resources per trial: {'cpu': n, 'gpu': fraction}; `auto` fits the memory estimate.

    joined: the search runs on a cluster it did not start (`--address`, `ray job submit`), whose
    autoscaler may add GPU nodes that do not exist yet (min_workers: 0).
    """
    import ray

    gpus = cfg.resources.gpus_per_trial
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    if gpus == "auto":
        total = local_gpu_memory() or cluster_gpu_memory()
        if not total:
            gpus = 0.0
            log("resources: no GPU found; trials run on CPU")
        else:
            estimate = memory_estimate(cfg, prepared)
            gpus = gpu_fraction_for(estimate.total, total)
            log(f"resources: auto: ~{estimate.total / 2**30:.1f} GiB per trial on a {total / 2**30:.0f} GiB GPU -> {gpus:g} GPU per trial")
    elif gpus > 0 and cluster_gpus <= 0:
        if not (joined or _autoscaling()):
            raise ConfigError(
                [f"resources.gpus_per_trial: {gpus:g} GPUs asked for, but this Ray cluster has no GPUs (use 0 or auto)"], "input"
            )
        log("resources: no GPU node in the cluster yet; trials wait for the autoscaler to add GPU nodes")
    return {"cpu": cfg.resources.cpus_per_trial, "gpu": float(gpus)}


def _autoscaling() -> bool:
    """True on a Ray cluster whose autoscaler may add GPU nodes later."""
    return bool(os.environ.get("RAY_ADDRESS")) or os.environ.get("LORA_RANK_SEARCH_AUTOSCALING") == "1"


def trial_name(trial) -> str:
    return layout.trial_name(trial.config)


def trial_dirname(trial) -> str:
    return layout.trial_dirname(trial.config, trial.trial_id)


def has_budget(cfg: SearchConfig) -> bool:
    b = cfg.budget
    return any(v is not None for v in (b.gpu_hours, b.cpu_hours, b.wall_minutes))


def _fit_budget(cfg: SearchConfig, prepared: Prepared, resources: dict, started_at: float, log) -> tuple:
    """Probe this machine, estimate the search, refuse or shrink it (search.budget.fit); returns
    (the config to run, the budget record for search_meta.json)."""
    import ray

    from lora_rank_search.search import budget
    from lora_rank_search.trainables.probe import probe

    choices = prepared.choices or {"": prepared.targets}
    from lora_rank_search.trainables.lora import lora_param_count

    r = max(cfg.lora.ranks)
    targets = max(choices.values(), key=lambda t: lora_param_count(prepared.linear_shapes, t, r))
    settings = trial_settings(cfg, prepared.model_path, list(targets))
    measured = probe(settings, prepared.data, r, cfg.budget.probe_steps)
    slots = budget.slots_for(resources, ray.cluster_resources(), cfg.resources.max_concurrent)
    configured = cfg.train.max_steps
    cfg, est = budget.fit(cfg, measured, resources, slots, time.time() - started_at, log)
    return cfg, {
        "limits": dataclasses.asdict(cfg.budget),
        "probe": dataclasses.asdict(measured),
        "estimate": {**dataclasses.asdict(est), "wall_minutes": est.wall_minutes},
        "configured_max_steps": configured,
        "max_steps": cfg.train.max_steps,
        "started_at": started_at,
    }


def _shrunk_as_saved(cfg: SearchConfig) -> SearchConfig:
    """On --resume with budget.fit: shrink, the max_steps the search was shrunk to (its saved config)."""
    from lora_rank_search.search.budget import with_max_steps

    saved_path = storage.join(cfg.experiment_path, layout.CONFIG_FILE)
    if not storage.exists(saved_path):
        return cfg
    saved = (yaml.safe_load(storage.read_text(saved_path)) or {}).get("train", {}).get("max_steps")
    return with_max_steps(cfg, int(saved)) if isinstance(saved, int) and saved < cfg.train.max_steps else cfg


def _record_spent(cfg: SearchConfig, grid, resources: dict, started_at: float) -> None:
    """What the search spent (wall seconds since the command started, trial-seconds and the resource
    hours they mean), beside its budget in search_meta.json; the report ends with it."""
    trial_seconds = 0.0
    for result in grid:
        metrics = getattr(result, "metrics", None) or {}
        trial_seconds += float(metrics.get("time_total_s", 0.0) or 0.0)
    gpu, cpu = float(resources.get("gpu", 0) or 0), float(resources.get("cpu", 1) or 1)
    exp = cfg.experiment_path
    meta = layout.read_meta(exp)
    record = meta.get("budget") or {"limits": dataclasses.asdict(cfg.budget)}
    record["spent"] = {
        "wall_seconds": time.time() - float(record.get("started_at", started_at)),
        "trial_seconds": trial_seconds,
        "gpu_hours": trial_seconds * gpu / 3600.0,
        "cpu_hours": 0.0 if gpu > 0 else trial_seconds * cpu / 3600.0,
    }
    meta["budget"] = record
    layout.write_meta(exp, meta)


def _resumed_trackers(cfg: SearchConfig, log) -> tuple[list, dict]:
    """On --resume, the trackers of the first start as search_meta.json records them (a second
    MLflow parent run would split the search): its parent run and W&B group, each resumed trial
    logging on to its own run, the verdict logged as after a first start."""
    from lora_rank_search.search import tracking

    record = layout.read_meta(cfg.experiment_path).get("tracking") or {}
    return (tracking.resumed_callbacks(cfg, record, log) if record else []), record


def _write_meta(cfg: SearchConfig, prepared: Prepared, resources: dict, budget: Optional[dict] = None,
                tracked: Optional[dict] = None, plan=None) -> None:
    """search_meta.json. resources: what each trial asks Ray for (with a `PackPlan`, its share of its pack)."""
    from importlib.metadata import version

    import ray
    import torch

    exp = cfg.experiment_path
    layout.write_config(exp, cfg.to_dict())
    meta = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model_path": prepared.model_path,
        "targets": prepared.targets,
        "target_choices": prepared.choices,
        "model": prepared.dims,
        "data": prepared.data_stats,
        "resources_per_trial": resources,
        "packing": {"arms_per_worker": plan.arms, "threads": plan.threads, "packs_per_node": plan.packs_per_node,
                    **({"packs_per_gpu": plan.packs_per_gpu} if plan.packs_per_gpu > 1 else {})}
        if plan else {"arms_per_worker": 1},
        "num_trials": num_trials(prepared.cfg),
        "config": cfg.to_dict(),  # what lora_rank_search.yaml holds: rebuilds it if it goes missing
        FINGERPRINTS: fingerprints(cfg.to_dict(), prepared.model_path),
        **({"budget": budget} if budget else {}),
        **({"tracking": tracked} if tracked else {}),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "transformers": version("transformers"),  # importing peft here cost 2 s of every search's start
            "peft": version("peft"),
        },
    }
    layout.write_meta(exp, meta)


def is_resumable(experiment: str) -> bool:
    """Tune's tuner.pkl and at least one experiment_state snapshot are in the experiment folder."""
    return layout.is_resumable(storage.listdir(experiment))


def check_experiment_dir(cfg: SearchConfig, resume: bool) -> None:
    """Refuse to merge into an existing experiment without --resume, and to resume nothing.

    Resumable means Tune's tuner.pkl and at least one experiment_state snapshot exist; a folder
    with less (a run that died in its first seconds) can be neither resumed nor reused.
    """
    exp = cfg.experiment_path
    try:
        names = storage.listdir(exp)
    except (ValueError, OSError) as exc:  # pyarrow: an unknown URI scheme, a bucket it cannot reach
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError([f"storage_path: cannot open {cfg.storage_path!r} ({first}); use a local folder, s3://, gs:// "
                           "or another filesystem pyarrow knows"], "input") from None
    resumable = layout.is_resumable(names)
    if not resume and resumable:
        raise ConfigError(
            [f"name: experiment {exp!r} already exists; add --resume to continue it, or choose another name (--set name=...)"],
            "input",
        )
    if not resume and names:
        raise ConfigError(
            [f"name: folder {exp!r} already exists but holds no resumable search (a run that stopped before its"
             " first snapshot?); delete it or choose another name (--set name=...)"],
            "input",
        )
    if resume and not resumable:
        why = "the run stopped before its first snapshot; delete the folder and" if names else "no experiment there;"
        raise ConfigError([f"name: nothing to resume at {exp!r} ({why} start without --resume)"], "input")
    if resume:
        saved_path = storage.join(exp, layout.CONFIG_FILE)
        if not storage.exists(saved_path):
            raise ConfigError([missing_config(exp, saved_path)], "input")
        try:
            saved = yaml.safe_load(storage.read_text(saved_path))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{saved_path}: the experiment's stored config does not parse ({type(exc).__name__}); "
                               + recovery(exp, saved_path)], "input") from None
        if not isinstance(saved, dict) or not saved:
            raise ConfigError([f"{saved_path}: the experiment's stored config is empty or not a mapping; "
                               + recovery(exp, saved_path)], "input")
        now, before = flatten(cfg.to_dict()), flatten(saved or {})
        changed = [k for k in sorted(set(now) | set(before)) if not k.startswith("resources.") and now.get(k) != before.get(k)]
        if changed:
            raise ConfigError(
                [f"{k}: {now.get(k)!r} differs from {before.get(k)!r} in the experiment being resumed ({exp})" for k in changed],
                "input",
            )


def describe_choices(prepared: Prepared) -> list[str]:
    """One line per target choice: its label, resolved targets and trainable parameters at each rank
    (the costs the verdict compares: `lora_param_count`, as `lora-rank params` prints them)."""
    from lora_rank_search.trainables.lora import lora_param_count

    ranks = sorted(prepared.cfg.lora.ranks)
    lines = []
    for label, targets in prepared.choices.items():
        costs = ", ".join(f"r={r}: {lora_param_count(prepared.linear_shapes, targets, r):,}" for r in ranks)
        lines.append(f"  {label}: {', '.join(targets)} (trainable params {costs})")
    return lines


# On CPU, `auto` does not pack: on the 2-core machine packed searches measured slower than one arm
# per worker (the start-up line says what bench/packing.py measured, 2026-12-06, bench/RESULTS.md).
# A number in arms_per_worker packs; a model from this hidden size up is compute-bound on CPU and
# its arms take turns on the base instead of stacking.
SMALL_HIDDEN = 256
CPU_PACKING_WALL = "1.08-1.34x the wall time on a planted tiny-model task, 1.14-1.41x on the quickstart"
CPU_PACKING_MEMORY = "0.48-0.53x and 0.24-0.27x the memory per arm"


def base_dropout_note(config) -> str:
    """The start-up line for a base model whose config trains with dropout of its own ('' without):
    every trial turns it off (`trainables.trial.base_dropout_off`)."""
    fields = {k: v for k, v in sorted(config.to_dict().items())
              if isinstance(v, float) and v > 0 and k.endswith(("dropout", "pdrop", "layerdrop"))
              and not k.startswith(("summary", "classifier"))}  # a causal LM's own layers only
    if not fields:
        return ""
    listed = ", ".join(f"{k} {v:g}" for k, v in fields.items())
    return (f"model: the base model's own dropout ({listed}) is off in every trial; the adapter's (lora.dropout) is the "
            "only one, so arms differ only by what the search varies and packed arms train exactly as alone")


def plan_packs(cfg: SearchConfig, prepared: Prepared, resources: dict, log: Callable[[str], None] = print):
    """How many arms share one base (`resources.arms_per_worker`), and what each trial then asks Ray for.

    Returns (PackPlan or None for one arm per worker, the per-trial resources). A pack holds one GPU
    (the GPU fraction set in gpus_per_trial, when one is set), or on CPU the CPUs of a node; each of
    its N client trials holds 1/N of that, so Ray places N trials on it.
    """
    import uuid

    import ray

    from lora_rank_search.search.resources import MAX_ARMS_PER_PACK, arms_that_fit, local_gpu_memory, cluster_gpu_memory, pack_memory
    from lora_rank_search.trainables.lora import split_targets
    from lora_rank_search.trainables.pack_server import PackPlan

    wanted = cfg.resources.arms_per_worker
    trials = num_trials(cfg)
    experts = [label for label, targets in (prepared.choices or {"": prepared.targets}).items() if split_targets(targets)[1]]
    if wanted == 1 or trials == 1:
        return None, resources
    if experts and wanted == "auto":
        log("packing: off (MoE expert weights are adapted as parameters, which one pass cannot split between arms);"
            " one arm per worker")
        return None, resources
    param_sets = {tuple(sorted(split_targets(t)[1])) for t in (prepared.choices or {"": prepared.targets}).values()} - {()}
    if len(param_sets) > 1:
        log(f"warning: resources.arms_per_worker: {wanted}: the target choices adapt different MoE expert / router "
            f"weights ({'; '.join(', '.join(p) for p in sorted(param_sets))}), which PEFT cannot hold as adapters of one "
            "model; one arm per worker")
        return None, resources
    gpu = resources["gpu"] > 0
    rows_per_pass, how, per_gpu = None, "arms stacked in one pass", 1
    if gpu:
        pack_gpu = 1.0 if cfg.resources.gpus_per_trial == "auto" else max(float(cfg.resources.gpus_per_trial), resources["gpu"])
        estimate = memory_estimate(cfg, prepared)
        total = local_gpu_memory() or cluster_gpu_memory() or 0
        fit = arms_that_fit(estimate, int(total * pack_gpu), MAX_ARMS_PER_PACK) if total else MAX_ARMS_PER_PACK
        arms = min(trials, fit if wanted == "auto" else int(wanted))
        room = arms_that_fit(estimate, int(total * pack_gpu), arms) if total else arms
        if wanted != "auto" and room < arms:
            log(f"warning: resources.arms_per_worker: {arms} arms per pack, but the memory estimate fits {room} beside the "
                f"base in {pack_gpu:g} of a {total / 2**30:.0f} GiB GPU (~{pack_memory(estimate, arms) / 2**30:.1f} GiB "
                f"needed); passes that run out of memory are split, and an arm that still does not fit ends as oom "
                f"(arms_per_worker: auto packs what fits)")
        threads = cfg.resources.cpus_per_trial
        note = f", ~{pack_memory(estimate, arms) / 2**30:.1f} GiB estimated per pack (the base once + {arms} adapters)"
        per_trial = {"cpu": threads / arms, "gpu": pack_gpu / arms}
        per_gpu = max(1, int(1 / pack_gpu + 1e-9)) if pack_gpu < 1 else 1
        if per_gpu > 1:
            note += f", {per_gpu} packs per GPU"
    else:
        if wanted == "auto":
            log("packing: off on CPU: packed searches measured slower than one arm per worker on 2 cores"
                f" (bench/packing.py: {CPU_PACKING_WALL}), though they held {CPU_PACKING_MEMORY}; one arm per worker"
                " (resources.arms_per_worker: N packs anyway)")
            return None, resources
        large = prepared.dims.get("hidden", 0) >= SMALL_HIDDEN
        nodes = [n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
        cpus = max(cfg.resources.cpus_per_trial, int(min(nodes)) if nodes else 1)
        # One pack per cpus_per_trial cores: a pack's step is one stream of ops, which several threads
        # share poorly (measured: one 2-thread pack of 15 arms was 1.06x the wall of one arm per worker).
        # As many arms per pack as asked, in as few packs as that needs.
        per_node = max(1, cpus // cfg.resources.cpus_per_trial)
        arms = min(trials, int(wanted))
        per_node = max(1, min(per_node, math.ceil(trials / arms)))
        threads = max(1, cpus // per_node)
        note = f", {per_node} packs per node" if per_node > 1 else ""
        if large:
            # A larger model's step is compute-bound on CPU: a stacked pass costs as much per row as the
            # arms' passes one by one, plus the padding to the longest row of every arm (measured 1.3-2x
            # per arm-step at 4 arms of SmolLM2-135M). The arms take turns; the pack still saves each
            # arm's process, imports, 4-bit load and copy of the base.
            rows_per_pass, how = cfg.train.batch_size, "arms take turns on it, one pass each"
        per_trial = {"cpu": threads / arms, "gpu": 0.0}
    if arms <= 1:
        log("packing: one arm per worker (no room for a second adapter beside the base)")
        return None, resources
    packs = math.ceil(trials / arms)
    where = f"{pack_gpu:g} GPU" if gpu else f"{threads} CPU thread{'s' if threads > 1 else ''}"
    if experts:
        how = "arms take turns on it (MoE expert weights are adapted as parameters)"
    log(f"packing: {arms} arms per worker on one shared base, {packs} pack(s) of {where}{note}; {how}")
    return PackPlan(arms=arms, threads=threads, experiment=uuid.uuid4().hex[:8], rows_per_pass=rows_per_pass,
                    packs_per_node=1 if gpu else per_node, packs_per_gpu=per_gpu), per_trial


def build_tuner(cfg: SearchConfig, prepared: Prepared, resources: dict, resume: bool, storage_marker: Optional[dict] = None,
                plan=None, callbacks: Optional[list] = None):
    """The Tuner (new or restored): one trial per arm, each in its own worker process or, with a
    `PackPlan`, a client of its node's pack server (`trainables.pack_server`).

    storage_marker: {'path', 'token', 'storage_path'} of the marker the driver wrote into the
    experiment folder (`storage.write_marker`); every trial checks its node sees it.
    """
    from ray import tune

    from lora_rank_search.search.logs import trial_logs
    from lora_rank_search.search.progress import ProgressPrinter
    from lora_rank_search.trainables.pack_server import packed_trial
    from lora_rank_search.trainables.trial import lora_trial

    settings = dataclasses.replace(trial_settings(cfg, prepared.model_path, prepared.choices or prepared.targets), storage_marker=storage_marker)
    if plan is None:
        parameters = {"settings": settings, "data": prepared.data}
    else:
        import ray

        from lora_rank_search.trainables.pack_server import StoredData

        # the clients pass the data on; only their servers deserialize it
        parameters = {"settings": settings, "data": StoredData(ray.put(prepared.data)), "plan": plan}
    trainable = tune.with_resources(tune.with_parameters(lora_trial, **parameters), resources)
    if resume:
        try:
            tuner = tune.Tuner.restore(cfg.experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        except ValueError as exc:
            if "expected 'packed_trial'" not in str(exc):
                raise
            # a packed search started when packing had a trainable of its own name: the same code under it
            trainable = tune.with_resources(tune.with_parameters(packed_trial, **parameters), resources)
            tuner = tune.Tuner.restore(cfg.experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        return _with_trackers(tuner, callbacks or [])
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            scheduler=make_scheduler(cfg),
            # successive halving caps running trials itself: Tune's cap makes a trial only when one
            # ends, and a rung would be decided before the later trials existed
            max_concurrent_trials=None if cfg.scheduler.type == "sha" else cfg.resources.max_concurrent,
            reuse_actors=True,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=cfg.name,
            storage_path=cfg.storage_path,
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=storage.CHECKPOINTS_KEPT, checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE
            ),
            failure_config=tune.FailureConfig(max_failures=cfg.resources.max_failures),
            callbacks=[ProgressPrinter(cfg.train.max_steps), *trial_logs(), *(callbacks or [])],
            verbose=0,
        ),
    )


def _with_trackers(tuner, trackers: list):
    """A restored Tuner with `trackers` in place of the tracker callbacks Tune saved at the first
    start (pickled with that start's code; Ray's MLflow and W&B callbacks also need the environment
    the first driver had set, and opened a second run for every resumed trial)."""
    from lora_rank_search.search.ray_usage import INTEGRATIONS

    local = getattr(tuner, "_local_tuner", None)  # Ray 2.60 internals; None through a Ray client (ray://)
    if local is None:
        return tuner
    run_config = local.get_run_config()
    kept = [c for c in run_config.callbacks or [] if type(c).__name__ not in INTEGRATIONS]
    run_config.callbacks = kept + list(trackers)
    return tuner


class _QuietTuneHints(logging.Filter):
    """Drop Tune's driver notes that the CLI says better: its `Tuner.restore(...)` resume hint
    (users resume with `lora-rank search CONFIG --resume`), and missing metrics of trials that
    had not reported yet when a search was interrupted."""

    PREFIXES = ("Experiment has been interrupted", "Failed to fetch metrics")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


def run_search(
    cfg: SearchConfig, *, resume: bool = False, address: Optional[str] = None, log: Callable[[str], None] = print
) -> str:
    """Run (or resume) the search; returns the experiment path. Raises ConfigError before Ray starts,
    also while another search runs in the same experiment (`search.lock`)."""
    from lora_rank_search.search import lock

    with lock.held(cfg):
        return _run_search(cfg, resume=resume, address=address, log=log)


def _run_search(cfg: SearchConfig, *, resume: bool, address: Optional[str], log: Callable[[str], None]) -> str:
    import ray

    from lora_rank_search.trainables.trial import quiet_libraries

    quiet_libraries()
    for name in ("ray.tune.tune", "ray.tune.analysis.experiment_analysis"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietTuneHints) for f in logger.filters):
            logger.addFilter(_QuietTuneHints())
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our ProgressPrinter replaces Tune's tables
    # A snapshot per checkpoint is what keeps every kept checkpoint resumable; don't warn about it.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ray_usage.install()  # Tune's callback usage tag without importing wandb (seconds per search)
    started_at = time.time()
    if resume and cfg.budget.fit == "shrink":
        cfg = _shrunk_as_saved(cfg)
    check_experiment_dir(cfg, resume)
    problem = address_problem(address)
    if problem:
        raise ConfigError([problem], "input")
    log(f"preparing: model {cfg.model.name_or_path}, data {cfg.data.source}")
    # Without --address: the cluster of a `ray job submit` (RAY_ADDRESS), else a private local
    # Ray, even if a `ray start` cluster runs on this machine (--address auto joins that one).
    started_here = not ray.is_initialized()
    local_ray = started_here and not address and not os.environ.get("RAY_ADDRESS")
    prepared = prepare(cfg, log, local_ray=local_ray)
    if resume:
        check_fingerprints(cfg, prepared.model_path)
    s = prepared.data_stats
    log(
        f"data: {s['train_examples']} train / {s['eval_examples']} eval examples ({s['eval_tokens']} eval tokens); "
        + (f"LoRA targets: {', '.join(prepared.targets)}" if len(prepared.choices) <= 1 else "target choices:")
    )
    if len(prepared.choices) > 1:
        for line in describe_choices(prepared):
            log(line)
    if started_here:
        address = address or (None if os.environ.get("RAY_ADDRESS") else "local")
        # Workers of a Ray started here inherit its environment: no INFO lines from them ("Restored
        # on ... from checkpoint": the progress lines say so).
        level = {"RAY_LOGGER_LEVEL": os.environ.get("RAY_LOGGER_LEVEL", "warning")} if local_ray else {}
        with environ(level), isolated_ray_start(local_ray):
            try:
                ray.init(address=address, include_dashboard=False, logging_level="WARNING", configure_logging=True)
            except ConnectionError as exc:  # --address auto with no cluster on this machine, a head that went away
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ConfigError([f"--address: cannot connect to the Ray cluster at {address!r} ({first})"], "input") from None
    try:
        joined = bool(address and address != "local") or bool(os.environ.get("RAY_ADDRESS"))
        resources = resolve_resources(cfg, prepared, log, joined=joined)
        # Trials write checkpoints on their own node: a local storage_path must be one shared filesystem.
        problem = storage.check_shared_with_nodes(cfg.storage_path)
        if problem:
            raise ConfigError([problem], "input")
        budget = None
        if has_budget(cfg) and not resume:
            cfg, budget = _fit_budget(cfg, prepared, resources, started_at, log)
            prepared.cfg = dataclasses.replace(prepared.cfg, train=cfg.train)  # the shrunk budget, the merged target choices
        elif has_budget(cfg):
            log("budget: resumed: the estimate and any shrinking were done when the search started")
        from lora_rank_search.search import tracking

        trackers, tracked = tracking.callbacks(cfg, log) if not resume else _resumed_trackers(cfg, log)
        # The budget above was fitted as one arm per worker at these resources, packed or not
        # (docs/users-data-metric-trackers-budget.md says what that leaves out for a pack).
        plan, resources = plan_packs(prepared.cfg, prepared, resources, log)
        if not resume:
            _write_meta(cfg, prepared, resources, budget, tracked, plan)
        marker = storage.write_marker(cfg.experiment_path)
        rungs = rung_steps(cfg)
        rates = ", ".join(format_lr(lr) for lr in learning_rates(cfg))
        choices = f"{len(prepared.choices)} target choices x " if len(prepared.choices) > 1 else ""
        log(f"search: {num_trials(prepared.cfg)} trials ({choices}ranks {list(cfg.lora.ranks)} x learning rates [{rates}] x seeds {list(cfg.train.seeds)}), "
            f"{resources['cpu']:g} CPU + {resources['gpu']:g} GPU each{' (a share of its pack)' if plan else ''}, scheduler {cfg.scheduler.type}"
            + (f" (ranks compared at steps {', '.join(map(str, rungs))} of {cfg.train.max_steps})" if rungs else ""))
        if resume:
            for line in storage.repair_stale_checkpoints(cfg.experiment_path):
                log(line)
        tuner = build_tuner(prepared.cfg, prepared, resources, resume, storage_marker=marker, plan=plan, callbacks=trackers)
        try:
            with tracking.environment(tracked):
                grid = tuner.fit()
        finally:
            if plan is not None:
                from lora_rank_search.trainables.pack_server import stop_servers

                stop_servers(plan.experiment)
        tracking.end_parent(tracked)
        if has_budget(cfg):
            _record_spent(cfg, grid, resources, started_at)
    finally:
        if started_here:
            ray.shutdown()
    return cfg.experiment_path
