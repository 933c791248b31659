"""The Kombu transport's consumer: receiving under prefetch, leases kept by the consumer,
settling, delayed retries and dead letters, on a connection of its own made by the transport's
:class:`~hedwig_tasks.transports._kombu_link.Broker`. See ``kombu.py`` for the design.

Locks: ``_lock`` is held by whatever reads from the connection (a receive taking what arrived,
a copy published and waited on, a declare), ``_held_lock`` over the consumer's own records for
a moment at a time, and ``_ack_lock`` over planning and writing acks, so that they go out in
the order planned; frames are written under the link's ``write_lock``. An ack never takes
``_lock``: acks go out while a receive reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import select
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import amqp
import amqp.serialization

from hedwig_tasks.transports._kombu_link import Broker, chunked
from hedwig_tasks.transports._kombu_messages import Reading, Received, read, send
from hedwig_tasks.transports._kombu_names import (
    ATTEMPTS,
    DEAD_AT,
    DEAD_ID,
    FAULT,
    REASON,
    SUBSCRIPTION,
    bucket,
    delay_queue_name,
    dlq_name,
)
from hedwig_tasks.transports._kombu_wire import ack_frames, deliver_args, properties_of
from hedwig_tasks.transports.base import Consumer, Delivery

__all__ = ["DEFAULT_PREFETCH", "KombuConsumer"]

logger = logging.getLogger("hedwig_tasks.transports.kombu")  # one logger for the whole transport

#: Unsettled deliveries a consumer may hold when the caller gives no ``max_outstanding``.
DEFAULT_PREFETCH = 64
#: Longest a receive waits on the socket before looking again (housekeeping), in seconds.
DRAIN_SLICE_S = 0.05
#: Seconds between checks that a missing subscription queue was provisioned.
EXISTENCE_CHECK_S = 5.0
_DELIVER = (60, 60)  # basic.deliver's method signature


@dataclasses.dataclass
class _Held:
    tag: int  # the broker's delivery tag on the channel of ``generation``
    subscription: str
    reading: Reading  # what the delivery handed out was made of; copies are made of it
    generation: int
    expires_at: float

    def headers(self, **extra: Any) -> dict[str, Any]:
        """Headers for a copy: the attributes, the attempt count, and the fault if there was one."""
        found: dict[str, Any] = {**self.reading.attributes, ATTEMPTS: self.reading.attempt, **extra}
        if self.reading.fault:
            found[FAULT] = self.reading.fault
        return found


def ack_plan(tags: Sequence[int], unacked: set[int]) -> list[tuple[int, bool]]:
    """``basic_ack`` calls, ``(tag, multiple)``, that settle ``tags`` and nothing else of ``unacked``.

    Tags below every other unacked one are settled by one ``multiple`` ack of the highest of them;
    the rest one by one. ``unacked`` loses ``tags``.
    """
    ordered = sorted(tags)
    unacked.difference_update(ordered)
    floor = min(unacked, default=math.inf)
    below = [t for t in ordered if t < floor]
    plan = [(below[-1], True)] if len(below) > 1 else [(t, False) for t in below]
    return plan + [(t, False) for t in ordered[len(below) :]]


class KombuConsumer(Consumer):
    """Consumes some of one app's subscriptions on a connection of its own.

    A receipt is a number naming a held delivery; once the delivery is settled, given back or
    its connection lost, the receipt settles nothing.
    """

    def __init__(self, broker: Broker, queue: str, subscriptions: list[str], *, prefetch: int) -> None:
        self._broker = broker
        self._queue = queue
        self._subscriptions = subscriptions
        self._prefetch = prefetch
        self._link = broker.link()
        self._lock = threading.RLock()
        self._held_lock = threading.Lock()
        self._ack_lock = threading.Lock()
        self._buffer: deque[tuple[str, Any]] = deque()
        self._held: dict[int, _Held] = {}
        self._unacked: set[int] = set()  # delivery tags of this channel not yet acked
        self._tokens = itertools.count(1)
        self._consuming = 0  # the link generation consumption was set up on
        self._declared: set[str] = set()
        self._tags: dict[str, str] = {}  # consumer tag -> subscription, on this generation's channel
        self._missing: list[str] = []  # subscriptions whose queue does not exist (yet)
        self._warned: set[str] = set()
        self._next_existence_check = 0.0
        self._next_expiry = math.inf  # no held lease runs out before this (the clock's time)

    # -- receiving --------------------------------------------------------------------------

    def receive(self, max_messages: int, wait_s: float) -> list[Delivery]:
        """Up to ``max_messages``, waiting up to ``wait_s``. Raises ``TransportError``."""
        deadline = time.monotonic() + wait_s
        while True:
            with self._lock, self._link.errors("receive"):
                self._ensure_consuming()
                self._housekeep()
                self._take_arrived(max_messages)
                if self._buffer and max_messages > 0:
                    return self._hand_out(max_messages)
                sock = self._socket()
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return []
            # Wait without the lock, so retries and dead letters from other threads go ahead
            # meanwhile; an ack frees prefetch room, and the broker's next delivery wakes this.
            self._wait(sock, min(DRAIN_SLICE_S, remaining_s))

    def _wait(self, sock: Any, timeout_s: float) -> None:
        """Until ``sock`` has something to read or ``timeout_s`` passed."""
        if sock is None:
            time.sleep(timeout_s)
            return
        with contextlib.suppress(OSError, ValueError):  # closed meanwhile: the next drain says why
            select.select([sock], [], [], timeout_s)

    def _socket(self) -> Any:
        """The socket deliveries arrive on, if known."""
        try:
            assert self._link.connection is not None
            return self._link.connection.connection.sock
        except AttributeError:
            return None

    def _ensure_consuming(self) -> None:
        channel = self._link.channel
        if self._consuming == self._link.generation:
            return
        self._buffer.clear()
        self._declared.clear()
        self._tags.clear()
        with self._held_lock:
            self._unacked.clear()
            # the connection they came on is gone; the broker gives them back
            self._held = {t: h for t, h in self._held.items() if h.generation == self._link.generation}
        channel.basic_qos(0, self._prefetch, True)  # shared by the channel's consumers
        self._consuming = self._link.generation
        self._missing = list(self._subscriptions)
        self._consume_existing()

    def _consume_existing(self) -> None:
        """Consume the subscriptions that exist; the broker refuses a queue never provisioned."""
        self._next_existence_check = time.monotonic() + EXISTENCE_CHECK_S
        for name in list(self._missing):
            if not self._link.exists("queue", name):
                if name not in self._warned:
                    logger.warning("queue %s does not exist (not provisioned?): nothing to receive from it", name)
                    self._warned.add(name)
                continue
            tag = self._link.channel.basic_consume(name, callback=self._collector(name), no_ack=False)
            self._tags[tag] = name
            self._missing.remove(name)

    def _collector(self, name: str) -> Callable[[Any], None]:
        def collect(message: Any) -> None:  # a py-amqp message, read with care in ``read``
            with self._held_lock:
                self._unacked.add(message.delivery_info["delivery_tag"])
            self._buffer.append((name, message))

        return collect

    def _take_arrived(self, max_messages: int) -> None:
        """Buffer up to ``max_messages`` deliveries the broker already pushed, without waiting.

        On plain TCP a delivery that arrived whole is read here (:meth:`_take_delivery`); any
        other frame goes to py-amqp (:meth:`_drain`).
        """
        assert self._link.connection is not None
        raw = self._link.connection.connection
        transport = chunked(raw)
        channel = self._link.channel
        number = channel.channel_id
        while len(self._buffer) < max_messages:
            found = transport.buffered_delivery(number) if transport is not None else None
            if found is None and transport is not None and transport.fill():  # the rest, or the next ones
                found = transport.buffered_delivery(number)
            if found is not None:
                raw.bytes_recv += 1
                self._take_delivery(channel, *found)
            elif transport is not None and not transport.holding():
                return  # nothing arrived: no socket timeout set and reset to learn that
            elif not self._drain(raw):
                return

    def _drain(self, raw: Any) -> bool:
        """Handle one method the broker already sent (a delivery, a confirm); False if none."""
        try:
            raw.drain_events(timeout=0)
        except TimeoutError:
            return False
        return True

    def _take_delivery(self, channel: Any, method: bytes, header: bytes, body: bytes) -> None:
        """Buffer a delivery read whole off the socket; py-amqp reads one with unusual properties."""
        consumer_tag, tag, redelivered = deliver_args(method)
        name = self._tags.get(consumer_tag)
        properties = properties_of(header) if name is not None and channel.is_open else None
        if properties is None or properties.get("content_encoding", "binary") != "binary":
            message = amqp.Message(frame_method=_DELIVER, frame_args=method)
            part = "its properties"
            try:
                message.inbound_header(header)
                part = "its exchange or routing key"
                amqp.serialization.loads("sLbss", method, 4)  # what dispatch_method reads first
            except Exception as exc:  # py-amqp cannot read them either (a short string not UTF-8...)
                if name is None or not channel.is_open:
                    raise
                # handed out with the fault, so that the worker dead-letters it with why
                properties = {"application_headers": {FAULT: f"{part} cannot be read: {exc!r}"[:300]}}
            else:
                if body:
                    message.inbound_body(body)
                channel.dispatch_method(_DELIVER, method, message)  # as py-amqp's reader would
                return
        assert name is not None
        info = {"consumer_tag": consumer_tag, "delivery_tag": tag, "redelivered": redelivered}
        with self._held_lock:
            self._unacked.add(tag)
        self._buffer.append((name, Received(body, properties, info)))

    def _hand_out(self, max_messages: int) -> list[Delivery]:
        found: list[Delivery] = []
        expires_at = self._broker.clock() + self._broker.lease_s
        generation = self._link.generation
        with self._held_lock:
            while self._buffer and len(found) < max_messages:
                name, message = self._buffer.popleft()
                reading = read(message)
                token = next(self._tokens)
                tag = message.delivery_info["delivery_tag"]
                self._held[token] = _Held(tag, name, reading, generation, expires_at)
                self._next_expiry = min(self._next_expiry, expires_at)
                found.append(
                    Delivery(
                        reading.body,
                        reading.attributes,
                        reading.attempt,
                        token,
                        name,
                        reading.message_id,
                        reading.fault,
                    )
                )
        return found

    def _housekeep(self) -> None:
        """Give back deliveries whose lease ran out; consume subscriptions provisioned since.

        Held leases are looked at only once the earliest may have run out (extending one only
        moves it later), so a receive usually costs no walk over what is held.
        """
        if self._missing and time.monotonic() >= self._next_existence_check:
            self._consume_existing()
        now = self._broker.clock()
        if now < self._next_expiry:
            return
        expired: list[_Held] = []
        with self._held_lock:
            for token, held in list(self._held.items()):
                if held.generation != self._link.generation:
                    del self._held[token]  # its connection is gone; the broker gives it back
                elif held.expires_at <= now:
                    del self._held[token]
                    expired.append(held)
            self._next_expiry = min((held.expires_at for held in self._held.values()), default=math.inf)
        for held in expired:
            logger.warning("lease ran out on id=%s from %s", held.reading.message_id, held.subscription)
            self._resend(held, held.subscription)

    # -- settling ---------------------------------------------------------------------------

    def _take(self, delivery: Delivery) -> _Held | None:
        with self._held_lock:
            held = self._held.pop(delivery.receipt, None)
        if held is None or held.generation != self._link.generation:
            return None
        return held

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Ack each; contiguous ones in one ``multiple`` ack, every ack frame in one write. Writes
        only: never waits for a receive."""
        # Acks are planned and written in one order, so a ``multiple`` one never covers a tag
        # that another thread planned to ack on its own and has not written yet.
        with self._ack_lock:
            with self._held_lock:
                channel, generation = self._link.current
                tags = []
                for delivery in deliveries:
                    held = self._held.pop(delivery.receipt, None)
                    if held is not None and held.generation == generation:
                        tags.append(held.tag)
                plan = ack_plan(tags, self._unacked) if channel is not None else []
            # A failure leaves the connection to the receive, which reads the same error and drops it.
            if plan:
                with self._link.errors("ack", drop=False):
                    self._link.write(ack_frames(channel.channel_id, plan))

    def _ack_one(self, held: _Held) -> None:
        with self._ack_lock:
            with self._held_lock:
                self._unacked.discard(held.tag)
            self._link.channel.basic_ack(held.tag)

    def release(self, deliveries: Sequence[Delivery]) -> None:
        """Put each back at the tail of its queue, attempt kept, then ack the held copy."""
        with self._lock, self._link.errors("release"):
            for delivery in deliveries:
                held = self._take(delivery)
                if held is not None:
                    self._resend(held, held.subscription)

    def retry_later(self, delivery: Delivery, delay_s: float) -> None:
        with self._lock, self._link.errors("retry later"):
            held = self._take(delivery)
            if held is None:
                return
            if delay_s <= 0:
                self._resend(held, held.subscription)
            else:
                self._delay(held, delay_s)

    def _resend(self, held: _Held, routing_key: str, **options: Any) -> None:
        """Publish a confirmed copy that carries the attempt, then ack the held one."""
        reading = held.reading
        message_id = reading.message_id or None
        send(self._link.confirms, routing_key, reading.body, held.headers(), message_id=message_id, **options)
        self._ack_one(held)

    def _delay(self, held: _Held, delay_s: float) -> None:
        bucket_s = bucket(delay_s)
        name = delay_queue_name(held.subscription, bucket_s)
        if name not in self._declared:
            arguments = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": held.subscription}
            self._link.channel.queue_declare(name, durable=True, auto_delete=False, arguments=arguments)
            self._declared.add(name)
        self._resend(held, name, expiration=min(delay_s, float(bucket_s)))

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Publish a copy with the reason to the app's dead-letter queue, then ack the held one."""
        with self._lock, self._link.errors("dead letter"):
            held = self._take(delivery)
            if held is None:
                return
            reading = held.reading
            headers = {
                **reading.attributes,
                REASON: reason,
                SUBSCRIPTION: held.subscription,
                ATTEMPTS: reading.attempt,
                DEAD_AT: repr(time.time()),
                DEAD_ID: uuid.uuid4().hex,
            }
            dlq = dlq_name(self._queue)
            if dlq not in self._declared:  # unrouted, it would be dropped
                self._link.channel.queue_declare(dlq, durable=True, auto_delete=False)
                self._declared.add(dlq)
            send(self._link.confirms, dlq, reading.body, headers, message_id=reading.message_id or None)
            self._ack_one(held)

    def extend_lease(self, deliveries: Sequence[Delivery], lease_s: float) -> None:
        """Move the consumer's deadline (the broker itself keeps an unacked message until the channel closes)."""
        expires_at = self._broker.clock() + lease_s
        with self._held_lock:
            for delivery in deliveries:
                held = self._held.get(delivery.receipt)
                if held is not None and held.generation == self._link.generation:
                    held.expires_at = expires_at
                    self._next_expiry = min(self._next_expiry, expires_at)  # a shorter lease than before

    def close(self) -> None:
        """Drop the connection: the broker gives back whatever was not settled."""
        with self._lock:
            with self._held_lock:
                self._held.clear()
                self._unacked.clear()
            self._buffer.clear()
            self._link.reset()
