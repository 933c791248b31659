"""How the Kombu transport's messages are built, sent and read: Hedwig attributes as headers,
persistent confirmed sends, reading a received message so that nothing in it can raise, and the
warning about publishes nobody receives. No connections of its own. See ``kombu.py`` for the design."""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol

import amqp
import amqp.exceptions

from hedwig_tasks.exceptions import PublishError
from hedwig_tasks.transports._kombu_names import ATTEMPTS, FAULT, topic_of
from hedwig_tasks.transports._kombu_wire import ACK, NACK, confirm_of, content_header, message_frames, publish_method

__all__ = [
    "Confirms",
    "Reading",
    "Received",
    "Wire",
    "attributes",
    "body_bytes",
    "headers_of",
    "message",
    "on_return",
    "read",
    "send",
    "warn_unrouted",
]

logger = logging.getLogger("hedwig_tasks.transports.kombu")  # one logger for the whole transport

#: Longest a publish waits for the broker's confirm, in seconds.
CONFIRM_TIMEOUT_S = 30.0

_OURS = "x-hedwig-"
_BROKERS = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")
_CONTENT = {"content_type": "application/octet-stream", "content_encoding": "binary"}


def _is_attribute(key: str, value: Any) -> bool:
    """Whether a header is a Hedwig attribute: not ours, not the broker's."""
    return not (key.startswith(_OURS) or key.startswith(_BROKERS) or (key == "redelivered" and value is True))


@functools.lru_cache(maxsize=1024)
def _plain_attribute(key: Any) -> bool:
    """Whether a header of this name is a Hedwig attribute whatever its value (not ``redelivered``)."""
    return type(key) is str and key != "redelivered" and _is_attribute(key, None)


def attributes(headers: Mapping[str, Any]) -> dict[str, str]:
    """The Hedwig attributes among headers we wrote (a dead letter's), each as text."""
    return {k: v if isinstance(v, str) else str(v) for k, v in headers.items() if _is_attribute(k, v)}


# -- sending ----------------------------------------------------------------------------------


def message(body: bytes, headers: Mapping[str, Any], *, message_id: Any = None, expiration: float | None = None) -> Any:
    """A persistent py-amqp message carrying ``body`` with ``headers`` (``expiration`` in seconds)."""
    properties: dict[str, Any] = {**_CONTENT, "delivery_mode": 2, "application_headers": dict(headers)}
    if message_id:
        properties["message_id"] = message_id
    if expiration is not None:
        properties["expiration"] = _ttl(expiration)
    return amqp.Message(body, **properties)


class Wire(Protocol):
    """A connection's socket as the publisher uses it: whole buffers out, frames in."""

    channel_id: int  #: the confirm channel's number

    @property
    def frame_max(self) -> int: ...

    def write(self, data: bytes) -> None:
        """Write ``data`` (whole frames) at once, under the connection's write lock."""

    def next_frame(self, timeout_s: float) -> tuple[int, int, bytes]:
        """The next frame read; ``TimeoutError`` if none came within ``timeout_s``."""

    def dispatch(self, frame: tuple[int, int, bytes]) -> None:
        """Hand a frame to py-amqp (a return, a channel or connection close, anything else)."""


