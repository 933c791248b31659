"""Is a change of Hedwig protobuf messages compatible? Compared on their descriptors.

Messages are read as ``FileDescriptorProto``\\ s, from any of:

- a ``.proto`` file, compiled with ``grpcio-tools``'s protoc (or a ``protoc`` on ``PATH``);
- a descriptor set (``protoc --include_imports --descriptor_set_out=FILE``): ``.pb``, ``.desc``,
  ``.binpb``, ``.protoset``;
- a generated ``_pb2.py``, whose serialized descriptor is read from its source, never run.

A message with Hedwig's option (extension 51235) is one (type, major), identified as the
validator does: ``message_type``, else the name ``<Type>V<major>``. Within a major no field may
change its number, type or cardinality, no number may be reused by another name (or a reserved
one used), no field may be removed and no ``required`` field added; messages it refers to are
compared the same way, and so are enums (no value removed or renumbered). ``minor_version``
must go up whenever the fields changed, and never down.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

from hedwig_tasks.exceptions import SchemaError
from hedwig_tasks.schema_tools.findings import BACKWARD, BOTH, FORWARD, VERSION, Finding, Report

try:
    from google.protobuf import descriptor_pb2

    from hedwig_tasks.validators.protobuf_message_options_pb2 import MessageOptionsCarrier
except Exception as exc:  # generated code raises VersionError on an older runtime
    raise SchemaError(
        f"comparing protobuf schemas needs protobuf: pip install 'hedwig-tasks[protobuf]' ({exc})"
    ) from exc

__all__ = ["check_protobuf", "hedwig_messages"]

_CLASS_NAME_RE = re.compile(r"^(.*)V(\d+)$")
_BOTH = (BACKWARD, FORWARD)
_LABELS = {1: "optional", 2: "required", 3: "repeated"}

FileProto = Any  # descriptor_pb2.FileDescriptorProto
MessageProto = Any  # descriptor_pb2.DescriptorProto


def _all_messages(files: Iterable[FileProto]) -> dict[str, MessageProto]:
    """Every message and enum by full name (``pkg.Outer.Inner``), nested ones too."""
    found: dict[str, MessageProto] = {}

    def walk(prefix: str, messages: Iterable[MessageProto], enums: Iterable[Any]) -> None:
        for enum in enums:
            found[f"{prefix}.{enum.name}" if prefix else enum.name] = enum
        for message in messages:
            name = f"{prefix}.{message.name}" if prefix else message.name
            found[name] = message
            walk(name, message.nested_type, message.enum_type)

    for file in files:
        walk(file.package, file.message_type, file.enum_type)
    return found


def _identity(message: MessageProto) -> tuple[str, int, int] | None:
    """``(type, major, minor)`` of a message with Hedwig's option, else None."""
    carrier = MessageOptionsCarrier.FromString(message.options.SerializeToString())
    if not carrier.HasField("message_options") or not carrier.message_options.major_version:
        return None
    options = carrier.message_options
    match = _CLASS_NAME_RE.match(message.name)
    message_type = options.message_type or (match.group(1) if match else "")
    return (message_type, options.major_version, options.minor_version) if message_type else None


def hedwig_messages(files: Iterable[FileProto]) -> dict[tuple[str, int], tuple[str, int]]:
    """``(type, major) -> (full message name, minor)`` for every top-level Hedwig message."""
    found: dict[tuple[str, int], tuple[str, int]] = {}
    for file in files:
        for message in file.message_type:
            identity = _identity(message)
            if identity is not None:
                name = f"{file.package}.{message.name}" if file.package else message.name
                found[(identity[0], identity[1])] = (name, identity[2])
    return found


def _signature(field: Any) -> str:
    """What a field is on the wire and to a reader: cardinality, type and message or enum name."""
    kind = descriptor_pb2.FieldDescriptorProto.Type.Name(field.type)[5:].lower()
    type_name = f" {field.type_name.lstrip('.')}" if field.type_name else ""
    oneof = " (in a oneof)" if field.HasField("oneof_index") and not field.proto3_optional else ""
    return f"{_LABELS.get(field.label, '?')} {kind}{type_name}{oneof}"


def _reserved(message: MessageProto) -> tuple[set[str], list[tuple[int, int]]]:
    return set(message.reserved_name), [(r.start, r.end) for r in message.reserved_range]


