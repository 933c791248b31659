"""The validator contract, and the parts of Hedwig's wire format every validator shares.

A validator turns a :class:`~hedwig_tasks.message.Message` into bytes plus string attributes
(:meth:`Validator.encode`) and back (:meth:`Validator.decode`), checking the data against the
schema of its type and major version both ways. Two forms exist on the wire:

* the *transport-attributes* form (the default): the body holds only the data; the id, time,
  publisher and schema ride in ``hedwig_*`` attributes and every header is its own attribute;
* the *container* form: the body is an envelope holding metadata and data; headers are also
  copied into attributes.

:meth:`Validator.decode` reads either. :func:`to_transport` and :func:`from_transport` add and
remove the ``hedwig_encoding`` layer that some transports need (base64 for SNS/SQS, which
carry text; a ``utf8`` flag for Pub/Sub, which carries bytes).
"""

from __future__ import annotations

import abc
import base64
import binascii
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from hedwig_tasks.exceptions import DecodeError, ValidationError
from hedwig_tasks.message import Message, Metadata, Version, delivered

__all__ = [
    "FORMAT_VERSION",
    "META_ATTRIBUTES",
    "Encoded",
    "Validator",
    "check_headers",
    "from_transport",
    "headers_from_attributes",
    "meta_attributes",
    "parse_schema_tail",
    "read_meta_attributes",
    "to_transport",
]

#: The only Hedwig format version there is.
FORMAT_VERSION = "1.0"

#: The attributes that carry a message's metadata in the transport-attributes form.
META_ATTRIBUTES = (
    "hedwig_format_version",
    "hedwig_id",
    "hedwig_message_timestamp",
    "hedwig_publisher",
    "hedwig_schema",
)
ENCODING_ATTRIBUTE = "hedwig_encoding"
_RESERVED_PREFIX = "hedwig_"
#: The attributes a message usually carries, all in the ``hedwig_`` namespace (none is a header).
_USUAL_ATTRIBUTES = frozenset((*META_ATTRIBUTES, ENCODING_ATTRIBUTE))


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A message on the wire: body, string attributes, and whether the body is binary."""

    body: bytes
    attributes: Mapping[str, str]
    binary: bool = False


class Validator(abc.ABC):
    """Encodes and decodes messages of one schema family (a JSON-Schema file, a set of protobufs).

    Versions follow Hedwig: publishing refuses a minor newer than the schema knows, while
    decoding accepts one (the data is validated against the schema of its major, and the
    message keeps the version it was sent with), so a publisher can deploy a new minor before
    its consumers do. A validator built with ``strict_minor=True`` refuses such a message on
    decode too.
    """

    #: Whether :meth:`decode` refuses a minor newer than the schema knows (Hedwig's consumers
    #: accept it). Set per instance by the constructor; False for a validator that never does.
    strict_minor: bool = False

    @abc.abstractmethod
    def known_types(self) -> Iterable[tuple[str, int]]:
        """Every ``(type, major)`` the schema defines."""

    @abc.abstractmethod
    def latest_version(self, message_type: str, major: int) -> Version:
        """The newest ``major.minor`` the schema knows; raises :class:`ValidationError` if none."""

    @abc.abstractmethod
    def encode(self, message: Message, *, container: bool = False) -> Encoded:
        """Validate and encode; raises :class:`ValidationError` naming what is wrong."""

    @abc.abstractmethod
    def decode(self, body: bytes, attributes: Mapping[str, str]) -> Message:
        """Decode either form and validate; raises :class:`DecodeError` saying what is wrong."""

    def decode_delivery(self, body: bytes, attributes: Mapping[str, str], delivery: Any) -> Message:
        """:meth:`decode`, the message carrying the ``delivery`` it came in (what a worker hands
        its handler). The built-in validators attach it as they build the message, which saves a
        copy per message; this default copies."""
        return delivered(self.decode(body, attributes), delivery)

    def check_version(
        self, message_type: str, version: Version, *, error: type[ValidationError], receiving: bool = False
    ) -> None:
        """Refuse a type or major the schema lacks, or a minor newer than it knows.

        A newer minor is always refused when publishing; when ``receiving``, only if
        :attr:`strict_minor` is set.
        """
        latest = self.latest_version(message_type, version.major)
        if version.minor > latest.minor and (self.strict_minor or not receiving):
            raise error(
                f"{message_type} {version}: minor version {version.minor} is newer than the "
                f"schema knows (newest is {latest}){' and strict_minor is set' if receiving else ''}"
            )


class _Attaching(Validator):
    """A validator that builds a received message with its delivery attached (the built-ins):
    it implements ``_decode``, which both :meth:`decode` and :meth:`decode_delivery` go through.
    A subclass that overrides :meth:`decode` is still asked, by the base's copying default."""

    def decode(self, body: bytes, attributes: Mapping[str, str]) -> Message:
        return self._decode(body, attributes, None)

    def decode_delivery(self, body: bytes, attributes: Mapping[str, str], delivery: Any) -> Message:
        if type(self).decode is not _Attaching.decode:  # a subclass decodes its own way: ask it
            return super().decode_delivery(body, attributes, delivery)
        return self._decode(body, attributes, delivery)

    @abc.abstractmethod
    def _decode(self, body: bytes, attributes: Mapping[str, str], delivery: Any) -> Message:
        """Decode either form and validate, the message carrying ``delivery`` (None: none)."""


