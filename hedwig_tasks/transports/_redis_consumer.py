"""The Redis transport's consumer: XREADGROUP over every stream of the queue at once, leases
from the group's pending list, takeovers, settling by Lua script, delayed retries moved when
due, and occasional trimming. See ``redis.py`` for the design."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import redis.exceptions

from hedwig_tasks.transports._redis_client import RedisLink
from hedwig_tasks.transports._redis_trim import Trimmer
from hedwig_tasks.transports._redis_wire import (
    delayed_key,
    dlq_key,
    publish_delayed_key,
    queue_key,
    read_entry,
    stream_key,
    subscription_name,
)
from hedwig_tasks.transports.base import Consumer, Delivery

__all__ = ["PARKING_CONSUMER", "Receipt", "RedisConsumer"]

logger = logging.getLogger("hedwig_tasks.transports.redis")  # one logger for the whole transport

#: The consumer released entries are handed to, idle as long as a lease, so any consumer's next
#: takeover takes them at once.
PARKING_CONSUMER = "hedwig-tasks-released"
#: Longest pause between looking after leases and due retries, in seconds (a quarter lease if less).
HOUSEKEEPING_S = 0.5
#: Seconds between checks that a subscription never provisioned has been since.
EXISTENCE_CHECK_S = 5.0
#: Most due retries moved into the queue's stream at a time.
MOVE_BATCH = 500


class Receipt(NamedTuple):
    """Which entry a delivery is, to which consumer and at which delivery count it was handed out."""

    stream: str
    entry_id: bytes
    delivered: int  #: the pending entry's delivery count when it was handed out
    consumer: str


class RedisConsumer(Consumer):
    """Consumes one queue's topic streams and its own stream as the queue's consumer group.

    Each consumer has a name of its own in the group. A delivery is pending to it (in the
    group's pending list) from the moment it is read until it is settled, so a consumer that
    dies loses nothing: its entries are taken over once their lease has run out.
    """

    def __init__(self, link: RedisLink, queue: str, topics: Sequence[str]) -> None:
        self._link = link
        self._queue = queue
        self._streams = [*dict.fromkeys(stream_key(t) for t in topics), queue_key(queue)]
        self._subscriptions = {stream_key(t): subscription_name(queue, t) for t in topics}
        self._publish_delays = [[publish_delayed_key(t), stream_key(t)] for t in dict.fromkeys(topics)]
        self._name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._buffer: deque[Delivery] = deque()  # read past what a receive asked for
        self._extended: dict[tuple[str, bytes], tuple[int, float]] = {}  # beyond a lease: (count, until)
        self._ready: list[str] | None = None  # the streams that have the group; None: look again
        self._next_check = 0.0
        self._next_housekeeping = 0.0
        self._housekeeping_s = min(HOUSEKEEPING_S, link.lease_s / 4)
        self._warned: set[str] = set()
        self._closed = threading.Event()
        self._trimmer = Trimmer(link)

    def __repr__(self) -> str:
        return f"<RedisConsumer {self._queue!r} as {self._name!r}>"

    # -- receiving ----------------------------------------------------------------------------

    def receive(self, max_messages: int, wait_s: float) -> list[Delivery]:
        """Up to ``max_messages``, blocking up to ``wait_s`` for the first. Raises ``TransportError``."""
        deadline = time.monotonic() + wait_s
        while True:
            found = self._buffered(max_messages)
            if not found and max_messages > 0:
                with self._link.errors("receive"):
                    found = self._fetch(max_messages, deadline)
            if found or time.monotonic() >= deadline or self._closed.is_set():
                return found

    def _buffered(self, max_messages: int) -> list[Delivery]:
        with self._lock:
            return [self._buffer.popleft() for _ in range(min(max_messages, len(self._buffer)))]

    def _fetch(self, max_messages: int, deadline: float) -> list[Delivery]:
        streams = self._ready_streams()
        now = time.monotonic()
        if not streams:
            self._closed.wait(max(0.0, min(deadline - now, self._link.block_s)))
            return []
        found: list[Delivery] = []
        if now >= self._next_housekeeping:
            try:
                found = self._housekeep(streams, max_messages)
            except redis.exceptions.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._ready = None  # a stream or its group went away (a Redis without persistence restarted)
                return []
        if len(found) < max_messages:
            block_s = max(0.0, min(deadline, self._next_housekeeping, now + self._link.block_s) - time.monotonic())
            block_ms = None if found else int(block_s * 1000)
            found += self._read(streams, max_messages - len(found), block_ms or None)
        return self._keep_extra(found, max_messages)

    def _read(self, streams: list[str], count: int, block_ms: int | None) -> list[Delivery]:
        """New entries of the group (XREADGROUP ``>``): first deliveries, count 1."""
        try:
            reply = self._link.client.xreadgroup(
                self._queue, self._name, dict.fromkeys(streams, ">"), count=count, block=block_ms
            )
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._ready = None  # a stream or its group went away: look again which exist
            return []
        return [
            self._delivery(name.decode(), entry_id, fields, 1)
            for name, entries in reply or ()
            for entry_id, fields in entries
            if fields is not None
        ]

    def _keep_extra(self, found: list[Delivery], max_messages: int) -> list[Delivery]:
        """XREADGROUP's count is per stream: what came past ``max_messages`` waits for the next receive."""
        if len(found) <= max_messages:
            return found
        with self._lock:
            self._buffer.extend(found[max_messages:])
        return found[:max_messages]

    def _delivery(self, stream: str, entry_id: bytes, fields: dict[bytes, bytes], count: int) -> Delivery:
        reading = read_entry(fields)
        subscription = reading.subscription or self._subscriptions.get(stream) or self._queue
        return Delivery(
            reading.body,
            reading.attributes,
            reading.prior_attempts + count,
            Receipt(stream, entry_id, count, self._name),
            subscription,
            entry_id.decode(),
            reading.fault,
        )

    def _ready_streams(self) -> list[str]:
        """The streams that have the queue's group; those missing are looked for again now and then."""
        if self._ready is not None and (len(self._ready) == len(self._streams) or time.monotonic() < self._next_check):
            return self._ready
        self._next_check = time.monotonic() + EXISTENCE_CHECK_S
        pipe = self._link.client.pipeline(transaction=False)
        for stream in self._streams:
            pipe.xinfo_groups(stream)
        replies = pipe.execute(raise_on_error=False)
        ready = [s for s, r in zip(self._streams, replies, strict=True) if _has_group(r, self._queue)]
        for stream in set(self._streams) - set(ready) - self._warned:
            logger.warning("%s has no group %s (not provisioned?): nothing to receive from it", stream, self._queue)
            self._warned.add(stream)
        self._ready = ready
        return ready

    # -- housekeeping -------------------------------------------------------------------------

    def _housekeep(self, streams: list[str], max_messages: int) -> list[Delivery]:
        """In one round trip: keep extended leases, move due retries and delayed publishes, take over
        leases that ran out."""
        self._next_housekeeping = time.monotonic() + self._housekeeping_s
        pipe = self._link.client.pipeline(transaction=False)
        refresh = self._refresh_args()
        if refresh:
            self._link.script("extend")(keys=refresh[0], args=refresh[1], client=pipe)
        keys = [delayed_key(self._queue), queue_key(self._queue)]
        self._link.script("move_due")(keys=keys, args=[MOVE_BATCH], client=pipe)
        for keys in self._publish_delays:  # delayed publishes to the topics read here
            self._link.script("move_due")(keys=keys, args=[MOVE_BATCH], client=pipe)
        args = [self._queue, self._name, self._link.lease_ms, max_messages]
        self._link.script("takeover")(keys=streams, args=args, client=pipe)
        taken = pipe.execute()[-1]
        self._trimmer.maybe([*streams, dlq_key(self._queue)], empty_ok=set(self._subscriptions))
        found = []
        for number, entry_id, count, flat in taken:
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            found.append(self._delivery(streams[number - 1], entry_id, fields, int(count)))
        return found

    def _refresh_args(self) -> tuple[list[str], list[Any]] | None:
        """Script arguments to reset the idle time of deliveries extended past one lease."""
        with self._lock:
            now = time.monotonic()
            for key, (_, until) in list(self._extended.items()):
                if until <= now:
                    del self._extended[key]
            receipts = [
                Receipt(stream, entry_id, count, self._name)
                for (stream, entry_id), (count, _) in self._extended.items()
            ]
        return _script_args(receipts, self._queue) if receipts else None

    # -- settling -----------------------------------------------------------------------------

    def _receipts(self, deliveries: Iterable[Delivery]) -> list[Receipt]:
        receipts = [d.receipt for d in deliveries if isinstance(d.receipt, Receipt)]
        if self._extended:
            with self._lock:
                for receipt in receipts:
                    self._extended.pop((receipt.stream, receipt.entry_id), None)
        return receipts

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """XACK what is still this consumer's, in one round trip."""
        receipts = self._receipts(deliveries)
        if receipts:
            keys, args = _script_args(receipts, self._queue)
            with self._link.errors("ack"):
                self._link.script("ack")(keys=keys, args=args)

    def release(self, deliveries: Sequence[Delivery]) -> None:
        """Hand them to the parking consumer, idle a whole lease: any consumer takes them at once."""
        receipts = self._receipts(deliveries)
        if receipts:
            keys, args = _script_args(receipts, self._queue, PARKING_CONSUMER, self._link.lease_ms)
            with self._link.errors("release"):
                self._link.script("release")(keys=keys, args=args)
            self._next_housekeeping = 0.0

    def extend_lease(self, deliveries: Sequence[Delivery], lease_s: float) -> None:
        """Reset their idle time; a lease longer than the transport's is kept up by receives."""
        receipts = [d.receipt for d in deliveries if isinstance(d.receipt, Receipt)]
        if not receipts:
            return
        keys, args = _script_args(receipts, self._queue)
        with self._link.errors("extend lease"):
            self._link.script("extend")(keys=keys, args=args)
        if lease_s > self._link.lease_s:
            until = time.monotonic() + lease_s - self._link.lease_s
            with self._lock:
                for receipt in receipts:
                    self._extended[(receipt.stream, receipt.entry_id)] = (receipt.delivered, until)

    def retry_later(self, delivery: Delivery, delay_s: float) -> None:
        """Into the queue's delayed set (due in ``delay_s``, by Redis's clock) and acked, atomically."""
        receipts = self._receipts([delivery])
        if not receipts:
            return
        receipt = receipts[0]
        keys = [receipt.stream, delayed_key(self._queue)]
        delay_ms = max(0, round(delay_s * 1000))
        args = [*self._owner(receipt), delay_ms, delivery.subscription, delivery.attempt, uuid.uuid4().hex]
        with self._link.errors("retry later"):
            self._link.script("retry")(keys=keys, args=args)
        if delay_ms == 0:
            self._next_housekeeping = 0.0

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Into the queue's dead-letter stream with the reason, and acked, atomically."""
        receipts = self._receipts([delivery])
        if not receipts:
            return
        receipt = receipts[0]
        keys = [receipt.stream, dlq_key(self._queue)]
        args = [*self._owner(receipt), reason, delivery.subscription, delivery.attempt, repr(time.time())]
        with self._link.errors("dead letter"):
            self._link.script("dead_letter")(keys=keys, args=args)

    def _owner(self, receipt: Receipt) -> list[Any]:
        return [self._queue, receipt.consumer, receipt.entry_id, receipt.delivered]

    def close(self) -> None:
        """Stop waiting; what is not settled comes back when its lease runs out."""
        self._closed.set()
        with self._lock:
            self._buffer.clear()
            self._extended.clear()


def _script_args(receipts: Sequence[Receipt], group: str, *more: Any) -> tuple[list[str], list[Any]]:
    """Keys (each stream once) and arguments (the group, ``more``, then key number, id, count and
    consumer per receipt): any consumer object of the queue settles what another received."""
    numbers: dict[str, int] = {}
    args = [group, *more]
    for receipt in receipts:
        number = numbers.setdefault(receipt.stream, len(numbers) + 1)
        args += (number, receipt.entry_id, receipt.delivered, receipt.consumer)
    return list(numbers), args


def _has_group(reply: Any, group: str) -> bool:
    if isinstance(reply, Exception):
        return False
    return any(_text(info.get(b"name", info.get("name"))) == group for info in reply)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
