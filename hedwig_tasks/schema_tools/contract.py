"""What services exchange: message types with their schemas and versions, topics, who publishes
and who consumes. Built from apps (:func:`from_app`) or from schema files (:func:`from_schema_file`),
and merged (:func:`merge`) to document several services at once."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hedwig_tasks.exceptions import RoutingError, SchemaError
from hedwig_tasks.message import Version
from hedwig_tasks.routing import DEFAULT_TOPIC

__all__ = ["Contract", "MessageSpec", "from_app", "from_schema_file", "merge"]


@dataclass(frozen=True)
class MessageSpec:
    """One (type, major): its newest version, topic, schema and where the schema came from.

    ``schema`` is the JSON Schema of the major (``root`` the file it sits in, for its ``$ref``\\ s)
    or, for protobuf, ``proto`` holds the message's fields as .proto text.
    """

    type: str
    version: Version
    topic: str
    schema_id: str
    schema: Mapping[str, Any] | None = None
    root: Mapping[str, Any] = field(default_factory=dict)
    proto: str = ""

    @property
    def key(self) -> tuple[str, int]:
        return (self.type, self.version.major)


@dataclass(frozen=True)
class Contract:
    """Messages by (type, major), and which services publish and consume each."""

    title: str
    messages: Mapping[tuple[str, int], MessageSpec]
    publishers: Mapping[tuple[str, int], tuple[str, ...]] = field(default_factory=dict)
    consumers: Mapping[tuple[str, int], tuple[str, ...]] = field(default_factory=dict)

    def services(self) -> list[str]:
        names = {n for names in (*self.publishers.values(), *self.consumers.values()) for n in names}
        return sorted(names)


def _json_specs(doc: Mapping[str, Any], topic_of: Any) -> dict[tuple[str, int], MessageSpec]:
    specs = {}
    for message_type, majors in doc["schemas"].items():
        for schema in majors.values():
            version = Version.parse(schema["x-version"])
            topic = topic_of(message_type, version.major)
            schema_id = f"{doc['id']}#/schemas/{message_type}/{version}"
            spec = MessageSpec(message_type, version, topic, schema_id, schema=schema, root=doc)
            specs[spec.key] = spec
    return specs


def _proto_text(cls: Any) -> str:
    """The fields of a protobuf message class as .proto text (numbers, types, names)."""
    lines = [f"message {cls.DESCRIPTOR.name} {{"]
    for item in cls.DESCRIPTOR.fields:
        kind = item.message_type.full_name if item.message_type else item.enum_type.full_name if item.enum_type else ""
        if not kind:
            from google.protobuf.descriptor_pb2 import FieldDescriptorProto

            kind = FieldDescriptorProto.Type.Name(item.type)[5:].lower()
        repeated = "repeated " if item.label == item.LABEL_REPEATED else ""
        lines.append(f"  {repeated}{kind} {item.name} = {item.number};")
    return "\n".join([*lines, "}"])


def _app_specs(app: Any) -> dict[tuple[str, int], MessageSpec]:
    def topic_of(message_type: str, major: int) -> str:
        try:
            return str(app.router.topic_for(message_type, major))
        except RoutingError:
            return ""

    validator = app.validator
    if hasattr(validator, "schema") and isinstance(validator.schema, Mapping):
        return _json_specs(validator.schema, topic_of)
    specs = {}
    for message_type, major in validator.known_types():
        cls = validator.message_class(message_type, major)
        version = validator.latest_version(message_type, major)
        topic = topic_of(message_type, major)
        spec = MessageSpec(message_type, version, topic, f"{message_type}/{version}", proto=_proto_text(cls))
        specs[spec.key] = spec
    return specs


def from_app(app: Any) -> Contract:
    """What one app publishes (every type of its schema routed to a topic it owns) and consumes
    (its handlers' types)."""
    specs = _app_specs(app)
    publishes = {}
    for key in specs:
        try:
            route = app.router.route(*key)
        except RoutingError:
            continue
        if route.owner is None:
            publishes[key] = (app.publisher,)
    consumes = {key: (app.name,) for key in app.registry.keys() if key in specs}
    return Contract(app.name, specs, publishes, consumes)


def from_schema_file(service: str, doc: Mapping[str, Any], *, consumes: Iterable[tuple[str, int]] = ()) -> Contract:
    """A service that publishes every type of its Hedwig JSON-Schema file on the default topics."""
    if not isinstance(doc.get("schemas"), Mapping) or not isinstance(doc.get("id"), str):
        raise SchemaError(f"{service}: not a Hedwig schema file (it needs 'id' and 'schemas')")
    specs = _json_specs(doc, lambda t, m: DEFAULT_TOPIC.format(type=t, major=m))
    return Contract(service, specs, {key: (service,) for key in specs}, {key: (service,) for key in consumes})


def merge(title: str, contracts: Iterable[Contract]) -> Contract:
    """One contract of several services; a later schema of the same (type, major) wins only if newer."""
    messages: dict[tuple[str, int], MessageSpec] = {}
    publishers: dict[tuple[str, int], tuple[str, ...]] = {}
    consumers: dict[tuple[str, int], tuple[str, ...]] = {}
    for contract in contracts:
        for key, spec in contract.messages.items():
            if key not in messages or spec.version.minor > messages[key].version.minor:
                messages[key] = spec
        for source, target in ((contract.publishers, publishers), (contract.consumers, consumers)):
            for key, names in source.items():
                target[key] = tuple(dict.fromkeys((*target.get(key, ()), *names)))
    return Contract(title, messages, publishers, consumers)
