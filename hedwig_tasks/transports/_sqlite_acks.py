"""Acknowledgements on the SQLite bus, deleted by the consumer's next claim in its own transaction.

An ack of its own is a write transaction: the file's write lock (which the receive loop's claims
then wait for), a commit, and pages the next claim writes again. So ``SQLiteConsumer.ack`` hands
its receipts here, and the next claim deletes them first thing in its transaction, before it
claims, so an acknowledged row can never be claimed again first.

Nothing waits for a claim that is not coming: an ack made while the receive loop waits for
messages deletes its receipts at once, in the acking thread, and a flusher thread deletes any
that have waited ``DEFAULT_ACK_DELAY_S`` (20 ms: the receive loop was busy elsewhere, waiting
for the worker's slots, say). ``close()`` deletes what is left, and the transport's ``status()``
what its consumers hold. A crash before then loses nothing that a crash between handling and
acknowledging would not: the rows come back when their lease runs out.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from hedwig_tasks.exceptions import TransportError
from hedwig_tasks.transports import _sqlite_sql as sql
from hedwig_tasks.transports._sqlite_db import BusFile

__all__ = ["PendingAcks", "Receipt", "delete_acked"]

logger = logging.getLogger(__name__)

#: Longest an acknowledged receipt waits for a claim before the flusher deletes it, in seconds:
#: as long as the worker gathers acks (``ACK_GATHER_S``). Each wait is a wake-up of the flusher,
#: and at 5 ms a draining worker spent some 5% more CPU on them (and their transactions).
DEFAULT_ACK_DELAY_S = 0.02
#: How long the flusher thread stays with nothing to delete before it ends, in seconds.
FLUSHER_IDLE_S = 1.0
#: Pause before the flusher tries again after a failed delete, in seconds.
RETRY_PAUSE_S = 1.0

#: A delivery's receipt on the bus: (row id, lease).
Receipt = tuple[int, object]


def delete_acked(connection: sqlite3.Connection, receipts: list[Receipt]) -> None:
    """Delete the rows these receipts still lease (inside a write transaction), a statement per 400."""
    for start in range(0, len(receipts), sql.ACK_CHUNK):
        chunk = receipts[start : start + sql.ACK_CHUNK]
        connection.execute(sql.ack_many(len(chunk)), [part for receipt in chunk for part in receipt])


class PendingAcks:
    """One consumer's acknowledged receipts that are not deleted yet. Thread-safe."""

    def __init__(self, bus: BusFile, *, delay_s: float = DEFAULT_ACK_DELAY_S) -> None:
        self._bus = bus
        self.delay_s = delay_s  #: how long receipts wait for a claim before the flusher deletes them
        self._receipts: list[Receipt] = []
        self._since = 0.0  # when the oldest of them came (monotonic)
        self._changed = threading.Condition(threading.Lock())
        self._waiting = False  # the receive loop waits for messages: no claim is coming
        self._flusher: threading.Thread | None = None
        self._flusher_idle = False  # the flusher waits for receipts, not for a deadline
        self._flusher_pid = 0
        self._closing = False

    def __bool__(self) -> bool:
        return bool(self._receipts)

    def add(self, receipts: list[Receipt]) -> None:
        """Hand over receipts to delete: with the next claim, or now if the receive loop waits."""
        with self._changed:
            if not self._waiting:
                if not self._receipts:
                    self._since = time.monotonic()
                self._receipts += receipts
                self._wake_flusher()
                return
        self._delete(receipts, "ack")

    def take(self) -> list[Receipt]:
        """All of them, for a transaction that deletes them; ``give_back`` if it fails."""
        with self._changed:
            taken, self._receipts = self._receipts, []
        return taken

    def give_back(self, receipts: list[Receipt]) -> None:
        if receipts:
            with self._changed:
                if not self._receipts:
                    self._since = time.monotonic()
                self._receipts[:0] = receipts
                self._wake_flusher()

    def flush(self) -> None:
        """Delete them now, in this thread. Raises ``TransportError``."""
        self._delete(self.take(), "ack")

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """While the receive loop waits for messages: what it has not deleted goes now, and acks
        made meanwhile are deleted by their own thread. Raises ``TransportError``."""
        with self._changed:
            self._waiting = True
        try:
            self.flush()
            yield
        finally:
            with self._changed:
                self._waiting = False

    def close(self) -> None:
        """Stop the flusher and delete the rest; those it cannot are logged, and come back after their lease."""
        with self._changed:
            flusher, self._closing = self._flusher, True
            self._changed.notify()
        taken: list[Receipt] = []
        try:
            if flusher is not None and flusher.is_alive() and flusher is not threading.current_thread():
                flusher.join()
            taken = self.take()
            if taken:
                with self._bus.writing("ack at close") as connection:
                    delete_acked(connection, taken)
        except TransportError as exc:
            logger.error(
                "%d acknowledged messages in %s were not deleted (they come back when their lease runs out): %s",
                len(taken),
                self._bus.path,
                exc,
            )
        finally:
            with self._changed:
                self._closing = False

    def _delete(self, receipts: list[Receipt], doing: str) -> None:
        if not receipts:
            return
        try:
            with self._bus.writing(doing) as connection:
                delete_acked(connection, receipts)
        except BaseException:
            self.give_back(receipts)
            raise

    # -- the flusher ------------------------------------------------------------------------------

    def _wake_flusher(self) -> None:
        """Start the flusher (again, after a fork or an error that ended it), or wake it if it waits
        for receipts (called holding the lock).

        A flusher already waiting for a deadline is left to wake by itself: waking it for every
        ack would cost more than the transactions it saves.
        """
        flusher = self._flusher
        if flusher is not None and flusher.is_alive() and self._flusher_pid == os.getpid():
            if self._flusher_idle:
                self._changed.notify()
            return
        self._flusher = threading.Thread(target=self._flush_loop, name="hedwig-sqlite-acks", daemon=True)
        self._flusher_pid, self._flusher_idle = os.getpid(), False
        self._flusher.start()

    def _flush_loop(self) -> None:
        while (due := self._next_due()) is not None:
            try:
                self._delete(due, "ack")
            except TransportError as exc:
                logger.warning("could not delete %d acknowledged messages (trying again): %s", len(due), exc)
                with self._changed:
                    self._changed.wait_for(lambda: self._closing, RETRY_PAUSE_S)

    def _next_due(self) -> list[Receipt] | None:
        """Receipts that waited ``delay_s`` for a claim; None when the flusher is to end."""
        with self._changed:
            while not self._closing:
                if not self._receipts:
                    self._flusher_idle = True
                    self._changed.wait(FLUSHER_IDLE_S)
                    self._flusher_idle = False
                    if not self._receipts and not self._closing:
                        break
                    continue
                wait_s = self._since + self.delay_s - time.monotonic()
                if wait_s <= 0:
                    taken, self._receipts = self._receipts, []
                    return taken
                self._changed.wait(wait_s)
            self._flusher = None
            return None
