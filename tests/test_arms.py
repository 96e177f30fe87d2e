"""The typed Arm (contract.arms): one declaration names trials and folders, groups them, keys the verdict."""

from __future__ import annotations

import dataclasses

import pytest

from lora_rank_search.contract.arms import (ARM_KEYS, CHOICE_KEY, DIMENSIONS, NUISANCE, NUISANCE_KEYS, REPLICATE_KEY, UNIT_KEYS, Arm, arm_of,
                           describe_nuisance, unit_of, with_arm)
from lora_rank_search.contract.layout import parse_trial_dirname, trial_dirname, trial_name


def test_roles_are_read_from_the_fields():
    assert UNIT_KEYS == (CHOICE_KEY, "r")
    assert NUISANCE_KEYS[0] == "lr"
    assert REPLICATE_KEY == "seed"
    assert ARM_KEYS == UNIT_KEYS + NUISANCE_KEYS
    assert [f.name for f in DIMENSIONS] == [*UNIT_KEYS, *NUISANCE_KEYS, REPLICATE_KEY], "names: units, nuisance, replicate"


@pytest.mark.parametrize("config", [
    {"r": 8, "lr": 3e-4, "seed": 0},
    {"r": 16, "lr": 1e-3, "seed": 2, CHOICE_KEY: "mlp"},
    {"r": 1, "lr": 5e-5, "seed": 0, CHOICE_KEY: "q_proj+v_proj"},
])
def test_a_folder_name_reads_back_as_its_arm(config):
    parsed = parse_trial_dirname(trial_dirname(config, "abc_00001"))
    assert parsed["trial_id"] == "abc_00001"
    assert Arm(**{k: v for k, v in parsed.items() if k != "trial_id"}) == Arm.of(config)
    assert trial_name(config).count("-") >= 2


def test_names_and_folders_are_those_of_earlier_searches():
    plain = {"r": 8, "lr": 3e-4, "seed": 0, "alpha_rule": "2r"}
    assert trial_name(plain) == "r8-lr3e-4-seed0"
    assert trial_dirname(plain, "x_1") == "r0008_lr3e-4_seed0_x_1"
    assert trial_dirname({**plain, CHOICE_KEY: "mlp"}, "x_1") == "mlp_r0008_lr3e-4_seed0_x_1"
    old = parse_trial_dirname("r0008_seed0_x_1")  # before learning-rate lists
    assert (old["r"], old["lr"], old["seed"], old[CHOICE_KEY]) == (8, None, 0, "")
    assert parse_trial_dirname("not-a-trial") is None


def test_units_and_arms_group_trials():
    a = {"r": 8.0, "lr": 3e-4, "seed": 0}
    b = {"r": 8, "lr": 3e-4, "seed": 1}
    c = {"r": 8, "lr": 1e-3, "seed": 0}
    assert unit_of(a) == unit_of(b) == unit_of(c) == ("", 8)
    assert arm_of(a) == arm_of(b) != arm_of(c)


def test_an_arms_nuisance_goes_into_the_config_it_was_trained_with():
    config = {"lora": {"ranks": [8]}, "train": {"learning_rate": [1e-4, 3e-4]}}
    assert with_arm(config, {"lr": 3e-4})["train"]["learning_rate"] == 3e-4
    assert config["train"]["learning_rate"] == [1e-4, 3e-4], "the caller's config is left alone"
    assert describe_nuisance({"lr": 3e-4}) == "lr 3e-4"


def test_trial_settings_take_the_arms_nuisance():
    from lora_rank_search.contract.config import LoraConfig, ModelConfig, QuantizationConfig, TrainConfig, TrialSettings

    settings = TrialSettings(model_path="m", model=ModelConfig(), quantization=QuantizationConfig(), lora=LoraConfig(),
                             train=TrainConfig(learning_rate=(1e-4, 3e-4)), targets=("q_proj",))
    assert settings.for_arm({"lr": 3e-4}).train.learning_rate == 3e-4
    assert settings.for_arm({}).train.learning_rate == 1e-4, "no arm: the first value"
    for f in DIMENSIONS:
        if f.metadata["role"] == NUISANCE:
            section, key = f.metadata["source"].split(".")
            assert key in {x.name for x in dataclasses.fields(getattr(settings, section))}, f"{f.name}: its source field exists"


def test_the_param_space_has_one_grid_per_dimension(raw_config):
    from lora_rank_search.search.config import parse_config
    from lora_rank_search.search.space import num_trials, param_space

    cfg = parse_config(raw_config(train={"learning_rate": [1e-3, 3e-3], "seeds": [0, 1]}))
    space = param_space(cfg)
    assert list(space)[:3] == ["r", "lr", "seed"]
    assert CHOICE_KEY not in space and space["target_preset"] == "all-linear"
    assert num_trials(cfg) == 4 * 2 * 2
    several = parse_config(raw_config(lora={"target_modules": ["attention", "mlp"]}))
    assert space_values(param_space(several)[CHOICE_KEY]) == ["attention", "mlp"]
    assert space_values(param_space(several)["r"]) == [32, 16, 2, 1], "largest rank first"


def space_values(grid) -> list:
    return list(grid["grid_search"])
