"""Several arms on one frozen base: the training step every trial runs (a trial alone is a pack of one).

A pack loads the 4-bit base once and gives each arm its own PEFT LoRA adapter (its rank, alpha,
target choice, dropout), optimizer, learning-rate schedule, gradient clipping, batch order and
dropout masks. In a step the arms' micro-batches are stacked along the batch dimension and go
through every frozen layer together (one dequantization, one larger matmul); each LoRA layer adds
an arm's term to that arm's rows only (`_segment_forward`), so ranks and target choices may differ
within one pass. Each arm's loss is the mean over its own tokens; the sum of the arms' losses is
backpropagated once, and since rows never mix in a causal LM (attention stays within a sequence,
norms are per token) every arm gets exactly the gradient it would have had alone (to floating-point
tolerance; `tests/test_pack.py`).

Dropout masks are a pure function of (arm seed, micro-batch index, layer name) (`KeyedDropout`):
an arm draws the same masks alone or packed, after a resume and under gradient checkpointing's
recomputation, without any random state to save.

When stacking cannot apply (a layer whose input rows are not the batch's rows, such as routed
experts), arms take turns on the shared base, one arm per pass (`Pack.mode`). A pass that runs out
of memory is retried with fewer arms; an arm that fails alone (out of memory, a non-finite loss)
leaves the pack and its pack-mates go on.

Pure PyTorch/PEFT: no Ray here (`trainables.pack_server` serves packs to Tune trials).

Over 400 lines on purpose: the step, the segment forward and the keyed dropout agree on which rows
belong to which arm, and an arm's exactness against training alone (`tests/test_pack.py`) depends
on all three together; split, each would need the others' row bookkeeping.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from lora_rank_search.contract.config import TrialSettings
from lora_rank_search.contract.layout import ADAPTER_DIR, ADAPTER_WEIGHTS
from lora_rank_search.contract.layout import TRAINER_STATE_FILE as STATE_FILE
from lora_rank_search.trainables.data import BatchOrder, TokenizedData, collate, eval_batches
from lora_rank_search.trainables.failures import DIVERGED, OK, OOM, out_of_memory_detail, planned_fault
from lora_rank_search.trainables.lora import alpha_label, lora_alpha, peft_config, split_targets

STACKED, TURNS = "stacked", "turns"
CPU_ROWS_PER_PASS = 64  # rows per stacked pass on CPU: past ~5 arms of 8 rows the gain flattens (measured)
GPU_ROWS_PER_PASS = 256


class PackLayoutError(RuntimeError):
    """A LoRA layer's input rows are not the stacked batch's rows: the pack must take turns."""


def lr_factor(step: int, schedule: str, warmup: int, max_steps: int) -> float:
    """Multiplier of the peak learning rate before optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, max_steps - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # cosine


def mask_key(seed: int, micro: int, layer: str) -> int:
    """The seed of one dropout mask: a pure function of the arm's seed, the micro-batch index and the layer."""
    return (int(seed) * 1_000_003 + int(micro) * 7_919 + zlib.crc32(layer.encode())) % (2**63 - 1)


class _Clock:
    """An arm's micro-batch counter (step * grad_accum + i): what its dropout masks are keyed by."""

    def __init__(self) -> None:
        self.micro = 0


def _keyed_dropout_class():
    import torch

    class KeyedDropout(torch.nn.Module):
        """Dropout whose mask is drawn from a generator seeded by `mask_key` (see the module doc).

        A (rows, tokens, features) input's mask is drawn for `length` tokens (the longest training
        row) and cut to the input's: a token's mask then does not depend on how far the batch is padded,
        which differs alone (the arm's longest row) and packed (the pack's longest row)."""

        def __init__(self, p: float, seed: int, layer: str, clock: _Clock, length: int = 0):
            super().__init__()
            self.p, self.seed, self.layer, self.clock, self.length = float(p), int(seed), layer, clock, int(length)

        def forward(self, x):
            if not self.training or self.p == 0.0:
                return x
            generator = torch.Generator(device=x.device)
            generator.manual_seed(mask_key(self.seed, self.clock.micro, self.layer))
            shape = list(x.shape)
            if x.dim() == 3:
                shape[1] = max(shape[1], self.length)
            keep = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - self.p, generator=generator)
            if x.dim() == 3:
                keep = keep[:, :x.shape[1]]
            return x * keep / (1.0 - self.p)

    return KeyedDropout


