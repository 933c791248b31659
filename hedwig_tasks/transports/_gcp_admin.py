"""The Pub/Sub transport's administration: provisioning, and reading and requeueing dead letters.
See ``gcp.py`` for the design."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from google.api_core import exceptions as google_exceptions

from hedwig_tasks.exceptions import PublishError, TransportError
from hedwig_tasks.transports._gcp_common import (
    _GOOGLE_DEAD_PREFIX,
    CALL_TIMEOUT_S,
    DEAD_AT_ATTRIBUTE,
    DEAD_ATTEMPTS_ATTRIBUTE,
    DLQ_RETENTION_S,
    DLQ_WAIT_S,
    MAX_ACK_DEADLINE_S,
    MAX_BATCH,
    MIN_SUBSCRIPTION_DEADLINE_S,
    PULL_DEADLINE_MARGIN_S,
    REASON_ATTRIBUTE,
    SOURCE_ATTRIBUTE,
    _boundary,
    _clean,
    _short,
    _whole,
)
from hedwig_tasks.transports.base import DeadLetterRecord, Progress

if TYPE_CHECKING:
    from hedwig_tasks.transports.gcp import GooglePubSubTransport


# -- administration ---------------------------------------------------------------------------


class _Provisioner:
    """Creates what is missing, in dependency order, and says what it did (or would do)."""

    def __init__(self, transport: GooglePubSubTransport, dry_run: bool) -> None:
        self.transport = transport
        self.dry_run = dry_run
        self.actions: list[str] = []
        self.publisher = transport._client("publisher")
        self.subscriber = transport._client("subscriber")
        self._created: set[str] = set()

    def run(self, queue: str | None, subscribe: Sequence[str], publish: Sequence[str]) -> list[str]:
        own_topics = [t for t in dict.fromkeys([*publish, *subscribe]) if t not in self.transport.foreign]
        for topic in own_topics:
            self.topic(topic, topic)
        if queue:
            self.topic(queue, f"{queue} (the app's own, for requeues and long retries)")
            self.topic(f"{queue}-dlq", f"{queue}-dlq (dead letters)")
            dlq = self.transport.topic_path(f"{queue}-dlq")
            for topic in dict.fromkeys(subscribe):
                owner = self.transport.foreign.get(topic)
                self.subscription(queue, topic, self.transport.topic_path(topic, owner), dlq)
            self.subscription(queue, None, self.transport.topic_path(queue), dlq)
            self.subscription(queue, "dlq", dlq, None)
        return self.actions

    def _exists(self, get: Callable[..., Any], **request: str) -> bool:
        try:
            with _boundary(f"reading {next(iter(request.values()))}"):
                get(**request, timeout=CALL_TIMEOUT_S)
        except TransportError as exc:
            if isinstance(exc.__cause__, google_exceptions.NotFound):
                return False
            raise
        return True

    def topic(self, topic: str, described: str) -> None:
        path = self.transport.topic_path(topic)
        if self._exists(self.publisher.get_topic, topic=path) or path in self._created:
            return
        self.actions.append(f"create topic {described}: {path}")
        self._created.add(path)
        if not self.dry_run:
            with _boundary(f"creating topic {path}"), contextlib.suppress(google_exceptions.AlreadyExists):
                self.publisher.create_topic(name=path, timeout=CALL_TIMEOUT_S)

    def subscription(self, queue: str, topic: str | None, topic_path: str, dlq: str | None) -> None:
        transport = self.transport
        if topic == "dlq":
            name = transport.dlq_name(queue)
        else:
            name = transport.subscription_name(queue, topic)
        path = transport.subscription_path(name)
        if self._exists(self.subscriber.get_subscription, subscription=path):
            return
        request: dict[str, Any] = {
            "name": path,
            "topic": topic_path,
            "ack_deadline_seconds": int(min(max(transport.lease_s, MIN_SUBSCRIPTION_DEADLINE_S), MAX_ACK_DEADLINE_S)),
        }
        if dlq is None:
            request["message_retention_duration"] = {"seconds": DLQ_RETENTION_S}
            self.actions.append(f"create subscription {name} to {_short(topic_path)} (dead letters of {queue})")
        else:
            request["dead_letter_policy"] = {
                "dead_letter_topic": dlq,
                "max_delivery_attempts": transport.max_delivery_attempts,
            }
            if transport.retry_backoff_s is not None:
                low, high = transport.retry_backoff_s
                request["retry_policy"] = {
                    "minimum_backoff": {"seconds": int(low)},
                    "maximum_backoff": {"seconds": int(high)},
                }
            what = topic if topic is not None else f"its own topic {_short(topic_path)}"
            self.actions.append(
                f"subscribe {queue} to {what}: {name} (dead letters after {transport.max_delivery_attempts} deliveries)"
            )
        if not self.dry_run:
            with _boundary(f"creating subscription {name}"), contextlib.suppress(google_exceptions.AlreadyExists):
                self.subscriber.create_subscription(request=request, timeout=CALL_TIMEOUT_S)


def _dlq_path(transport: GooglePubSubTransport, queue: str) -> str:
    return transport.subscription_path(transport.dlq_name(queue))


def _dlq_modack(transport: GooglePubSubTransport, queue: str, ack_ids: list[str], seconds: int) -> None:
    path = _dlq_path(transport, queue)
    for start in range(0, len(ack_ids), MAX_BATCH):
        with _boundary(f"giving back dead letters of {queue}"):
            transport._client("subscriber").modify_ack_deadline(
                subscription=path, ack_ids=ack_ids[start : start + MAX_BATCH], ack_deadline_seconds=seconds
            )


def _pull_dead(transport: GooglePubSubTransport, queue: str, limit: int, seen: set[str]) -> list[Any]:
    """Up to ``limit`` unseen messages of the DLQ subscription; [] once a pull brings nothing new."""
    path = _dlq_path(transport, queue)
    try:
        with _boundary(f"reading dead letters of {queue}"):
            response = transport._client("subscriber").pull(
                request={"subscription": path, "max_messages": max(1, min(limit, MAX_BATCH))},
                timeout=DLQ_WAIT_S + PULL_DEADLINE_MARGIN_S,
                retry=None,
            )
    except TransportError as exc:
        if isinstance(exc.__cause__, google_exceptions.DeadlineExceeded):
            return []
        raise
    fresh = [r for r in response.received_messages if r.message.message_id not in seen]
    repeated = [r.ack_id for r in response.received_messages if r.message.message_id in seen]
    if repeated:
        _dlq_modack(transport, queue, repeated, 0)
    seen.update(r.message.message_id for r in fresh)
    return fresh


def _record(item: Any) -> DeadLetterRecord:
    """A DLQ message as a record: ours carry the reason; Pub/Sub's policy leaves its own marks."""
    message = item.message
    attributes = dict(message.attributes)
    dead_at = message.publish_time.timestamp() if message.publish_time else time.time()
    if REASON_ATTRIBUTE in attributes:
        reason = attributes[REASON_ATTRIBUTE]
        source = attributes.get(SOURCE_ATTRIBUTE, "")
        attempts = _whole(attributes.get(DEAD_ATTEMPTS_ATTRIBUTE)) or 0
        dead_at = (_whole(attributes.get(DEAD_AT_ATTRIBUTE)) or 0) / 1000 or dead_at
    else:
        source = _short(attributes.get(f"{_GOOGLE_DEAD_PREFIX}SourceSubscription", ""))
        attempts = _whole(attributes.get(f"{_GOOGLE_DEAD_PREFIX}SourceDeliveryCount")) or 0
        reason = f"Pub/Sub dead-letter policy: not acknowledged after {attempts} deliveries"
    return DeadLetterRecord(
        bytes(message.data), _clean(attributes), reason, source, attempts, dead_at, message.message_id
    )


