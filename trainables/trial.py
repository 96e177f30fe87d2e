"""One trial: 4-bit base + LoRA of rank r → train → evaluate every `eval_every` steps → report.

`run_trial` reads top to bottom and knows nothing about Ray: it is handed a `report` callable
(metrics, checkpoint folder) and an optional checkpoint folder to resume from. `lora_trial` is the
Ray Tune function trainable that wires it to `tune.report` / `tune.get_checkpoint`, and a bare loop
(bench/overhead.py) can call `run_trial` directly.
Slightly over 400 lines: the recipe plus the process glue a trial needs (device, checkpoints to
restore from, the node check, quiet libraries); the training itself is `trainables.pack`.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from lora_rank_search.contract.layout import ADAPTER_DIR, ADAPTER_WEIGHTS, CHECKPOINT_PREFIX  # the experiment folder's names
from lora_rank_search.contract.config import TrialSettings
from lora_rank_search.contract.layout import TRAINER_STATE_FILE as STATE_FILE
from lora_rank_search.contract.metrics import checked_report
from lora_rank_search.trainables.data import TokenizedData, eval_batches
from lora_rank_search.trainables.failures import OK, OOM, out_of_memory_detail
from lora_rank_search.trainables.lora import peft_config
from lora_rank_search.trainables.pack import lr_factor  # noqa: F401 - the schedule, where tests and benches look for it
Report = Callable[[dict, Optional[str]], None]  # (metrics, checkpoint folder or None) -> None


def trial_device() -> str:
    """'cuda:0' when Ray gave this worker a GPU that torch can see, else 'cpu'."""
    import torch

    return "cuda:0" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "cpu"


def reset_peak_memory() -> None:
    """Start the peak-memory count afresh: a reused Ray worker (reuse_actors) runs trial after trial,
    and each reports its own peak, not the largest of the trials before it in that process. On GPU
    torch's peak counters; on CPU the freed heap goes back to the system, then Linux's peak resident
    set (`/proc/self/clear_refs`) restarts from what is resident now."""
    import ctypes
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:  # not Linux, or not allowed: the peak then spans the process's trials
        pass


def peak_memory_bytes(device: str) -> int:
    """CUDA max allocated on GPU; the process's peak resident set size on CPU (bytes)."""
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def build_model(settings: TrialSettings, r: int, device: str, targets: Optional[Sequence[str]] = None):
    """Load the base (4-bit per settings) and attach a fresh LoRA adapter of rank r on `targets`
    (default: settings.targets)."""
    from peft import get_peft_model

    lora = settings.for_arm({"r": r}).lora
    return get_peft_model(load_base(settings, device),
                          peft_config(r, lora.alpha, lora.dropout, list(settings.targets if targets is None else targets)))


def load_base(settings: TrialSettings, device: str):
    """The frozen base as a trial trains on it: 4-bit per settings, one 4-bit layout on CPU, and
    gradient checkpointing when configured."""
    from lora_rank_search.trainables.model import load_base_model

    base = load_base_model(settings.model_path, settings.quantization, device, settings.model.trust_remote_code)
    base_dropout_off(base)
    if device == "cpu":
        keep_4bit_layout_fixed(base)
    if settings.train.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    return base


def base_dropout_off(model) -> dict[str, float]:
    """Turn the frozen base's own dropout off (returns {module or attribute: the p it had}).

    Some bases train with dropout in their layers (GPT-2's attn/resid/embd_pdrop, Phi-2's
    resid_pdrop), drawn from the global random stream: an arm's masks would then depend on which
    arms shared its passes, and the attention's dropout (a float handed to the attention kernel)
    cannot be keyed per arm. With it off, the adapter's dropout (`lora.dropout`, keyed per arm) is
    the only one: packed arms train exactly as alone. `search.runner.base_dropout_note` says so at
    start-up."""
    import torch

    off = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            off[name] = module.p
            module.p = 0.0
        for attr in ("attention_dropout", "dropout", "layerdrop"):
            value = getattr(module, attr, None)
            if isinstance(value, float) and value > 0:
                off[f"{name}.{attr}"] = value
                setattr(module, attr, 0.0)
    return off


