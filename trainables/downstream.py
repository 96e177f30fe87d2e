"""A downstream metric (`eval.metric`): greedy generations of the eval prompts, scored against the
references, as the verdict's quantity instead of the eval loss.

`eval.metric` names a built-in (`exact_match`, `contains`: the share of generations that equal /
contain their reference, whitespace-stripped) or the user's own function `module:function`, called
as `function(generations, references)` and returning a number. The eval prompts are each eval
example's tokens before its first token with loss; the reference is the text of that first span
with loss (the response, completion, output or first assistant turn), special tokens dropped.

Pure and testable: `eval_pairs` (token ids in, prompts and references out), `score` (texts in,
number out), `generate` (a model and prompts in, texts out). A trial calls `evaluate_metric`.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, Optional, Sequence

IGNORE = -100
BUILTIN_METRICS = ("exact_match", "contains")
METRIC_KEY, BASE_METRIC_KEY, METRIC_ERROR_KEY = "eval_metric", "base_eval_metric", "eval_metric_error"


class MetricError(RuntimeError):
    """The metric function raised or returned a non-number (the message names the function)."""


def exact_match(generations: Sequence[str], references: Sequence[str]) -> float:
    """Share of generations equal to their reference (both whitespace-stripped)."""
    return sum(g.strip() == r.strip() for g, r in zip(generations, references)) / max(1, len(references))


def contains(generations: Sequence[str], references: Sequence[str]) -> float:
    """Share of generations that contain their (whitespace-stripped) reference."""
    return sum(r.strip() in g for g, r in zip(generations, references)) / max(1, len(references))


BUILTINS: dict = {"exact_match": exact_match, "contains": contains}


def metric_problem(name: str) -> Optional[str]:
    """Why `eval.metric` cannot be used (checked before Ray starts), or None."""
    if name in BUILTINS:
        return None
    if ":" not in name:
        return f"must be {' | '.join(BUILTIN_METRICS)} or module:function, got {name!r}"
    try:
        resolve(name)
    except MetricError as exc:
        return str(exc)
    return None


def resolve(name: str) -> Callable:
    """The metric function of a built-in name or `module:function`."""
    if name in BUILTINS:
        return BUILTINS[name]
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise MetricError(f"cannot import the metric function {name!r} ({type(exc).__name__}: {exc})") from None
    if not callable(fn):
        raise MetricError(f"the metric {name!r} is not a function")
    return fn


def score(name: str, generations: Sequence[str], references: Sequence[str]) -> float:
    """The metric's value; MetricError (naming the function) when it raises or returns no number."""
    fn = resolve(name)
    try:
        value = fn(list(generations), list(references))
    except Exception as exc:  # noqa: BLE001 - the user's function: any failure is named
        raise MetricError(f"the metric function {name!r} raised {type(exc).__name__}: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise MetricError(f"the metric function {name!r} returned {value!r}, not a finite number")
    return float(value)


def prompts_check(ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], data_format: str) -> tuple:
    """(problem, warning) about the eval examples' prompts for the metric (checked before Ray
    starts; either may be None). A prompt is the tokens before the first token with loss: `text`
    puts loss on every token, so no example has one and the metric has nothing to generate from
    (a refusal); an example without one among others counts as an empty generation (a warning)."""
    prompts, _ = eval_pairs(ids, labels)
    empty = sum(1 for p in prompts if not p)
    if not empty:
        return None, None
    where = f"in data.format {data_format!r}" + (" (loss on every token)" if data_format == "text" else "")
    if empty == len(prompts):
        return (f"needs a prompt before the answer in the eval examples (a format with a response: instruction, completion, "
                f"alpaca, chat or sharegpt); {'the one eval example has none' if len(prompts) == 1 else f'none of the {len(prompts)} eval examples has one'} "
                f"{where}"), None
    return None, (f"eval.metric: {empty} of {len(prompts)} eval examples have no prompt before their answer {where}; "
                  "each counts as an empty generation")


def eval_pairs(ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> tuple[list, list]:
    """(prompt ids, reference ids) per example: the tokens before the first token with loss, and
    the tokens of that first span with loss."""
    prompts, references = [], []
    for x, y in zip(ids, labels):
        x, y = [int(v) for v in x], [int(v) for v in y]
        start = next((i for i, v in enumerate(y) if v != IGNORE), len(y))
        end = next((i for i in range(start, len(y)) if y[i] == IGNORE), len(y))
        prompts.append(x[:start])
        references.append(x[start:end])
    return prompts, references


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: Optional[int], pad_id: int,
             device: str) -> list:
    """Greedy continuations (new token ids, up to max_new_tokens, stopping at EOS), one prompt at a time."""
    import torch

    out = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for prompt in prompts:
            if not len(prompt):  # nothing to continue (`prompts_check` warned at start-up): an empty generation
                out.append([])
                continue
            ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
            new: list = []
            past = None
            step_ids = ids
            for _ in range(max_new_tokens):
                result = model(input_ids=step_ids, past_key_values=past, use_cache=True)
                past = result.past_key_values
                token = int(result.logits[0, -1].argmax())
                if eos_id is not None and token == eos_id:
                    break
                new.append(token)
                step_ids = torch.tensor([[token]], dtype=torch.long, device=device)
            out.append(new)
    model.train(was_training)
    return out


def evaluate_metric(model, tokenizer, data, name: str, max_new_tokens: int, device: str) -> dict:
    """{METRIC_KEY: value} for one evaluation, or {METRIC_KEY: nan, METRIC_ERROR_KEY: why} when the
    metric function fails (the trial goes on and is recorded)."""
    prompts, refs = eval_pairs(data.eval_ids, data.eval_labels)
    new = generate(model, prompts, max_new_tokens, tokenizer.eos_token_id, data.pad_id, device)
    generations = [tokenizer.decode(n, skip_special_tokens=True) for n in new]
    references = [tokenizer.decode(r, skip_special_tokens=True) for r in refs]
    try:
        return {METRIC_KEY: score(name, generations, references)}
    except MetricError as exc:
        return {METRIC_KEY: math.nan, METRIC_ERROR_KEY: str(exc)}
