"""Pub/Sub transport internals shared by the transport, its consumer and its administration:
constants, the error boundary and message checks. See ``gcp.py`` for the design."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import parse_qs

import grpc
from google.api_core import exceptions as google_exceptions

from hedwig_tasks.exceptions import ConfigurationError, PublishError, TransportError

#: Ack deadline a receive takes and each lease extension asks for, in seconds.
DEFAULT_LEASE_S = 30.0
#: Deliveries after which the subscription's dead-letter policy moves a message (the safety net).
DEFAULT_MAX_DELIVERY_ATTEMPTS = 20
#: Longest a publish keeps retrying an unavailable service before it raises, in seconds.
DEFAULT_PUBLISH_TIMEOUT_S = 30.0
#: Longest one administrative call may take, in seconds.
CALL_TIMEOUT_S = 10.0
#: Longest one pull waits for messages, in seconds.
MAX_LONG_POLL_S = 10.0
#: A pull's deadline beyond its wait: Pub/Sub answers an empty pull about a second before it.
PULL_DEADLINE_MARGIN_S = 0.95
#: How long a dead-letter read waits for more before it believes there are none, in seconds.
DLQ_WAIT_S = 0.5
#: Longest pause between quick polls of several subscriptions, in seconds.
MAX_POLL_PAUSE_S = 0.2
#: Longest ack deadline Pub/Sub takes in one call, in seconds.
MAX_ACK_DEADLINE_S = 600
#: Shortest ack deadline a subscription can have, in seconds.
MIN_SUBSCRIPTION_DEADLINE_S = 10
#: Largest Pub/Sub message (data plus attributes), in bytes.
MAX_MESSAGE_BYTES = 10_000_000
#: Most attributes on one message.
MAX_ATTRIBUTES = 100
#: Longest attribute key and value, in bytes.
MAX_ATTRIBUTE_KEY_BYTES = 256
MAX_ATTRIBUTE_VALUE_BYTES = 1024
#: Most messages one Publish or Pull call carries.
MAX_BATCH = 1000
#: Retention of the dead-letter subscription, in seconds (the Pub/Sub maximum, 7 days).
DLQ_RETENTION_S = 604800

#: Attributes this transport adds; none of them is a Hedwig header (the ``hedwig_`` prefix).
NOT_BEFORE_ATTRIBUTE = "hedwig_not_before"  #: epoch ms before which a republished retry waits
ATTEMPTS_ATTRIBUTE = "hedwig_attempts"  #: attempts made before a republished retry
REASON_ATTRIBUTE = "hedwig_dead_letter_reason"
SOURCE_ATTRIBUTE = "hedwig_dead_letter_subscription"
DEAD_ATTEMPTS_ATTRIBUTE = "hedwig_dead_letter_attempts"
DEAD_AT_ATTRIBUTE = "hedwig_dead_letter_at"  #: epoch ms
_OURS = frozenset(
    {
        NOT_BEFORE_ATTRIBUTE,
        ATTEMPTS_ATTRIBUTE,
        REASON_ATTRIBUTE,
        SOURCE_ATTRIBUTE,
        DEAD_ATTEMPTS_ATTRIBUTE,
        DEAD_AT_ATTRIBUTE,
    }
)
#: Attributes Pub/Sub adds when its dead-letter policy forwards a message.
_GOOGLE_DEAD_PREFIX = "CloudPubSubDeadLetter"

_URL_OPTIONS = (
    "retry_min_backoff_s",
    "retry_max_backoff_s",
    "batch_max_bytes",
    "batch_max_latency_s",
    "batch_max_messages",
    "emulator",
    "lease_s",
    "max_delivery_attempts",
    "publish_timeout_s",
)
_WHOLE_RE = re.compile(r"[0-9]{1,18}")
_RETRYABLE = (
    google_exceptions.ServiceUnavailable,
    google_exceptions.DeadlineExceeded,
    google_exceptions.InternalServerError,
    google_exceptions.Aborted,
    google_exceptions.ResourceExhausted,
    google_exceptions.Unknown,
)


# -- boundary and helpers ---------------------------------------------------------------------


@contextlib.contextmanager
def _boundary(doing: str, error: type[TransportError] = TransportError) -> Iterator[None]:
    """Turn google.api_core's errors into ours: the transport boundary."""
    try:
        yield
    except google_exceptions.NotFound as exc:
        raise error(f"{doing} failed: not found ({exc.message}); run `hedwig-tasks provision`") from exc
    except google_exceptions.RetryError as exc:
        cause = exc.cause if exc.cause is not None else exc
        raise error(f"{doing} failed: gave up retrying: {cause}") from exc
    except google_exceptions.GoogleAPIError as exc:
        hint = " (is the Pub/Sub emulator or service reachable?)" if isinstance(exc, _RETRYABLE) else ""
        raise error(f"{doing} failed: {exc}{hint}") from exc
    except (grpc.RpcError, OSError) as exc:
        raise error(f"{doing} failed: {exc}") from exc


