"""The SQLite bus's consumer: claims batches under a lease, settles them, waits for wake-ups."""

from __future__ import annotations

import itertools
import os
import sqlite3
import threading
import time
from collections.abc import Sequence

from hedwig_tasks.transports import _sqlite_sql as sql
from hedwig_tasks.transports._sqlite_acks import PendingAcks, delete_acked
from hedwig_tasks.transports._sqlite_db import BusFile
from hedwig_tasks.transports._sqlite_rows import Row, delivery
from hedwig_tasks.transports._sqlite_wake import Listener, WakeChannel
from hedwig_tasks.transports.base import Consumer, Delivery

__all__ = ["SQLiteConsumer"]

#: First pause between polls of an empty subscription, in seconds (doubles each poll). A
#: wake-up from a publisher ends the pause at once; polling finds what comes due by the clock.
DEFAULT_POLL_MIN_S = 0.02
#: Longest pause between polls of an empty subscription, in seconds.
DEFAULT_POLL_MAX_S = 0.2


class SQLiteConsumer(Consumer):
    """Leases messages of some of one queue's subscriptions in a SQLite bus file.

    A receipt is ``(row id, lease)``, the lease being the attempt number it was claimed at, so
    a receipt whose lease ran out and was claimed again settles nothing.
    """

    def __init__(self, bus: BusFile, wake: WakeChannel, queue: str, topics: list[str]) -> None:
        self._bus = bus
        self._wake = wake
        self._queue = queue
        self._topics = topics
        self._subscriptions = [f"{queue}:{topic}" for topic in topics]
        self._turn = itertools.count()  # rotates which subscription is claimed from first
        # The last claim found messages, so the next goes straight to the write transaction;
        # after an empty one, a read first keeps idle polls off the write lock publishers need.
        self._busy = False
        self._listener: Listener | None = None
        self._listener_lock = threading.Lock()
        self.pending_acks = PendingAcks(bus)  #: acknowledged, and deleted with the next claim

    def receive(self, max_messages: int, wait_s: float) -> list[Delivery]:
        """Claim up to ``max_messages``, waiting up to ``wait_s`` for a wake-up or a poll to find some.

        Raises ``TransportError``.
        """
        if max_messages < 1 or not self._subscriptions:
            return []
        deadline = time.monotonic() + wait_s
        pause_s = DEFAULT_POLL_MIN_S
        while True:
            found = self._claim(max_messages)
            remaining_s = deadline - time.monotonic()
            if found or remaining_s <= 0:
                return found
            listener = self._listening()
            with self.pending_acks.waiting():
                if listener is None:
                    time.sleep(min(pause_s, remaining_s))
                elif not listener.wait(min(pause_s, remaining_s)):
                    pause_s = min(pause_s * 2, DEFAULT_POLL_MAX_S)

    def _listening(self) -> Listener | None:
        """This consumer's wake-up socket, bound (and kept) on its first empty claim.

        A claim that came back empty before the socket was bound may have missed a wake-up, so
        a new socket starts with one waiting (see :class:`Listener`) and the loop claims again.
        """
        listener = self._listener
        if listener is not None and listener.pid == os.getpid():
            return listener
        with self._listener_lock:
            if self._listener is None or self._listener.pid != os.getpid():
                self._listener = self._wake.listen(self._topics)
            return self._listener

    def _in_turn(self) -> list[str]:
        start = next(self._turn) % len(self._subscriptions)
        return self._subscriptions[start:] + self._subscriptions[:start]

    def _ready(self, names: list[str]) -> list[str]:
        """The subscriptions with a visible message; only reads, never takes the write lock."""
        now = self._bus.clock()
        with self._bus.reading("receive") as connection:
            return [name for name in names if connection.execute(sql.PEEK, (name, now, name)).fetchone()]

    def _claim(self, max_messages: int) -> list[Delivery]:
        names = self._in_turn()
        if not self._busy and not self.pending_acks:
            names = self._ready(names)
            if not names:
                return []
        claimed: list[tuple[str, list[Row]]] = []
        wanted = max_messages
        acked = self.pending_acks.take()
        # Decode after COMMIT: every Python step inside the transaction may wait for the GIL
        # while holding the write lock that publishers in other processes are waiting for.
        try:
            with self._bus.writing("receive") as connection:
                delete_acked(connection, acked)  # first, so that none of them is claimed again
                now = self._bus.clock()
                for name in names:
                    rows = _claim_rows(connection, name, now, now + self._bus.lease_s, wanted)
                    claimed.append((name, rows))
                    wanted -= len(rows)
                    if wanted <= 0:
                        break
        except BaseException:
            self.pending_acks.give_back(acked)
            raise
        self._busy = wanted < max_messages
        return [delivery(name, row) for name, rows in claimed for row in sorted(rows)]

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Delete them with the next claim, or within ``DEFAULT_ACK_DELAY_S`` (see ``_sqlite_acks``);
        stale receipts delete nothing. Raises ``TransportError`` only when the receive loop waits,
        which makes the ack delete them at once."""
        if deliveries:
            self.pending_acks.add([d.receipt for d in deliveries])

    def retry_later(self, delivery: Delivery, delay_s: float) -> None:
        self._bus.write("retry later", sql.UNLEASE, [(self._bus.clock() + delay_s, *delivery.receipt)])
        if delay_s <= 0:
            self._wake.notify()

    def release(self, deliveries: Sequence[Delivery]) -> None:
        now = self._bus.clock()
        if deliveries and self._bus.write("release", sql.UNLEASE, [(now, *d.receipt) for d in deliveries]):
            self._wake.notify()

    def extend_lease(self, deliveries: Sequence[Delivery], lease_s: float) -> None:
        until = self._bus.clock() + lease_s
        if deliveries:
            self._bus.write("extend lease", sql.EXTEND, [(until, *d.receipt) for d in deliveries])

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move it to ``dead_letters`` with ``reason``, in one transaction."""
        with self._bus.writing("dead letter") as connection:
            connection.execute(sql.BURY, (self._queue, reason, self._bus.clock(), *delivery.receipt))
            connection.execute(sql.ACK, delivery.receipt)

    def close(self) -> None:
        """Delete what was acknowledged and unbind the wake-up socket; deliveries not settled come
        back when their lease runs out."""
        self.pending_acks.close()
        with self._listener_lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None


def _claim_rows(connection: sqlite3.Connection, name: str, now: float, until: float, count: int) -> list[Row]:
    """Lease up to ``count`` visible rows of one subscription (inside a write transaction)."""
    rows = _lease(connection, sql.CLAIM_DUE, (name, now), until, count)
    if len(rows) < count:
        rows += _lease(connection, sql.CLAIM_UNTIMED, (name, sql.UNTIMED), until, count - len(rows))
    return rows


def _lease(
    connection: sqlite3.Connection, claim: str, where: tuple[str, float | str], until: float, count: int
) -> list[Row]:
    if sql.HAS_RETURNING:
        return connection.execute(claim, (until, *where, count)).fetchall()
    ids = [(row_id,) for (row_id,) in connection.execute(sql.PICK_OLD[claim], (*where, count))]
    connection.executemany(sql.LEASE_OLD, [(until, row_id) for (row_id,) in ids])
    return [connection.execute(sql.LEASED_OLD, row_id).fetchone() for row_id in ids]