def keep_4bit_layout_fixed(model) -> None:
    """bitsandbytes repacks 4-bit weights for a bf16 CPU kernel the first time a layer runs in
    eval mode without gradients, which shifts outputs by ~0.3% from then on. Keep one layout so
    train and eval losses (and a resumed trial) stay comparable."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def evaluate(model, data: TokenizedData, batch_size: int, device: str) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over the whole eval split (nats/token), and the token count."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches(data, batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            shift_logits = logits[:, :-1, :].float()
            shift_labels = batch["labels"][:, 1:]
            loss = F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += float(loss)
            count += int((shift_labels != -100).sum())
    model.train(was_training)
    return total / max(count, 1), count


def base_loss_once(model, data: TokenizedData, batch_size: int, device: str, settings: TrialSettings) -> float:
    """The untouched base's eval loss (nats/token), from the per-machine cache when a trial of the
    same model, quantization and eval data computed it already; else evaluated and cached."""
    import hashlib
    import json

    from lora_rank_search.trainables.model import cache_root, source_fingerprint

    try:
        weights = source_fingerprint(settings.model_path)  # the weights' files, sizes and times: a retrained model is new
    except Exception:  # noqa: BLE001 - no fingerprint, no cache: evaluate
        loss, _ = evaluate(model, data, batch_size, device)
        return loss
    digest = hashlib.sha256()
    parts = (settings.model_path, weights, repr(settings.quantization), device.split(":")[0], str(batch_size))
    digest.update("|".join(parts).encode())
    for ids, labels in zip(data.eval_ids, data.eval_labels):
        digest.update(bytes(memoryview(ids.astype("int32"))))
        digest.update(bytes(memoryview(labels.astype("int32"))))
    path = cache_root() / "base_eval" / f"{digest.hexdigest()[:24]}.json"
    try:
        return float(json.loads(path.read_text())["base_eval_loss"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    loss, _ = evaluate(model, data, batch_size, device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"base_eval_loss": loss}))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the next trial one evaluation
    return loss


def saved_step(folder: str) -> int:
    """The optimizer step a checkpoint folder was saved at."""
    import torch

    return int(torch.load(Path(folder) / STATE_FILE, weights_only=True)["step"])


def run_trial(
    config: dict,
    settings: TrialSettings,
    data: TokenizedData,
    report: Report,
    restore_from: Optional[str] = None,
    threads: Optional[int] = None,
) -> dict:
    """Train one (rank, learning rate, seed) trial to max_steps, reporting at every evaluation: a
    pack of one arm (`trainables.pack`), in this process.

    Args:
        config: the trial's Tune config: ``r``, ``lr`` and ``seed`` (plus labels such as
            alpha_rule); without ``lr`` the settings' learning rate is used.
        settings: the search-wide settings made by `search.space.trial_settings` (typed).
        data: tokenized train/eval data.
        report: called with (metrics, checkpoint folder) after every evaluation, and once with
            (metrics with trial_status diverged/oom and a `failure` line, None) if the trial fails so.
        restore_from: a checkpoint folder written by an earlier run of this trial.
        threads: torch CPU threads (defaults to cpus_per_trial).
    Returns the last metrics. Other exceptions propagate (Tune retries from the last checkpoint).
    """
    import torch

    from lora_rank_search.trainables.pack import Pack, next_report_step

    # ---- setup
    started = time.time()
    report = _checked(report)  # every report keeps to contract/metrics.py
    if restore_from and saved_step(restore_from) >= settings.train.max_steps:
        return {}  # it had finished when its driver was killed: nothing to redo, no model to load
    pack = Pack(settings, data, threads=threads)
    arm = pack.add("trial", config, restore_from)
    here = process_metrics(started, time.time() - started)
    metrics: dict[str, Any] = {}

    # ---- train, evaluate and report
    while arm.step < settings.train.max_steps:
        target = next_report_step(arm.step, settings)
        while arm.step < target and not pack.train_step(["trial"]):
            pass
        if arm.status != OK:  # diverged / out of memory: report why and end (a retry would fail the same way)
            metrics = {**here, **metrics, **pack.failure_report("trial")}
            report(metrics, None)
            return metrics
        try:
            metrics = {**here, **pack.report(["trial"])["trial"], "elapsed_s": time.time() - started}
        except torch.OutOfMemoryError:
            detail = out_of_memory_detail(pack.device, arm.step, True, arm.r, settings.train.batch_size, max(pack.lengths))
            metrics = {**here, **metrics, **pack.failure_report("trial"), "step": arm.step, "trial_status": OOM, "failure": detail}
            report(metrics, None)
            return metrics
        if metrics["trial_status"] != OK:  # a non-finite evaluation: diverged
            report(metrics, None)
            return metrics
        folder = Path(tempfile.mkdtemp(prefix=f"lrs-ckpt-r{arm.r}-"))
        try:
            metrics["adapter_bytes"] = pack.save("trial", folder)
            report(metrics, str(folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return metrics


def _checked(report: Report) -> Report:
    return lambda metrics, folder: report(dict(checked_report(metrics)), folder)


def process_metrics(started: float, load_seconds: float) -> dict:
    """What a report says about the process that trained it (seconds since the epoch; seconds)."""
    return {
        "gpu_ids": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "node_id": _node_id(),
        "pid": os.getpid(),
        "train_pid": os.getpid(),
        "started_at": started,
        "load_seconds": load_seconds,
    }


def _single_lr(value) -> float:
    """The settings' learning rate for a trial whose config names none (a bare `run_trial` call)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"config: 'lr' must name one of train.learning_rate {list(value)} for this trial")
        value = value[0]
    return float(value)


