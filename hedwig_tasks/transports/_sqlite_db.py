"""The SQLite bus file: one connection per thread and process, and the transactions run on them.

Every part of the SQLite transport (publishing, the consumers, administration) holds the one
:class:`BusFile` of its transport and reads or writes through it, so driver errors become ours
at one boundary and every write holds the file's write lock from its start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

from hedwig_tasks.exceptions import TransportError
from hedwig_tasks.transports._boundary import boundary
from hedwig_tasks.transports._sqlite_sql import SCHEMA, SCHEMA_VERSION

__all__ = ["BusFile"]

logger = logging.getLogger(__name__)
#: Pause before asking again to switch a new file to WAL mode while another connection does, in seconds.
WAL_SWITCH_PAUSE_S = 0.01

#: First nap of a writer waiting for another's write lock, in seconds (doubles each try).
WRITE_NAP_MIN_S = 0.00005
#: Longest nap of a writer waiting for another's write lock, in seconds.
WRITE_NAP_MAX_S = 0.002


def open_wal(path: Path, busy_timeout_s: float) -> tuple[sqlite3.Connection, str]:
    """A connection to ``path`` in WAL mode with ``synchronous=NORMAL``, and the journal mode it got.

    ``busy_timeout_s`` is SQLite's busy timeout: a writer waits for another's lock instead of
    failing. Switching a new file to WAL while another connection does the same can be refused
    ("database is locked") without the busy handler being asked, so the switch is asked again
    until that timeout. Raises ``sqlite3.Error``; the connection is closed if it does.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    deadline = time.monotonic() + busy_timeout_s
    try:
        while True:
            try:
                (mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(WAL_SWITCH_PAUSE_S)
        connection.execute("PRAGMA synchronous = NORMAL")  # durable across crashes of a process in WAL mode
    except BaseException:
        connection.close()
        raise
    return connection, str(mode)


class _Slot:
    """One thread's connection to the bus, kept in that thread's local storage.

    Python drops a thread's local storage when the thread ends, and every thread's when the
    transport goes; the slot then closes its connection, so a worker's threads (or a dropped
    transport) do not leave connections open behind them. A connection another process
    opened (before a fork) is never touched.
    """

    __slots__ = ("__weakref__", "connection", "key")

    def __init__(
        self,
        key: tuple[int, int],
        connection: sqlite3.Connection,
        registry: set[tuple[int, sqlite3.Connection]],
        lock: threading.RLock,
    ) -> None:
        self.key = key  # (pid, generation) it was opened in
        self.connection = connection
        weakref.finalize(self, _close_slot, key[0], connection, registry, lock)


def _close_slot(
    pid: int, connection: sqlite3.Connection, registry: set[tuple[int, sqlite3.Connection]], lock: threading.RLock
) -> None:
    if pid != os.getpid():  # a parent's: leave it referenced, never closed here
        return
    with lock:
        registry.discard((pid, connection))
    connection.close()  # closing twice (after close()) is harmless


class BusFile:
    """One SQLite file in WAL mode, with the lease length and clock every part shares."""

    def __init__(self, path: Path, *, lease_s: float, busy_timeout_s: float, clock: Callable[[], float]) -> None:
        self.path = path
        self.lease_s = lease_s
        self.busy_timeout_s = busy_timeout_s
        self.clock = clock
        self._local = threading.local()  # each thread's _Slot
        # Reentrant: a slot dropped while this thread holds it closes its connection under it.
        self._lock = threading.RLock()
        self._connections: set[tuple[int, sqlite3.Connection]] = set()  # (pid, connection), open ones
        self._generation = 0  # bumped by close(), so threads reconnect afterwards

    def connection(self) -> sqlite3.Connection:
        """This thread's connection, opened (with the schema ensured) on first use."""
        slot: _Slot | None = getattr(self._local, "slot", None)
        if slot is None or slot.key != (os.getpid(), self._generation):
            slot = _Slot((os.getpid(), self._generation), self._connect(), self._connections, self._lock)
            self._local.slot = slot  # the slot it replaces, if any, closes its own connection
        return slot.connection

    def _connect(self) -> sqlite3.Connection:
        connection, mode = open_wal(self.path, self.busy_timeout_s)
        try:
            if mode != "wal":  # e.g. a network file system: still correct, but readers block writers
                logger.warning("SQLite bus %s runs in %s journal mode, not WAL", self.path, mode)
            if connection.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                connection.executescript(SCHEMA)
            connection.execute("PRAGMA busy_timeout = 0")  # writers wait in _begin, readers in reading()
        except BaseException:
            connection.close()
            raise
        with self._lock:
            self._connections.add((os.getpid(), connection))
        return connection

    @contextlib.contextmanager
    def errors(self, doing: str, error: type[TransportError] = TransportError) -> Iterator[None]:
        """Turn driver and file-system errors into ``error``: the transport boundary."""
        with boundary(f"{doing} on {self.path}", (sqlite3.Error, OSError), error=error):
            yield

    @contextlib.contextmanager
    def reading(self, doing: str) -> Iterator[sqlite3.Connection]:
        """This thread's connection for reads, which wait up to ``busy_timeout_s`` for a lock.

        In WAL mode a read hardly ever waits (only while another connection recovers the log).
        """
        with self.errors(doing):
            connection = self.connection()
            connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            try:
                yield connection
            finally:
                connection.execute("PRAGMA busy_timeout = 0")

    @contextlib.contextmanager
    def writing(self, doing: str, error: type[TransportError] = TransportError) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding the file's write lock from its start; rolled back on error."""
        with self.errors(doing, error):
            connection = self.connection()
            self._begin(connection)
            try:
                yield connection
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def _begin(self, connection: sqlite3.Connection) -> None:
        """Take the write lock, napping 50 µs doubling to 2 ms while another writer holds it.

        SQLite's own busy handler first sleeps 1 ms, then longer: ten times a claim's whole
        transaction, which left two worker processes on one bus waiting more than working.
        Raises ``sqlite3.OperationalError`` once ``busy_timeout_s`` has passed.
        """
        nap_s, deadline = WRITE_NAP_MIN_S, 0.0
        while True:
            try:
                connection.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "database is locked" not in str(exc):
                    raise
                now = time.monotonic()
                deadline = deadline or now + self.busy_timeout_s
                if now > deadline:
                    raise
            time.sleep(nap_s)
            nap_s = min(nap_s * 2, WRITE_NAP_MAX_S)

    def write(self, doing: str, sql: str, rows: list[tuple[float | int, ...]]) -> int:
        """Run ``sql`` once per row in one write transaction; how many rows it changed."""
        with self.writing(doing) as connection:
            return connection.executemany(sql, rows).rowcount

    def close(self) -> None:
        """Close every connection this process opened; a later call reconnects."""
        pid = os.getpid()
        with self._lock:
            # A parent's connections (after a fork) stay referenced: never closed, nor collected, here.
            mine = {entry for entry in self._connections if entry[0] == pid}
            self._connections -= mine
            self._generation += 1
        for _, connection in mine:
            connection.close()
