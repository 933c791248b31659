"""How SNS and SQS carry a Hedwig message: the message limits, and reading and writing its fields.

It holds what a message may be (:data:`MAX_MESSAGE_BYTES`, :data:`MAX_ATTRIBUTES`, the
characters SQS accepts) and the checks made before publishing (:func:`outgoing`,
:func:`sized_batches`); reading a received message's fields without raising
(:func:`read_message`: attributes, an SNS envelope, the receive count); and the
``hedwig_dead_letter`` attribute a dead letter's reason and displaced attributes ride in.
Pure functions on boto3's message dicts: no I/O. See ``aws.py`` for the design.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

from hedwig_tasks.exceptions import PublishError

__all__ = [
    "BATCH",
    "MAX_DELAY_S",
    "NOT_BEFORE_ATTRIBUTE",
    "DEAD_LETTER_ATTRIBUTE",
    "MAX_ATTRIBUTES",
    "MAX_MESSAGE_BYTES",
    "Read",
    "outgoing",
    "plain_attributes",
    "read_message",
    "sent_at",
    "sized_batches",
    "split_dead_letter",
    "sqs_attributes",
    "whole",
    "with_dead_letter",
]

#: Most entries in one SQS or SNS batch call.
BATCH = 10
#: Largest SNS/SQS message, body plus attribute names, types and values, in bytes.
MAX_MESSAGE_BYTES = 262144
#: Most message attributes an SQS message (and raw SNS delivery to SQS) carries.
MAX_ATTRIBUTES = 10
#: The attribute a dead letter's reason (and any attributes it displaced) rides in.
DEAD_LETTER_ATTRIBUTE = "hedwig_dead_letter"
#: The attribute a delayed publish rides with: epoch ms before which no consumer gets it.
NOT_BEFORE_ATTRIBUTE = "hedwig_not_before"
#: Longest ``DelaySeconds`` SQS takes on a send, in seconds.
MAX_DELAY_S = 900

# Characters SQS accepts in bodies and attribute values (raw SNS delivery drops anything else).
_BAD_CHARS_RE = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_WHOLE_RE = re.compile(r"[0-9]{1,18}")


def sqs_attributes(attributes: Mapping[str, str]) -> dict[str, dict[str, str]]:
    return {name: {"DataType": "String", "StringValue": value} for name, value in attributes.items()}


def plain_attributes(raw: Any) -> dict[str, str]:
    """SQS message attributes as text (binary ones as base64), whatever could be read."""
    return _read_attributes(raw)[0]


def _read_attributes(raw: Any) -> tuple[dict[str, str], list[str]]:
    """SQS message attributes as text, and a fault for each one that is not text."""
    if raw is None:
        return {}, []
    if not isinstance(raw, Mapping):
        return {}, [f"message attributes are {type(raw).__name__}, not a map"]
    found, faults = {}, []
    for name, value in raw.items():
        text, fault = _attribute_text(str(name), value)
        if text is not None:
            found[str(name)] = text
        if fault:
            faults.append(fault)
    return found, faults


def _attribute_text(name: str, value: Any) -> tuple[str | None, str]:
    """One attribute's text (None if there is none) and a fault ("" when it is plain text).

    Hedwig sends every attribute as a String; a Number's text is kept as it came. A Binary
    one is shown as base64, and is a fault: a header that is not text has no meaning here.
    """
    if not isinstance(value, Mapping):
        return None, f"attribute {name!r} is {type(value).__name__}, not an SQS attribute value"
    kind = str(value.get("DataType", ""))
    if kind.startswith("Binary"):
        raw = value.get("BinaryValue")
        text = base64.b64encode(raw).decode() if isinstance(raw, (bytes, bytearray)) else None
        return text, f"attribute {name!r} is of type {kind}, not text (shown as base64)"
    text = value.get("StringValue")
    if not isinstance(text, str):
        return None, f"attribute {name!r} of type {kind or '?'} has no text value"
    return text, ""


def _wire_size(body: str, attributes: Mapping[str, str]) -> int:
    size = len(body.encode())
    return size + sum(len(k.encode()) + len("String") + len(v.encode()) for k, v in attributes.items())


def outgoing(topic: str, body: bytes, attributes: Mapping[str, str]) -> str:
    """The body as text, after checking what SNS and SQS would refuse or silently drop."""
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError:
        raise PublishError(f"publish to {topic!r}: SNS carries text and the body is not UTF-8") from None
    if _BAD_CHARS_RE.search(text):
        raise PublishError(f"publish to {topic!r}: the body holds characters SQS does not accept")
    if len(attributes) > MAX_ATTRIBUTES:
        raise PublishError(
            f"publish to {topic!r}: {len(attributes)} attributes, but SQS delivery carries at most "
            f"{MAX_ATTRIBUTES} (AWS drops such messages); use fewer headers or the container form"
        )
    if not attributes.get("hedwig_publisher", "-"):
        raise PublishError(
            f"publish to {topic!r}: the message names no publisher (hedwig_publisher is empty, which SQS "
            "refuses): set HEDWIG_PUBLISHER, or give the app one with Hedwig(..., publisher=...)"
        )
    for name, value in attributes.items():
        if not value or _BAD_CHARS_RE.search(value):
            raise PublishError(f"publish to {topic!r}: attribute {name!r} must be non-empty text SQS accepts")
    size = _wire_size(text, attributes)
    if size > MAX_MESSAGE_BYTES:
        raise PublishError(f"publish to {topic!r}: message is {size} bytes; SNS takes at most {MAX_MESSAGE_BYTES}")
    return text


def sized_batches(entries: list[tuple[int, str, Mapping[str, str]]]) -> Iterator[list[tuple[int, str, Any]]]:
    """Entries in batches of at most ten and at most MAX_MESSAGE_BYTES in all."""
    batch: list[tuple[int, str, Any]] = []
    size = 0
    for entry in entries:
        entry_size = _wire_size(entry[1], entry[2])
        if batch and (len(batch) == BATCH or size + entry_size > MAX_MESSAGE_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(entry)
        size += entry_size
    if batch:
        yield batch


def _unwrap_envelope(body: str, attributes: dict[str, str]) -> tuple[str, dict[str, str], str]:
    """Body and attributes of an SNS notification delivered without raw delivery, and a fault.

    Anything else comes back as it was. An envelope whose message or attributes are not
    text comes back as it was too, with a fault naming what is wrong, so nothing is lost.
    """
    if attributes or not body.startswith("{"):
        return body, attributes, ""
    try:
        envelope = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested past what the parser takes
        return body, attributes, ""
    if not isinstance(envelope, dict) or envelope.get("Type") != "Notification" or "TopicArn" not in envelope:
        return body, attributes, ""
    message = envelope.get("Message", "")
    if not isinstance(message, str) or _BAD_CHARS_RE.search(message):
        return body, attributes, "SNS envelope: its Message is not text SQS can carry"
    raw = envelope.get("MessageAttributes") or {}
    if not isinstance(raw, dict):
        return body, attributes, f"SNS envelope: its MessageAttributes are {type(raw).__name__}, not a map"
    found = {}
    for name, value in raw.items():
        kind = value.get("Type", "") if isinstance(value, dict) else ""
        text = value.get("Value") if isinstance(value, dict) else None
        if not str(kind).startswith(("String", "Number")) or not isinstance(text, str) or _BAD_CHARS_RE.search(text):
            return body, attributes, f"SNS envelope: attribute {name!r} is not text (type {kind or '?'})"
        found[name] = text
    return message, found, ""


def split_dead_letter(attributes: dict[str, str]) -> tuple[dict[str, str], dict[str, Any]]:
    """The message's own attributes (displaced ones restored) and the dead-letter info.

    Lenient, for the dead-letter tools: info that cannot be read is left out.
    """
    raw = attributes.pop(DEAD_LETTER_ATTRIBUTE, None)
    info, _ = _dead_letter_info(raw)
    attributes.update(info.get("attributes") or {})
    return attributes, info


def _restore_displaced(attributes: dict[str, str]) -> tuple[dict[str, str], str]:
    """For a consumer: attributes with those a dead letter displaced restored, and a fault
    (the attribute kept as it came) when the dead-letter info cannot be read."""
    raw = attributes.get(DEAD_LETTER_ATTRIBUTE)
    if raw is None:
        return attributes, ""
    info, fault = _dead_letter_info(raw)
    if fault:
        return attributes, fault
    rest = {k: v for k, v in attributes.items() if k != DEAD_LETTER_ATTRIBUTE}
    return {**rest, **(info.get("attributes") or {})}, ""


def _dead_letter_info(raw: str | None) -> tuple[dict[str, Any], str]:
    """The JSON of a ``hedwig_dead_letter`` attribute, and a fault ("" if it reads as ours)."""
    if not raw:
        return {}, ""
    try:
        info = json.loads(raw)
    except (ValueError, RecursionError):
        return {}, f"attribute {DEAD_LETTER_ATTRIBUTE} is not JSON: {raw[:200]!r}"
    if not isinstance(info, dict):
        return {}, f"attribute {DEAD_LETTER_ATTRIBUTE} is JSON {type(info).__name__}, not an object: {raw[:200]!r}"
    displaced = info.get("attributes") or {}
    if not isinstance(displaced, dict) or not all(isinstance(v, str) for v in displaced.values()):
        return {k: v for k, v in info.items() if k != "attributes"}, (
            f"attribute {DEAD_LETTER_ATTRIBUTE}: its displaced attributes are not a map of text: {raw[:200]!r}"
        )
    return info, ""


def whole(value: Any) -> int | None:
    """A whole number 0 or more, from text or an int; None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    if isinstance(value, str) and _WHOLE_RE.fullmatch(value.strip()):
        return int(value)
    return None


