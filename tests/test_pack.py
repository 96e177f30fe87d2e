"""Arms packed on one base train exactly as they would alone (no Ray): per-step train and eval
losses, saved adapters loadable by PEFT, a failing arm leaving its pack-mates alone."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lora_rank_search.search.config import parse_config
from lora_rank_search.search.runner import prepare
from lora_rank_search.search.space import trial_settings
from lora_rank_search.trainables.failures import FAULT_ENV
from lora_rank_search.trainables.pack import TURNS, Pack, mask_key, next_report_step

ARMS = {  # different ranks, learning rates and target choices
    "a": {"r": 2, "lr": 3e-3, "seed": 0, "target_choice": "attention"},
    "b": {"r": 8, "lr": 1e-2, "seed": 1, "target_choice": "mlp"},
    "c": {"r": 4, "lr": 1e-3, "seed": 2, "target_choice": "attention"},
}
STEPS, EVAL_EVERY = 20, 5
TOL = 1e-4


@pytest.fixture
def packed_setup(raw_config):
    def make(**over):
        raw = raw_config(lora={"target_modules": ["attention", "mlp"], "dropout": 0.1, "alpha": 16},
                         train={"max_steps": STEPS, "eval_every": EVAL_EVERY, "batch_size": 8, "learning_rate": [1e-3, 3e-3, 1e-2]},
                         **over)
        cfg = parse_config(raw)
        prepared = prepare(cfg, log=lambda _: None)
        return prepared, trial_settings(cfg, prepared.model_path, prepared.choices)

    return make


def _train(pack: Pack, keys, steps: int, every: int) -> dict:
    """Train the pack's arms `steps` steps, evaluating every `every`: {key: [eval losses]}."""
    evals = {k: [] for k in keys}
    for step in range(1, steps + 1):
        assert pack.train_step(keys) == []
        if step % every == 0:
            for key, loss in pack.evaluate(keys).items():
                evals[key].append(loss)
    return evals


def _close(a, b) -> bool:
    return abs(a - b) <= TOL * max(abs(a), abs(b), 1e-12)


