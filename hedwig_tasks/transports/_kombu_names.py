"""The Kombu transport's names: what each topic, subscription, dead-letter and delay queue is
called on the broker, the delay buckets, and the headers the transport writes. Pure; no I/O.
See ``kombu.py`` for the design."""

from __future__ import annotations

__all__ = [
    "ATTEMPTS",
    "DEAD_AT",
    "DEAD_ID",
    "DELAY_BUCKETS_S",
    "FAULT",
    "REASON",
    "SUBSCRIPTION",
    "bucket",
    "delay_queue_name",
    "dlq_name",
    "exchange_name",
    "publish_delay_queue_name",
    "subscription_name",
    "topic_of",
]

#: Delay buckets, in seconds: powers of two up to about 48 days (AMQP's longest TTL).
DELAY_BUCKETS_S = tuple(1 << k for k in range(23))

#: Header: how many times the message was received before this copy was made.
ATTEMPTS = "x-hedwig-attempts"
#: Header of a dead letter: why it is there.
REASON = "x-hedwig-reason"
#: Header of a dead letter: the subscription it came from (and goes back to on requeue).
SUBSCRIPTION = "x-hedwig-subscription"
#: Header of a dead letter: when it died, epoch seconds as text.
DEAD_AT = "x-hedwig-dead-at"
#: Header of a dead letter: its own id (``DeadLetterRecord.transport_id``), unique among dead letters.
DEAD_ID = "x-hedwig-dead-id"
#: Header: why a consumer could not read a delivery; kept on copies it makes (release, retry) of one.
FAULT = "x-hedwig-fault"

_PREFIX = "hedwig-"


def exchange_name(topic: str) -> str:
    """The exchange of ``topic``."""
    return f"{_PREFIX}{topic}"


def topic_of(exchange: str) -> str:
    """The topic an exchange belongs to (the name itself if it is not one of ours)."""
    return exchange[len(_PREFIX) :] if exchange.startswith(_PREFIX) else exchange


def subscription_name(queue: str, topic: str) -> str:
    """The queue that holds app ``queue``'s copies of ``topic``."""
    return f"{_PREFIX}{queue}-{topic}"


def dlq_name(queue: str) -> str:
    """App ``queue``'s dead-letter queue, shared by all its subscriptions."""
    return f"{_PREFIX}{queue}-dlq"


def delay_queue_name(subscription: str, bucket_s: int) -> str:
    """The queue retries of ``subscription`` wait in for up to ``bucket_s`` seconds."""
    return f"{subscription}-delay-{bucket_s}s"


def publish_delay_queue_name(topic: str, bucket_s: int) -> str:
    """The queue delayed publishes to ``topic`` wait in for up to ``bucket_s`` seconds.

    Spelled ``hedwig:`` (not ``hedwig-``), so it can never be a subscription's delay queue.
    """
    return f"hedwig:publish-delay:{bucket_s}s:{topic}"


def bucket(delay_s: float) -> int:
    """The delay bucket a retry after ``delay_s`` seconds waits in: the smallest that holds it."""
    return next((b for b in DELAY_BUCKETS_S if b >= delay_s), DELAY_BUCKETS_S[-1])