def _check_message(topic: str, body: bytes, attributes: Mapping[str, str]) -> None:
    """Raise ``PublishError`` for what Pub/Sub would refuse, before anything is sent."""
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise PublishError(f"publish to {topic!r}: the body must be bytes, got {type(body).__name__}")
    if len(attributes) > MAX_ATTRIBUTES:
        raise PublishError(
            f"publish to {topic!r}: {len(attributes)} attributes; Pub/Sub takes at most {MAX_ATTRIBUTES}"
        )
    size = len(body)
    for key, value in attributes.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise PublishError(f"publish to {topic!r}: attribute {key!r} must be a string with a string value")
        key_bytes, value_bytes = len(key.encode()), len(value.encode())
        if not key or key_bytes > MAX_ATTRIBUTE_KEY_BYTES or key.startswith("goog"):
            raise PublishError(f"publish to {topic!r}: attribute name {key!r} is empty, too long or reserved")
        if value_bytes > MAX_ATTRIBUTE_VALUE_BYTES:
            raise PublishError(
                f"publish to {topic!r}: attribute {key!r} is {value_bytes} bytes; "
                f"Pub/Sub takes at most {MAX_ATTRIBUTE_VALUE_BYTES}"
            )
        size += key_bytes + value_bytes
    if size > MAX_MESSAGE_BYTES:
        raise PublishError(f"publish to {topic!r}: message is {size} bytes; Pub/Sub takes at most {MAX_MESSAGE_BYTES}")
    if not body and not attributes:
        raise PublishError(f"publish to {topic!r}: Pub/Sub refuses a message with neither data nor attributes")


def _options(query: str) -> dict[str, str]:
    given = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(given) - set(_URL_OPTIONS))
    if unknown:
        raise ConfigurationError(f"unknown gcp option(s) {', '.join(unknown)} (known: {', '.join(_URL_OPTIONS)})")
    return {name: values[-1] for name, values in given.items()}


def _number(name: str, value: Any, cast: Callable[[Any], float]) -> Any:
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"gcp option {name}={value!r} must be a number") from None


def _whole(text: str | None) -> int | None:
    """A whole number 0 or more written in ``text``; None for anything else."""
    if text is None or not _WHOLE_RE.fullmatch(text.strip()):
        return None
    return int(text)


def _short(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _epoch_ms() -> int:
    return int(time.time() * 1000)


def _clean(attributes: Mapping[str, str]) -> dict[str, str]:
    """The message's own attributes, without what this transport or Pub/Sub's DLQ added."""
    return {k: v for k, v in attributes.items() if k not in _OURS and not k.startswith(_GOOGLE_DEAD_PREFIX)}


@dataclasses.dataclass(eq=False)
class _Receipt:
    """One delivery of one message: its ack id, and whether it may still settle anything."""

    ack_id: str
    subscription: str  # full path
    message_id: str
    republished: bool  # carries hedwig_attempts: a retry that went through the app's own topic
    settled: bool = False