def _node_id() -> str:
    if "ray" not in sys.modules:  # not in a Ray worker (a bare loop): no node, and no import of Ray
        return ""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - outside Ray there is no node
        return ""


def quiet_libraries(transformers: bool = True) -> None:
    """Keep trial logs to what matters: no progress bars, kernel-hub notices or deprecation noise.

    transformers=False (a packed trial's client, which never loads a model): leave transformers
    unimported (0.8 CPU-s and 15 MiB of each client process, measured on 2 cores); the environment
    variables set here quiet it should it load later."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("bitsandbytes", "ray.train._internal.storage", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    # PEFT checks rank_pattern / alpha_pattern keys against target_modules only; on an expert weight
    # (target_parameters) they do apply: the fused gate_up_proj trains at 2r (tests/test_clients.py)
    warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match any targeted module",
                            category=RuntimeWarning)
    if not transformers:
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def exit_quietly_on_sigterm() -> None:
    """When Ray stops a trial (Ctrl-C on the driver, a stopped or preempted trial) it SIGTERMs the
    worker, whose handler raises SystemExit in the main thread. If that lands inside a weakref or
    __del__ callback, Python ignores the exit and prints a traceback the driver relays to the user's
    console, and the worker lingers until Ray kills it. Here such an exit is carried out instead,
    silently: everything the trial reported is already persisted with its checkpoint.
    """
    if getattr(sys.unraisablehook, "lrs_exit_on_sigterm", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, SystemExit):
            code = unraisable.exc_value.code
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
        previous(unraisable)

    hook.lrs_exit_on_sigterm = True
    sys.unraisablehook = hook


class NodeSetupError(RuntimeError):
    """The node a trial landed on cannot run it: the model or the storage_path is missing there."""


def on_this_node(settings: TrialSettings) -> TrialSettings:
    """The settings made fit for the node this trial runs on (a cluster node may not be the
    driver's machine): the model resolved here (builtin/GGUF models are converted once per
    machine, into this machine's cache), and the experiment's storage checked to be the driver's.

    Raises NodeSetupError, before any weights load, naming the node and what to fix.
    """
    from lora_rank_search.contract.storage import SHARED_STORAGE_HINT, sees_marker
    from lora_rank_search.trainables.model import ModelSourceError, resolve_model

    node = _node_ip()
    marker = settings.storage_marker
    if marker and not sees_marker(marker["path"], marker["token"]):
        raise NodeSetupError(
            f"storage_path: {marker['storage_path']!r} is not shared with node {node} (the experiment folder the driver"
            f" wrote is not there); {SHARED_STORAGE_HINT}"
        )
    try:
        path = resolve_model(settings.model.name_or_path, settings.model.gguf_file)
    except ModelSourceError as exc:
        raise NodeSetupError(
            f"{exc} on node {node}; a local model folder must exist at the same path on every node of the cluster"
            " (copy it there with the cluster's file_mounts or setup_commands, or use a hub id or a builtin model)"
        ) from None
    return dataclasses.replace(settings, model_path=path)


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray
        import socket

        return socket.gethostname()


def lora_trial(config: dict, settings: Optional[TrialSettings] = None, data: Optional[TokenizedData] = None,
               plan=None) -> None:
    """Ray Tune function trainable (wrap with tune.with_parameters(settings=..., data=...)). With a
    `PackPlan` (and the data as `StoredData`) the arm trains in its node's pack
    (`trainables.pack_server.train_in_pack`). One trainable name for both modes: Tune's resume
    checks it, and a search may resume with `resources.arms_per_worker` changed, each arm from its
    own checkpoint (the same files either way)."""
    from ray import tune

    if plan is not None:
        from lora_rank_search.trainables.pack_server import train_in_pack

        train_in_pack(config, settings, data, plan)
        return

    quiet_libraries()
    exit_quietly_on_sigterm()
    reset_peak_memory()
    settings = on_this_node(settings)

    def report(metrics: dict, folder: Optional[str]) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder) if folder else None)

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        run_trial(config, settings, data, report)
        return
    local = restorable_checkpoint(checkpoint)
    try:
        run_trial(config, settings, data, report, restore_from=local)
    finally:
        shutil.rmtree(local, ignore_errors=True)


class CheckpointUnusable(RuntimeError):
    """No kept checkpoint of a trial loads; the message names the file and why."""


def checkpoint_problem(folder: str) -> Optional[str]:
    """Why a local checkpoint folder cannot be resumed from ('<file in it>: <reason>'), or None."""
    import torch
    from safetensors.torch import load_file

    def why(exc: Exception) -> str:
        first = str(exc).splitlines()[0] if str(exc) else "unreadable"
        return f"{type(exc).__name__}: {first}"

    weights = f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}"
    try:
        load_file(str(Path(folder) / weights))
    except Exception as exc:  # noqa: BLE001 - any reason it does not load
        return f"{weights}: {why(exc)}"
    try:
        loaded = torch.load(Path(folder) / STATE_FILE, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        return f"{STATE_FILE}: {why(exc)}"
    if not isinstance(loaded, dict) or "step" not in loaded:
        return f"{STATE_FILE}: holds no training state"
    return None


def _older_checkpoints(checkpoint) -> list:
    """The trial's other kept checkpoints older than `checkpoint`, newest first (tune.Checkpoint)."""
    import pyarrow.fs
    from ray import tune

    parent, name = checkpoint.path.rstrip("/").rsplit("/", 1)
    try:
        infos = checkpoint.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    except OSError:
        return []
    names = sorted((i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory
                    and i.base_name.startswith(CHECKPOINT_PREFIX) and i.base_name < name), reverse=True)
    return [tune.Checkpoint(f"{parent}/{n}", filesystem=checkpoint.filesystem) for n in names]


def restorable_checkpoint(checkpoint) -> str:
    """A local copy of the newest kept checkpoint of this trial that loads, starting at `checkpoint`
    (Tune's latest). A checkpoint that does not load (a truncated file, a full disk) is named on
    stderr, file and reason, and the next older one is tried; raises CheckpointUnusable, naming
    every file that failed, when none loads."""
    failed = []
    for candidate in [checkpoint, *_older_checkpoints(checkpoint)]:
        local = tempfile.mkdtemp(prefix="lrs-restore-")
        try:
            candidate.to_directory(local)
            problem = checkpoint_problem(local)
        except Exception as exc:  # noqa: BLE001 - a folder that cannot even be copied
            problem = f"(the folder): {type(exc).__name__}: {exc}"
        if problem is None:
            if failed:
                print(f"warning: checkpoint: resuming from the older {candidate.path}", file=sys.stderr, flush=True)
            return local
        shutil.rmtree(local, ignore_errors=True)
        file, reason = problem.split(": ", 1)
        failed.append(f"{candidate.path}/{file} ({reason})")
        print(f"warning: checkpoint: {failed[-1]} does not load", file=sys.stderr, flush=True)
    raise CheckpointUnusable("no kept checkpoint of this trial loads: " + "; ".join(failed))
