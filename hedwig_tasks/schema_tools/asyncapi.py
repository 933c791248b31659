"""An AsyncAPI 3.0 document of a :class:`~hedwig_tasks.schema_tools.contract.Contract`.

Channels are topics; each (type, major) is a message in ``components.messages`` whose payload
is its JSON Schema (``schemaFormat`` draft-04, refs to ``#/definitions/X`` pointed at
``components.schemas``) or, for protobuf, its fields as .proto text; ``x-hedwig-version`` and
``x-hedwig-schema`` give the newest version and the schema string on the wire. Each publishing
service has a ``send`` operation and each consuming one a ``receive`` operation per message,
named ``<service>.send.<message>`` and tagged with the service.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from hedwig_tasks.schema_tools.contract import Contract, MessageSpec

__all__ = ["ASYNCAPI_VERSION", "JSON_SCHEMA_FORMAT", "PROTOBUF_FORMAT", "document", "message_id"]

ASYNCAPI_VERSION = "3.0.0"
JSON_SCHEMA_FORMAT = "application/schema+json;version=draft-04"
PROTOBUF_FORMAT = "application/vnd.google.protobuf;version=3"

_ID_UNSAFE = re.compile(r"[^\w.\-]")
_DEFINITIONS = "#/definitions/"


def _safe(name: str) -> str:
    return _ID_UNSAFE.sub("_", name)


def message_id(spec: MessageSpec) -> str:
    """The key of a (type, major) in ``components.messages``: ``<type>.v<major>``."""
    return _safe(f"{spec.type}.v{spec.version.major}")


def _rewrite_refs(value: Any) -> Any:
    """``value`` with ``#/definitions/X`` refs pointing at ``#/components/schemas/X``."""
    if isinstance(value, Mapping):
        return {
            k: (
                "#/components/schemas/" + _safe(v[len(_DEFINITIONS) :])
                if k == "$ref" and isinstance(v, str) and v.startswith(_DEFINITIONS)
                else _rewrite_refs(v)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_rewrite_refs(v) for v in value]
    return value


def _payload(spec: MessageSpec) -> dict[str, Any]:
    if spec.schema is None:
        return {"schemaFormat": PROTOBUF_FORMAT, "schema": spec.proto}
    return {"schemaFormat": JSON_SCHEMA_FORMAT, "schema": _rewrite_refs(spec.schema)}


def _message(spec: MessageSpec) -> dict[str, Any]:
    description = spec.schema.get("description") if spec.schema is not None else None
    message: dict[str, Any] = {
        "name": spec.type,
        "title": f"{spec.type} {spec.version}",
        "contentType": "application/json" if spec.schema is not None else "application/x-protobuf",
        "payload": _payload(spec),
        "x-hedwig-version": str(spec.version),
        "x-hedwig-schema": spec.schema_id,
    }
    if isinstance(description, str):
        message["summary"] = description
    return message


def _operation(action: str, service: str, channel: str, message: str) -> dict[str, Any]:
    return {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel}"},
        "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
        "summary": f"{service} {'publishes' if action == 'send' else 'consumes'} {message}",
        "tags": [{"name": f"service:{service}"}],
        "x-hedwig-service": service,
    }


def _schemas(contract: Contract) -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for spec in contract.messages.values():
        for name, definition in (spec.root.get("definitions") or {}).items():
            schemas[_safe(name)] = {"schemaFormat": JSON_SCHEMA_FORMAT, "schema": _rewrite_refs(definition)}
    return schemas


def _version_tag(contract: Contract) -> str:
    """A version for ``info``: a digest of every message's schema, so it changes when they do."""
    text = json.dumps(
        [(k, str(s.version), s.schema, s.proto) for k, s in sorted(contract.messages.items())], sort_keys=True
    )
    return "0.0.0+" + hashlib.sha256(text.encode()).hexdigest()[:12]


def document(contract: Contract) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of ``contract`` (a dict ready for ``json.dumps``)."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for key, spec in sorted(contract.messages.items()):
        if not spec.topic:
            continue
        channel, message = _safe(spec.topic), message_id(spec)
        entry = channels.setdefault(channel, {"address": spec.topic, "title": spec.topic, "messages": {}})
        entry["messages"][message] = {"$ref": f"#/components/messages/{message}"}
        for action, services in (
            ("send", contract.publishers.get(key, ())),
            ("receive", contract.consumers.get(key, ())),
        ):
            for service in services:
                operations[f"{_safe(service)}.{action}.{message}"] = _operation(action, service, channel, message)
    doc: dict[str, Any] = {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": f"{contract.title}: Hedwig messages",
            "version": _version_tag(contract),
            "description": "Services: " + (", ".join(contract.services()) or "none") + ". Generated by hedwig-tasks.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": {message_id(s): _message(s) for _, s in sorted(contract.messages.items())}},
    }
    schemas = _schemas(contract)
    if schemas:
        doc["components"]["schemas"] = schemas
    return doc
