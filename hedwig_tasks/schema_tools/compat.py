"""Is a change of a Hedwig JSON-Schema file compatible, type by type and major by major?

Hedwig's consumers validate every message against their own schema of its major, whatever its
minor, and services deploy in any order, so within one major a change must work both ways:

- *forward*: old consumers read new messages (everything valid under NEW is valid under OLD);
- *backward*: new consumers read old messages (everything valid under OLD is valid under NEW).

:func:`check_json` compares the schema of each (type, major) keyword by keyword, following
local ``$ref``\\ s, and tags each change with the directions it breaks: a removed or retyped
property, a new required property, optional made required or back, an enum, range, length,
pattern or format narrowed or widened, a property added to a closed object
(``additionalProperties: false``), a closed object opened or an open one closed. An optional
property added to an open object breaks nothing. A keyword it does not analyse (``allOf``,
``patternProperties``...) that changed counts as breaking both ways. ``x-version`` must go up
when anything but a title, description, default or example changed, never go down, and keep
its major. A removed type or major is a violation; a new one beside the old is not.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from hedwig_tasks.message import Version
from hedwig_tasks.schema_tools.findings import BACKWARD, BOTH, FORWARD, VERSION, Finding, Report

__all__ = ["ANNOTATIONS", "check_json", "compare_schemas", "pointer"]

#: Keywords that change no message's validity, so no version needs to go up for them.
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "x-version"})
_LOWER = ("minimum", "minLength", "minItems", "minProperties")
_UPPER = ("maximum", "maxLength", "maxItems", "maxProperties")
_CONSTRAINTS = ("pattern", "format", "multipleOf")
_ANALYSED = frozenset(
    {"$ref", "type", "enum", "const", "properties", "required", "additionalProperties", "items", "uniqueItems"}
    | {"exclusiveMinimum", "exclusiveMaximum", *_LOWER, *_UPPER, *_CONSTRAINTS}
)
#: How many ``$ref`` hops a chain may take before it counts as a loop.
_MAX_REF_HOPS = 64
_BOTH = (BACKWARD, FORWARD)


def pointer(*parts: str) -> str:
    """A JSON pointer (RFC 6901) of ``parts``."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _resolve(schema: Any, doc: Mapping[str, Any]) -> Any:
    """``schema`` with local ``$ref``\\ s followed (a remote or broken one is left as it is)."""
    for _ in range(_MAX_REF_HOPS):
        ref = schema.get("$ref") if isinstance(schema, Mapping) else None
        if not isinstance(ref, str) or not ref.startswith("#"):
            return schema
        target: Any = doc
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, Mapping) or part not in target:
                return schema
            target = target[part]
        schema = target
    return schema


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _types(schema: Mapping[str, Any]) -> set[str] | None:
    kind = schema.get("type")
    if kind is None:
        return None
    return {kind} if isinstance(kind, str) else set(kind)


def _covers(wide: set[str] | None, narrow: set[str] | None) -> bool:
    if wide is None:
        return True
    if narrow is None:
        return False
    return all(t in wide or (t == "integer" and "number" in wide) for t in narrow)


def _direction(narrowed: bool, widened: bool) -> tuple[str, ...]:
    """Tightening breaks new consumers of old messages; loosening, old consumers of new ones."""
    if narrowed and widened:
        return _BOTH
    return (BACKWARD,) if narrowed else (FORWARD,) if widened else ()


