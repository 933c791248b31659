"""The Redis transport's layout: key and subscription names, the fields an entry carries, and
reading an entry (or a dead letter) back into body and attributes. See ``redis.py`` for the design."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from hedwig_tasks.exceptions import PublishError
from hedwig_tasks.transports.base import DeadLetterRecord

__all__ = [
    "ATTEMPT",
    "DEAD_AT",
    "DEAD_ATTEMPTS",
    "PAYLOAD",
    "REASON",
    "RESERVED",
    "SUBSCRIPTION",
    "Reading",
    "dead_letter_record",
    "delayed_key",
    "delayed_member",
    "dlq_key",
    "entry_fields",
    "publish_delayed_key",
    "queue_key",
    "read_entry",
    "stream_key",
    "subscription_name",
]

#: The body, as text (base64 with ``hedwig_encoding=base64`` when the message is binary).
PAYLOAD = "hedwig_payload"
#: Attempts made before this entry was written (a retry's copy); absent on a first publish.
ATTEMPT = "hedwig_tasks_attempt"
#: The subscription a retry's copy or a dead letter came from (``<queue>:<topic>``).
SUBSCRIPTION = "hedwig_tasks_subscription"
#: A dead letter's reason, attempts made and when it died (epoch seconds).
REASON = "hedwig_tasks_reason"
DEAD_ATTEMPTS = "hedwig_tasks_attempts"
DEAD_AT = "hedwig_tasks_dead_at"
#: Fields that are the transport's, not the message's: never handed out as attributes. The
#: Hedwig library ignores attributes starting with ``hedwig_`` that it does not know.
RESERVED = frozenset({PAYLOAD, ATTEMPT, SUBSCRIPTION, REASON, DEAD_ATTEMPTS, DEAD_AT})
_RESERVED_BYTES = frozenset(name.encode() for name in RESERVED)


def stream_key(topic: str) -> str:
    """The stream of topic ``topic``, as the Hedwig library names it."""
    return f"hedwig:{topic}"


def queue_key(queue: str) -> str:
    """The queue's own stream: due retries and requeued dead letters (the Hedwig library's too)."""
    return f"hedwig:{queue}"


def dlq_key(queue: str) -> str:
    """The queue's dead-letter stream, as the Hedwig library names it."""
    return f"hedwig:{queue}:dlq"


def delayed_key(queue: str) -> str:
    """The sorted set of the queue's retries waiting to be due (score: due time in ms)."""
    return f"hedwig:{queue}:delayed"


def publish_delayed_key(topic: str) -> str:
    """The sorted set of delayed publishes to ``topic`` waiting to be due (score: due time in ms)."""
    return f"hedwig:{topic}:publish-delayed"


def delayed_member(token: str, topic: str, fields: Mapping[str, bytes]) -> bytes:
    """A delayed set's member: netstrings {token, topic, field, value, ...}, as ``MOVE_DUE`` reads them."""
    items = [token.encode(), topic.encode()]
    for name, value in fields.items():
        items += [name.encode(), value]
    return b"".join(b"%d:%s" % (len(item), item) for item in items)


def subscription_name(queue: str, topic: str) -> str:
    """What a delivery's ``subscription`` says: the queue and the topic it came from."""
    return f"{queue}:{topic}"


def entry_fields(topic: str, body: bytes, attributes: Mapping[str, str]) -> dict[str, bytes]:
    """The fields of a new entry: ``hedwig_payload`` and the attributes. Raises ``PublishError``
    for a body that is not UTF-8 (the Hedwig library reads every field as text) or an attribute
    that names one of the transport's own fields."""
    try:
        bytes(body).decode("utf-8")
    except UnicodeDecodeError:
        raise PublishError(f"publish to {topic!r}: Redis entries carry text and the body is not UTF-8") from None
    clash = RESERVED.intersection(attributes)
    if clash:
        raise PublishError(f"publish to {topic!r}: attribute {sorted(clash)[0]!r} is the transport's own field")
    fields = {PAYLOAD: bytes(body)}
    for name, value in attributes.items():
        fields[name] = value.encode()
    return fields


@dataclasses.dataclass(frozen=True)
class Reading:
    """What an entry's fields say; ``fault`` names what could not be read ("" when all could)."""

    body: bytes
    attributes: dict[str, str]
    prior_attempts: int  #: attempts made before this entry was written
    subscription: str | None  #: where a retry's copy or a requeued dead letter came from
    fault: str


def read_entry(fields: Mapping[bytes, bytes]) -> Reading:
    """Read an entry's fields; whatever they hold, a :class:`Reading` (with a fault if need be)."""
    faults: list[str] = []
    body = fields.get(PAYLOAD.encode())
    if body is None:
        faults.append(f"no {PAYLOAD} field: not a Hedwig entry")
        body = b""
    elif not _utf8(body):
        faults.append(f"{PAYLOAD} is not UTF-8 text")
    attributes = _attributes(fields, faults)
    prior = _prior_attempts(fields.get(ATTEMPT.encode()), faults)
    subscription = fields.get(SUBSCRIPTION.encode())
    named = subscription.decode("utf-8", "replace") if subscription else None
    return Reading(body, attributes, prior, named, "; ".join(faults))


def _utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _attributes(fields: Mapping[bytes, bytes], faults: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in fields.items():
        if name in _RESERVED_BYTES:
            continue
        try:
            found[name.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError:
            shown = name.decode("utf-8", "replace")
            faults.append(f"field {shown!r} is not UTF-8 text")
            found[shown] = value.decode("utf-8", "replace")
    return found


def _prior_attempts(raw: bytes | None, faults: list[str]) -> int:
    if raw is None:
        return 0
    if not raw.isdigit():
        faults.append(f"{ATTEMPT} {raw[:40]!r} is not a whole number")
        return 0
    return int(raw)


def dead_letter_record(entry_id: bytes, fields: Mapping[bytes, bytes]) -> DeadLetterRecord:
    """A dead-letter stream entry as a record; fields that cannot be read are shown as well as may be."""
    reading = read_entry(fields)

    def text(name: str) -> str:
        return fields.get(name.encode(), b"").decode("utf-8", "replace")

    attempts = text(DEAD_ATTEMPTS)
    try:
        dead_at = float(text(DEAD_AT) or 0.0)
    except ValueError:
        dead_at = 0.0
    return DeadLetterRecord(
        body=reading.body,
        attributes=reading.attributes,
        reason=text(REASON) or reading.fault,
        subscription=text(SUBSCRIPTION),
        attempts=int(attempts) if attempts.isdigit() else 0,
        dead_at=dead_at,
        transport_id=entry_id.decode(),
    )
