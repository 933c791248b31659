"""The Pub/Sub consumer: pulls that never lease more than asked, leases, settling, delayed
retries (ack deadlines, or republishing to the app's own topic) and dead letters, all through
the shared :class:`~hedwig_tasks.transports._gcp_client.PubSubClient`. See ``gcp.py`` for the design."""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from hedwig_tasks.exceptions import TransportError
from hedwig_tasks.transports._gcp_client import (
    MAX_ACK_DEADLINE_S,
    MIN_SUBSCRIPTION_DEADLINE_S,
    PubSubClient,
    short,
)
from hedwig_tasks.transports._gcp_wire import (
    ATTEMPTS_ATTRIBUTE,
    DEAD_AT_ATTRIBUTE,
    DEAD_ATTEMPTS_ATTRIBUTE,
    MAX_ATTRIBUTE_VALUE_BYTES,
    NOT_BEFORE_ATTRIBUTE,
    REASON_ATTRIBUTE,
    SOURCE_ATTRIBUTE,
    clean,
    epoch_ms,
    whole,
)
from hedwig_tasks.transports.base import Consumer, Delivery

__all__ = ["PubSubConsumer"]

#: Longest pause between quick polls of several subscriptions, in seconds.
MAX_POLL_PAUSE_S = 0.2

logger = logging.getLogger("hedwig_tasks.transports.gcp")  # one logger for the whole transport

#: Age past which a message not due yet is republished rather than deferred again, in seconds.
MAX_DEFER_AGE_S = 3600.0


def _age_s(message: Any) -> float:
    """Seconds since Pub/Sub took ``message`` (0 if it does not say)."""
    published = getattr(message, "publish_time", None)
    try:
        return time.time() - published.timestamp() if published else 0.0
    except (AttributeError, TypeError, ValueError, OverflowError):
        return 0.0


@dataclasses.dataclass(eq=False)
class _Receipt:
    """One delivery of one message: its ack id, and whether it may still settle anything."""

    ack_id: str
    subscription: str  # full path
    message_id: str
    republished: bool  # carries hedwig_attempts: a retry that went through the app's own topic
    settled: bool = False


# -- consuming --------------------------------------------------------------------------------


