"""What a Pub/Sub message carries beside a Hedwig message, and what Pub/Sub takes in one.

It holds the attributes this transport adds (a retry's not-before time and attempts, a dead
letter's reason, source, attempts and time) and how to read them back safely; removing them
(and those Pub/Sub's dead-letter policy adds) before a message is handed out; and the check of
a message against Pub/Sub's size and attribute limits before anything is sent.
See ``gcp.py`` for the design.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping

from hedwig_tasks.exceptions import PublishError

__all__ = [
    "ATTEMPTS_ATTRIBUTE",
    "DEAD_ATTEMPTS_ATTRIBUTE",
    "DEAD_AT_ATTRIBUTE",
    "GOOGLE_DEAD_PREFIX",
    "MAX_ATTRIBUTES",
    "NOT_BEFORE_ATTRIBUTE",
    "REASON_ATTRIBUTE",
    "SOURCE_ATTRIBUTE",
    "MAX_ATTRIBUTE_VALUE_BYTES",
    "check_message",
    "clean",
    "delayed",
    "epoch_ms",
    "whole",
]

#: Largest Pub/Sub message (data plus attributes), in bytes.
MAX_MESSAGE_BYTES = 10_000_000
#: Most attributes on one message.
MAX_ATTRIBUTES = 100
#: Longest attribute key and value, in bytes.
MAX_ATTRIBUTE_KEY_BYTES = 256
MAX_ATTRIBUTE_VALUE_BYTES = 1024

#: Attributes this transport adds; none of them is a Hedwig header (the ``hedwig_`` prefix).
NOT_BEFORE_ATTRIBUTE = "hedwig_not_before"  #: epoch ms before which a republished retry or delayed publish waits
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
#: Attributes Pub/Sub adds when its dead-letter policy forwards a message start with this.
GOOGLE_DEAD_PREFIX = "CloudPubSubDeadLetter"

_WHOLE_RE = re.compile(r"[0-9]{1,18}")


def whole(text: str | None) -> int | None:
    """A whole number 0 or more written in ``text``; None for anything else."""
    if text is None or not _WHOLE_RE.fullmatch(text.strip()):
        return None
    return int(text)


def epoch_ms() -> int:
    """Now, in milliseconds since the epoch (as ``hedwig_not_before`` and ``hedwig_dead_letter_at``)."""
    return int(time.time() * 1000)


def delayed(attributes: Mapping[str, str], delay_s: float) -> Mapping[str, str]:
    """The attributes of a publish delayed by ``delay_s``: a not-before time and no attempts yet.

    Pub/Sub has no delay: each consumer holds a message that came early with the broker (ack
    deadlines, or republishing to its app's own topic) until then. ``hedwig_attempts=0`` keeps
    those early deliveries out of the attempt the handler sees.
    """
    if delay_s <= 0:
        return attributes
    due_ms = epoch_ms() + math.ceil(delay_s * 1000)
    return {**attributes, NOT_BEFORE_ATTRIBUTE: str(due_ms), ATTEMPTS_ATTRIBUTE: "0"}


def clean(attributes: Mapping[str, str]) -> dict[str, str]:
    """The message's own attributes, without what this transport or Pub/Sub's DLQ added."""
    return {k: v for k, v in attributes.items() if k not in _OURS and not k.startswith(GOOGLE_DEAD_PREFIX)}


def check_message(topic: str, body: bytes, attributes: Mapping[str, str]) -> None:
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