def _read_dead_letters(
    transport: GooglePubSubTransport, queue: str, limit: int
) -> tuple[list[DeadLetterRecord], list[str]]:
    """Up to ``limit`` dead letters, oldest first, and the ack ids that now hold them."""
    items: list[Any] = []
    seen: set[str] = set()
    while len(items) < limit:
        fresh = _pull_dead(transport, queue, limit - len(items), seen)
        if not fresh:
            break
        items += fresh
    pairs = sorted(((_record(item), item.ack_id) for item in items), key=lambda pair: pair[0].dead_at)
    return [record for record, _ in pairs], [ack_id for _, ack_id in pairs]


def _requeue(transport: GooglePubSubTransport, queue: str, limit: int | None, progress: Progress | None) -> int:
    moved = 0
    seen: set[str] = set()
    own = transport.topic_path(queue)
    path = _dlq_path(transport, queue)
    while limit is None or moved < limit:
        batch = _pull_dead(transport, queue, MAX_BATCH if limit is None else limit - moved, seen)
        if not batch:
            break
        messages = [(bytes(item.message.data), _clean(item.message.attributes)) for item in batch]
        try:
            transport._publish_now(own, messages, queue)
        except PublishError:
            _dlq_modack(transport, queue, [item.ack_id for item in batch], 0)
            raise
        with _boundary(f"acknowledging requeued dead letters of {queue}"):
            transport._client("subscriber").acknowledge(subscription=path, ack_ids=[item.ack_id for item in batch])
        moved += len(batch)
        if progress:
            progress(moved, limit)
    return moved