class PubSubConsumer(Consumer):
    """Pulls some subscriptions of one app: exactly as many messages as asked, never more."""

    def __init__(
        self, client: PubSubClient, queue: str, names: list[str], *, lease_s: float, max_delivery_attempts: int
    ) -> None:
        self._client = client
        self._queue = queue
        self._names = names
        self._lease_s = lease_s
        self._max_delivery_attempts = max_delivery_attempts
        self._lock = threading.Lock()
        self._current: dict[tuple[str, str], _Receipt] = {}  # (subscription, message id) -> latest receipt
        self._counts: dict[tuple[str, str], int] = {}  # receives seen, for subscriptions without a DLQ policy
        self._next = 0

    # -- receiving ----------------------------------------------------------------------------

    def receive(self, max_messages: int, wait_s: float) -> list[Delivery]:
        """Pull up to ``max_messages``, waiting up to about ``wait_s`` for the first.

        One subscription is long-polled; several are polled in turn, quickly and then again
        after short pauses, so a message on any of them is seen within a fifth of a second.
        Raises ``TransportError``, naming a missing subscription.
        """
        deadline = time.monotonic() + wait_s
        pause_s = 0.02
        while True:
            remaining = deadline - time.monotonic()
            if len(self._names) == 1:
                found = self._pull(self._names[0], max_messages, max(0.0, remaining))
            else:
                found = self._pull_all(max_messages)
            remaining = deadline - time.monotonic()
            if found or remaining <= 0:
                return found
            if len(self._names) > 1:
                time.sleep(min(pause_s, remaining))
                pause_s = min(pause_s * 2, MAX_POLL_PAUSE_S)

    def _pull_all(self, max_messages: int) -> list[Delivery]:
        """Quick pulls of each subscription in turn (starting with a different one each time),
        each asking for what the ones before did not bring."""
        with self._lock:
            start, self._next = self._next, self._next + 1
        found: list[Delivery] = []
        for i in range(len(self._names)):
            if len(found) >= max_messages:
                break
            found += self._pull(self._names[(start + i) % len(self._names)], max_messages - len(found), 0.0)
        return found

    def _pull(self, name: str, max_messages: int, wait_s: float) -> list[Delivery]:
        path = self._client.subscription_path(name)
        received = self._client.pull(path, max_messages, wait_s, doing=f"pull from subscription {name}")
        if received and self._lease_s < MIN_SUBSCRIPTION_DEADLINE_S:
            self._client.modify_ack_deadline(path, [r.ack_id for r in received], self._lease_s)
        deliveries = []
        for item in received:
            delivery = self._delivery(name, path, item)
            if delivery is not None:
                deliveries.append(delivery)
        return deliveries

    def _delivery(self, name: str, path: str, item: Any) -> Delivery | None:
        """The delivery for one pulled message; None for a retry not due yet (left with the broker).

        A ``hedwig_not_before`` or ``hedwig_attempts`` that is not a whole number is a fault (the
        attempt is then 1), never an error: the rest of the pull goes on.
        """
        message = item.message
        attributes = dict(message.attributes)
        faults = []
        if NOT_BEFORE_ATTRIBUTE in attributes:
            not_before = whole(attributes[NOT_BEFORE_ATTRIBUTE])
            if not_before is None:
                faults.append(f"{NOT_BEFORE_ATTRIBUTE}={attributes[NOT_BEFORE_ATTRIBUTE]!r} is not a time in epoch ms")
            elif self._defer(path, item, not_before):
                return None
        republished = ATTEMPTS_ATTRIBUTE in attributes
        made = whole(attributes.get(ATTEMPTS_ATTRIBUTE))
        if republished and made is None:
            faults.append(f"{ATTEMPTS_ATTRIBUTE}={attributes[ATTEMPTS_ATTRIBUTE]!r} is not a whole number")
        key = (path, message.message_id)
        with self._lock:
            if republished:
                attempt = 1 if made is None else made + 1
            elif item.delivery_attempt:
                attempt = int(item.delivery_attempt)
            else:
                attempt = self._counts[key] = self._counts.get(key, 0) + 1
            receipt = self._current[key] = _Receipt(item.ack_id, path, message.message_id, republished)
        fault = "; ".join(faults)
        if fault:
            logger.warning("Pub/Sub message %s on %s cannot be read: %s", message.message_id, name, fault)
        return Delivery(bytes(message.data), clean(attributes), attempt, receipt, name, message.message_id, fault)

    def _defer(self, path: str, item: Any, not_before_ms: int) -> bool:
        """Keep a republished retry or delayed publish that is not due yet with the broker, not in memory.

        By ack deadline (600 s at most at a time) while that is safe; republished to the app's
        own topic (a hop) near the dead-letter policy's limit, since every deferral counts as a
        delivery, and once the copy is an hour old, so no delay outlives the subscription's
        message retention.
        """
        remaining_s = (not_before_ms - epoch_ms()) / 1000
        if remaining_s <= 0:
            return False
        near_limit = (item.delivery_attempt or 0) >= self._max_delivery_attempts - 2
        if near_limit or _age_s(item.message) > MAX_DEFER_AGE_S:  # start afresh
            message = item.message
            self._republish_own(bytes(message.data), dict(message.attributes))
            self._call("ack", path, lambda: self._client.acknowledge(path, [item.ack_id]))
        else:
            self._client.modify_ack_deadline(path, [item.ack_id], min(math.ceil(remaining_s), MAX_ACK_DEADLINE_S))
        return True

    # -- settling -----------------------------------------------------------------------------

    def _live(self, delivery: Delivery) -> _Receipt | None:
        receipt: _Receipt = delivery.receipt
        with self._lock:
            current = self._current.get((receipt.subscription, receipt.message_id))
            if current is not receipt or receipt.settled:
                return None
            return receipt

    def _settle(self, deliveries: Sequence[Delivery]) -> dict[str, list[_Receipt]]:
        """The live receipts among ``deliveries``, marked settled, by subscription path."""
        by_path: dict[str, list[_Receipt]] = {}
        with self._lock:
            for delivery in deliveries:
                receipt: _Receipt = delivery.receipt
                key = (receipt.subscription, receipt.message_id)
                if self._current.get(key) is receipt and not receipt.settled:
                    receipt.settled = True
                    del self._current[key]
                    self._counts.pop(key, None)
                    by_path.setdefault(receipt.subscription, []).append(receipt)
        return by_path

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge them, one call per subscription (a thousand ids a call); returns once sent.

        Raises ``TransportError`` when a call fails: those messages come back when their ack
        deadline passes.
        """
        for path, receipts in self._settle(deliveries).items():
            self._client.acknowledge(path, [r.ack_id for r in receipts])

    def _call(self, what: str, path: str, action: Callable[[], None]) -> None:
        try:
            action()
        except TransportError as exc:
            logger.warning("%s on %s failed: %s (the message will come back)", what, short(path), exc)
            raise

    def release(self, deliveries: Sequence[Delivery]) -> None:
        """Nack: visible again at once (a delivery attempt, as every receive is)."""
        for path, receipts in self._settle(deliveries).items():
            self._client.modify_ack_deadline(path, [r.ack_id for r in receipts], 0)

    def extend_lease(self, deliveries: Sequence[Delivery], lease_s: float) -> None:
        by_path: dict[str, list[str]] = {}
        for delivery in deliveries:
            receipt = self._live(delivery)
            if receipt is not None:
                by_path.setdefault(receipt.subscription, []).append(receipt.ack_id)
        for path, ack_ids in by_path.items():
            self._client.modify_ack_deadline(path, ack_ids, min(lease_s, MAX_ACK_DEADLINE_S))

    def retry_later(self, delivery: Delivery, delay_s: float) -> None:
        """Up to 600 s: the ack deadline (the broker redelivers; the attempt counts toward the
        dead-letter policy). Longer, or for a message already republished: republish to the app's
        own topic with a not-before time and the attempts so far, then acknowledge this copy."""
        receipt = self._live(delivery)
        if receipt is None:
            return
        if delay_s <= MAX_ACK_DEADLINE_S and not receipt.republished:
            if self._settle([delivery]):
                self._client.modify_ack_deadline(receipt.subscription, [receipt.ack_id], delay_s)
            return
        attributes = {
            **delivery.attributes,
            NOT_BEFORE_ATTRIBUTE: str(epoch_ms() + int(delay_s * 1000)),
            ATTEMPTS_ATTRIBUTE: str(delivery.attempt),
        }
        self._republish_own(delivery.body, attributes)
        if self._settle([delivery]):
            self._client.acknowledge(receipt.subscription, [receipt.ack_id])

    def _republish_own(self, body: bytes, attributes: dict[str, str]) -> None:
        """To the app's own topic ``hedwig-<queue>``."""
        self._client.publish(self._client.topic_path(self._queue), [(body, attributes)], topic=self._queue)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Publish it to ``hedwig-<queue>-dlq`` with the reason, then acknowledge it here."""
        receipt = self._live(delivery)
        if receipt is None:
            return
        reason_bytes = reason.encode()[:MAX_ATTRIBUTE_VALUE_BYTES]
        attributes = {
            **delivery.attributes,
            REASON_ATTRIBUTE: reason_bytes.decode("utf-8", "ignore"),
            SOURCE_ATTRIBUTE: delivery.subscription,
            DEAD_ATTEMPTS_ATTRIBUTE: str(delivery.attempt),
            DEAD_AT_ATTRIBUTE: str(epoch_ms()),
        }
        path = self._client.topic_path(f"{self._queue}-dlq")
        self._client.publish(path, [(delivery.body, attributes)], topic=self._client.dlq_name(self._queue))
        if self._settle([delivery]):
            self._client.acknowledge(receipt.subscription, [receipt.ack_id])

    def close(self) -> None:
        """Nothing to free: the transport owns the client. Unsettled deliveries come back when
        their ack deadline passes."""
