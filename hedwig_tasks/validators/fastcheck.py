"""A fast yes-or-don't-know check for the common subset of JSON Schema draft 4.

:func:`compile_check` turns a schema into a plain Python predicate. The predicate answers
True only when the data is certainly valid; False means "not sure", and the caller then asks
``jsonschema`` itself, which stays the authority (and writes the error message). A schema using
any keyword outside the subset compiles to None: no fast path at all. So the fast path can
only ever make validation quicker, never laxer.

A keyword's guard ("does it apply to this value?") tests types the way jsonschema does
(``isinstance``), so a dict subclass or a ``Decimal`` is checked, not waved through; a
``type`` check is exact, which can only send more values to the slow path.

The subset: ``type``, ``properties``, ``required``, ``additionalProperties``, ``items`` (one
schema), ``enum`` of scalars, ``minLength``/``maxLength``, ``pattern``, ``minimum``/``maximum``
(with draft 4's boolean ``exclusive*``), ``minItems``/``maxItems``, ``format`` (through the
same format checker), and ``$ref`` to
``#/definitions/...`` in the same file. Annotations (``description``, ``x-*``, ...) are ignored.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Check", "compile_check"]

Check = Callable[[Any], bool]

_ANNOTATIONS = frozenset({"description", "title", "default", "examples", "$schema", "$comment"})
_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: type(v) is dict,
    "array": lambda v: type(v) is list,
    "string": lambda v: type(v) is str,
    "integer": lambda v: type(v) is int,
    "number": lambda v: type(v) is int or type(v) is float,
    "boolean": lambda v: type(v) is bool,
    "null": lambda v: v is None,
}


class _Unsupported(Exception):
    """The schema uses something outside the subset."""


def compile_check(schema: Any, root: Mapping[str, Any], format_checker: Any = None) -> Check | None:
    """A predicate that is True only for data certainly valid against ``schema``, or None.

    ``format_checker`` is the ``jsonschema.FormatChecker`` the slow path uses; without one a
    schema using ``format`` gets no fast path.
    """
    try:
        return _Compiler(root, format_checker).compile(schema)
    except _Unsupported:
        return None


class _Compiler:
    def __init__(self, root: Mapping[str, Any], format_checker: Any) -> None:
        self.root = root
        self.format_checker = format_checker
        self.refs: dict[str, Check] = {}

    def compile(self, schema: Any) -> Check:
        if not isinstance(schema, Mapping):
            raise _Unsupported
        if "$ref" in schema:
            return self._ref(schema["$ref"])
        keywords = {key: value for key, value in schema.items() if not _ignored(key)}
        fused = self._fused(keywords, schema)
        if fused is not None:
            return fused
        found = [self._keyword(key, value, schema) for key, value in keywords.items()]
        checks = [c for c in found if c is not None]
        if not checks:
            return lambda value: True
        if len(checks) == 1:
            return checks[0]
        return _all_of(tuple(checks))

    def _fused(self, keywords: Mapping[str, Any], schema: Mapping[str, Any]) -> Check | None:
        """One function for the usual shapes, an object or a string with its usual keywords, instead of
        one per keyword (each keeping its guard for the other types); None for any other shape.

        Each keyword is compiled as alone (so checked the same), and the type is tested once up front:
        past it, every guard would pass.
        """
        kind = keywords.get("type")
        if kind == "object" and keywords.keys() <= _OBJECT_KEYWORDS:
            self._k_required(keywords.get("required", []), schema)  # refuses what it refuses alone
            required = frozenset(keywords.get("required", ()))
            props = keywords.get("properties", {})
            if not isinstance(props, Mapping):
                raise _Unsupported
            compiled = tuple((name, self.compile(sub)) for name, sub in props.items())
            extra = None
            if "additionalProperties" in keywords:
                extra = self._k_additionalProperties(keywords["additionalProperties"], schema)
            return _object(required, compiled, extra)
        if kind == "string" and keywords.keys() <= _STRING_KEYWORDS:
            low, high = keywords.get("minLength", 0), keywords.get("maxLength")
            pattern = keywords.get("pattern")
            search = None if pattern is None else self._k_pattern(pattern, schema)
            return _string(low, high, search)
        return None

    def _ref(self, ref: Any) -> Check:
        if not isinstance(ref, str) or not ref.startswith("#/definitions/") or "~" in ref or "%" in ref:
            raise _Unsupported
        if ref not in self.refs:
            self.refs[ref] = lambda value: False  # a cycle resolves to "not sure"
            target: Any = self.root
            for part in ref[2:].split("/"):
                if not isinstance(target, Mapping) or part not in target:
                    raise _Unsupported
                target = target[part]
            self.refs[ref] = self.compile(target)
        cache = self.refs
        return lambda value: cache[ref](value)

    def _keyword(self, key: str, value: Any, schema: Mapping[str, Any]) -> Check | None:
        method = getattr(self, "_k_" + key.replace("$", ""), None)
        if method is None:
            raise _Unsupported
        check: Check | None = method(value, schema)
        return check

    def _k_type(self, value: Any, schema: Mapping[str, Any]) -> Check:
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not all(n in _TYPES for n in names):
            raise _Unsupported
        tests = tuple(_TYPES[n] for n in names)
        return tests[0] if len(tests) == 1 else _any_of(tests)

    def _k_properties(self, value: Any, schema: Mapping[str, Any]) -> Check:
        if not isinstance(value, Mapping):
            raise _Unsupported
        compiled = tuple((name, self.compile(sub)) for name, sub in value.items())

        def properties(v: Any) -> bool:
            if not isinstance(v, dict):
                return True
            for name, check in compiled:
                if name in v and not check(v[name]):
                    return False
            return True

        return properties

    def _k_required(self, value: Any, schema: Mapping[str, Any]) -> Check:
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
            raise _Unsupported
        names = frozenset(value)
        return lambda v: not isinstance(v, dict) or names <= v.keys()

    def _k_additionalProperties(self, value: Any, schema: Mapping[str, Any]) -> Check | None:
        if "patternProperties" in schema:
            raise _Unsupported
        known = frozenset(schema.get("properties", {}))
        if value is True:
            return None
        if value is False:
            return lambda v: not isinstance(v, dict) or known.issuperset(v)
        extra = self.compile(value)
        return lambda v: not isinstance(v, dict) or all(k in known or extra(item) for k, item in v.items())

    def _k_items(self, value: Any, schema: Mapping[str, Any]) -> Check:
        if not isinstance(value, Mapping):
            raise _Unsupported  # the tuple form
        item = self.compile(value)

        def items(v: Any) -> bool:
            if not isinstance(v, list):
                return True
            for x in v:
                if not item(x):
                    return False
            return True

        return items

    def _k_enum(self, value: Any, schema: Mapping[str, Any]) -> Check:
        if not isinstance(value, list) or not all(type(x) in (str, int, float, bool) or x is None for x in value):
            raise _Unsupported
        allowed = [(type(x), x) for x in value]
        return lambda v: (type(v), v) in allowed

    def _k_minLength(self, value: Any, schema: Mapping[str, Any]) -> Check:
        return lambda v: not isinstance(v, str) or len(v) >= value

    def _k_maxLength(self, value: Any, schema: Mapping[str, Any]) -> Check:
        return lambda v: not isinstance(v, str) or len(v) <= value

    def _k_minItems(self, value: Any, schema: Mapping[str, Any]) -> Check:
        return lambda v: not isinstance(v, list) or len(v) >= value

    def _k_maxItems(self, value: Any, schema: Mapping[str, Any]) -> Check:
        return lambda v: not isinstance(v, list) or len(v) <= value

    def _k_pattern(self, value: Any, schema: Mapping[str, Any]) -> Check:
        try:
            search = re.compile(value).search
        except (re.error, TypeError):
            raise _Unsupported from None
        return lambda v: not isinstance(v, str) or search(v) is not None

    def _k_minimum(self, value: Any, schema: Mapping[str, Any]) -> Check:
        exclusive = schema.get("exclusiveMinimum", False) is True
        return lambda v: not _is_number(v) or (v > value if exclusive else v >= value)

    def _k_maximum(self, value: Any, schema: Mapping[str, Any]) -> Check:
        exclusive = schema.get("exclusiveMaximum", False) is True
        return lambda v: not _is_number(v) or (v < value if exclusive else v <= value)

    def _k_exclusiveMinimum(self, value: Any, schema: Mapping[str, Any]) -> None:
        if not isinstance(value, bool):
            raise _Unsupported  # draft 6's numeric form

    _k_exclusiveMaximum = _k_exclusiveMinimum

    def _k_format(self, value: Any, schema: Mapping[str, Any]) -> Check:
        if self.format_checker is None or not isinstance(value, str):
            raise _Unsupported
        conforms = self.format_checker.conforms
        return lambda v: bool(conforms(v, value))


_OBJECT_KEYWORDS = frozenset({"type", "required", "properties", "additionalProperties"})
_STRING_KEYWORDS = frozenset({"type", "minLength", "maxLength", "pattern"})


def _object(required: frozenset[str], properties: tuple[tuple[str, Check], ...], extra: Check | None) -> Check:
    def check(value: Any) -> bool:
        if type(value) is not dict or not required <= value.keys():
            return False
        for name, one in properties:
            if name in value and not one(value[name]):
                return False
        return extra is None or extra(value)

    return check


def _string(low: Any, high: Any, search: Check | None) -> Check:
    def check(value: Any) -> bool:
        if type(value) is not str or len(value) < low or (high is not None and len(value) > high):
            return False
        return search is None or search(value)

    return check


def _all_of(checks: tuple[Check, ...]) -> Check:
    # loops, not all() over a generator: this runs for every message published and received
    def check(value: Any) -> bool:
        for one in checks:
            if not one(value):
                return False
        return True

    return check


def _any_of(checks: tuple[Check, ...]) -> Check:
    def check(value: Any) -> bool:
        for one in checks:
            if one(value):
                return True
        return False

    return check


def _is_number(value: Any) -> bool:
    """Whether a keyword for numbers applies: jsonschema's draft 4 "number" (bools excluded)."""
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _ignored(key: str) -> bool:
    return key in _ANNOTATIONS or key.startswith("x-")