@pytest.mark.slow
def test_three_different_arms_train_packed_exactly_as_alone(packed_setup, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from lora_rank_search.trainables.model import load_base_model

    prepared, settings = packed_setup()
    pack = Pack(settings, prepared.data, threads=2)
    for key, config in ARMS.items():
        pack.add(key, config)
    assert pack.mode == "stacked"
    packed_evals = _train(pack, list(ARMS), STEPS, EVAL_EVERY)
    for key in ARMS:
        pack.save(key, tmp_path / "packed" / key)

    for key, config in ARMS.items():
        alone = Pack(settings, prepared.data, threads=2)
        alone.add(key, config)
        alone_evals = _train(alone, [key], STEPS, EVAL_EVERY)
        train_packed, train_alone = pack.arms[key].step_losses, alone.arms[key].step_losses
        assert len(train_packed) == len(train_alone) == STEPS
        bad = [(i + 1, p, a) for i, (p, a) in enumerate(zip(train_packed, train_alone)) if not _close(p, a)]
        assert not bad, f"arm {key}: train losses differ at (step, packed, alone) {bad[:3]}"
        bad = [(p, a) for p, a in zip(packed_evals[key], alone_evals[key]) if not _close(p, a)]
        assert not bad, f"arm {key}: eval losses differ: {bad}"
        assert train_alone[-1] < train_alone[0], "the arm learned"
        alone.save(key, tmp_path / "alone" / key)
        w_packed = load_file(str(tmp_path / "packed" / key / "adapter" / "adapter_model.safetensors"))
        w_alone = load_file(str(tmp_path / "alone" / key / "adapter" / "adapter_model.safetensors"))
        assert set(w_packed) == set(w_alone) and w_packed
        for name in w_alone:
            diff = float((w_packed[name] - w_alone[name]).abs().max())
            scale = float(w_alone[name].abs().max())
            assert diff <= TOL * max(scale, 1e-6) + 1e-7, f"arm {key}: {name} differs by {diff} (max {scale})"
        del alone

    # every arm's adapter_config.json names the base (PEFT sets it for a pack's first adapter only)
    import json

    named = {json.loads((tmp_path / where / key / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
             for where in ("packed", "alone") for key in ARMS}
    assert len(named) == 1 and None not in named, named
    from peft import AutoPeftModelForCausalLM

    assert AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "packed" / "c" / "adapter")).peft_config["default"].r == 4

    # each saved adapter loads in PEFT onto the base, with its own rank and targets
    base = load_base_model(settings.model_path, settings.quantization, "cpu")
    model = PeftModel.from_pretrained(base, str(tmp_path / "packed" / "b" / "adapter"))
    assert model.peft_config["default"].r == 8
    assert any("mlp" in n and "lora_A" in n for n, _ in model.named_parameters())
    assert not any("self_attn" in n and "lora_A" in n for n, _ in model.named_parameters())


@pytest.mark.slow
def test_a_diverging_arm_leaves_its_pack_mates_training_as_alone(packed_setup, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "r=8:step=3:kind=nan")
    prepared, settings = packed_setup()
    pack = Pack(settings, prepared.data, threads=2)
    for key, config in ARMS.items():
        pack.add(key, config)
    failed = []
    for _ in range(5):
        failed += pack.train_step(list(ARMS))
    assert failed == ["b"] and pack.arms["b"].status == "diverged"
    assert pack.arms["b"].failure == "training loss became nan at step 3 (r=8, seed=1)"
    assert pack.arms["a"].step == pack.arms["c"].step == 5 and pack.arms["b"].step == 2
    monkeypatch.delenv(FAULT_ENV)
    alone = Pack(settings, prepared.data, threads=2)
    alone.add("a", ARMS["a"])
    for _ in range(5):
        alone.train_step(["a"])
    assert all(_close(p, a) for p, a in zip(pack.arms["a"].step_losses, alone.arms["a"].step_losses))
    pack.remove("b")
    assert "arm2" not in pack.model.peft_config and not any(".arm2." in n for n, _ in pack.model.named_parameters())
    assert pack.train_step(["a", "c"]) == [] and pack.arms["a"].step == pack.arms["c"].step == 6, "the others train on"
    assert all(p.requires_grad and p.grad is None for p in pack.arms["c"].params)
    pack.add("d", {**ARMS["b"], "seed": 3})  # a new arm joins; the others keep training
    assert pack.train_step(["a", "c", "d"]) == [] and pack.arms["d"].step == 1 and pack.arms["a"].step == 7
    for key in ("a", "c", "d"):  # the pack empties, and a new arm still trains and evaluates in it
        pack.remove(key)
    pack.add("e", ARMS["c"])
    assert pack.train_step(["e"]) == [] and math.isfinite(pack.evaluate(["e"])["e"])


@pytest.mark.slow
def test_turns_give_the_same_losses_as_stacking(packed_setup):
    prepared, settings = packed_setup()
    stacked, turns = Pack(settings, prepared.data, threads=2), Pack(settings, prepared.data, threads=2, mode=TURNS)
    for key, config in ARMS.items():
        stacked.add(key, config)
        turns.add(key, config)
    a, b = _train(stacked, list(ARMS), 4, 2), _train(turns, list(ARMS), 4, 2)
    assert all(_close(x, y) for k in ARMS for x, y in zip(a[k], b[k]))


def test_dropout_masks_are_keyed_by_seed_step_and_layer():
    assert mask_key(0, 5, "layers.0.q_proj") == mask_key(0, 5, "layers.0.q_proj")
    keys = {mask_key(s, m, layer) for s in (0, 1) for m in (0, 1, 2) for layer in ("a.q_proj", "a.v_proj")}
    assert len(keys) == 12


def test_arms_report_at_every_eval_rung_and_the_end():
    class S:
        class train:
            max_steps, eval_every = 60, 25
        rungs = (10, 30)

    steps, step = [], 0
    while step < 60:
        step = next_report_step(step, S)
        steps.append(step)
    assert steps == [10, 25, 30, 50, 60]
    assert math.isfinite(steps[-1])


def test_arms_that_fit_a_gpu_hold_the_base_once_and_each_arm_beside_it():
    from lora_rank_search.search.resources import GIB, MemoryEstimate, arms_that_fit, pack_memory

    estimate = MemoryEstimate(base_weights=4 * GIB, adapter_and_optimizer=GIB // 2, activations=GIB // 2, context=GIB // 2)
    # 0.9 * 80 GiB - 4 - 0.5 = 67.5 GiB of room, 1 GiB per arm -> 67, capped at 16
    assert arms_that_fit(estimate, 80 * GIB, 16) == 16
    assert arms_that_fit(estimate, 10 * GIB, 16) == 4  # 9 - 4.5 = 4.5 GiB -> 4 arms
    assert arms_that_fit(estimate, 4 * GIB, 16) == 1  # not even one beside the base: one arm per worker
    assert pack_memory(estimate, 4) == 4 * GIB + GIB // 2 + 4 * GIB
    assert pack_memory(estimate, 4) <= 0.9 * 10 * GIB


@pytest.mark.parametrize("over, expected", [
    ({"arms_per_worker": 1}, None),
    ({"arms_per_worker": "auto"}, "off"),  # measured slower than one arm per worker on CPU (bench/packing.py)
    ({"arms_per_worker": 4}, (4, 1, 2)),  # a pack per core, 8 arms over 2 packs
    ({"arms_per_worker": 3}, (3, 1, 2)),  # 3 per pack: 3 packs, 2 on this node at a time
    ({"arms_per_worker": 8}, (8, 2, 1)),  # all 8 in one pack, as asked: it gets both cores
])
def test_plan_packs_on_cpu(over, expected, raw_config, monkeypatch):
    import ray

    from lora_rank_search.search.config import parse_config
    from lora_rank_search.search.runner import plan_packs

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    cfg = parse_config(raw_config(lora={"ranks": [1, 2, 4, 8]}, train={"learning_rate": [1e-3, 3e-3]},
                                  resources={"cpus_per_trial": 1, **over}))
    prepared = prepare(cfg, log=lambda _: None)
    lines = []
    plan, per_trial = plan_packs(cfg, prepared, {"cpu": 1, "gpu": 0.0}, lines.append)
    if expected is None:
        assert plan is None and per_trial == {"cpu": 1, "gpu": 0.0} and not lines
        return
    if expected == "off":
        assert plan is None and per_trial == {"cpu": 1, "gpu": 0.0}
        assert lines and lines[0].startswith("packing: off on CPU") and "bench/packing.py" in lines[0]
        return
    arms, threads, packs = expected
    assert (plan.arms, plan.threads, plan.packs_per_node) == (arms, threads, packs)
    assert per_trial == {"cpu": pytest.approx(threads / arms), "gpu": 0.0}
    assert lines and lines[0].startswith(f"packing: {arms} arms per worker")


def test_on_cpu_a_number_stacks_a_tiny_models_arms_and_lets_a_larger_models_take_turns(raw_config, monkeypatch):
    import ray

    from lora_rank_search.search.config import parse_config
    from lora_rank_search.search.runner import plan_packs

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    cfg = parse_config(raw_config(lora={"ranks": [1, 2, 4, 8]}, resources={"cpus_per_trial": 1, "arms_per_worker": 2}))
    prepared = prepare(cfg, log=lambda _: None)
    small, _ = plan_packs(cfg, prepared, {"cpu": 1, "gpu": 0.0}, lambda _: None)
    assert small is not None and small.rows_per_pass is None, "the tiny model's arms are stacked (rows by device)"
    prepared.dims["hidden"] = 576  # SmolLM2-135M's width: compute-bound on CPU
    cfg = parse_config(raw_config(lora={"ranks": [1, 2, 4, 8]}, resources={"cpus_per_trial": 1, "arms_per_worker": 2}))
    lines = []
    plan, per_trial = plan_packs(cfg, prepared, {"cpu": 1, "gpu": 0.0}, lines.append)
    assert plan is not None and (plan.arms, plan.threads, plan.packs_per_node) == (2, 1, 2), "a number packs as asked"
    assert plan.rows_per_pass == cfg.train.batch_size, "one arm's micro-batch per pass"
    assert per_trial == {"cpu": pytest.approx(0.5), "gpu": 0.0}
    assert "take turns" in lines[0] and "2 packs per node" in lines[0]


@pytest.mark.slow
def test_a_non_finite_evaluation_ends_the_arm_as_diverged(packed_setup, monkeypatch):
    prepared, settings = packed_setup()
    pack = Pack(settings, prepared.data, threads=2)
    for key in ("a", "c"):
        pack.add(key, ARMS[key])
    assert pack.train_step(["a", "c"]) == []
    monkeypatch.setattr(pack, "evaluate", lambda keys: {"a": float("inf"), "c": 3.0})
    reports = pack.report(["a", "c"])
    assert reports["a"]["trial_status"] == "diverged" and math.isnan(reports["a"]["eval_loss"])
    assert reports["a"]["failure"] == "eval loss became inf at step 1 (r=2, seed=0)"
    assert pack.arms["a"].status == "diverged" and pack.train_step(["a", "c"]) == [] and pack.arms["a"].step == 1
    assert reports["c"]["trial_status"] == "ok" and pack.arms["c"].step == 2, "its pack-mate trains on"


@pytest.mark.slow
def test_gradient_checkpointing_recomputes_the_same_arms_and_masks(raw_config):
    results = {}
    for checkpointing in (False, True):
        raw = raw_config(lora={"target_modules": ["attention", "mlp"], "dropout": 0.1, "alpha": 16},
                         train={"max_steps": 4, "eval_every": 2, "batch_size": 8, "learning_rate": [1e-3, 3e-3, 1e-2],
                                "gradient_checkpointing": checkpointing}, scheduler={"type": "none"})
        cfg = parse_config(raw)
        prepared = prepare(cfg, log=lambda _: None)
        pack = Pack(trial_settings(cfg, prepared.model_path, prepared.choices), prepared.data, threads=2)
        for key in ("a", "b"):
            pack.add(key, ARMS[key])
        results[checkpointing] = _train(pack, ["a", "b"], 4, 2), {k: pack.arms[k].step_losses for k in ("a", "b")}
    (evals_off, train_off), (evals_on, train_on) = results[False], results[True]
    for key in ("a", "b"):
        assert all(_close(x, y) for x, y in zip(train_off[key], train_on[key])), (train_off[key], train_on[key])
        assert all(_close(x, y) for x, y in zip(evals_off[key], evals_on[key]))


def test_trials_arriving_together_spread_over_equal_packs_by_their_number():
    from lora_rank_search.trainables.pack_server import trial_number

    assert [trial_number(f"239e2_{i:05d}") % 2 for i in range(4)] == [0, 1, 0, 1]
    assert trial_number("no-number-here") == trial_number("no-number-here") >= 0


@pytest.mark.parametrize("active, here, expected", [
    ([3, 0], 0, 1),  # after a rung the arms going on sit in pack 0: one moves to the idle pack 1
    ([1, 0], 0, 1),  # staying: 2 arms vs 0; moving: 1 vs 1
    ([1, 1], 0, None),  # staying 2 vs 1, moving 1 vs 2: no better
    ([2, 1], 0, 1),  # staying 3 vs 1, moving 2 vs 2
    ([0, 0], 0, None),  # alone: stays
    ([1, 2], 0, None),
    ([2, 0, 1], 0, 1),  # the least busy of several
    ([0, 4], 1, 0),
    ([5], 0, None),  # one pack per node (a GPU): nowhere to go
])
def test_an_arm_moves_to_a_less_busy_pack_only_when_it_balances(active, here, expected):
    from lora_rank_search.trainables.pack_server import less_busy

    # `active` counts the arms training in each pack besides the one deciding (it asks for nothing while it decides)
    assert less_busy(active, here) == expected


def test_on_a_gpu_a_number_of_arms_beyond_the_memory_estimate_packs_as_asked_with_a_warning(raw_config, monkeypatch):
    from lora_rank_search.search import resources, runner
    from lora_rank_search.search.config import parse_config

    def plan(arms_per_worker):
        cfg = parse_config(raw_config(lora={"ranks": [1, 2, 4, 8]}, train={"learning_rate": [1e-3, 3e-3]},
                                      resources={"gpus_per_trial": "auto", "arms_per_worker": arms_per_worker}))
        prepared = prepare(cfg, log=lambda _: None)
        est = runner.memory_estimate(cfg, prepared)
        device = math.ceil((est.base_weights + est.context + 2.5 * (est.adapter_and_optimizer + est.activations)) / resources.USABLE_FRACTION)
        for module in (runner, resources):
            monkeypatch.setattr(module, "local_gpu_memory", lambda: device)
        lines = []
        packs, per_trial = runner.plan_packs(cfg, prepared, {"cpu": 1, "gpu": 1.0}, lines.append)
        return packs, per_trial, lines

    packs, per_trial, lines = plan(6)
    assert packs.arms == 6 and per_trial["gpu"] == pytest.approx(1 / 6), "as asked"
    assert lines[0].startswith("warning: resources.arms_per_worker: 6 arms per pack, but the memory estimate fits 2 beside the base"), lines
    packs, _, lines = plan(2)
    assert packs.arms == 2 and not any(line.startswith("warning") for line in lines), lines
    packs, _, lines = plan("auto")
    assert packs.arms == 2 and not any(line.startswith("warning") for line in lines), lines


@pytest.fixture
def moe_setup(raw_config, tmp_path):
    """(prepared, settings) of a search over [attention, experts] on a tiny 4-bit Qwen3-MoE."""
    from lora_rank_search.trainables.tiny import build_tiny_moe

    model = build_tiny_moe(tmp_path / "moe")
    raw = raw_config(model={"name_or_path": str(model)},
                     lora={"target_modules": ["attention", "experts"], "dropout": 0.0, "alpha": 16},
                     train={"max_steps": 6, "eval_every": 3, "batch_size": 4, "learning_rate": [3e-3, 1e-2]},
                     scheduler={"type": "none"})
    cfg = parse_config(raw)
    prepared = prepare(cfg, log=lambda _: None)
    return prepared, trial_settings(cfg, prepared.model_path, prepared.choices)


@pytest.mark.slow
def test_moe_expert_weights_train_alone_and_packed_exactly_alike(moe_setup, tmp_path):
    """Expert weights are adapted as parameters (PEFT's ParamWrapper), not as layers: a trial alone
    on them failed (the pack's row routing took them for linear layers), and packed they must take
    turns, each pass applying only its own arm's delta."""
    from safetensors.torch import load_file

    prepared, settings = moe_setup
    arms = {"a": {"r": 2, "lr": 1e-2, "seed": 0, "target_choice": "attention"},
            "b": {"r": 4, "lr": 1e-2, "seed": 1, "target_choice": "experts"},
            "c": {"r": 2, "lr": 3e-2, "seed": 2, "target_choice": "experts"}}

    def train(keys, folder):
        pack = Pack(settings, prepared.data, threads=2)
        for key in keys:
            pack.add(key, arms[key])
        evals = _train(pack, keys, 6, 3)
        for key in keys:
            pack.save(key, folder / key)
        return pack, evals

    packed, packed_evals = train(list(arms), tmp_path / "packed")
    assert packed.mode == TURNS
    for key in arms:
        alone, alone_evals = train([key], tmp_path / "alone")
        losses = list(zip(packed.arms[key].step_losses + packed_evals[key], alone.arms[key].step_losses + alone_evals[key]))
        assert len(losses) == 8 and all(_close(p, a) for p, a in losses), (key, losses)
        assert alone_evals[key][-1] < alone.base_eval_loss(), "the arm learned"
        w_packed = load_file(str(tmp_path / "packed" / key / "adapter" / "adapter_model.safetensors"))
        w_alone = load_file(str(tmp_path / "alone" / key / "adapter" / "adapter_model.safetensors"))
        assert set(w_packed) == set(w_alone) and all(float((w_packed[n] - w_alone[n]).abs().max()) <= 1e-6 for n in w_alone)
    assert math.isclose(packed.base_eval_loss(), alone.base_eval_loss(), rel_tol=1e-6), "the base: no arm's delta"


def test_moe_target_choices_over_different_expert_weights_are_not_packed(raw_config, tmp_path, monkeypatch):
    import ray

    from lora_rank_search.search.runner import plan_packs
    from lora_rank_search.trainables.tiny import build_tiny_moe

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    model = build_tiny_moe(tmp_path / "moe")

    def plan(choices):
        cfg = parse_config(raw_config(model={"name_or_path": str(model)}, lora={"target_modules": choices, "dropout": 0.0},
                                      resources={"cpus_per_trial": 1, "arms_per_worker": 4}))
        lines = []
        packs, _ = plan_packs(cfg, prepare(cfg, log=lambda _: None), {"cpu": 1, "gpu": 0.0}, lines.append)
        return packs, lines

    packs, lines = plan(["experts", "all-linear"])  # all-linear on a MoE: the experts and the router
    assert packs is None and lines[0].startswith("warning: resources.arms_per_worker: 4: the target choices adapt different")
    packs, lines = plan(["attention", "experts"])
    assert packs is not None and packs.arms == 4 and "take turns" in lines[0], lines


def _variable_length_records(n: int = 300) -> list:
    import random

    from lora_rank_search.trainables.tiny import chain_records, word_list

    rng = random.Random(0)
    return [r for i in range(n) for r in chain_records(word_list(60), 1, length=rng.randint(3, 14), seed=i)]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_arms_train_as_alone_on_rows_of_different_lengths_and_a_base_with_dropout(arch, raw_config, tmp_path):
    """Packed, an arm's rows are padded to the pack's longest row, alone to its own: its LoRA
    dropout masks must not depend on that (they did: 1e-3 apart after 4 steps). GPT-2 trains with
    dropout in its own layers, drawn from the global random stream: off in every trial."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from lora_rank_search.trainables.tiny import build_tokenizer, word_list, write_jsonl

    data = write_jsonl(_variable_length_records(), tmp_path / "variable.jsonl")
    model = tmp_path / arch
    if arch == "gpt2":
        tokenizer = build_tokenizer(word_list(60) + ["user", "assistant", "system"], model)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                    pad_token_id=tokenizer.pad_token_id)).save_pretrained(model)
        over = {"model": {"name_or_path": str(model)}}
    else:
        over = {}
    cfg = parse_config(raw_config(data={"source": str(data)}, lora={"target_modules": ["attention", "mlp"], "dropout": 0.1, "alpha": 16},
                                  train={"max_steps": 4, "eval_every": 2, "batch_size": 4, "learning_rate": [1e-2]},
                                  scheduler={"type": "none"}, **over))
    prepared = prepare(cfg, log=lambda _: None)
    settings = trial_settings(cfg, prepared.model_path, prepared.choices)
    arms = {"a": {"r": 2, "lr": 1e-2, "seed": 0, "target_choice": "attention"},
            "b": {"r": 4, "lr": 1e-2, "seed": 1, "target_choice": "mlp"}}
    lengths = prepared.data.train_ids.lengths()
    assert min(lengths) < max(lengths), "rows of different lengths"

    def train(keys):
        pack = Pack(settings, prepared.data, threads=2)
        for key in keys:
            pack.add(key, arms[key])
        evals = _train(pack, keys, 4, 2)
        return {key: pack.arms[key].step_losses + evals[key] for key in keys}

    packed = train(list(arms))
    for key in arms:
        alone = train([key])[key]
        assert all(_close(p, a) for p, a in zip(packed[key], alone)), (key, packed[key], alone)


def test_a_base_with_dropout_of_its_own_is_named_at_start_up_and_turned_off():
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from lora_rank_search.search.runner import base_dropout_note
    from lora_rank_search.trainables.trial import base_dropout_off

    assert base_dropout_note(LlamaConfig()) == ""
    note = base_dropout_note(GPT2Config())
    assert note.startswith("model: the base model's own dropout (attn_pdrop 0.1, embd_pdrop 0.1, resid_pdrop 0.1) is off")
    model = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    assert base_dropout_off(model) and not base_dropout_off(model), "turned off once, nothing left"
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_peft_s_pattern_warning_on_expert_weights_is_quieted_and_the_pattern_applies(tmp_path):
    """PEFT warns that rank_pattern / alpha_pattern keys matched no targeted *module* when they name
    an expert weight (a target parameter); they do apply there, so trials and pack servers drop it."""
    import warnings

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_rank_search.trainables.lora import peft_config
    from lora_rank_search.trainables.tiny import build_tiny_moe
    from lora_rank_search.trainables.trial import quiet_libraries

    model = AutoModelForCausalLM.from_pretrained(build_tiny_moe(tmp_path / "moe"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        peft = get_peft_model(model, peft_config(4, 16.0, 0.0, ["param:down_proj", "param:gate_up_proj"]))
    assert not [w for w in caught if "pattern keys did not match" in str(w.message)]
    # 2 layers x 4 experts; down_proj (32 -> 64) at r = 4, the fused gate_up_proj (64 -> 2 x 32) at 2r = 8
    assert sum(p.numel() for p in peft.parameters() if p.requires_grad) == 2 * 4 * (4 * (32 + 64) + 8 * (64 + 64))


def test_a_packed_trial_s_client_process_loads_neither_torch_nor_transformers():
    """The client of a pack (one Tune trial per arm) only relays calls to its server: each is a
    process per arm, so what it imports is paid per arm (ray.tune alone is ~115 MiB)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from lora_rank_search.trainables.trial import lora_trial, quiet_libraries, on_this_node, process_metrics\n"
            "from lora_rank_search.trainables.pack_server import train_in_pack, node_servers, least_loaded\n"
            "from lora_rank_search.trainables.pack import next_report_step\n"
            "quiet_libraries(transformers=False)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
