"""The Kombu transport's consumer: receiving under prefetch, leases kept by the consumer,
settling, delayed retries and dead letters, on a connection of its own made by the transport's
:class:`~hedwig_tasks.transports._kombu_link.Broker`. See ``kombu.py`` for the design."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import select
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import kombu

from hedwig_tasks.transports._kombu_link import Broker
from hedwig_tasks.transports._kombu_messages import Reading, read, send
from hedwig_tasks.transports._kombu_names import (
    ATTEMPTS,
    DEAD_AT,
    FAULT,
    REASON,
    SUBSCRIPTION,
    bucket,
    delay_queue_name,
    dlq_name,
)
from hedwig_tasks.transports.base import Consumer, Delivery

__all__ = ["DEFAULT_PREFETCH", "KombuConsumer"]

logger = logging.getLogger("hedwig_tasks.transports.kombu")  # one logger for the whole transport

#: Unsettled deliveries a consumer may hold when the caller gives no ``max_outstanding``.
DEFAULT_PREFETCH = 64
#: Longest a receive waits on the socket before looking again (housekeeping), in seconds.
DRAIN_SLICE_S = 0.05
#: Seconds between checks that a missing subscription queue was provisioned.
EXISTENCE_CHECK_S = 5.0


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclasses.dataclass
class _Held:
    message: Any  # a kombu Message
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
        self._buffer: deque[tuple[str, Any]] = deque()
        self._held: dict[int, _Held] = {}
        self._tokens = itertools.count(1)
        self._consuming = 0  # the link generation consumption was set up on
        self._declared: set[str] = set()
        self._missing: list[str] = []  # subscriptions whose queue does not exist (yet)
        self._warned: set[str] = set()
        self._next_existence_check = 0.0
        self._wake_r, self._wake_w = os.pipe()  # settling wakes a receive waiting on the socket
        os.set_blocking(self._wake_r, False)  # several waiters may see one byte; only one gets it
        os.set_blocking(self._wake_w, False)
        weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)

    # -- receiving --------------------------------------------------------------------------

    def receive(self, max_messages: int, wait_s: float) -> list[Delivery]:
        """Up to ``max_messages``, waiting up to ``wait_s``. Raises ``TransportError``."""
        deadline = time.monotonic() + wait_s
        while True:
            with self._lock, self._link.errors("receive"):
                self._ensure_consuming()
                self._housekeep()
                if not self._buffer:
                    self._drain(0.0)
                self._drain_ready(max_messages)
                if self._buffer and max_messages > 0:
                    return self._hand_out(max_messages)
                sock = self._socket()
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return []
            # Wait without the lock, so acks and retries from other threads go ahead meanwhile; a
            # settle frees prefetch room, so it wakes this wait.
            self._wait(sock, min(DRAIN_SLICE_S, remaining_s))

    def _wait(self, sock: Any, timeout_s: float) -> None:
        """Until ``sock`` has something to read, something was settled, or ``timeout_s`` passed."""
        waiting = [self._wake_r] if sock is None else [sock, self._wake_r]
        with contextlib.suppress(OSError, ValueError):  # closed meanwhile: the next drain says why
            readable, _, _ = select.select(waiting, [], [], timeout_s)
            if self._wake_r in readable:
                os.read(self._wake_r, 4096)  # BlockingIOError: another waiter took the byte first

    def _woken(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe is already a wake-up
            os.write(self._wake_w, b"!")

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
        channel.basic_qos(0, self._prefetch, True)  # shared by the channel
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
            queue = kombu.Queue(name, no_declare=True)
            callback = self._collector(name)
            # Kombu raises out of the drain on a message it could not decompress or encode, unless
            # told what to do: collect it all the same (its fields are read with care, in ``read``).
            consumer = kombu.Consumer(
                self._link.channel,
                [queue],
                auto_declare=False,
                on_message=callback,
                on_decode_error=callback,
            )
            consumer.consume()
            self._missing.remove(name)

    def _collector(self, name: str) -> Callable[..., None]:
        def collect(message: Any, error: Exception | None = None) -> None:
            self._buffer.append((name, message))

        return collect

    def _drain(self, timeout_s: float) -> None:
        assert self._link.connection is not None
        try:
            self._link.connection.drain_events(timeout=timeout_s)
        except TimeoutError:
            pass

    def _drain_ready(self, max_messages: int) -> None:
        """Take what the broker already pushed, without waiting, to return a fuller batch."""
        assert self._link.connection is not None
        while self._buffer and len(self._buffer) < max_messages:
            before = len(self._buffer)
            self._drain(0.0)
            if len(self._buffer) == before:
                return

    def _hand_out(self, max_messages: int) -> list[Delivery]:
        found: list[Delivery] = []
        expires_at = self._broker.clock() + self._broker.lease_s
        while self._buffer and len(found) < max_messages:
            name, message = self._buffer.popleft()
            reading = read(message)
            token = next(self._tokens)
            self._held[token] = _Held(message, name, reading, self._link.generation, expires_at)
            found.append(
                Delivery(
                    reading.body, reading.attributes, reading.attempt, token, name, reading.message_id, reading.fault
                )
            )
        return found

    def _housekeep(self) -> None:
        """Give back deliveries whose lease ran out; consume subscriptions provisioned since."""
        if self._missing and time.monotonic() >= self._next_existence_check:
            self._consume_existing()
        now = self._broker.clock()
        for token, held in list(self._held.items()):
            if held.generation != self._link.generation:
                del self._held[token]  # its connection is gone; the broker gives it back
            elif held.expires_at <= now:
                logger.warning("lease ran out on id=%s from %s", held.reading.message_id, held.subscription)
                del self._held[token]
                self._resend(held, held.subscription)

    # -- settling ---------------------------------------------------------------------------

    def _take(self, delivery: Delivery) -> _Held | None:
        self._woken()
        held = self._held.pop(delivery.receipt, None)
        if held is None or held.generation != self._link.generation:
            return None
        return held

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        with self._lock, self._link.errors("ack"):
            messages = [held.message for held in map(self._take, deliveries) if held is not None]
            for message in messages:
                message.ack()

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
                self._delay_rabbit(held, delay_s)

    def _resend(self, held: _Held, routing_key: str, **options: Any) -> None:
        """Publish a copy (confirmed on RabbitMQ) that carries the attempt, then ack the held one."""
        reading = held.reading
        message_id = reading.message_id or None
        send(self._link.channel, routing_key, reading.body, held.headers(), message_id=message_id, **options)
        held.message.ack()

    def _delay_rabbit(self, held: _Held, delay_s: float) -> None:
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
            }
            dlq = dlq_name(self._queue)
            if dlq not in self._declared:  # unrouted, it would be dropped
                self._link.channel.queue_declare(dlq, durable=True, auto_delete=False)
                self._declared.add(dlq)
            send(self._link.channel, dlq, reading.body, headers, message_id=reading.message_id or None)
            held.message.ack()

    def extend_lease(self, deliveries: Sequence[Delivery], lease_s: float) -> None:
        """Move the consumer's deadline (the broker itself keeps an unacked message until the channel closes)."""
        with self._lock:
            expires_at = self._broker.clock() + lease_s
            for delivery in deliveries:
                held = self._held.get(delivery.receipt)
                if held is not None and held.generation == self._link.generation:
                    held.expires_at = expires_at

    def close(self) -> None:
        """Drop the connection: the broker gives back whatever was not settled."""
        with self._lock:
            self._held.clear()
            self._buffer.clear()
            self._link.reset()
