"""Protobuf messages in Hedwig's binary wire format.

Each message class carries Hedwig's option, extension 51235 on ``google.protobuf.MessageOptions``::

    import "hedwig_tasks/validators/protobuf_options.proto";  // or Hedwig's "hedwig/protobuf/options.proto"

    message UserCreatedV1 {
      option (hedwig_tasks.message_options) = {major_version: 1, minor_version: 2, message_type: "user-created"};
      string user_id = 1;
    }

The message type is ``message_type``, or else inferred from a class name ``<Type>V<major>``
(``UserCreatedV1`` is type ``UserCreated``); ``minor_version`` is the newest minor the class
knows. The option is read from the serialized descriptor options, so classes compiled against
this package's ``protobuf_options.proto`` and against authedwig's ``options.proto`` both work.

On the wire the schema string is ``<type>/<major>.<minor>``. In the attributes form the body is
the data's protobuf bytes; in the container form it is a ``PayloadV1`` whose ``data`` is a
``google.protobuf.Any`` packed with ``type.googleapis.com/<full message name>``, byte for byte
what authedwig writes.
"""

from __future__ import annotations

import re
import types
from collections.abc import Iterable, Mapping
from typing import Any

from hedwig_tasks.exceptions import ConfigurationError, DecodeError, SchemaError, ValidationError
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

try:
    from google.protobuf import json_format
    from google.protobuf.message import DecodeError as ProtoDecodeError
    from google.protobuf.message import EncodeError as ProtoEncodeError
    from google.protobuf.message import Message as ProtoMessage

    from hedwig_tasks.validators.protobuf_container_pb2 import PayloadV1
    from hedwig_tasks.validators.protobuf_message_options_pb2 import MessageOptions, MessageOptionsCarrier
except Exception as exc:  # not only ImportError: generated code raises VersionError on an older runtime
    raise ConfigurationError(
        f"the protobuf validator needs protobuf>=6.33.5: pip install 'hedwig-tasks[protobuf]' ({exc})"
    ) from exc

__all__ = ["TYPE_URL_PREFIX", "ProtobufValidator", "messages_of"]

#: What ``Any.Pack`` puts before a message's full name in ``type_url``, as Hedwig does.
TYPE_URL_PREFIX = "type.googleapis.com/"

_CLASS_NAME_RE = re.compile(r"^(.*)V(\d+)$")

ProtoClass = type[ProtoMessage]


def _options_of(cls: ProtoClass) -> MessageOptions | None:
    """The Hedwig option of a class, whichever .proto declared extension 51235, or None."""
    raw = cls.DESCRIPTOR.GetOptions().SerializeToString()
    carrier = MessageOptionsCarrier.FromString(raw)
    return carrier.message_options if carrier.HasField("message_options") else None


def _identify(cls: Any) -> tuple[str, Version]:
    """``(type, newest version)`` from a class's Hedwig option; :class:`SchemaError` if unusable."""
    if not (isinstance(cls, type) and issubclass(cls, ProtoMessage)):
        raise SchemaError(f"{cls!r} is not a protobuf message class")
    name = cls.DESCRIPTOR.full_name
    options = _options_of(cls)
    if options is None:
        raise SchemaError(f"{name}: no Hedwig message_options option (extension 51235)")
    if not options.major_version:
        raise SchemaError(f"{name}: message_options.major_version is missing (it must be 1 or more)")
    match = _CLASS_NAME_RE.match(cls.__name__)
    if match and int(match.group(2)) != options.major_version:
        raise SchemaError(
            f"{name}: the class name says major {match.group(2)}, major_version says {options.major_version}"
        )
    message_type = options.message_type or (match.group(1) if match else "")
    if not message_type:
        raise SchemaError(f"{name}: no message_type option, and the class name is not '<Type>V<major>'")
    if "/" in message_type:
        raise SchemaError(f"{name}: message type {message_type!r} must not contain '/'")
    return message_type, Version(options.major_version, options.minor_version)


