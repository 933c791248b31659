"""The SNS/SQS transport's consumer: parallel long polls, visibility as the lease, batched deletes,
delayed retries and dead letters sent to the ``-DLQ`` queue; and the receipt each delivery
carries. It calls SQS through the :class:`~hedwig_tasks.transports._aws_client.AWSClient` it is
given. See ``aws.py`` for the design.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from hedwig_tasks.exceptions import TransportError
from hedwig_tasks.transports._aws_client import (
    MAX_POLLERS,
    MAX_VISIBILITY_S,
    MAX_WAIT_S,
    AWSClient,
    queue_name,
    whole_seconds,
)
from hedwig_tasks.transports._aws_wire import (
    BATCH,
    MAX_DELAY_S,
    NOT_BEFORE_ATTRIBUTE,
    Read,
    read_message,
    whole,
    with_dead_letter,
)
from hedwig_tasks.transports.base import Consumer, Delivery

__all__ = ["SQSConsumer"]

logger = logging.getLogger("hedwig_tasks.transports.aws")  # one logger for the whole transport

#: Longest dead-letter reason kept, in characters.
MAX_REASON_CHARS = 4096


@dataclasses.dataclass(eq=False)
class _Receipt:
    """One receive of one message: its handle, and whether it may still settle anything."""

    handle: str
    message_id: str
    received_at: float  # monotonic
    settled: bool = False
    superseded: bool = False

    @property
    def live(self) -> bool:
        return not (self.settled or self.superseded)


# -- the consumer -----------------------------------------------------------------------------


class SQSConsumer(Consumer):
    """Receives and settles the messages of one SQS queue. Thread-safe.

    Receives run on a small pool of pollers, so one call can keep several long polls open;
    messages a poller brings after its caller returned wait for the next ``receive``. Every
    settling call returns once SQS has been told, so a caller that counts what it holds (the
    worker's prefetch bound) never counts a message SQS still holds for it. A lock orders
    lease extensions against settlements, so an extension never undoes a ``retry_later`` or
    ``release`` that came after it.
    """

    def __init__(
        self,
        client: AWSClient,
        queue: str,
        *,
        lease_s: float,
        clock: Callable[[], float] = time.time,
        max_hold_s: int = MAX_VISIBILITY_S - 60,
    ) -> None:
        self._client = client
        self._clock = clock  # epoch seconds: when a delayed publish is due
        self._max_hold_s = max(1, max_hold_s)  # longest an early message is hidden at one go
        self._name = queue_name(queue)
        self._dlq_name = queue_name(queue, dlq=True)
        self._lease_s = whole_seconds(lease_s)
        self._cond = threading.Condition()
        self._stash: list[Delivery] = []
        self._polling = 0  # messages asked for by pollers still running
        self._poll_error: TransportError | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._latest: dict[str, _Receipt] = {}  # message id -> its newest live receipt here
        self._settle_lock = threading.Lock()
        self._closed = False

    @property
    def _url(self) -> str:
        return self._client.queue_url(self._name)

    # -- receiving ----------------------------------------------------------------------------

    def receive(self, max_messages: int, wait_s: float) -> list[Delivery]:
        """Up to ``max_messages``, long-polling ``ceil(wait_s)`` seconds (20 at most).

        Starts one poller per ten messages wanted (at most ten pollers). Raises ``TransportError``.
        """
        if max_messages < 1:
            return []
        url = self._url  # a missing queue or endpoint fails here, in the caller's thread
        give_up = time.monotonic() + max(wait_s, 0) + 10.0
        launched = False
        with self._cond:
            while True:
                found = self._take(max_messages)
                if found:
                    return found
                if self._poll_error is not None:
                    error, self._poll_error = self._poll_error, None
                    raise error
                if not launched:
                    self._launch(url, max_messages - self._polling, wait_s)
                    launched = True
                remaining = give_up - time.monotonic()
                if self._polling <= 0 or remaining <= 0:
                    return []
                self._cond.wait(remaining)

    def _take(self, count: int) -> list[Delivery]:
        fresh_after = time.monotonic() - self._lease_s / 2  # older ones may already be visible again
        stale = [d for d in self._stash if d.receipt.received_at < fresh_after]
        with self._settle_lock:
            for delivery in stale:
                logger.debug("dropping SQS message %s: held too long unclaimed", delivery.transport_id)
                delivery.receipt.superseded = True
                if self._latest.get(delivery.transport_id) is delivery.receipt:
                    del self._latest[delivery.transport_id]
        kept = [d for d in self._stash if d.receipt.received_at >= fresh_after]
        self._stash = kept[count:]
        return kept[:count]

    def _launch(self, url: str, count: int, wait_s: float) -> None:
        if count <= 0:
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(MAX_POLLERS, thread_name_prefix="hedwig-sqs-poll")
        wait = min(MAX_WAIT_S, whole_seconds(wait_s))
        # Full batches only, when there is room for one: a remainder waits for the next call, so
        # a caller freeing slots a few at a time does not cost a request per few messages.
        sizes = [BATCH] * min(count // BATCH, MAX_POLLERS) or [count]
        for size in sizes:
            self._polling += size
            self._pool.submit(self._poll, url, size, wait)

    def _poll(self, url: str, size: int, wait: int) -> None:
        deliveries: list[Delivery] = []
        error: TransportError | None = None
        try:
            messages = self._client.receive(url, size, wait, self._lease_s)
            reads = [(m, read_message(m)) for m in messages]
            deliveries = [self._delivery(m, read) for m, read in reads if not self._defer(url, m, read)]
        except TransportError as exc:
            error = exc
        except Exception as exc:  # a bug here must not leave a receive waiting forever
            error = TransportError(f"receive from {self._name} failed: {exc!r}")
        with self._cond:
            self._polling -= size
            closed = self._closed
            if not closed:
                self._stash.extend(deliveries)
                self._poll_error = error or self._poll_error
            self._cond.notify_all()
        if closed and deliveries:
            self.release(deliveries)

    def _defer(self, url: str, message: dict[str, Any], read: Read) -> bool:
        """Hold a delayed publish received early with SQS, never in memory; False: it is due.

        More than SQS's longest ``DelaySeconds`` (15 min) early, on its first receive: hidden by
        visibility until 15 min before it is due (12 h at most at a time). Otherwise, or on a
        later receive (each counts toward the redrive policy): sent again with ``DelaySeconds``
        as the rest of the delay (15 min at most), and this copy deleted; the copy that arrives
        on time is a first receive, so ``attempt`` says 1.
        """
        due_ms = whole(read.attributes.get(NOT_BEFORE_ATTRIBUTE))
        if due_ms is None or read.fault:
            return False  # no delay, or an unreadable one: the delivery carries it as a fault
        remaining_s = due_ms / 1000 - self._clock()
        if remaining_s <= 0:
            return False
        message_id = str(message["MessageId"])
        try:
            how = self._hold(url, message, read, remaining_s)
        except TransportError as exc:  # not handed out early: it comes back when its lease runs out
            logger.warning("SQS message %s is due in %.0fs and could not be held: %s", message_id, remaining_s, exc)
            return True
        logger.debug("SQS message %s is due in %.0fs: %s", message_id, remaining_s, how)
        return True

    def _hold(self, url: str, message: dict[str, Any], read: Read, remaining_s: float) -> str:
        """Hide an early message by visibility, or send it again delayed; says which."""
        handle, message_id = str(message["ReceiptHandle"]), str(message["MessageId"])
        doing = f"hold delayed SQS message {message_id} in {self._name}"
        if read.attempt <= 1 and remaining_s > MAX_DELAY_S:
            hide_s = min(whole_seconds(remaining_s - MAX_DELAY_S), self._max_hold_s)
            self._client.set_visibility(url, handle, hide_s, doing=doing)
            return f"hidden for {hide_s}s"
        delay_s = min(whole_seconds(remaining_s), MAX_DELAY_S, self._max_hold_s)
        self._client.send(url, read.body, read.attributes, doing=doing, delay_s=delay_s)
        self._client.delete(url, [(message_id, handle)])
        return f"sent again with a delay of {delay_s}s"

    def _delivery(self, message: dict[str, Any], read: Read) -> Delivery:
        """One received message as a Delivery; a field that cannot be read makes a fault, never
        an error (a message without a receipt handle or id is the broker's failure, and raises)."""
        receipt = _Receipt(str(message["ReceiptHandle"]), str(message["MessageId"]), time.monotonic())
        fault = read.fault
        if NOT_BEFORE_ATTRIBUTE in read.attributes and whole(read.attributes[NOT_BEFORE_ATTRIBUTE]) is None:
            fault = "; ".join(filter(None, [fault, f"{NOT_BEFORE_ATTRIBUTE} is not a time in epoch ms"]))
        if fault:
            logger.warning("SQS message %s cannot be read: %s", receipt.message_id, fault)
        with self._settle_lock:
            previous = self._latest.get(receipt.message_id)
            if previous is not None:
                previous.superseded = True
            self._latest[receipt.message_id] = receipt
        body = read.body.encode("utf-8", "surrogatepass")
        return Delivery(body, read.attributes, read.attempt, receipt, self._name, receipt.message_id, fault)

    # -- settling -----------------------------------------------------------------------------

    def _claim(self, deliveries: Sequence[Delivery]) -> list[_Receipt]:
        """Mark these settled (under the settle lock); returns the receipts that were still live."""
        live = []
        for delivery in deliveries:
            receipt: _Receipt = delivery.receipt
            if receipt.live:
                receipt.settled = True
                self._latest.pop(receipt.message_id, None)
                live.append(receipt)
            else:
                logger.debug("SQS message %s: receipt already settled or superseded", receipt.message_id)
        return live

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Delete them with ``DeleteMessageBatch``, ten a call; returns once every call was sent.

        Batching across messages is the caller's (the worker's acker hands over what finished
        together). Raises ``TransportError`` when a call fails: those messages come back when
        their lease runs out.
        """
        with self._settle_lock:
            receipts = self._claim(deliveries)
        if receipts:
            self._client.delete(self._url, [(r.message_id, r.handle) for r in receipts])

    def retry_later(self, delivery: Delivery, delay_s: float) -> None:
        """Hide it for ``delay_s`` (whole seconds, capped at what SQS allows: 12 h from receipt)."""
        receipt: _Receipt = delivery.receipt
        left = MAX_VISIBILITY_S - 5 - whole_seconds(time.monotonic() - receipt.received_at)
        visibility = min(whole_seconds(delay_s), left)
        if visibility < whole_seconds(delay_s):
            logger.warning("SQS message %s: retry delay %.0fs capped at %ds", receipt.message_id, delay_s, visibility)
        with self._settle_lock:
            if not self._claim([delivery]):
                return
            doing = f"retry later of SQS message {receipt.message_id} in {self._name}"
            self._client.set_visibility(self._url, receipt.handle, visibility, doing=doing)

    def release(self, deliveries: Sequence[Delivery]) -> None:
        """Make them visible at once (visibility 0), ten a call."""
        with self._settle_lock:
            receipts = self._claim(deliveries)
            self._client.change_visibility(self._url, [(r.message_id, r.handle) for r in receipts], 0)

    def extend_lease(self, deliveries: Sequence[Delivery], lease_s: float) -> None:
        """Set their visibility to ``lease_s`` from now, ten a call; settled ones are skipped."""
        with self._settle_lock:
            entries = [(d.receipt.message_id, d.receipt.handle) for d in deliveries if d.receipt.live]
            self._client.change_visibility(self._url, entries, min(MAX_VISIBILITY_S, whole_seconds(lease_s)))

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Send body, attributes and reason to ``HEDWIG-<queue>-DLQ``, then delete the original."""
        receipt: _Receipt = delivery.receipt
        info = {
            "reason": reason[:MAX_REASON_CHARS],
            "attempts": delivery.attempt,
            "subscription": delivery.subscription,
            "dead_at": round(time.time(), 3),
        }
        attributes = with_dead_letter(delivery.attributes, info)
        dlq = self._client.queue_url(self._dlq_name)
        with self._settle_lock:
            if not receipt.live:
                return
            body = delivery.body.decode("utf-8", "surrogatepass")
            self._client.send(dlq, body, attributes, doing=f"dead-letter SQS message {receipt.message_id} to {dlq}")
            self._claim([delivery])
        self._client.delete(self._url, [(receipt.message_id, receipt.handle)])

    def close(self) -> None:
        """Give back messages pollers brought that nobody took."""
        with self._cond:
            self._closed = True
            unclaimed, self._stash = self._stash, []
            self._cond.notify_all()
        if unclaimed:
            self.release(unclaimed)
        if self._pool is not None:
            self._pool.shutdown(wait=False)