class _Differ:
    """Compares the fields of two versions of one message, and of the messages they refer to."""

    def __init__(self, old: dict[str, MessageProto], new: dict[str, MessageProto], type_: str, version: str) -> None:
        self.old, self.new = old, new
        self.type, self.version = type_, version
        self._seen: set[tuple[str, str]] = set()

    def _finding(self, where: str, message: str, breaks: tuple[str, ...]) -> Finding:
        return Finding(self.type, self.version, where, message, breaks)

    def compare(self, old_name: str, new_name: str) -> Iterator[Finding]:
        if (old_name, new_name) in self._seen or old_name not in self.old or new_name not in self.new:
            return
        self._seen.add((old_name, new_name))
        old, new = self.old[old_name], self.new[new_name]
        if isinstance(old, descriptor_pb2.EnumDescriptorProto):
            yield from self._enum(new_name, old, new)
            return
        before = {f.number: f for f in old.field}
        after = {f.number: f for f in new.field}
        short = new_name.rpartition(".")[2]
        for number in sorted(before.keys() | after.keys()):
            yield from self._field(short, before.get(number), after.get(number), old, number)

    def _field(self, message: str, old: Any, new: Any, old_message: MessageProto, number: int) -> Iterator[Finding]:
        where = f"{message}.{(new or old).name} ({number})"
        if new is None:
            yield self._finding(where, f"field {old.name} = {number} removed", (FORWARD,))
        elif old is None:
            names, ranges = _reserved(old_message)
            if new.name in names or any(start <= number < end for start, end in ranges):
                yield self._finding(where, f"field {new.name} = {number} uses a reserved number or name", _BOTH)
            elif new.label == 2:
                yield self._finding(where, f"required field {new.name} = {number} added", (BACKWARD,))
            else:
                yield self._finding(where, f"field {new.name} = {number} added", ())
        elif old.name != new.name:
            yield self._finding(where, f"number {number} reused: it was {old.name}, now {new.name}", _BOTH)
        elif _signature(old) != _signature(new):
            yield self._finding(where, f"type changed from {_signature(old)} to {_signature(new)}", _BOTH)
        elif old.type_name:
            yield from self.compare(old.type_name.lstrip("."), new.type_name.lstrip("."))

    def _enum(self, name: str, old: Any, new: Any) -> Iterator[Finding]:
        """An enum value removed or renumbered breaks readers; one added does not."""
        before = {v.name: v.number for v in old.value}
        after = {v.name: v.number for v in new.value}
        short = name.rpartition(".")[2]
        for value in sorted(before.keys() | after.keys()):
            where = f"{short}.{value}"
            if value not in after:
                yield self._finding(where, f"enum value {value} = {before[value]} removed", _BOTH)
            elif value not in before:
                yield self._finding(f"{where} ({after[value]})", f"enum value {value} = {after[value]} added", ())
            elif before[value] != after[value]:
                message = f"enum value {value} changed number {before[value]} -> {after[value]}"
                yield self._finding(where, message, _BOTH)

    def moved_numbers(self, old_name: str, new_name: str) -> Iterator[Finding]:
        """A field whose name stayed but whose number changed (reported once, on the message)."""
        before = {f.name: f.number for f in self.old[old_name].field}
        after = {f.name: f.number for f in self.new[new_name].field}
        short = new_name.rpartition(".")[2]
        for name in sorted(before.keys() & after.keys()):
            if before[name] != after[name]:
                where = f"{short}.{name} ({after[name]})"
                yield self._finding(where, f"field {name} changed number {before[name]} -> {after[name]}", _BOTH)


def _version_finding(type_: str, label: str, where: str, old: int, new: int, changed: bool) -> list[Finding]:
    if new < old:
        return [Finding(type_, label, where, f"minor_version went down from {old} to {new}", (VERSION,))]
    if changed and new == old:
        message = f"the message changed but minor_version stayed {new}: make it {new + 1}"
        return [Finding(type_, label, where, message, (VERSION,))]
    return []


def check_protobuf(old_files: Iterable[FileProto], new_files: Iterable[FileProto], *, mode: str = BOTH) -> Report:
    """Every change of the Hedwig messages from one set of files to another, judged in ``mode``."""
    old_files, new_files = list(old_files), list(new_files)
    old_all, new_all = _all_messages(old_files), _all_messages(new_files)
    before, after = hedwig_messages(old_files), hedwig_messages(new_files)
    findings: list[Finding] = []
    for type_, major in sorted(before.keys() | after.keys()):
        if (type_, major) not in after:
            old_name, minor = before[(type_, major)]
            message = "removed, but consumers may still receive it: keep it beside a new major"
            findings.append(Finding(type_, f"{major}.{minor}", old_name, message, (BACKWARD,)))
            continue
        new_name, new_minor = after[(type_, major)]
        if (type_, major) not in before:
            findings.append(Finding(type_, f"{major}.{new_minor}", new_name, "new type or major"))
            continue
        old_name, old_minor = before[(type_, major)]
        label = f"{major}.{old_minor} -> {major}.{new_minor}" if old_minor != new_minor else f"{major}.{new_minor}"
        differ = _Differ(old_all, new_all, type_, label)
        found = [*differ.moved_numbers(old_name, new_name), *differ.compare(old_name, new_name)]
        findings += found
        where = new_name.rpartition(".")[2] + " minor_version"
        findings += _version_finding(type_, label, where, old_minor, new_minor, bool(found))
    return Report(mode=mode, findings=tuple(findings))
