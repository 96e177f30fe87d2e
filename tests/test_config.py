"""Config schema: strict parsing, every problem at once, overrides, shipped configs."""

from __future__ import annotations

import glob
import os

import pytest
import yaml

from lora_rank_search.search.config import (
    README_MARKERS,
    ConfigError,
    SearchConfig,
    apply_overrides,
    describe_schema,
    load_config,
    parse_config,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def problems(raw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return info.value.problems


def test_defaults_parse_and_round_trip():
    cfg = parse_config({})
    assert isinstance(cfg, SearchConfig)
    again = parse_config(cfg.to_dict())
    assert again == cfg
    assert cfg.lora.alpha == 16.0 and cfg.train.seeds == (0,)
    assert cfg.train.learning_rate == (1e-4, 3e-4, 1e-3), "a 10x span by default (bench/alpha_lr.py)"


def test_every_problem_is_reported_at_once_with_field_and_value():
    found = problems(
        {
            "lora": {"ranks": [4, 0, -2, 4, 2.5], "alpha": "3r", "dropout": 1.0, "bogus": 1},
            "train": {"batch_size": 0, "max_steps": 100, "eval_every": 200},
            "scheduler": {"reduction_factor": 1},
            "resources": {"gpus_per_trial": 1.5},
        }
    )
    text = "\n".join(found)
    # type errors are reported first (a rank of 2.5 is not an integer) ...
    assert "lora.ranks[4]: expected an integer, got 2.5" in text
    assert "lora.bogus: unknown key" in text
    # ... and once the types are right, every range problem at once
    found = problems(
        {
            "lora": {"ranks": [4, 0, -2, 4], "alpha": "3r", "dropout": 1.0},
            "train": {"batch_size": 0, "max_steps": 100, "eval_every": 200},
            "scheduler": {"reduction_factor": 1},
            "resources": {"gpus_per_trial": 1.5},
        }
    )
    text = "\n".join(found)
    for expected in (
        "lora.ranks[1]: rank must be a positive integer, got 0",
        "lora.ranks[2]: rank must be a positive integer, got -2",
        "lora.ranks[3]: duplicate rank 4",
        "lora.alpha: must be a number or one of r | 2r | rslora, got '3r'",
        "lora.dropout: must be in [0, 1), got 1.0",
        "train.batch_size: must be a positive integer, got 0",
        "train.eval_every: must be <= train.max_steps (100), got 200",
        "scheduler.reduction_factor: must be >= 2, got 1.0",
        "resources.gpus_per_trial: above 1 it must be a whole number of GPUs, got 1.5",
    ):
        assert expected in text
    assert len(found) == 9


def test_unknown_top_level_and_section_keys_are_errors():
    found = problems({"nmae": "x", "model": {"name": "y"}})
    assert any(p.startswith("nmae: unknown key") for p in found)
    assert any(p.startswith("model.name: unknown key") and "name_or_path" in p for p in found)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"lora": {"ranks": "8"}}, "lora.ranks: expected a list, got '8'"),
        ({"lora": {"ranks": [8, "x"]}}, "lora.ranks[1]: expected an integer, got 'x'"),
        ({"train": {"learning_rate": "fast"}}, "train.learning_rate: expected a number, got 'fast'"),
        ({"model": {"trust_remote_code": "yes"}}, "model.trust_remote_code: expected true or false, got 'yes'"),
        ({"train": "x"}, "train: expected a mapping of keys, got 'x'"),
        ({"lora": {"ranks": None}}, "lora.ranks: a value is required, got null"),
    ],
)
def test_type_errors_name_field_and_value(raw, expected):
    assert expected in problems(raw)


def test_numbers_written_as_strings_and_bare_exponents_parse():
    cfg = parse_config(yaml.safe_load("train: {learning_rate: 2e-4}\nlora: {alpha: 16}"))
    assert cfg.train.learning_rate == pytest.approx(2e-4)
    assert cfg.lora.alpha == 16.0
    assert parse_config({"resources": {"gpus_per_trial": "0.25"}}).resources.gpus_per_trial == 0.25


def test_yaml_words_read_as_booleans_mean_the_choice_they_spell(tmp_path):
    """YAML 1.1 reads `off`/`on`/`no`/`yes` as booleans: a choice field spelled that way takes the
    word, in the file and in --set; a boolean where no such word is a choice is still refused."""
    path = tmp_path / "c.yaml"
    path.write_text("scheduler: {confirm: off}\n")
    assert load_config(str(path), []).scheduler.confirm == "off"
    assert load_config(str(path), ["scheduler.confirm=tail"]).scheduler.confirm == "tail"
    assert load_config(str(path), ["scheduler.confirm=OFF"]).scheduler.confirm == "off"
    assert problems({"scheduler": {"confirm": True}}) == ["scheduler.confirm: must be one of off | tail | full, got True"]
    assert problems({"scheduler": {"type": False}})[0].startswith("scheduler.type: must be one of")


def test_overrides_apply_nested_values_parsed_as_yaml():
    errors: list[str] = []
    raw = apply_overrides({"lora": {"dropout": 0.1}}, ["lora.ranks=[4, 8]", "train.max_steps=50", "name=x", "bad"], errors)
    assert raw["lora"] == {"dropout": 0.1, "ranks": [4, 8]}
    assert raw["train"]["max_steps"] == 50 and raw["name"] == "x"
    assert errors == ["--set bad: expected key.sub=value"]


def test_load_config_collects_override_and_schema_problems(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora: {ranks: [4]}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["lora.ranks=[]", "oops"])
    assert "--set oops: expected key.sub=value" in info.value.problems
    assert "lora.ranks: must list at least one rank, got []" in info.value.problems


def test_unreadable_and_invalid_yaml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_relative_paths_become_absolute_hub_ids_and_uris_do_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text("")
    cfg = parse_config(
        {"storage_path": "runs", "model": {"name_or_path": "org/model"}, "data": {"source": "data.jsonl"}}, base_dir=tmp_path
    )
    assert cfg.storage_path == str(tmp_path / "runs")
    assert cfg.model.name_or_path == "org/model"
    assert cfg.data.source == str(tmp_path / "data.jsonl")
    assert parse_config({"storage_path": "s3://bucket/runs"}).storage_path == "s3://bucket/runs"


def test_schema_table_lists_every_key():
    table = describe_schema()
    for key in ("`lora.ranks`", "`train.eval_every`", "`scheduler.grace_period`", "`resources.gpus_per_trial`"):
        assert key in table


def _search_configs() -> list[str]:
    """Every configs/**/*.yaml except the listed Ray cluster launcher configs, which
    tests/test_cluster_config.py checks against Ray's schema (an unlisted one fails here)."""
    from test_cluster_config import CLUSTER_CONFIGS

    cluster = {os.path.join(ROOT, rel) for rel in CLUSTER_CONFIGS}
    return [p for p in sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)) if p not in cluster]


SHIPPED = _search_configs()


def test_there_are_shipped_configs():
    assert any(p.endswith("quickstart.yaml") for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_shipped_search_config_parses(path):
    load_config(path)
    with open(path) as handle:
        first = handle.readline()
    assert first.startswith("# lora-rank search"), "example configs start with the command that runs them"


def test_readme_config_and_metrics_references_match_the_code():
    from lora_rank_search.search.config import readme_blocks

    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = readme_blocks()
    assert blocks[README_MARKERS] == describe_schema()
    for (start, end), body in blocks.items():
        assert start in text and end in text, f"README lacks the {start} block"
        block = text.split(start, 1)[1].split(end, 1)[0].strip()
        assert block == body, f"README block {start} is stale: run `make docs`"
