"""The budget's probe: time a few optimizer steps and an eval pass on this machine, before any trial.

It loads the base as a trial does (4-bit per the config) with the largest rank's adapter, runs one
untimed warm-up step and `steps` timed ones on training batches, and one evaluation pass over (up
to 4 batches of) the eval split, scaled to the whole split. Nothing is saved; the model is freed.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

from lora_rank_search.contract.config import TrialSettings
from lora_rank_search.trainables.data import BatchOrder, TokenizedData, collate, eval_batches

EVAL_BATCHES_TIMED = 4


@dataclass(frozen=True)
class Probe:
    """What the probe measured on this machine (seconds)."""

    load_s: float  # loading the 4-bit base and attaching the adapter
    step_s: float  # one optimizer step (batch_size x grad_accum examples), median of the timed steps
    eval_s: float  # one evaluation pass over the eval split
    steps: int = 0  # optimizer steps timed
    device: str = "cpu"


def probe(settings: TrialSettings, data: TokenizedData, r: int, steps: int = 3) -> Probe:
    """Seconds to load, per optimizer step (median of `steps`), and per full evaluation pass."""
    import torch

    from lora_rank_search.trainables.trial import build_model, trial_device

    device = trial_device()
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(settings.cpus_per_trial)  # what a trial gets
    try:
        started = time.perf_counter()
        model = build_model(settings, r, device)
        model.train()
        load_s = time.perf_counter() - started
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        t = settings.train
        order = BatchOrder(len(data.train_ids), 0, lengths=data.train_ids.lengths(), batch_size=t.batch_size)
        times = []
        for i in range(steps + 1):
            tick = time.perf_counter()
            for _ in range(t.grad_accum):
                idx = order.next_indices(t.batch_size)
                batch = collate([data.train_ids[j] for j in idx], [data.train_labels[j] for j in idx], data.pad_id)
                loss = model(**{k: v.to(device) for k, v in batch.items()}).loss / t.grad_accum
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:  # the first step warms kernels and allocators up
                times.append(time.perf_counter() - tick)
        eval_batch = t.eval_batch_size or 2 * t.batch_size
        total = math.ceil(len(data.eval_ids) / eval_batch)
        tick, timed = time.perf_counter(), 0
        with torch.no_grad():
            for batch in eval_batches(data, eval_batch):
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
                timed += 1
                if timed >= EVAL_BATCHES_TIMED:
                    break
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        eval_s = (time.perf_counter() - tick) * total / max(1, timed)
        del model, optimizer
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        return Probe(load_s=load_s, step_s=statistics.median(times), eval_s=eval_s, steps=steps, device=device)
    finally:
        torch.set_num_threads(threads)