class Confirms:
    """Publisher confirms on one py-amqp channel: publish any number, then wait for them all once.

    The channel is put in confirm mode; the broker numbers this channel's publishes from 1 and
    confirms them (several at once with ``multiple``), or refuses (nacks) them. With a ``wire``
    (a plain TCP connection), :meth:`send` writes each message's frames as one buffer and
    :meth:`wait` reads the acks itself; every other frame still goes to py-amqp. Not thread-safe:
    the caller holds whatever lock guards the channel's connection.
    """

    def __init__(self, channel: Any, wire: Wire | None = None) -> None:
        channel.confirm_select()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        self._channel = channel
        self._wire = wire
        self._methods: dict[tuple[str, str, bool], bytes | None] = {}  # publish method frames built
        self._sent = 0  # the broker's number of the last publish
        self._waiting: set[int] = set()
        self._nacked = 0

    def publish(self, message: Any, *, routing_key: str, exchange: str = "", mandatory: bool = False) -> None:
        """Send one py-amqp message, without waiting for its confirm (see :meth:`wait`)."""
        self._channel.basic_publish(message, exchange=exchange, routing_key=routing_key, mandatory=mandatory)
        self._sent += 1
        self._waiting.add(self._sent)

    def send(
        self,
        body: bytes,
        headers: Mapping[str, str],
        *,
        message_id: str,
        routing_key: str,
        exchange: str = "",
        mandatory: bool = False,
        expiration: float | None = None,
    ) -> None:
        """Send one persistent message (as :func:`message` builds it), without waiting for its confirm."""
        frames = self._frames(body, headers, message_id, exchange, routing_key, mandatory, expiration)
        if frames is None:
            built = message(body, headers, message_id=message_id, expiration=expiration)
            self.publish(built, exchange=exchange, routing_key=routing_key, mandatory=mandatory)
            return
        assert self._wire is not None
        self._wire.write(frames)
        self._sent += 1
        self._waiting.add(self._sent)

    def _frames(
        self,
        body: bytes,
        headers: Mapping[str, str],
        message_id: str,
        exchange: str,
        routing_key: str,
        mandatory: bool,
        expiration: float | None,
    ) -> bytes | None:
        """The message's frames as one buffer, or None for py-amqp to send it (no wire, or unusual)."""
        wire = self._wire
        if wire is None or type(body) is not bytes:
            return None
        route = (exchange, routing_key, mandatory)
        method = self._methods.get(route, b"")
        if method == b"":
            if len(self._methods) > _KEPT_METHODS:
                self._methods.clear()
            method = self._methods[route] = publish_method(wire.channel_id, exchange, routing_key, mandatory=mandatory)
        ttl = None if expiration is None else _ttl(expiration)
        header = content_header(len(body), headers, message_id, ttl) if method is not None else None
        if header is None or method is None:
            return None
        return message_frames(method, wire.channel_id, header, body, wire.frame_max)

    def wait(self, timeout_s: float = CONFIRM_TIMEOUT_S) -> None:
        """Until the broker has confirmed every message published so far.

        Raises ``PublishError`` if it refused any (the rest are confirmed by then); a confirm
        that does not come within ``timeout_s`` (a blocked broker) raises a driver error, so the
        caller's boundary drops the connection.
        """
        deadline = time.monotonic() + timeout_s
        read = self._read if self._wire is not None else self._channel.connection.drain_events
        while self._waiting:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise amqp.exceptions.RecoverableConnectionError(
                    f"{len(self._waiting)} publishes not confirmed within {timeout_s:g}s"
                )
            try:
                read(timeout=remaining_s)
            except TimeoutError:
                continue
        nacked, self._nacked = self._nacked, 0
        if nacked:
            raise PublishError(f"RabbitMQ refused {nacked} of the messages (nack)")

    def _read(self, timeout: float) -> None:
        """Read one frame: a confirm of this channel's is taken here, anything else goes to py-amqp."""
        wire = self._wire
        assert wire is not None
        frame = wire.next_frame(timeout)
        frame_type, channel, payload = frame
        if frame_type == 1 and channel == wire.channel_id:
            kind = payload[:4]
            if kind == ACK:
                self._on_ack(*confirm_of(payload))
                return
            if kind == NACK:
                self._on_nack(*confirm_of(payload))
                return
        wire.dispatch(frame)

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        if multiple:
            self._waiting = {n for n in self._waiting if n > delivery_tag}
        else:
            self._waiting.discard(delivery_tag)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        before = len(self._waiting)
        self._on_ack(delivery_tag, multiple)
        self._nacked += before - len(self._waiting)


#: Most publish method frames a channel keeps built (one per exchange and routing key).
_KEPT_METHODS = 256


def _ttl(expiration: float) -> str:
    """A delay in seconds as an AMQP per-message TTL (milliseconds, as text)."""
    return str(max(0, int(expiration * 1000)))


def send(
    confirms: Confirms,
    routing_key: str,
    body: bytes,
    headers: Mapping[str, Any],
    *,
    message_id: Any = None,
    expiration: float | None = None,
) -> None:
    """Publish one message persistently to the queue ``routing_key`` and wait for its confirm."""
    confirms.publish(message(body, headers, message_id=message_id, expiration=expiration), routing_key=routing_key)
    confirms.wait()


_unrouted_lock = threading.Lock()
_unrouted: set[str] = set()  # topics warned about in this process


def warn_unrouted(topic: str, message_id: Any) -> None:
    """Warn, once per topic in this process, that a publish reached a topic without subscriptions."""
    with _unrouted_lock:
        if topic in _unrouted:
            return
        _unrouted.add(topic)
    logger.warning(
        "topic %s has no subscription: id=%s was delivered to nobody (said once per topic)", topic, message_id
    )