class _Differ:
    """Walks two schemas of one (type, major) side by side and yields what changed."""

    def __init__(self, old_doc: Mapping[str, Any], new_doc: Mapping[str, Any], type_: str, version: str) -> None:
        self.old_doc, self.new_doc = old_doc, new_doc
        self.type, self.version = type_, version
        self._seen: set[tuple[int, int]] = set()

    def _finding(self, where: str, message: str, breaks: tuple[str, ...]) -> Finding:
        return Finding(self.type, self.version, where, message, breaks)

    def compare(self, old: Any, new: Any, where: str) -> Iterator[Finding]:
        old, new = _resolve(old, self.old_doc), _resolve(new, self.new_doc)
        if (id(old), id(new)) in self._seen:
            return
        self._seen.add((id(old), id(new)))
        if not (isinstance(old, Mapping) and isinstance(new, Mapping)):
            if _key(old) != _key(new):
                yield self._finding(where, f"schema changed from {_key(old)} to {_key(new)}", _BOTH)
            return
        yield from self._type(old, new, where)
        yield from self._enum(old, new, where)
        yield from self._bounds(old, new, where)
        yield from self._object(old, new, where)
        yield from self._items(old, new, where)
        yield from self._rest(old, new, where)

    def _type(self, old: Mapping[str, Any], new: Mapping[str, Any], where: str) -> Iterator[Finding]:
        before, after = _types(old), _types(new)
        if before == after:
            return
        breaks = _direction(narrowed=not _covers(after, before), widened=not _covers(before, after))
        shown = [sorted(t) if t is not None else "any" for t in (before, after)]
        yield self._finding(where + "/type", f"type changed from {shown[0]} to {shown[1]}", breaks)

    def _enum(self, old: Mapping[str, Any], new: Mapping[str, Any], where: str) -> Iterator[Finding]:
        for word in ("enum", "const"):
            if word not in old and word not in new:
                continue
            allowed = [
                {_key(v) for v in (s[word] if word == "enum" else [s[word]])} if word in s else None for s in (old, new)
            ]
            before, after = allowed
            if before == after:
                continue
            narrowed = before is None or (after is not None and not after >= before)
            widened = after is None or (before is not None and not before >= after)
            change = "narrowed" if not widened else "widened" if not narrowed else "changed"
            yield self._finding(where + "/" + word, f"{word} {change}", _direction(narrowed, widened))

    def _bounds(self, old: Mapping[str, Any], new: Mapping[str, Any], where: str) -> Iterator[Finding]:
        for word in (*_LOWER, *_UPPER, "exclusiveMinimum", "exclusiveMaximum", *_CONSTRAINTS, "uniqueItems"):
            before, after = old.get(word), new.get(word)
            if before == after:
                continue
            tightened, loosened = self._tightening(word, before, after)
            verb = "tightened" if not loosened else "loosened" if not tightened else "changed"
            yield self._finding(
                f"{where}/{word}", f"{word} {verb} ({_key(before)} -> {_key(after)})", _direction(tightened, loosened)
            )

    @staticmethod
    def _tightening(word: str, before: Any, after: Any) -> tuple[bool, bool]:
        """(tightened, loosened) for one keyword's change."""
        if before is None or before is False:
            return True, False
        if after is None or after is False:
            return False, True
        if word in _CONSTRAINTS or isinstance(before, bool) or isinstance(after, bool):
            return True, True
        lower = word in _LOWER or word == "exclusiveMinimum"
        raised = after > before
        return (raised, not raised) if lower else (not raised, raised)

    def _object(self, old: Mapping[str, Any], new: Mapping[str, Any], where: str) -> Iterator[Finding]:
        old_props, new_props = old.get("properties") or {}, new.get("properties") or {}
        yield from self._closure(old, new, where)
        closed_old, closed_new = old.get("additionalProperties") is False, new.get("additionalProperties") is False
        for name in old_props.keys() - new_props.keys():
            breaks = (FORWARD, BACKWARD) if closed_new else (FORWARD,)
            yield self._finding(pointer(*_parts(where), "properties", name), f"property {name!r} removed", breaks)
        for name in new_props.keys() - old_props.keys():
            at = pointer(*_parts(where), "properties", name)
            if closed_old:
                yield self._finding(at, f"property {name!r} added to a closed object", (FORWARD,))
            elif name not in set(new.get("required") or ()):
                yield self._finding(at, f"optional property {name!r} added", ())
        for name in old_props.keys() & new_props.keys():
            yield from self.compare(old_props[name], new_props[name], pointer(*_parts(where), "properties", name))
        yield from self._required(old, new, where)

    def _required(self, old: Mapping[str, Any], new: Mapping[str, Any], where: str) -> Iterator[Finding]:
        before, after = set(old.get("required") or ()), set(new.get("required") or ())
        old_props, new_props = old.get("properties") or {}, new.get("properties") or {}
        for name in sorted(after - before):
            what = "optional property {!r} made required" if name in old_props else "new required property {!r}"
            yield self._finding(where + "/required", what.format(name), (BACKWARD,))
        for name in sorted(before - after):
            if name in new_props or name not in old_props:
                yield self._finding(where + "/required", f"required property {name!r} made optional", (FORWARD,))

    def _closure(self, old: Mapping[str, Any], new: Mapping[str, Any], where: str) -> Iterator[Finding]:
        before, after = old.get("additionalProperties", True), new.get("additionalProperties", True)
        at = where + "/additionalProperties"
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            yield from self.compare(before, after, at)
        elif _key(before) != _key(after):
            opened = after is True or (before is False and isinstance(after, Mapping))
            what = "closed object opened" if before is False else "open object closed" if after is False else None
            what = what or f"additionalProperties {'loosened' if opened else 'tightened'}"
            yield self._finding(at, what, (FORWARD,) if opened else (BACKWARD,))

    def _items(self, old: Mapping[str, Any], new: Mapping[str, Any], where: str) -> Iterator[Finding]:
        before, after = old.get("items"), new.get("items")
        if before is None and after is None:
            return
        if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
            for index, (a, b) in enumerate(zip(before, after, strict=True)):
                yield from self.compare(a, b, f"{where}/items/{index}")
        elif isinstance(before, Mapping) and isinstance(after, Mapping):
            yield from self.compare(before, after, where + "/items")
        elif _key(before) != _key(after):
            yield self._finding(where + "/items", "items changed", _direction(after is not None, before is not None))

    def _rest(self, old: Mapping[str, Any], new: Mapping[str, Any], where: str) -> Iterator[Finding]:
        for word in sorted((old.keys() | new.keys()) - _ANALYSED - ANNOTATIONS):
            if _key(old.get(word)) != _key(new.get(word)):
                yield self._finding(f"{where}/{word}", f"{word} changed (not analysed: counts as breaking)", _BOTH)