def check_headers(headers: Mapping[str, str]) -> None:
    """Headers are string to string and never use the reserved ``hedwig_`` prefix."""
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValidationError(f"header {key!r}: keys and values must be strings, got {value!r}")
        if key.startswith(_RESERVED_PREFIX):
            raise ValidationError(f"header {key!r}: the 'hedwig_' prefix is reserved")


def meta_attributes(message: Message, schema: str) -> dict[str, str]:
    """The transport attributes of the attributes form: five ``hedwig_*`` plus every header."""
    attributes = {
        "hedwig_format_version": FORMAT_VERSION,
        "hedwig_id": message.id,
        "hedwig_message_timestamp": str(message.timestamp),
        "hedwig_publisher": message.publisher,
        "hedwig_schema": schema,
    }
    attributes.update(message.headers)
    return attributes


def headers_from_attributes(attributes: Mapping[str, str]) -> dict[str, str]:
    """Every attribute outside the ``hedwig_`` namespace is a header, as Hedwig reads them."""
    if attributes.keys() <= _USUAL_ATTRIBUTES:  # most messages: no headers (a set test, in C)
        return {}
    return {k: v for k, v in attributes.items() if not k.startswith(_RESERVED_PREFIX)}


def read_meta_attributes(attributes: Mapping[str, str], delivery: Any = None) -> tuple[str, Metadata, str]:
    """``(id, metadata, schema)`` from transport attributes, the metadata carrying ``delivery``;
    :class:`DecodeError` if any is missing."""
    # a worker does this per message: subscripts and one chain of type tests, the errors aside
    try:
        format_version = attributes["hedwig_format_version"]
        message_id = attributes["hedwig_id"]
        timestamp_text = attributes["hedwig_message_timestamp"]
        publisher = attributes["hedwig_publisher"]
        schema = attributes["hedwig_schema"]
    except KeyError:
        raise _missing(attributes) from None
    if not (
        type(format_version) is str
        and type(message_id) is str
        and type(timestamp_text) is str
        and type(publisher) is str
        and type(schema) is str
    ):
        if any(not isinstance(attributes.get(name), str) for name in META_ATTRIBUTES):  # a str subclass passes
            raise _missing(attributes)
    if format_version != FORMAT_VERSION:
        raise DecodeError(f"unknown hedwig_format_version {format_version!r}")
    try:
        timestamp = int(timestamp_text)
    except ValueError:
        raise DecodeError(f"hedwig_message_timestamp is not an integer: {timestamp_text!r}") from None
    metadata = Metadata.received(timestamp, publisher, headers_from_attributes(attributes), delivery)
    return message_id, metadata, schema


def _missing(attributes: Mapping[str, Any]) -> DecodeError:
    """The error naming the meta attributes that are missing or not strings."""
    missing = [name for name in META_ATTRIBUTES if not isinstance(attributes.get(name), str)]
    return DecodeError(f"missing Hedwig attribute(s): {', '.join(missing)}")


def parse_schema_tail(schema: str) -> tuple[str, Version]:
    """``("send_email", Version(1, 0))`` from a schema string ending in ``send_email/1.0``."""
    head, _, version = schema.rpartition("/")
    message_type = head.rpartition("/")[2]
    if not message_type or not version:
        raise DecodeError(f"invalid schema {schema!r}: expected it to end in '<type>/<major>.<minor>'")
    try:
        return message_type, Version.parse(version)
    except ValueError:
        raise DecodeError(f"invalid schema {schema!r}: {version!r} is not a version") from None


def to_transport(encoded: Encoded, *, text_only: bool) -> tuple[bytes, dict[str, str]]:
    """Body and attributes as a transport carries them.

    A transport that carries only text (SNS/SQS) gets a binary body base64-encoded the way
    Hedwig does (MIME style, newline every 76 characters) with ``hedwig_encoding=base64``; a
    transport that carries bytes gets a text body flagged ``hedwig_encoding=utf8``.
    """
    attributes = dict(encoded.attributes)
    if text_only and encoded.binary:
        attributes[ENCODING_ATTRIBUTE] = "base64"
        return base64.encodebytes(encoded.body), attributes
    if not text_only and not encoded.binary:
        attributes[ENCODING_ATTRIBUTE] = "utf8"
    return encoded.body, attributes


def from_transport(body: bytes | str, attributes: Mapping[str, str]) -> bytes:
    """Undo :func:`to_transport`: the validator's bytes. Raises :class:`DecodeError` on bad base64."""
    raw = body.encode() if isinstance(body, str) else body
    if attributes.get(ENCODING_ATTRIBUTE) == "base64":
        try:
            return base64.b64decode(raw)
        except (binascii.Error, ValueError) as exc:
            raise DecodeError(f"body is not valid base64: {exc}") from None
    return raw


def dump_any(value: Any) -> str:
    """A short, safe rendering of a value for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