def on_return(exc: Any, exchange: str, routing_key: str, message: Any) -> None:
    """RabbitMQ gave back a mandatory publish: no queue is bound to the topic's exchange."""
    warn_unrouted(topic_of(exchange), message.properties.get("message_id"))


# -- reading what a broker hands over --------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Received:
    """A delivery read off the socket by the consumer itself (``_kombu_wire.properties_of``): the
    fields :func:`read` and the consumer use of a py-amqp message, with the body as bytes (py-amqp
    would not decode it either: it carries no content encoding, or ``binary``)."""

    body: bytes
    properties: dict[str, Any]
    delivery_info: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Reading:
    """What a consumer could read of one received message."""

    body: bytes
    attributes: dict[str, str]  #: the headers that are Hedwig attributes (text values only)
    attempt: int
    message_id: str
    fault: str  #: what could not be read, for the worker to dead-letter it with; empty if nothing


def read(message: Any) -> Reading:
    """Every field the consumer uses of a received py-amqp message, read so that no value of it can raise.

    Another system may publish to a subscription: a text body (py-amqp decodes a body that has
    a ``content_encoding``), no body, headers or counts of any type. What cannot be read is
    named in ``fault``; the body is then the raw bytes there are and the attempt 1.
    """
    faults: list[str] = []
    properties = message.properties if isinstance(message.properties, Mapping) else {}
    headers = properties.get("application_headers")
    if headers is None:
        headers = {}
    elif not isinstance(headers, Mapping):
        faults.append(f"headers are {_kind(headers)}, not a table")
        headers = {}
    earlier = headers.get(FAULT)
    if isinstance(earlier, str) and earlier:
        faults.append(earlier)  # found when it was first received; this is a copy the consumer made
    body = _body(message.body, properties, faults)
    found = _text_attributes(headers, faults)
    attempt = _attempt(message, headers, faults)
    return Reading(body, found, attempt, str(properties.get("message_id") or ""), "; ".join(faults))


def body_bytes(body: Any, encoding: Any = None) -> tuple[bytes, str]:
    """A message body as bytes, and what was wrong with it ("" if nothing).

    A text body is what the client decoded with the message's ``content_encoding``: it is
    encoded back with that encoding (or UTF-8 when there is none).
    """
    if body is None or body == "":  # no body frames came: py-amqp leaves the text "", whatever the encoding
        return b"", ""
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body), ""
    if isinstance(body, str):
        codec = encoding if isinstance(encoding, str) and encoding else "utf-8"
        try:
            return body.encode(codec), ""
        except (LookupError, ValueError):  # ValueError: a codec name with a NUL, UnicodeError
            return body.encode("utf-8", "surrogatepass"), f"its text body cannot be encoded back as {codec!r}"
    return b"", f"body is {_kind(body)}, not bytes or text"


def headers_of(message: Any) -> dict[str, Any]:
    """A py-amqp message's headers (an empty table when it has none)."""
    return message.properties.get("application_headers") or {}


def _body(raw: Any, properties: Mapping[str, Any], faults: list[str]) -> bytes:
    body, fault = body_bytes(raw, properties.get("content_encoding"))
    if fault:
        faults.append(fault)
    return body


def _text_attributes(headers: Mapping[Any, Any], faults: list[str]) -> dict[str, str]:
    """The Hedwig attributes among the headers (without ours and the broker's); each must be text."""
    found: dict[str, str] = {}
    odd: list[str] = []
    for key, value in headers.items():
        if type(value) is str and _plain_attribute(key):  # the usual header: looked at once per name
            found[key] = value
        elif not isinstance(key, str):
            odd.append(_short(key))
        elif not _is_attribute(key, value):
            continue
        elif isinstance(value, str):
            found[key] = value
        else:
            odd.append(f"{key} ({_kind(value)})")
    if odd:
        faults.append(f"headers that are not text: {', '.join(sorted(odd))}")
    return found


def _attempt(message: Any, headers: Mapping[Any, Any], faults: list[str]) -> int:
    count = headers.get(ATTEMPTS, 0)
    if type(count) is not int or count < 0:  # a bool is an int, but not a count
        faults.append(f"{ATTEMPTS} is {_short(count)}, not a count")
        return 1
    info = message.delivery_info
    return count + 1 + bool(isinstance(info, Mapping) and info.get("redelivered"))


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."
