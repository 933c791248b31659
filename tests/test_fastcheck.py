"""The fast path never accepts what jsonschema refuses, and accepts the common valid cases."""

from __future__ import annotations

from typing import Any

import pytest
from jsonschema import Draft4Validator, FormatChecker

from hedwig_tasks.validators.fastcheck import compile_check

ROOT: dict[str, Any] = {
    "definitions": {
        "name": {"type": "string", "minLength": 1, "maxLength": 5},
        "node": {"type": "object", "properties": {"child": {"$ref": "#/definitions/node"}}},
    }
}

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}},
    {"type": "object", "properties": {"a": {"$ref": "#/definitions/name"}}, "additionalProperties": False},
    {"type": "object", "additionalProperties": {"type": "number", "exclusiveMinimum": True, "minimum": 1}},
    {"type": "array", "items": {"type": ["string", "null"], "pattern": "^x"}, "minItems": 1, "maxItems": 2},
    {"enum": ["a", 1, None, True]},
    {"type": "string", "format": "email"},
    {"$ref": "#/definitions/node"},
]

VALUES: list[Any] = [
    {"a": 1},
    {"a": -1},
    {"a": 10},
    {"a": True},
    {"a": 1.0},
    {"a": "abc"},
    {"a": ""},
    {"a": "abcdef"},
    {"b": 1},
    {"b": 1.5},
    {"b": 1},
    {},
    ["x1"],
    ["x1", None],
    ["y"],
    [],
    ["x", "x", "x"],
    "a",
    1,
    1.0,
    None,
    True,
    False,
    "someone@example.com",
    "not-an-email",
    {"child": {"child": {}}},
    {"child": 3},
    [1, 2],
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_fast_accepts_only_what_jsonschema_accepts(schema: dict[str, Any]) -> None:
    checker = FormatChecker()
    check = compile_check(schema, ROOT, checker)
    assert check is not None
    slow = Draft4Validator({**ROOT, **schema}, format_checker=checker)
    accepted = 0
    for value in VALUES:
        if check(value):
            accepted += 1
            assert slow.is_valid(value), (schema, value)
    assert accepted > 0


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "patternProperties": {"^x": {}}},
        {"oneOf": [{"type": "string"}]},
        {"items": [{"type": "string"}]},
        {"$ref": "https://elsewhere/schema#/x"},
        {"format": "email"},
        {"type": "object", "properties": {"a": {"id": "other", "type": "string"}}},
    ],
)
def test_anything_outside_the_subset_gets_no_fast_path(schema: dict[str, Any]) -> None:
    assert compile_check(schema, ROOT, FormatChecker() if "oneOf" in schema else None) is None


def test_subclasses_and_decimals_are_checked_not_waved_through() -> None:
    import enum
    from collections import OrderedDict
    from decimal import Decimal

    class Colour(str, enum.Enum):
        RED = "a"

    cases = [
        ({"required": ["a"]}, OrderedDict()),
        ({"type": "object", "properties": {"p": {"required": ["name"]}}}, {"p": OrderedDict()}),
        ({"properties": {"n": {"minimum": 0}}}, {"n": Decimal("-1")}),
        ({"properties": {"s": {"minLength": 3}}}, {"s": Colour.RED}),
        ({"pattern": "^b"}, Colour.RED),
    ]
    for schema, value in cases:
        check = compile_check(schema, ROOT)
        assert check is not None
        assert not Draft4Validator(schema).is_valid(value)
        assert not check(value), (schema, value)
