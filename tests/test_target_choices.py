"""Target choices as a search dimension, without Ray: parsing and bad input, the param space, trial
names, start-up resolution, and one cost for every place that shows it (start-up lines, the trial's
own count, `lora-rank params`)."""

from __future__ import annotations

import re

import pytest

from lora_rank_search.contract import layout
from lora_rank_search.contract.arms import arm_of, unit_of
from lora_rank_search.search.config import ConfigError, parse_config, target_choices
from lora_rank_search.search.runner import describe_choices, prepare
from lora_rank_search.search.space import num_trials, param_space, trial_settings

CHOICES = ["attention", "mlp", "all-linear"]


@pytest.mark.parametrize("spec, expected", [
    ("attention", [("attention", "attention")]),
    (["q_proj", "v_proj"], [("q_proj+v_proj", ("q_proj", "v_proj"))]),  # a flat list of names: one explicit choice
    (CHOICES, [(c, c) for c in CHOICES]),
    ([["q_proj", "v_proj"], "all-linear"], [("q_proj+v_proj", ("q_proj", "v_proj")), ("all-linear", "all-linear")]),
])
def test_one_choice_or_a_list_of_choices(spec, expected):
    cfg = parse_config({"lora": {"target_modules": spec}})
    assert target_choices(cfg) == expected
    assert parse_config(cfg.to_dict()) == cfg, "round-trips through plain data"


@pytest.mark.parametrize("spec, message", [
    (["attention", "q_proj"], "lora.target_modules[1]: in a list of target choices each is a preset (attention-qv | attention | "
                              "mlp | experts | all-linear) or a list of module names (write [q_proj] for one module), got 'q_proj'"),
    (["attention", "atention"], "lora.target_modules[1]: in a list of target choices each is a preset"),
    ([], "lora.target_modules: an explicit list must name at least one module, got []"),
    ([[], "mlp"], "lora.target_modules[0]: an explicit list must name at least one module, got []"),
    (["mlp", "attention", "mlp"], "lora.target_modules[2]: duplicate target choice 'mlp'"),
    ([["q_proj", "v_proj"], ["q_proj", "v_proj"]], "lora.target_modules[1]: duplicate target choice 'q_proj+v_proj'"),
    ([["q_proj", 3], "mlp"], "lora.target_modules[0][1]: expected a string, got 3"),
])
def test_bad_choices_are_named_with_the_field_and_the_value(spec, message):
    with pytest.raises(ConfigError) as caught:
        parse_config({"lora": {"target_modules": spec}})
    assert any(p.startswith(message) for p in caught.value.problems), caught.value.problems


def test_the_param_space_has_a_choice_dimension_only_with_several_choices():
    one = param_space(parse_config({}))
    assert "target_choice" not in one and one["target_preset"] == "attention", "one choice: as before"
    several = parse_config({"lora": {"target_modules": CHOICES, "ranks": [2, 4]}, "train": {"learning_rate": [1e-3, 3e-3]}})
    space = param_space(several)
    assert space["target_choice"] == {"grid_search": CHOICES} and "target_preset" not in space
    assert num_trials(several) == 3 * 2 * 2


def test_trial_names_and_folders_carry_the_choice_and_parse_back():
    plain = {"r": 8, "lr": 3e-4, "seed": 0}
    assert layout.trial_name(plain) == "r8-lr3e-4-seed0" and layout.trial_dirname(plain, "x_1") == "r0008_lr3e-4_seed0_x_1"
    for choice in ("mlp", "attention-qv", "q_proj+v_proj", "all-linear"):
        config = {**plain, "target_choice": choice}
        assert layout.trial_name(config) == f"{choice}-r8-lr3e-4-seed0"
        parsed = layout.parse_trial_dirname(layout.trial_dirname(config, "abc_00001"))
        assert parsed == {"r": 8, "lr": 3e-4, "seed": 0, "trial_id": "abc_00001", "target_choice": choice}
    assert layout.parse_trial_dirname("r0008_lr3e-4_seed0_x_1")["target_choice"] == ""
    assert unit_of(plain) == ("", 8) and unit_of({**plain, "target_choice": "mlp"}) == ("mlp", 8)
    assert arm_of({**plain, "target_choice": "mlp"})[:3] == ("mlp", 8, 3e-4)  # then any further nuisance (None: not searched)


def test_choices_are_resolved_at_start_up_and_trials_pick_their_own(raw_config):
    cfg = parse_config(raw_config(lora={"target_modules": [*CHOICES, ["q_proj", "v_proj"]], "ranks": [2, 4]}))
    prepared = prepare(cfg, log=lambda _: None)
    assert prepared.choices == {
        "attention": ["k_proj", "o_proj", "q_proj", "v_proj"], "mlp": ["down_proj", "gate_proj", "up_proj"],
        "all-linear": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
        "q_proj+v_proj": ["q_proj", "v_proj"]}
    settings = trial_settings(cfg, prepared.model_path, prepared.choices)
    assert settings.targets_for({"r": 2, "target_choice": "mlp"}) == ("down_proj", "gate_proj", "up_proj")
    with pytest.raises(KeyError, match="'experts' is not one of this search's"):
        settings.targets_for({"r": 2, "target_choice": "experts"})
    single = trial_settings(cfg, prepared.model_path, prepared.targets)
    assert single.targets_for({"r": 2}) == tuple(prepared.choices["attention"]) and single.choices == ()


def test_a_choice_the_model_lacks_is_named_by_its_index(raw_config):
    with pytest.raises(ConfigError) as caught:
        prepare(parse_config(raw_config(lora={"target_modules": ["mlp", ["q_proj", "qkv"]]})), log=lambda _: None)
    assert any(p.startswith("lora.target_modules[1]: 'qkv' not found") for p in caught.value.problems), caught.value.problems


def test_one_cost_everywhere_start_up_the_trial_and_the_calculator(raw_config, tiny_model, capsys):
    """The verdict compares trials' trainable_params: the count of the model a trial builds. It must
    equal the start-up lines and `lora-rank params` for the same presets and ranks."""
    from lora_rank_search.search.cli import main
    from lora_rank_search.trainables.trial import build_model

    cfg = parse_config(raw_config(lora={"target_modules": CHOICES, "ranks": [2, 4]}))
    prepared = prepare(cfg, log=lambda _: None)
    lines = describe_choices(prepared)
    startup = {}
    for line in lines:  # "  mlp: down_proj, gate_proj, up_proj (trainable params r=2: 1,536, r=4: 3,072)"
        choice = line.split(":")[0].strip()
        for r, n in re.findall(r"r=(\d+): ([\d,]+)", line):
            startup[(choice, int(r))] = int(n.replace(",", ""))
    settings = trial_settings(cfg, prepared.model_path, prepared.choices)
    built = {}
    for choice in CHOICES:
        for r in (2, 4):
            model = build_model(settings, r, "cpu", settings.targets_for({"r": r, "target_choice": choice}))
            built[(choice, r)] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert startup == built
    assert main(["params", tiny_model, "--ranks", "2", "4", "--targets", *CHOICES]) == 0
    table = capsys.readouterr().out
    printed = {(row.split()[0], int(row.split()[1])): int(row.split()[3].replace(",", "")) for row in table.splitlines()
               if row.split() and row.split()[0] in CHOICES and len(row.split()) > 3 and row.split()[1].isdigit()}
    assert printed == built
