"""The fast path never accepts what jsonschema refuses, and accepts the common valid cases."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import SCHEMA_FILE
from jsonschema import Draft4Validator, FormatChecker

from hedwig_tasks import DecodeError
from hedwig_tasks.validators.fastcheck import compile_check
from hedwig_tasks.validators.jsonschema import JSONSchemaValidator

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
    {  # the fused shapes: an object, and a string with its length and pattern
        "type": "object",
        "required": ["s"],
        "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 3, "pattern": "^x"}},
        "additionalProperties": False,
    },
    {"type": "object", "properties": {"n": {"type": "integer"}}, "additionalProperties": {"type": "string"}},
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
    {"s": "xy"},
    {"s": "x"},
    {"s": "xyzw"},
    {"s": "yy"},
    {"s": 12},
    {"s": "xy", "t": 1},
    {"n": 1, "t": "u"},
    {"n": 1, "t": 2},
    {"n": "1"},
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
        ({"type": "string", "minLength": 2}, Colour.RED),
        ({"type": "object", "required": ["a"]}, OrderedDict()),
    ]
    for schema, value in cases:
        check = compile_check(schema, ROOT)
        assert check is not None
        assert not Draft4Validator(schema).is_valid(value)
        assert not check(value), (schema, value)


@pytest.mark.parametrize("fast", [pytest.param(True, id="fast-path"), pytest.param(False, id="jsonschema-only")])
def test_a_newer_minor_meets_the_same_checks_with_or_without_the_fast_path(fast: bool) -> None:
    """The fast check is compiled per major, so it serves every minor; a strict validator refuses first."""
    schema = json.loads(SCHEMA_FILE.read_text())
    if not fast:
        schema["schemas"]["user-created"]["1.*"]["oneOf"] = [{"type": "object"}]  # outside the subset
    default, strict = JSONSchemaValidator(schema), JSONSchemaValidator(schema, strict_minor=True)
    assert (default._fast[("user-created", 1)] is not None) is fast
    attributes = {
        "hedwig_format_version": "1.0",
        "hedwig_id": "i",
        "hedwig_message_timestamp": "1",
        "hedwig_publisher": "p",
        "hedwig_schema": f"{schema['id']}#/schemas/user-created/1.9",
    }
    valid, invalid = b'{"user_id":"U","profile":{"name":"Ada"}}', b'{"user_id":"U","profile":{"name":7}}'
    assert default.decode(valid, attributes).data == {"user_id": "U", "profile": {"name": "Ada"}}
    with pytest.raises(DecodeError, match=r"user-created 1\.9: data\.profile\.name: 7 is not of type 'string'"):
        default.decode(invalid, attributes)
    with pytest.raises(DecodeError, match=r"minor version 9 is newer .* strict_minor is set"):
        strict.decode(valid, attributes)
