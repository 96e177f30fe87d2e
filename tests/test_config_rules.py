"""Each config field carries its own rules (contract.config `_doc` metadata and its type): every
rule the schema declares is enforced, under the field's own name, so renaming a field cannot drop
its check. The cases are generated from the schema, not listed by hand."""

from __future__ import annotations

import typing

import pytest

from lora_rank_search.contract.config import schema_fields
from lora_rank_search.search.config import ConfigError, parse_config

FIELDS = list(schema_fields())


def _raw(dotted: str, value) -> dict:
    raw: dict = {}
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return raw


def _problems(dotted: str, value) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(_raw(dotted, value))
    return [p for p in caught.value.problems if p.startswith(dotted)]


def _options(tp) -> tuple:
    args = typing.get_args(tp) if typing.get_origin(tp) is typing.Union else (tp,)
    return args


@pytest.mark.parametrize("dotted", [d for d, f, _ in FIELDS if f.metadata.get("limit")])
def test_a_value_above_the_fields_limit_is_refused(dotted):
    limit = dict((d, f) for d, f, _ in FIELDS)[dotted].metadata["limit"]
    assert any("can be meant" in p for p in _problems(dotted, limit + 1))


@pytest.mark.parametrize("dotted", [d for d, f, _ in FIELDS if f.metadata.get("path")])
def test_a_path_field_refuses_what_the_filesystem_refuses(dotted):
    assert any("NUL byte" in p for p in _problems(dotted, "a\x00b"))


@pytest.mark.parametrize("dotted,allowed", [(d, typing.get_args(o)) for d, _, tp in FIELDS for o in _options(tp)
                                            if typing.get_origin(o) is typing.Literal])
def test_a_value_outside_the_fields_literal_is_refused(dotted, allowed):
    assert any(f"must be one of {' | '.join(allowed)}" in p for p in _problems(dotted, "no-such-value"))
    parse_config(_raw(dotted, allowed[-1]))  # every listed value is accepted


@pytest.mark.parametrize("dotted,element", [(d, typing.get_args(o)[0]) for d, _, tp in FIELDS for o in _options(tp)
                                            if typing.get_origin(o) is tuple and typing.get_args(o)])
def test_a_list_fields_elements_are_typed(dotted, element):
    assert any(p.startswith(f"{dotted}[1]: expected") for p in _problems(dotted, [1, "word"]))


def test_the_rules_are_declared_where_expected():
    declared = {d for d, f, _ in FIELDS if f.metadata.get("limit") or f.metadata.get("path")}
    assert {"train.batch_size", "data.max_seq_len", "name", "storage_path", "data.source"} <= declared