@dataclasses.dataclass(frozen=True)
class Read:
    """What a consumer reads from one received SQS message."""

    body: str
    attributes: dict[str, str]
    attempt: int
    fault: str  #: what could not be read; "" when everything could


def read_message(message: Mapping[str, Any]) -> Read:
    """Body, attributes and attempt of one received message. Never raises: whatever cannot
    be read is named in the fault, the body stays as it came and the attempt falls back to 1."""
    faults: list[str] = []
    body = message.get("Body", "")
    if not isinstance(body, str):
        faults.append(f"body is {type(body).__name__}, not text")
        body = ""
    attributes, attribute_faults = _read_attributes(message.get("MessageAttributes"))
    faults += attribute_faults
    if not faults:
        unwrapped, attributes, fault = _unwrap_envelope(body, attributes)
        body = unwrapped if not fault else body
        faults += [fault] if fault else []
    attributes, fault = _restore_displaced(attributes)
    faults += [fault] if fault else []
    system = message.get("Attributes")
    count = system.get("ApproximateReceiveCount", "1") if isinstance(system, Mapping) else "1"
    attempt = whole(count)
    if not attempt:
        faults.append(f"ApproximateReceiveCount {count!r} is not a whole number 1 or more")
    return Read(body, attributes, attempt or 1, "; ".join(faults))


def with_dead_letter(attributes: Mapping[str, str], info: dict[str, Any]) -> dict[str, str]:
    """Attributes plus the dead-letter info, moving attributes into it past the limit of ten."""
    kept = {k: v for k, v in attributes.items() if k != DEAD_LETTER_ATTRIBUTE}
    if len(kept) >= MAX_ATTRIBUTES:
        ranked = sorted(kept, key=lambda name: (not name.startswith("hedwig_"), name))
        info = {**info, "attributes": {name: kept.pop(name) for name in ranked[MAX_ATTRIBUTES - 1 :]}}
    kept[DEAD_LETTER_ATTRIBUTE] = json.dumps(info, ensure_ascii=False, separators=(",", ":"))
    return kept


def sent_at(message: Mapping[str, Any]) -> int:
    """When SQS took the message, in epoch ms (0 if it does not say)."""
    return whole((message.get("Attributes") or {}).get("SentTimestamp")) or 0