def _parts(where: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in where.split("/")[1:]]


def compare_schemas(
    old: Any, new: Any, *, old_doc: Mapping[str, Any], new_doc: Mapping[str, Any], type_: str, version: str, where: str
) -> list[Finding]:
    """Every change from ``old`` to ``new`` (two schemas of one type), ``$ref``\\ s read in their docs."""
    return list(_Differ(old_doc, new_doc, type_, version).compare(old, new, where))


def _version_findings(type_: str, key: str, old: Any, new: Any, changed: bool, where: str) -> list[Finding]:
    label = f"{old} -> {new}" if old != new else str(new)
    try:
        before, after = Version.parse(old), Version.parse(new)
    except (TypeError, ValueError):
        return [Finding(type_, label, where, f"x-version {new!r} (or {old!r}) is not 'MAJOR.MINOR'", (VERSION,))]
    if str(after.major) != key.partition(".")[0]:
        return [Finding(type_, label, where, f"x-version {after} left major {key}", (VERSION,))]
    if after.minor < before.minor:
        return [Finding(type_, label, where, f"x-version went down from {before} to {after}", (VERSION,))]
    if changed and after.minor == before.minor:
        nxt = Version(after.major, after.minor + 1)
        return [
            Finding(type_, label, where, f"the schema changed but x-version stayed {after}: make it {nxt}", (VERSION,))
        ]
    return []


def _check_major(old_doc: Mapping[str, Any], new_doc: Mapping[str, Any], type_: str, key: str) -> list[Finding]:
    old, new = old_doc["schemas"][type_][key], new_doc["schemas"][type_][key]
    where = pointer("schemas", type_, key)
    old_v, new_v = (s.get("x-version") if isinstance(s, Mapping) else None for s in (old, new))
    label = f"{old_v} -> {new_v}" if old_v != new_v else str(new_v)
    found = compare_schemas(old, new, old_doc=old_doc, new_doc=new_doc, type_=type_, version=label, where=where)
    return found + _version_findings(type_, key, old_v, new_v, bool(found), where + "/x-version")


def _majors(doc: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    types = doc.get("schemas")
    return {t: m for t, m in types.items() if isinstance(m, Mapping)} if isinstance(types, Mapping) else {}


def _version_of(doc: Mapping[str, Any], type_: str, key: str) -> str:
    schema = doc["schemas"][type_][key]
    return str(schema.get("x-version", key)) if isinstance(schema, Mapping) else key


def check_json(old_doc: Mapping[str, Any], new_doc: Mapping[str, Any], *, mode: str = BOTH) -> Report:
    """Every change from one Hedwig JSON-Schema file to another, judged in ``mode``."""
    findings: list[Finding] = []
    if old_doc.get("id") != new_doc.get("id"):
        message = f"schema id changed from {old_doc.get('id')!r} to {new_doc.get('id')!r}: consumers refuse it"
        findings.append(Finding("*", "-", "/id", message, _BOTH))
    old_types, new_types = _majors(old_doc), _majors(new_doc)
    for type_ in sorted(old_types.keys() | new_types.keys()):
        before, after = old_types.get(type_, {}), new_types.get(type_, {})
        for key in sorted(before.keys() | after.keys()):
            where = pointer("schemas", type_, key)
            if key not in after:
                what = "major" if after else "type"
                message = f"{what} removed, but consumers may still receive it: keep it beside a new major"
                findings.append(Finding(type_, _version_of(old_doc, type_, key), where, message, (BACKWARD,)))
            elif key not in before:
                added = "new major beside the old" if before else "new type"
                findings.append(Finding(type_, _version_of(new_doc, type_, key), where, added))
            else:
                findings.extend(_check_major(old_doc, new_doc, type_, key))
    return Report(mode=mode, findings=tuple(findings))
