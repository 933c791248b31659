"""JSON-Schema messages in Hedwig's schema-file format.

The schema file looks like::

    {"id": "https://example.com/schema",
     "$schema": "http://json-schema.org/draft-04/schema",
     "schemas": {"send_email": {"1.*": {"x-version": "1.2", "type": "object", ...}}},
     "definitions": {...}}

Each type maps ``"<major>.*"`` to the schema of that major version; ``x-version`` names the
newest minor. On the wire the schema string is ``<id>#/schemas/<type>/<major>.<minor>``. One
validator per (type, major) is compiled when the file is loaded, so a message costs one
JSON encode or decode plus one validation.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

from hedwig_tasks.exceptions import DecodeError, SchemaError, ValidationError
from hedwig_tasks.message import Message, Metadata, Version
from hedwig_tasks.validators.base import (
    FORMAT_VERSION,
    Encoded,
    _Attaching,
    check_headers,
    meta_attributes,
    parse_schema_tail,
    read_meta_attributes,
)
from hedwig_tasks.validators.fastcheck import compile_check

__all__ = ["JSONSchemaValidator"]

_MAJOR_KEY_RE = re.compile(r"^(\d+)\.\*$")
#: How many distinct schema strings a validator remembers the parse of.
_SCHEMAS_SEEN_LIMIT = 1024
_CONTAINER_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


#: The scanner ``json.loads`` runs, with its defaults (typeshed does not declare ``scan_once``).
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _loads(body: bytes) -> Any:
    """``json.loads(body)``, quicker for the usual body: UTF-8 with no whitespace around the value.

    ``json.loads`` of bytes guesses the encoding, decodes, and skips whitespace in Python before
    and after its scanner runs; this runs the same scanner at once. Anything else (another
    encoding, a BOM, whitespace around, an error) goes to ``json.loads`` itself, for the same
    value or the same error.
    """
    if type(body) is bytes:
        try:
            text = body.decode()
            value, end = _scan(text, 0)
            if end == len(text):
                return value
        except (ValueError, StopIteration):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            pass
    return json.loads(body)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, default=_json_default, allow_nan=False, separators=(",", ":")).encode()


def _field_path(error: Any) -> str:
    path = "data"
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _check_metaschema(schema: Mapping[str, Any], keys: Iterable[tuple[str, int]], source: str) -> None:
    """:class:`SchemaError` naming the first part of the file that its JSON-Schema draft refuses.

    The metaschema does not look inside Hedwig's ``schemas`` key, so each message's schema is
    checked on its own as well as the file (whose ``definitions`` it does check).
    """
    from jsonschema import Draft4Validator
    from jsonschema.exceptions import SchemaError as MetaschemaError
    from jsonschema.validators import validator_for

    cls = validator_for(schema, default=Draft4Validator)
    parts = [((), schema), *((("schemas", t, f"{m}.*"), schema["schemas"][t][f"{m}.*"]) for t, m in keys)]
    for where, part in parts:
        try:
            cls.check_schema(part)
        except MetaschemaError as exc:
            path = "/".join(str(p) for p in (*where, *exc.absolute_path)) or "its top level"
            raise SchemaError(f"{source}: {path} is not valid JSON Schema: {exc.message}") from exc


class JSONSchemaValidator(_Attaching):
    """Validates and encodes messages against a Hedwig JSON-Schema file.

    Like Hedwig's consumers, :meth:`decode` accepts a minor newer than the file's ``x-version``
    and validates its data against the schema of its major; ``strict_minor=True`` refuses it.
    Raises :class:`SchemaError` at construction when the file breaks Hedwig's conventions.
    """

    def __init__(self, schema: Mapping[str, Any] | str | Path, *, strict_minor: bool = False) -> None:
        self.strict_minor = strict_minor
        source = f"schema file {str(schema)!r}" if isinstance(schema, (str, Path)) else "the schema"
        if isinstance(schema, (str, Path)):
            schema = self._load(Path(schema))
        self.schema: Mapping[str, Any] = schema
        self._latest = self._check(schema)
        self.root: str = schema["id"]
        _check_metaschema(schema, self._latest, source)
        self._validators = self._compile(schema)
        self._schemas_seen: dict[str, tuple[str, Version]] = {}

    @staticmethod
    def _load(path: Path) -> Mapping[str, Any]:
        try:
            with path.open(encoding="utf-8") as f:
                loaded: Mapping[str, Any] = json.load(f)
        except OSError as exc:
            raise SchemaError(f"cannot read schema file {str(path)!r}: {exc.strerror}") from exc
        except ValueError as exc:
            raise SchemaError(f"schema file {str(path)!r} is not valid JSON: {exc}") from exc
        return loaded

    @staticmethod
    def _check(schema: Mapping[str, Any]) -> dict[tuple[str, int], Version]:
        """The newest version of each (type, major); :class:`SchemaError` listing every problem."""
        problems: list[str] = []
        latest: dict[tuple[str, int], Version] = {}
        root = schema.get("id")
        if not isinstance(root, str) or not root:
            problems.append("'id' must be a non-empty string (the schema URL)")
        elif root.endswith("#"):
            problems.append(f"'id' must not end in '#' (Hedwig appends '#/schemas/...'): {root!r}")
        types = schema.get("schemas")
        if not isinstance(types, Mapping) or not types:
            problems.append("'schemas' must map message types to their versions")
            types = {}
        for message_type, majors in types.items():
            if not isinstance(majors, Mapping) or not majors:
                problems.append(f"{message_type!r}: expected a map of '<major>.*' to schemas")
                continue
            for key, definition in majors.items():
                where = f"{message_type!r} {key!r}"
                match = _MAJOR_KEY_RE.match(key)
                if match is None:
                    problems.append(f"{where}: version keys look like '1.*'")
                    continue
                if not isinstance(definition, Mapping) or "x-version" not in definition:
                    problems.append(f"{where}: missing 'x-version' (the newest minor, such as '1.0')")
                    continue
                try:
                    version = Version.parse(definition["x-version"])
                except ValueError:
                    problems.append(f"{where}: x-version {definition['x-version']!r} is not 'MAJOR.MINOR'")
                    continue
                if version.major != int(match.group(1)):
                    problems.append(f"{where}: x-version {version} is not of major {match.group(1)}")
                    continue
                latest[(message_type, version.major)] = version
        if problems:
            raise SchemaError("invalid Hedwig schema: " + "; ".join(problems))
        return latest

    def _compile(self, schema: Mapping[str, Any]) -> dict[tuple[str, int], Any]:
        from jsonschema import Draft4Validator, FormatChecker
        from jsonschema.validators import validator_for
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT4

        resource = Resource.from_contents(dict(schema), default_specification=DRAFT4)
        registry: Registry[Any] = Registry().with_resource(self.root, resource)
        cls = validator_for(schema, default=Draft4Validator)
        checker = FormatChecker()
        checker.checks("human-uuid")(lambda value: not isinstance(value, str) or bool(_CONTAINER_ID_RE.match(value)))
        self._fast = {
            key: compile_check(schema["schemas"][key[0]][f"{key[1]}.*"], schema, checker) for key in self._latest
        }
        root = cls(dict(schema), registry=registry, format_checker=checker)
        # Evolving the file's validator keeps its resolver, so "#/definitions/..." refs inside a
        # message's schema resolve from the file's root, and a schema without refs costs no lookup.
        validators = {
            (message_type, major): root.evolve(schema=schema["schemas"][message_type][f"{major}.*"])
            for message_type, major in self._latest
        }
        #: What a message of (type, major) is checked with, found in one lookup: its validator,
        #: the newest minor the file knows, and its fast check (None: none).
        self._checks = {key: (validators[key], self._latest[key].minor, self._fast[key]) for key in self._latest}
        return validators

    def known_types(self) -> Iterable[tuple[str, int]]:
        return self._latest.keys()

    def latest_version(self, message_type: str, major: int) -> Version:
        try:
            return self._latest[(message_type, major)]
        except KeyError:
            raise self._unknown(message_type, major, ValidationError) from None

    def schema_string(self, message_type: str, version: Version) -> str:
        return f"{self.root}#/schemas/{message_type}/{version}"

    def _unknown(self, message_type: str, major: int, error: type[ValidationError]) -> ValidationError:
        if not any(t == message_type for t, _ in self._latest):
            return error(f"unknown message type {message_type!r}: the schema {self.root!r} does not define it")
        return error(f"{message_type!r} has no major version {major} in the schema {self.root!r}")

    def _validate(self, message_type: str, version: Version, data: Any, *, receiving: bool) -> None:
        """Check type, major and minor, then the data against its major's schema (fast path first)."""
        error = DecodeError if receiving else ValidationError
        checks = self._checks.get((message_type, version.major))
        if checks is None:
            raise self._unknown(message_type, version.major, error)
        validator, latest_minor, fast = checks
        if version.minor > latest_minor:
            self.check_version(message_type, version, error=error, receiving=receiving)
        if fast is not None and fast(data):
            return
        first = next(validator.iter_errors(data), None)
        if first is not None:
            from jsonschema.exceptions import best_match

            best = best_match(validator.iter_errors(data))
            raise error(f"{message_type} {version}: {_field_path(best)}: {best.message}")

    def encode(self, message: Message, *, container: bool = False) -> Encoded:
        check_headers(message.headers)
        if not isinstance(message.data, Mapping):
            raise ValidationError(
                f"{message.type} {message.version}: data must be an object, got {type(message.data).__name__}"
            )
        self._validate(message.type, message.version, message.data, receiving=False)
        schema = self.schema_string(message.type, message.version)
        try:
            if container:
                envelope = {
                    "format_version": FORMAT_VERSION,
                    "schema": schema,
                    "id": message.id,
                    "metadata": {
                        "timestamp": message.timestamp,
                        "publisher": message.publisher,
                        "headers": dict(message.headers),
                    },
                    "data": message.data,
                }
                return Encoded(_dumps(envelope), dict(message.headers))
            return Encoded(_dumps(message.data), meta_attributes(message, schema))
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"{message.type} {message.version}: data is not JSON: {exc}") from exc

    def _decode(self, body: bytes, attributes: Mapping[str, str], delivery: Any) -> Message:
        try:
            payload = _loads(body)
        except ValueError as exc:
            raise DecodeError(f"body is not valid JSON: {exc}") from None
        except RecursionError:  # nested deeper than the parser goes: not data any schema takes
            raise DecodeError("body is not valid JSON: nested too deep to parse") from None
        if "hedwig_schema" in attributes or "hedwig_id" in attributes:
            message_id, metadata, schema = read_meta_attributes(attributes, delivery)
            data = payload
        else:
            message_id, metadata, schema, data = self._open_container(payload, delivery)
        message_type, version = self._read_schema(schema)
        self._validate(message_type, version, data, receiving=True)
        return Message.received(message_type, version, data, message_id, metadata)

    def _read_schema(self, schema: str) -> tuple[str, Version]:
        """Type and version from a received schema string; remembered, as a service sees few."""
        known = self._schemas_seen.get(schema)
        if known is not None:
            return known
        if not schema.startswith(self.root):
            raise DecodeError(f"schema {schema!r} belongs to another schema file, not {self.root!r}")
        known = parse_schema_tail(schema)
        if len(self._schemas_seen) < _SCHEMAS_SEEN_LIMIT:
            self._schemas_seen[schema] = known
        return known

    @staticmethod
    def _open_container(payload: Any, delivery: Any) -> tuple[str, Metadata, str, Any]:
        if not isinstance(payload, dict):
            raise DecodeError("missing Hedwig attributes, and the body is not a Hedwig container")
        missing = [k for k in ("format_version", "schema", "id", "metadata", "data") if k not in payload]
        if missing:
            raise DecodeError(f"missing Hedwig attributes, and the container lacks: {', '.join(missing)}")
        if payload["format_version"] != FORMAT_VERSION:
            raise DecodeError(f"unknown container format_version {payload['format_version']!r}")
        meta, schema, message_id = payload["metadata"], payload["schema"], payload["id"]
        if not isinstance(schema, str) or not isinstance(message_id, str) or not isinstance(meta, dict):
            raise DecodeError("container 'schema' and 'id' must be strings and 'metadata' an object")
        if not isinstance(payload["data"], dict):
            raise DecodeError("container 'data' must be an object")
        headers = meta.get("headers") or {}
        try:
            check_headers(headers)
            metadata = Metadata(
                timestamp=int(meta.get("timestamp", 0)),
                publisher=str(meta.get("publisher", "")),
                headers=headers,
                delivery=delivery,
            )
        except (ValidationError, TypeError, ValueError, AttributeError) as exc:
            raise DecodeError(f"invalid container metadata: {exc}") from None
        return message_id, metadata, schema, payload["data"]
