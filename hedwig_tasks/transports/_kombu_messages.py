"""How the Kombu transport's messages are built, sent and read: Hedwig attributes as headers,
persistent confirmed sends, reading a received message so that nothing in it can raise, and the
warning about publishes nobody receives. No connections of its own. See ``kombu.py`` for the design."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping
from typing import Any

from hedwig_tasks.transports._kombu_names import ATTEMPTS, FAULT, topic_of

__all__ = [
    "Reading",
    "attributes",
    "body_bytes",
    "on_return",
    "read",
    "send",
    "warn_unrouted",
]

logger = logging.getLogger("hedwig_tasks.transports.kombu")  # one logger for the whole transport

#: RabbitMQ: longest a publish waits for the broker's confirm, in seconds.
CONFIRM_TIMEOUT_S = 30.0

_OURS = "x-hedwig-"
_BROKERS = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")
_CONTENT = {"content_type": "application/octet-stream", "content_encoding": "binary"}


def _is_attribute(key: str, value: Any) -> bool:
    """Whether a header is a Hedwig attribute: not ours, not the broker's."""
    return not (key.startswith(_OURS) or key.startswith(_BROKERS) or (key == "redelivered" and value is True))


def attributes(headers: Mapping[str, Any]) -> dict[str, str]:
    """The Hedwig attributes among headers we wrote (a dead letter's), each as text."""
    return {k: v if isinstance(v, str) else str(v) for k, v in headers.items() if _is_attribute(k, v)}


# -- sending ----------------------------------------------------------------------------------


def send(
    channel: Any,
    routing_key: str,
    body: bytes,
    headers: Mapping[str, Any],
    *,
    exchange: str = "",
    message_id: Any = None,
    expiration: float | None = None,
    mandatory: bool = False,
) -> None:
    """Publish persistently (what ``kombu.Producer.publish`` does, without its per-call setup).

    ``exchange`` defaults to the default exchange: straight to the queue ``routing_key``.
    The channel waits for the broker's confirm; a refusal raises. A ``mandatory``
    publish that no queue takes comes back to the channel's return handler before the confirm.
    """
    properties: dict[str, Any] = {"delivery_mode": 2, "message_id": message_id}
    if expiration is not None:
        properties["expiration"] = str(max(0, int(expiration * 1000)))
    message = channel.prepare_message(
        body, 0, _CONTENT["content_type"], _CONTENT["content_encoding"], dict(headers), properties
    )
    # A confirm that never comes (a blocked broker) must not hang the caller.
    channel.basic_publish(
        message, exchange=exchange, routing_key=routing_key, mandatory=mandatory, timeout=CONFIRM_TIMEOUT_S
    )


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


@dataclasses.dataclass(frozen=True)
class Reading:
    """What a consumer could read of one received Kombu message."""

    body: bytes
    attributes: dict[str, str]  #: the headers that are Hedwig attributes (text values only)
    attempt: int
    message_id: str
    fault: str  #: what could not be read, for the worker to dead-letter it with; empty if nothing


def read(message: Any) -> Reading:
    """Every field the consumer uses of a received message, read so that no value of it can raise.

    Another system may publish to a subscription: a text body (AMQP clients decode a body that
    has a ``content_encoding``), no body, headers or counts of any type. What cannot be read is
    named in ``fault``; the body is then the raw bytes there are and the attempt 1.
    """
    faults: list[str] = []
    headers = message.headers
    if not isinstance(headers, Mapping):
        faults.append(f"headers are {_kind(headers)}, not a table")
        headers = {}
    earlier = headers.get(FAULT)
    if isinstance(earlier, str) and earlier:
        faults.append(earlier)  # found when it was first received; this is a copy the consumer made
    body = _body(message, faults)
    found = _text_attributes(headers, faults)
    attempt = _attempt(message, headers, faults)
    properties = message.properties if isinstance(message.properties, Mapping) else {}
    return Reading(body, found, attempt, str(properties.get("message_id") or ""), "; ".join(faults))


def body_bytes(body: Any, encoding: Any = None) -> tuple[bytes, str]:
    """A message body as bytes, and what was wrong with it ("" if nothing).

    A text body is what the client decoded with the message's ``content_encoding``: it is
    encoded back with that encoding (or UTF-8 when there is none).
    """
    if body is None:
        return b"", ""
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body), ""
    if isinstance(body, str):
        codec = encoding if isinstance(encoding, str) and encoding else "utf-8"
        try:
            return body.encode(codec), ""
        except (LookupError, UnicodeError):
            return body.encode("utf-8", "surrogatepass"), f"its text body cannot be encoded back as {codec!r}"
    return b"", f"body is {_kind(body)}, not bytes or text"


def _body(message: Any, faults: list[str]) -> bytes:
    body, fault = body_bytes(message.body, message.content_encoding)
    if fault:
        faults.append(fault)
    return body


def _text_attributes(headers: Mapping[Any, Any], faults: list[str]) -> dict[str, str]:
    """The Hedwig attributes among the headers (without ours and the broker's); each must be text."""
    found: dict[str, str] = {}
    odd: list[str] = []
    for key, value in headers.items():
        if not isinstance(key, str):
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
