"""How a trial fails: the statuses it reports, the out-of-memory explanation, and a test hook.

A trial whose loss turns NaN/inf (``diverged``) or that runs out of GPU memory (``oom``) does not
raise: it reports one last result with ``trial_status`` and ``failure`` and ends, because a retry
from its checkpoint would fail the same way. Any other exception propagates, and Tune retries the
trial from its last checkpoint up to ``resources.max_failures`` times.

Test hook (not for production use): ``LORA_RANK_SEARCH_FAULT="r=2:step=20:kind=raise"`` makes the
trial of rank 2 fail at optimizer step 20 (1-based): ``raise`` a RuntimeError, make the loss
``nan``, raise ``oom`` (torch.OutOfMemoryError, also on CPU), or ``hang`` for HANG_SECONDS
before that step (a stuck step: what a lost node looks like from inside the trial), or ``corrupt``:
truncate the adapter weights of the trial's newest checkpoint on disk, then raise (a retry must
fall back to an older checkpoint), or ``exit``: the process dies at once (in a pack, the whole pack). Add
``:once`` to fire only in a run that started from scratch (so a retry from a checkpoint gets past
it); separate several faults with ``;``. Workers inherit it from the driver's environment on a
local Ray.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

from lora_rank_search.contract.metrics import DIVERGED, OK, OOM  # noqa: F401 - the `trial_status` values, re-exported for the trainables

FAULT_ENV = "LORA_RANK_SEARCH_FAULT"
FAULT_KINDS = ("raise", "nan", "oom", "hang", "corrupt", "exit")
HANG_SECONDS = 60.0
GIB = 1024**3


class TrialDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class Fault:
    """One injected fault: in the trial of rank `r`, at optimizer step `step` (1-based)."""

    r: int
    step: int
    kind: str
    once: bool = False

    def apply(self, loss):
        """The micro-batch loss, made NaN, returned after a hang, or an exception raised instead (kind)."""
        import torch

        if self.kind == "hang":
            time.sleep(HANG_SECONDS)
            return loss
        if self.kind == "nan":
            return loss * float("nan")
        if self.kind == "oom":
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({FAULT_ENV} at step {self.step})")
        if self.kind == "exit":  # the process dies at once (a crashed pack server, a killed worker)
            os._exit(1)
        if self.kind == "corrupt":
            _truncate_newest_checkpoint()
        raise RuntimeError(f"injected fault ({FAULT_ENV} at step {self.step})")


def _truncate_newest_checkpoint() -> None:
    """Cut the newest persisted checkpoint's adapter_model.safetensors of this Tune trial in half."""
    from ray.train._internal.session import get_session  # test hook only: a private API is fine here

    from lora_rank_search.contract.layout import ADAPTER_DIR, ADAPTER_WEIGHTS, CHECKPOINT_PREFIX

    storage = get_session().storage
    fs, trial = storage.storage_filesystem, storage.trial_fs_path
    import pyarrow.fs

    names = sorted(i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(trial)) if i.base_name.startswith(CHECKPOINT_PREFIX))
    target = f"{trial}/{names[-1]}/{ADAPTER_DIR}/{ADAPTER_WEIGHTS}"
    with fs.open_input_stream(target) as handle:
        data = handle.read()
    with fs.open_output_stream(target) as out:
        out.write(data[: len(data) // 2])


def planned_fault(r: int, resumed: bool, spec: Optional[str] = None) -> Optional[Fault]:
    """The fault the test hook plans for the trial of rank r, or None (the normal case)."""
    spec = os.environ.get(FAULT_ENV, "") if spec is None else spec
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        parts = dict(p.split("=", 1) if "=" in p else (p, "1") for p in item.split(":"))
        fault = Fault(int(parts["r"]), int(parts["step"]), parts["kind"], "once" in parts)
        if fault.kind not in FAULT_KINDS:
            raise ValueError(f"{FAULT_ENV}: kind must be one of {', '.join(FAULT_KINDS)}, got {fault.kind!r}")
        if fault.r == r and not (fault.once and resumed):
            return fault
    return None


def out_of_memory_detail(device: str, step: int, evaluating: bool, r: int, batch_size: int, seq_len: int) -> str:
    """One line for the results: where it ran out, the memory numbers (GiB), and what to change.

    Args:
        step: the optimizer step being trained, or the one just trained when evaluating.
        batch_size, seq_len: the training micro-batch (examples) and its longest example (tokens).
    """
    import torch

    phase = f"in the evaluation after step {step}" if evaluating else f"at step {step}"
    where = f"out of memory {phase} (r={r}, batch {batch_size} x {seq_len} tokens)"
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(device)
        numbers = (
            f"{torch.cuda.memory_allocated(device) / GIB:.2f} GiB allocated, peak {torch.cuda.max_memory_allocated(device) / GIB:.2f} GiB,"
            f" {free / GIB:.2f} GiB free of {total / GIB:.2f} GiB on the GPU"
        )
    else:
        import resource

        numbers = f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB:.2f} GiB (CPU)"
    hint = (
        "fewer trials per GPU (a larger resources.gpus_per_trial, or auto), a smaller train.batch_size,"
        " or train.gradient_checkpointing: true"
    )
    return f"{where}: {numbers}; try {hint}"