@dataclass
class Arm:
    """One arm in a pack: its adapter (named `name` in the PEFT model) and everything it trains with."""

    key: str
    name: str
    config: dict
    r: int
    lr: float
    seed: int
    targets: tuple
    params: list = field(default_factory=list)
    optimizer: Any = None
    scheduler: Any = None
    order: Any = None
    clock: _Clock = field(default_factory=_Clock)
    step: int = 0
    tokens_seen: int = 0
    best: dict = field(default_factory=lambda: {"best_eval_loss": math.inf, "best_step": 0})
    losses: list = field(default_factory=list)  # per optimizer step since the last evaluation
    step_losses: list = field(default_factory=list)  # every step's training loss (kept for tests and benches)
    interval_tokens: int = 0
    interval_time: float = 0.0
    base_eval_loss: float = math.nan
    base_eval_metric: float = math.nan  # eval.metric of the untouched base (NaN without a metric)
    fixed: dict = field(default_factory=dict)
    fault: Any = None
    status: str = OK
    failure: str = ""
    current_lr: float = 0.0


class Pack:
    """Arms sharing one frozen base (see the module doc).

    Args:
        settings: the search-wide settings (`search.space.trial_settings`).
        data: tokenized train/eval data (every arm sees the batches its own seed orders).
        device: 'cpu' or 'cuda:N' (default: the trial's device).
        threads: torch CPU threads (default: cpus_per_trial).
        rows_per_pass: most rows (examples) in one stacked forward/backward; default by device.
        mode: STACKED (default) or TURNS (one arm per pass).
    """

    def __init__(self, settings: TrialSettings, data: TokenizedData, device: Optional[str] = None,
                 threads: Optional[int] = None, rows_per_pass: Optional[int] = None, mode: str = STACKED):
        import torch

        from lora_rank_search.trainables.trial import load_base, trial_device

        self.started = time.time()
        self.settings, self.data = settings, data
        self.device = device or trial_device()
        if self.device == "cpu":
            torch.set_num_threads(threads or settings.cpus_per_trial)
        self.base = load_base(settings, self.device)
        self.load_seconds = time.time() - self.started
        self.model = None  # the PeftModel, made with the first arm
        self.arms: dict[str, Arm] = {}
        self._param_layers: list = []  # PEFT's ParamWrapper layers (expert / router weights adapted as parameters)
        self.segments: list[tuple[str, int, int]] = []  # (adapter name, first row, end row) of the current pass
        self.mode = mode
        default_rows = GPU_ROWS_PER_PASS if self.device.startswith("cuda") else CPU_ROWS_PER_PASS
        self.rows_per_pass = rows_per_pass or max(default_rows, settings.train.batch_size)
        self._patched: set = set()  # ids of the LoRA layers wired (`_wire`)
        self._names = 0
        self._base_loss: Optional[float] = None
        self.lengths = data.train_ids.lengths()
        self.longest = int(max(self.lengths)) if len(self.lengths) else 0  # tokens: the widest a training batch gets
        self.eval_batch = settings.train.eval_batch_size or 2 * settings.train.batch_size
        self.downstream = _downstream(settings, data, self.device)  # eval.metric: model -> {eval_metric, ...}, or None
        self._base_metric: Optional[dict] = None

    @property
    def segments(self) -> list[tuple[str, int, int]]:
        return self._segments

    @segments.setter
    def segments(self, value: list[tuple[str, int, int]]) -> None:
        """The current pass's arms, told to every LoRA layer: a Linear layer reads them in
        `_segment_forward`; a ParamWrapper (an expert or router weight adapted as a parameter) adds
        the delta of PEFT's active adapters to the whole weight, so it is given the pass's one arm, or
        none for the untouched base (such a pack takes turns: `_wire`)."""
        if self._param_layers:
            if len(value) > 1:
                raise PackLayoutError("expert or router weights adapted as parameters cannot be split between stacked arms")
            names = [value[0][0]] if value else []
            for layer in self._param_layers:
                layer._active_adapter = names  # PEFT's own attribute (peft 0.21, pinned); set_adapter would also flip requires_grad
        self._segments = value

    # ---- arms in and out

    def add(self, key: str, config: dict, restore_from: Optional[str] = None) -> Arm:
        """Attach an arm (a trial's config: r, lr, seed, its target choice) with a fresh adapter, or
        restored from a checkpoint folder written by `save`. Returns the arm."""
        import torch

        from lora_rank_search.trainables.trial import _single_lr

        if key in self.arms:
            self.remove(key)
        s = self.settings
        r, seed = int(config["r"]), int(config["seed"])
        lr = float(config["lr"]) if config.get("lr") is not None else _single_lr(s.train.learning_rate)
        targets = tuple(s.targets_for(config))
        self._names += 1
        arm = Arm(key=key, name=f"arm{self._names}", config=dict(config), r=r, lr=lr, seed=seed, targets=targets)
        lora_cfg = peft_config(r, s.lora.alpha, s.for_arm(config).lora.dropout, list(targets))
        torch.manual_seed(seed)  # LoRA A's initialisation, the same alone or packed
        if self.model is None:
            from peft import get_peft_model

            self.model = get_peft_model(self.base, lora_cfg, adapter_name=arm.name)
        else:
            self.model.add_adapter(arm.name, lora_cfg)
            if self.model.active_adapter not in self.model.peft_config:  # the pack was empty: PEFT still names a deleted one
                self.model.set_adapter(arm.name)
        self._wire(arm)
        arm.params = [p for n, p in self.model.named_parameters() if f".{arm.name}." in n or n.endswith(f".{arm.name}")]
        self.arms[key] = arm
        self._trainable()
        train = s.train
        arm.optimizer = torch.optim.AdamW(arm.params, lr=lr, weight_decay=train.weight_decay)
        arm.scheduler = torch.optim.lr_scheduler.LambdaLR(
            arm.optimizer, lambda step: lr_factor(step, train.lr_schedule, train.warmup_steps, train.max_steps))
        arm.order = BatchOrder(len(self.data.train_ids), seed, lengths=self.lengths, batch_size=train.batch_size)
        try:
            if restore_from:
                self._load(arm, Path(restore_from))
            else:
                arm.base_eval_loss = self.base_eval_loss()
                arm.base_eval_metric = self.base_metric().get("eval_metric", math.nan)
        except BaseException:
            self.remove(key)
            raise
        arm.clock.micro = arm.step * train.grad_accum
        arm.fault = planned_fault(r, resumed=restore_from is not None)  # test hook, None in normal runs
        alpha, rslora = lora_alpha(s.lora.alpha, r)
        arm.fixed = {
            "r": r, "seed": seed, "learning_rate": lr, "base_eval_loss": arm.base_eval_loss,
            "lora_alpha": alpha, "use_rslora": rslora, "alpha_rule": alpha_label(s.lora.alpha),
            "target_modules": ",".join(targets), "trainable_params": sum(p.numel() for p in arm.params),
            "device": self.device, "resumed_from_step": arm.step,
        }
        return arm

    def remove(self, key: str) -> None:
        """Detach an arm and give its memory back (adapter, gradients, optimizer state)."""
        arm = self.arms.pop(key, None)
        if arm is None:
            return
        arm.optimizer = arm.scheduler = None
        arm.params = []
        self.model.delete_adapter(arm.name)
        if self.arms:  # PEFT's forward reads the config of an active adapter: name one that exists
            self.model.set_adapter(next(iter(self.arms.values())).name)
        self._trainable()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def _trainable(self) -> None:
        """Every arm's adapter trains (PEFT's add/delete_adapter mark only its active adapter trainable)."""
        for arm in self.arms.values():
            for p in arm.params:
                p.requires_grad_(True)

    def _wire(self, arm: Arm) -> None:
        """Route every LoRA layer through `_segment_forward` and give the arm its keyed dropout."""
        from peft.tuners.lora.layer import LoraLayer, ParamWrapper

        dropout_class = _keyed_dropout_class()
        p = float(self.settings.for_arm(arm.config).lora.dropout)
        for module_name, module in self.model.named_modules():
            if not isinstance(module, LoraLayer) or arm.name not in getattr(module, "lora_A", {}):
                continue
            if id(module) not in self._patched:  # each layer wired once, by its kind
                self._patched.add(id(module))
                if isinstance(module, ParamWrapper):  # PEFT's forward, routed by `segments` (no dropout: config-checked)
                    self._param_layers.append(module)
                else:
                    module.forward = _segment_forward(module, self)
            if isinstance(module, ParamWrapper):
                continue
            if p > 0:
                module.lora_dropout[arm.name] = dropout_class(p, arm.seed, module_name.replace(f".{arm.name}", ""), arm.clock,
                                                              self.longest)
        _, params = split_targets(arm.targets)
        if params and self.mode == STACKED:
            self.mode = TURNS  # expert weights are parametrized, not layers whose rows we can split

    # ---- the base

    def base_eval_loss(self) -> float:
        """The untouched base's eval loss (nats/token), evaluated once per pack (and cached per machine)."""
        if self._base_loss is None:
            from lora_rank_search.trainables.trial import base_loss_once

            saved, self.segments = self.segments, []
            try:
                self._base_loss = base_loss_once(self.model if self.model is not None else self.base, self.data,
                                                 self.eval_batch, self.device, self.settings)
            finally:
                self.segments = saved
        return self._base_loss

    def base_metric(self) -> dict:
        """eval.metric of the untouched base ({} without a metric), evaluated once per pack."""
        if self.downstream is None:
            return {}
        if self._base_metric is None:
            saved, self.segments = self.segments, []
            try:
                self._base_metric = self.downstream(self.model if self.model is not None else self.base)
            finally:
                self.segments = saved
        return self._base_metric

    def _metric(self, arm: Arm) -> dict:
        """eval.metric of one arm (greedy generations one prompt at a time: the arm owns every row)."""
        self.segments = [(arm.name, 0, 1)]
        try:
            return {"base_eval_metric": arm.base_eval_metric, **self.downstream(self.model)}
        finally:
            self.segments = []
            self.model.train()

    # ---- a training step

    def train_step(self, keys: Sequence[str]) -> list[str]:
        """One optimizer step for each arm of `keys` still training; returns the keys of arms that
        failed in it (status diverged/oom, `failure` set). Other exceptions propagate."""
        import torch

        arms = [self.arms[k] for k in keys if self.arms[k].status == OK and self.arms[k].step < self.settings.train.max_steps]
        failed: list[str] = []
        if not arms:
            return failed
        tick = time.perf_counter()
        self.model.train()
        snapshot = {a.key: (a.order.state(), a.clock.micro, a.interval_tokens) for a in arms}
        todo = list(arms)
        while todo:
            step_loss = {a.key: 0.0 for a in todo}
            try:
                for _ in range(self.settings.train.grad_accum):
                    for group in self._groups(todo):
                        self._micro(group, step_loss)
            except (torch.OutOfMemoryError, PackLayoutError) as exc:
                for a in todo:  # redo this step with fewer arms per pass
                    a.order = BatchOrder.from_state(len(self.data.train_ids), snapshot[a.key][0], self.lengths, self.settings.train.batch_size)
                    a.clock.micro, a.interval_tokens = snapshot[a.key][1], snapshot[a.key][2]
                    a.optimizer.zero_grad(set_to_none=True)
                if isinstance(exc, PackLayoutError):
                    self.mode = TURNS  # this model's layers do not keep the batch's rows: one arm per pass
                elif len(todo) == 1 or self._arms_per_pass(todo) == 1:
                    arm = todo[0]
                    self._fail(arm, OOM, out_of_memory_detail(self.device, arm.step + 1, False, arm.r,
                                                              self.settings.train.batch_size, max(self.lengths)))
                    failed.append(arm.key)
                    todo = todo[1:]
                else:
                    self.rows_per_pass = max(self.settings.train.batch_size, self.rows_per_pass // 2)
                if self.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                continue
            break
        elapsed = time.perf_counter() - tick
        for arm in todo:
            loss = step_loss[arm.key]
            if arm.status != OK:
                failed.append(arm.key)
                continue
            if not math.isfinite(loss):
                self._fail(arm, DIVERGED, f"training loss became {loss} at step {arm.step + 1} (r={arm.r}, seed={arm.seed})")
                failed.append(arm.key)
                continue
            if self.settings.train.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(arm.params, self.settings.train.max_grad_norm)
            arm.current_lr = arm.optimizer.param_groups[0]["lr"]
            arm.optimizer.step()
            arm.scheduler.step()
            arm.optimizer.zero_grad(set_to_none=True)
            arm.step += 1
            arm.losses.append(loss)
            arm.step_losses.append(loss)
            arm.interval_time += elapsed / len(todo)  # the arms shared the step's time
        return failed

    def _arms_per_pass(self, arms: Sequence[Arm]) -> int:
        if self.mode == TURNS:
            return 1
        return max(1, self.rows_per_pass // max(1, self.settings.train.batch_size))

    def _groups(self, arms: Sequence[Arm]) -> list[list[Arm]]:
        k = self._arms_per_pass(arms)
        return [list(arms[i:i + k]) for i in range(0, len(arms), k)]

    def _micro(self, group: list[Arm], step_loss: dict) -> None:
        """Forward and backward of one micro-batch of every arm in `group`, stacked."""
        micro, data = self.settings.train.batch_size, self.data
        ids, labels = [], []
        for arm in group:
            idx = arm.order.next_indices(micro)
            ids += [data.train_ids[i] for i in idx]
            labels += [data.train_labels[i] for i in idx]
        batch = {k: v.to(self.device) for k, v in collate(ids, labels, data.pad_id).items()}
        for row, arm in enumerate(group):
            arm.interval_tokens += int(batch["attention_mask"][row * micro:(row + 1) * micro].sum())
        # The rows' arms stay set through the backward pass: gradient checkpointing recomputes the
        # forward there, and must apply the same LoRA terms (and the same keyed dropout masks).
        self.segments = [(arm.name, i * micro, (i + 1) * micro) for i, arm in enumerate(group)]
        try:
            losses = self._losses(group, batch, micro)
            total = None
            accum = self.settings.train.grad_accum
            for arm, loss in zip(group, losses):
                loss = loss / accum
                if arm.fault and arm.fault.step == arm.step + 1:
                    loss = arm.fault.apply(loss)
                value = float(loss.detach())
                step_loss[arm.key] += value
                if math.isfinite(value):  # a diverged arm contributes nothing: its pack-mates' gradients stay clean
                    total = loss if total is None else total + loss
            if total is not None:
                total.backward()
        finally:
            self.segments = []
        for arm in group:
            arm.clock.micro += 1

    def _losses(self, group: list[Arm], batch: dict, rows: int) -> list:
        """Each arm's mean cross-entropy over its own tokens (nats/token) on its `rows` rows of `batch`
        (`self.segments` names the rows' arms)."""
        import torch.nn.functional as F

        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # rows: self.segments
        labels = batch["labels"]
        out = []
        for i in range(len(group)):
            part = logits[i * rows:(i + 1) * rows, :-1, :].float()
            target = labels[i * rows:(i + 1) * rows, 1:]
            out.append(F.cross_entropy(part.reshape(-1, part.size(-1)), target.reshape(-1), ignore_index=-100))
        return out

    def _fail(self, arm: Arm, status: str, detail: str) -> None:
        arm.status, arm.failure = status, detail
        arm.optimizer.zero_grad(set_to_none=True)

    # ---- evaluation

    def evaluate(self, keys: Sequence[str]) -> dict[str, float]:
        """Token-weighted mean eval cross-entropy of each arm (nats/token), stacked like training."""
        try:
            return self._evaluate(keys)
        except PackLayoutError:
            self.mode = TURNS
            return self._evaluate(keys)

    def _evaluate(self, keys: Sequence[str]) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        arms = [self.arms[k] for k in keys]
        totals = {a.key: 0.0 for a in arms}
        count = 0
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in eval_batches(self.data, self.eval_batch):
                    rows = int(batch["input_ids"].shape[0])
                    labels = batch["labels"][:, 1:].to(self.device)
                    count += int((labels != -100).sum())
                    k = max(1, self._arms_per_pass(arms) * self.settings.train.batch_size // max(1, rows)) if self.mode == STACKED else 1
                    for start in range(0, len(arms), k):
                        group = arms[start:start + k]
                        stacked = {n: batch[n].repeat(len(group), 1).to(self.device) for n in ("input_ids", "attention_mask")}
                        self.segments = [(a.name, i * rows, (i + 1) * rows) for i, a in enumerate(group)]
                        try:
                            logits = self.model(**stacked).logits
                        finally:
                            self.segments = []
                        for i, arm in enumerate(group):
                            part = logits[i * rows:(i + 1) * rows, :-1, :].float()
                            totals[arm.key] += float(F.cross_entropy(part.reshape(-1, part.size(-1)), labels.reshape(-1),
                                                                     ignore_index=-100, reduction="sum"))
        finally:
            self.model.train()
        return {key: total / max(count, 1) for key, total in totals.items()}

    def report(self, keys: Sequence[str]) -> dict[str, dict]:
        """Evaluate the arms and return each one's metrics (as `contract.metrics` declares them)."""
        from lora_rank_search.trainables.trial import peak_memory_bytes

        tick = time.perf_counter()
        losses = self.evaluate(keys)
        eval_seconds = (time.perf_counter() - tick) / max(1, len(keys))
        out = {}
        for key in keys:
            arm, loss = self.arms[key], losses[key]
            arm.tokens_seen += arm.interval_tokens
            if loss < arm.best["best_eval_loss"]:
                arm.best = {"best_eval_loss": loss, "best_step": arm.step}
            metrics = {
                **arm.fixed, "step": arm.step, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
                "train_loss": sum(arm.losses) / max(1, len(arm.losses)), "tokens_seen": arm.tokens_seen,
                "tokens_per_s": arm.interval_tokens / max(arm.interval_time, 1e-9), "lr": arm.current_lr,
                "eval_seconds": eval_seconds, "trial_status": OK, "failure": "", **arm.best,
                "peak_memory_bytes": peak_memory_bytes(self.device),
            }
            if self.downstream is not None:  # eval.metric at the same steps as the eval loss
                metrics.update(self._metric(arm))
            if not math.isfinite(loss):
                arm.status = DIVERGED
                arm.failure = f"eval loss became {loss} at step {arm.step} (r={arm.r}, seed={arm.seed})"
                metrics.update(trial_status=DIVERGED, failure=arm.failure, eval_loss=math.nan, eval_perplexity=math.nan)
            arm.losses, arm.interval_tokens, arm.interval_time = [], 0, 0.0
            out[key] = metrics
        return out

    def failure_report(self, key: str) -> dict:
        """The last metrics of an arm that failed in training (status and `failure` set)."""
        from lora_rank_search.trainables.trial import peak_memory_bytes

        arm = self.arms[key]
        return {**arm.fixed, "step": arm.step + 1, "eval_loss": math.nan, "eval_perplexity": math.nan,
                "peak_memory_bytes": peak_memory_bytes(self.device), "trial_status": arm.status, "failure": arm.failure,
                **arm.best}

    # ---- checkpoints (PEFT adapter + loop state, the same files a trial alone writes)

    def save(self, key: str, folder: Path) -> int:
        """Write the arm's checkpoint into `folder`; returns the adapter weights file's bytes."""
        import torch
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        arm = self.arms[key]
        adapter = Path(folder) / ADAPTER_DIR
        adapter.mkdir(parents=True, exist_ok=True)
        weights = get_peft_model_state_dict(self.model, adapter_name=arm.name)
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(adapter / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        config = self.model.peft_config[arm.name]
        # the searched model's folder for every arm: PEFT names the base for a pack's first adapter only,
        # and as whatever folder it was loaded from (the pre-quantized cache, or the model on the load
        # that filled the cache); `lora-rank export` points it at the configured model
        config.base_model_name_or_path = self.settings.model_path
        config.save_pretrained(str(adapter))
        state = {"step": arm.step, "tokens_seen": arm.tokens_seen, "order": arm.order.state(),
                 "base_eval_loss": arm.base_eval_loss, "base_eval_metric": arm.base_eval_metric, **arm.best}
        torch.save({"optimizer": arm.optimizer.state_dict(), "scheduler": arm.scheduler.state_dict(),
                    "rng": torch.get_rng_state(), **state}, Path(folder) / STATE_FILE)
        return (adapter / ADAPTER_WEIGHTS).stat().st_size

    def _load(self, arm: Arm, folder: Path) -> None:
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(str(folder / ADAPTER_DIR / ADAPTER_WEIGHTS), device=self.device)
        result = set_peft_model_state_dict(self.model, weights, adapter_name=arm.name)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"checkpoint adapter does not fit the model: unexpected keys {result.unexpected_keys[:3]}")
        state = torch.load(folder / STATE_FILE, weights_only=True)
        arm.optimizer.load_state_dict(state.pop("optimizer"))
        arm.scheduler.load_state_dict(state.pop("scheduler"))
        state.pop("rng", None)  # dropout masks are keyed by the step, not drawn from a saved state
        arm.step, arm.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        arm.best = {"best_eval_loss": state["best_eval_loss"], "best_step": state["best_step"]}
        arm.order = BatchOrder.from_state(len(self.data.train_ids), state["order"], self.lengths, self.settings.train.batch_size)
        arm.base_eval_loss = state.get("base_eval_loss", math.nan)
        arm.base_eval_metric = state.get("base_eval_metric", math.nan)


def _downstream(settings: TrialSettings, data: TokenizedData, device: str):
    """model -> {eval_metric[, eval_metric_error]} when eval.metric is set, else None
    (`trainables.downstream`: greedy generation of the eval prompts and scoring)."""
    ev = getattr(settings, "eval", None)
    if ev is None or not ev.metric:
        return None
    from lora_rank_search.trainables.downstream import evaluate_metric
    from lora_rank_search.trainables.model import load_tokenizer

    tokenizer = load_tokenizer(settings.model_path, settings.model.trust_remote_code)
    return lambda model: evaluate_metric(model, tokenizer, data, ev.metric, ev.max_new_tokens, device)


def _segment_forward(layer, pack: Pack):
    """A LoRA layer's forward in a pack: the frozen base on every row, then each arm's LoRA term on
    that arm's rows (the arms listed in `pack.segments`; none: the untouched base)."""
    import torch

    def forward(x, *args, **kwargs):
        result = layer.base_layer(x, *args, **kwargs)
        segments = [s for s in pack.segments if s[0] in layer.lora_A]
        if not segments:
            return result
        if len(pack.segments) == 1:  # one arm owns every row, whatever the layer's input shape
            name = segments[0][0]
            return result + _lora_term(layer, name, x).to(result.dtype)
        if x.shape[0] != pack.segments[-1][2]:
            raise PackLayoutError(f"{type(layer).__name__} sees {x.shape[0]} rows, not the {pack.segments[-1][2]} stacked ones")
        pieces = []
        for name, start, end in pack.segments:
            piece = result[start:end]
            if name in layer.lora_A:
                piece = piece + _lora_term(layer, name, x[start:end]).to(result.dtype)
            pieces.append(piece)
        return torch.cat(pieces, dim=0)

    return forward


def _lora_term(layer, name: str, x):
    """scaling · B(A(dropout(x))) of one adapter, in its weights' dtype."""
    lora_a = layer.lora_A[name]
    x = x.to(lora_a.weight.dtype)
    return layer.lora_B[name](lora_a(layer.lora_dropout[name](x))) * layer.scaling[name]


def next_report_step(step: int, settings: TrialSettings) -> int:
    """The next step after `step` at which an arm evaluates and reports: every eval_every, at every
    rung (the scheduler compares arms there) and at max_steps."""
    train = settings.train
    candidates = [train.max_steps, (step // train.eval_every + 1) * train.eval_every]
    candidates += [r for r in settings.rungs if r > step]
    return min(c for c in candidates if c > step)

