"""The AMQP frames the Kombu transport writes and reads itself: a persistent ``basic.publish``
(method, content header and body frames, as one buffer) and the broker's ``basic.ack`` /
``basic.nack`` of it; a consumer's ``basic.ack`` frames. Byte for byte what py-amqp writes for the same message;
py-amqp still opens the connection and channel, selects confirms and handles every other frame.
See ``kombu.py`` for the design.

Only the common case is built here: text headers whose names fit a short string, and an
exchange, routing key and message id that do too. Anything else (:func:`content_header` returns
None) goes through py-amqp's ``basic_publish``, which says what is wrong with it.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "ACK",
    "DELIVER",
    "NACK",
    "ack_frames",
    "confirm_of",
    "content_header",
    "deliver_args",
    "message_frames",
    "properties_of",
    "publish_method",
]

#: Method frame payload prefixes (class 60 ``basic``): ``basic.ack`` and ``basic.nack``.
ACK = b"\x00\x3c\x00\x50"
NACK = b"\x00\x3c\x00\x78"
DELIVER = b"\x00\x3c\x00\x3c"
_PUBLISH = b"\x00\x3c\x00\x28\x00\x00"  # basic.publish and its reserved short
_FRAME = struct.Struct(">BHI")
_FRAME_END = b"\xce"
_CONFIRM = struct.Struct(">QB")  # delivery tag, then the bits (multiple first)
_ACK_FRAME = struct.Struct(">BHIHHQ?B")  # a whole basic.ack frame: header, class, method, tag, multiple, end
_HEADER = struct.Struct(">HHQH")  # class, weight, body size, property flags
_FLAGS_AT = struct.Struct(">H")
_LONG = struct.Struct(">I")
#: Property flags: content type, content encoding, headers, delivery mode, expiration, message id.
_FLAGS = 0x8000 | 0x4000 | 0x2000 | 0x1000 | 0x0080
_EXPIRATION_FLAG = 0x0100
#: Properties :func:`properties_of` reads (short strings but the headers and delivery mode), by flag.
_READ = (
    (0x8000, "content_type"),
    (0x4000, "content_encoding"),
    (0x2000, "application_headers"),
    (0x1000, "delivery_mode"),
    (0x0100, "expiration"),
    (0x0080, "message_id"),
)
_READABLE = 0x8000 | 0x4000 | 0x2000 | 0x1000 | 0x0100 | 0x0080
_INT = struct.Struct(">i")
#: The content type and encoding every message of ours carries (``_kombu_messages._CONTENT``).
_CONTENT = b"\x18application/octet-stream\x06binary"
_PERSISTENT = b"\x02"


def _short(text: str) -> bytes | None:
    raw = text.encode("utf-8", "surrogatepass")
    return bytes((len(raw),)) + raw if len(raw) < 256 else None


def frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    """One frame: type, channel, size, ``payload`` and the frame end octet."""
    return _FRAME.pack(frame_type, channel, len(payload)) + payload + _FRAME_END


def publish_method(channel: int, exchange: str, routing_key: str, *, mandatory: bool) -> bytes | None:
    """The ``basic.publish`` method frame (constant per channel, exchange and key: callers keep it),
    or None if a name does not fit a short string."""
    name, key = _short(exchange), _short(routing_key)
    if name is None or key is None:
        return None
    return frame(1, channel, _PUBLISH + name + key + (b"\x01" if mandatory else b"\x00"))


def content_header(
    body_size: int, headers: Mapping[str, str], message_id: str, expiration: str | None = None
) -> bytes | None:
    """The content header payload of a persistent message with our content type, text ``headers``
    and ``message_id``; None if any of it is not what this builds (py-amqp's path takes it)."""
    parts: list[bytes] = []
    for key, value in headers.items():
        name = _header_name(key) if type(value) is str else None
        if name is None:
            return None
        raw = value.encode("utf-8", "surrogatepass")
        parts += (name, _LONG.pack(len(raw)), raw)
    table = b"".join(parts)
    ident = _short(message_id)
    if ident is None:
        return None
    flags, expires = _FLAGS, b""
    if expiration is not None:
        short = _short(expiration)
        if short is None:
            return None
        flags, expires = flags | _EXPIRATION_FLAG, short
    head = _HEADER.pack(60, 0, body_size, flags)
    return b"".join((head, _CONTENT, _LONG.pack(len(table)), table, _PERSISTENT, expires, ident))


@functools.lru_cache(maxsize=1024)
def _header_name(key: object) -> bytes | None:
    """A header's name as a table key followed by the long string type; None if it is not a short string."""
    if type(key) is not str:
        return None
    short = _short(key)
    return None if short is None else short + b"S"


def message_frames(method: bytes, channel: int, header: bytes, body: bytes, frame_max: int) -> bytes:
    """``method``, the content header and ``body`` (in frames of at most ``frame_max`` bytes) as one buffer."""
    parts = [method, _FRAME.pack(2, channel, len(header)), header, _FRAME_END]
    chunk = frame_max - 8 if frame_max > 8 else len(body) or 1
    for start in range(0, len(body), chunk):
        piece = body[start : start + chunk]
        parts += (_FRAME.pack(3, channel, len(piece)), piece, _FRAME_END)
    return b"".join(parts)


def ack_frames(channel: int, plan: Sequence[tuple[int, bool]]) -> bytes:
    """``basic.ack`` frames, one per ``(delivery tag, multiple)``, as one buffer."""
    return b"".join(_ACK_FRAME.pack(1, channel, 13, 60, 80, tag, multiple, 0xCE) for tag, multiple in plan)


def confirm_of(payload: bytes) -> tuple[int, bool]:
    """The delivery tag and ``multiple`` of a ``basic.ack`` or ``basic.nack`` method payload."""
    tag, bits = _CONFIRM.unpack_from(payload, 4)
    return tag, bool(bits & 1)


# -- reading deliveries -------------------------------------------------------------------------


def deliver_args(payload: bytes) -> tuple[str, int, bool]:
    """The consumer tag, delivery tag and ``redelivered`` of a ``basic.deliver`` method payload."""
    size = payload[4]
    tag, bits = _CONFIRM.unpack_from(payload, 5 + size)
    return payload[5 : 5 + size].decode("utf-8", "surrogatepass"), tag, bool(bits & 1)


def properties_of(header: bytes) -> dict[str, Any] | None:
    """A content header's properties as py-amqp reads them, for the usual ones (a few short
    strings, the delivery mode, headers of text and 32-bit integers); None for anything else,
    for py-amqp to read."""
    (flags,) = _FLAGS_AT.unpack_from(header, 12)
    if flags & ~_READABLE:
        return None
    if flags == _FLAGS:  # ours: content type and encoding, headers, delivery mode, message id
        return _ours(header)
    properties: dict[str, Any] = {}
    at = 14
    try:
        for flag, name in _READ:
            if not flags & flag:
                continue
            if flag == 0x2000:
                properties[name], at = _table(header, at)
            elif flag == 0x1000:
                properties[name] = header[at]
                at += 1
            else:
                size = header[at]
                properties[name] = header[at + 1 : at + 1 + size].decode("utf-8", "surrogatepass")
                at += 1 + size
    except (_Unusual, UnicodeDecodeError, IndexError, struct.error):
        return None
    return properties


def _ours(header: bytes) -> dict[str, Any] | None:
    """:func:`properties_of` for the properties this transport's publishes carry, in their order."""
    try:
        at = 15 + header[14]
        content_type = header[15:at].decode("utf-8", "surrogatepass")
        end = at + 1 + header[at]
        encoding = header[at + 1 : end].decode("utf-8", "surrogatepass")
        table, at = _table(header, end)
        size = header[at + 1]
        ident = header[at + 2 : at + 2 + size].decode("utf-8", "surrogatepass")
        mode = header[at]
    except (_Unusual, UnicodeDecodeError, IndexError, struct.error):
        return None
    return {
        "content_type": content_type,
        "content_encoding": encoding,
        "application_headers": table,
        "delivery_mode": mode,
        "message_id": ident,
    }


class _Unusual(Exception):
    """A table value :func:`_table` leaves to py-amqp."""


def _table(buffer: bytes, at: int) -> tuple[dict[str, Any], int]:
    (size,) = _LONG.unpack_from(buffer, at)
    at += 4
    end = at + size
    table: dict[str, Any] = {}
    while at < end:
        length = buffer[at]
        key = buffer[at + 1 : at + 1 + length].decode("utf-8", "surrogatepass")
        at += 1 + length
        kind = buffer[at]
        if kind == 0x53:  # S: a long string
            (length,) = _LONG.unpack_from(buffer, at + 1)
            table[key] = buffer[at + 5 : at + 5 + length].decode("utf-8", "surrogatepass")
            at += 5 + length
        elif kind == 0x49:  # I: a signed 32-bit integer (our attempt count)
            (table[key],) = _INT.unpack_from(buffer, at + 1)
            at += 5
        else:
            raise _Unusual
    if at != end:
        raise _Unusual
    return table, end