def messages_of(module: types.ModuleType) -> list[ProtoClass]:
    """Every top-level message class of a generated ``_pb2`` module that carries Hedwig's option.

    Classes without the option (helper messages) are left out. Raises :class:`SchemaError` for a
    module that is not protoc output.
    """
    file: Any = getattr(module, "DESCRIPTOR", None)
    if not hasattr(file, "message_types_by_name"):
        raise SchemaError(f"{module.__name__} is not a protoc-generated _pb2 module")
    classes: list[ProtoClass] = [getattr(module, name) for name in file.message_types_by_name]
    return [cls for cls in classes if _options_of(cls) is not None]


def _parse(cls: ProtoClass, body: bytes, what: str) -> Any:
    try:
        return cls.FromString(body)
    except ProtoDecodeError as exc:
        raise DecodeError(f"{what} is not a valid {cls.DESCRIPTOR.full_name}: {exc}") from None


class ProtobufValidator(_Attaching):
    """Validates and encodes messages as protobuf classes carrying Hedwig's message options.

    ``message.data`` is an instance of the class for its (type, major), or a dict of its fields.
    A message whose minor is newer than its class's ``minor_version`` is decoded with that class
    (fields it does not know are kept as unknown fields), as Hedwig does, unless
    ``strict_minor=True``. Raises :class:`SchemaError` at construction for a class without a
    usable option, or two classes for one (type, major).
    """

    def __init__(self, messages: Iterable[ProtoClass], *, strict_minor: bool = False) -> None:
        self.strict_minor = strict_minor
        self._classes = self._check(messages)

    @staticmethod
    def _check(messages: Iterable[ProtoClass]) -> dict[tuple[str, int], tuple[ProtoClass, Version]]:
        """Each (type, major) with its class and newest version; :class:`SchemaError` listing every problem."""
        problems: list[str] = []
        found: dict[tuple[str, int], tuple[ProtoClass, Version]] = {}
        for cls in messages:
            try:
                message_type, version = _identify(cls)
            except SchemaError as exc:
                problems.append(str(exc))
                continue
            key = (message_type, version.major)
            if key in found:
                other = found[key][0].DESCRIPTOR.full_name
                problems.append(f"{cls.DESCRIPTOR.full_name}: {message_type!r} major {key[1]} is already {other}")
                continue
            found[key] = (cls, version)
        if not found and not problems:
            problems.append("no message classes given")
        if problems:
            raise SchemaError("invalid Hedwig protobuf messages: " + "; ".join(problems))
        return found

    def known_types(self) -> Iterable[tuple[str, int]]:
        return self._classes.keys()

    def latest_version(self, message_type: str, major: int) -> Version:
        return self._lookup(message_type, major, ValidationError)[1]

    def message_class(self, message_type: str, major: int) -> ProtoClass:
        """The class of a (type, major); raises :class:`ValidationError` if none is declared."""
        return self._lookup(message_type, major, ValidationError)[0]

    def _lookup(self, message_type: str, major: int, error: type[ValidationError]) -> tuple[ProtoClass, Version]:
        try:
            return self._classes[(message_type, major)]
        except KeyError:
            if not any(t == message_type for t, _ in self._classes):
                raise error(f"unknown message type {message_type!r}: no protobuf class declares it") from None
            raise error(f"{message_type!r} has no major version {major} among the protobuf classes") from None

    def encode(self, message: Message, *, container: bool = False) -> Encoded:
        check_headers(message.headers)
        cls, _ = self._lookup(message.type, message.version.major, ValidationError)
        self.check_version(message.type, message.version, error=ValidationError)
        data = self._coerce(cls, message)
        schema = f"{message.type}/{message.version}"
        try:
            if container:
                return Encoded(self._pack(message, schema, data), dict(message.headers), binary=True)
            return Encoded(data.SerializeToString(), meta_attributes(message, schema), binary=True)
        except ProtoEncodeError as exc:  # a proto2 class with a required field unset
            raise ValidationError(f"{message.type} {message.version}: data: {exc}") from None

    @staticmethod
    def _coerce(cls: ProtoClass, message: Message) -> Any:
        """The data as an instance of ``cls``; :class:`ValidationError` naming a bad field or type."""
        where = f"{message.type} {message.version}"
        if isinstance(message.data, Mapping):
            try:
                return json_format.ParseDict(dict(message.data), cls())
            except json_format.ParseError as exc:
                raise ValidationError(f"{where}: data: {exc}") from None
        if not isinstance(message.data, cls):
            raise ValidationError(
                f"{where}: data must be a {cls.DESCRIPTOR.full_name} or a dict of its fields, "
                f"got {type(message.data).__name__}"
            )
        return message.data

    @staticmethod
    def _pack(message: Message, schema: str, data: Any) -> bytes:
        payload = PayloadV1(format_version=FORMAT_VERSION, id=message.id, schema=schema)
        payload.metadata.publisher = message.publisher
        payload.metadata.timestamp.FromMilliseconds(message.timestamp)
        payload.metadata.headers.update(message.headers)
        payload.data.Pack(data)
        body: bytes = payload.SerializeToString()
        return body

    def _decode(self, body: bytes, attributes: Mapping[str, str], delivery: Any) -> Message:
        if "hedwig_schema" in attributes or "hedwig_id" in attributes:
            message_id, metadata, schema = read_meta_attributes(attributes, delivery)
            message_type, version, cls = self._resolve(schema)
            data = _parse(cls, body, "body")
        else:
            message_id, metadata, schema, packed = self._open_container(body, delivery)
            message_type, version, cls = self._resolve(schema)
            data = self._unpack(cls, packed, schema)
        return Message.received(message_type, version, data, message_id, metadata)

    def _resolve(self, schema: str) -> tuple[str, Version, ProtoClass]:
        """Type, version and class of a schema string; :class:`DecodeError` if the type or major is
        unknown, or the minor newer than the class knows and ``strict_minor`` is set.
        """
        message_type, version = parse_schema_tail(schema)
        cls, latest = self._lookup(message_type, version.major, DecodeError)
        if version.minor > latest.minor:
            self.check_version(message_type, version, error=DecodeError, receiving=True)
        return message_type, version, cls

    @staticmethod
    def _open_container(body: bytes, delivery: Any) -> tuple[str, Metadata, str, Any]:
        try:
            payload = PayloadV1.FromString(body)
        except ProtoDecodeError as exc:
            raise DecodeError(f"missing Hedwig attributes, and the body is not a Hedwig PayloadV1: {exc}") from None
        missing = [name for name in ("format_version", "id", "schema") if not getattr(payload, name)]
        missing += [] if payload.HasField("data") else ["data"]
        if missing:
            raise DecodeError(f"missing Hedwig attributes, and the container lacks: {', '.join(missing)}")
        if payload.format_version != FORMAT_VERSION:
            raise DecodeError(f"unknown container format_version {payload.format_version!r}")
        headers = dict(payload.metadata.headers)
        try:
            check_headers(headers)
        except ValidationError as exc:
            raise DecodeError(f"invalid container metadata: {exc}") from None
        metadata = Metadata(
            timestamp=payload.metadata.timestamp.ToMilliseconds(),
            publisher=payload.metadata.publisher,
            headers=headers,
            delivery=delivery,
        )
        return payload.id, metadata, payload.schema, payload.data

    @staticmethod
    def _unpack(cls: ProtoClass, packed: Any, schema: str) -> Any:
        if not packed.Is(cls.DESCRIPTOR):
            raise DecodeError(
                f"container data is {packed.type_url!r}, but {schema} is {TYPE_URL_PREFIX}{cls.DESCRIPTOR.full_name}"
            )
        return _parse(cls, packed.value, "container data")
