"""The SQLite state store: the default, a file beside the SQLite bus.

Features
    Every operation of the contract, each in one write transaction (``BEGIN IMMEDIATE``), so
    the threads and processes of one machine may share the file. Expired rows are swept from
    a write at most every ``sweep_every_s``.

Connection string
    ``sqlite:///relative/state.db`` or ``sqlite:////absolute/state.db``.

Options (query string)
    ``table`` (the tables' name prefix; default ``hedwig_state``), ``busy_timeout_s`` (how long a
    write waits for another's lock before ``StateError``; default 5).

Time
    The client's clock (``time.time``, or the ``clock`` a test injects): every process sharing
    the file runs on one machine, so they share one clock.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from hedwig_tasks.exceptions import ConfigurationError, StateError
from hedwig_tasks.state.base import (
    Lease,
    Member,
    StateStore,
    check_bucket,
    check_ttl,
    encode_data,
    refill,
)
from hedwig_tasks.transports._sqlite_db import open_wal
from hedwig_tasks.transports._url import Option, read_options, seconds, text

__all__ = ["DEFAULT_BUSY_TIMEOUT_S", "DEFAULT_SWEEP_EVERY_S", "DEFAULT_TABLE", "SQLiteStore"]

#: Seconds a write waits for another's lock before failing.
DEFAULT_BUSY_TIMEOUT_S = 5.0
#: Seconds between sweeps of expired rows (run from a write).
DEFAULT_SWEEP_EVERY_S = 60.0
#: The tables' name prefix.
DEFAULT_TABLE = "hedwig_state"

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")
_OPTIONS: dict[str, Option] = {"table": text, "busy_timeout_s": seconds}
_Row = tuple[Any, ...]


def check_identifier(name: str, what: str = "table") -> str:
    """``name`` if it is a plain SQL identifier; ``ConfigurationError`` otherwise."""
    if not _IDENTIFIER.match(name):
        raise ConfigurationError(f"{what} {name!r}: use letters, digits and _ (up to 41), starting with a letter")
    return name


def _schema(t: str) -> str:
    return f"""
    CREATE TABLE IF NOT EXISTS {t}_keys (
        key TEXT PRIMARY KEY, value TEXT NOT NULL, expires_at REAL) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS {t}_buckets (
        key TEXT PRIMARY KEY, tokens REAL NOT NULL, updated_at REAL NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS {t}_members (
        grp TEXT NOT NULL, member TEXT NOT NULL, data TEXT NOT NULL, seen REAL NOT NULL, expires_at REAL NOT NULL,
        PRIMARY KEY (grp, member)) WITHOUT ROWID;
    """


def _live(row: _Row | None, now: float) -> bool:
    return row is not None and (row[1] is None or row[1] > now)


class SQLiteStore(StateStore):
    """The contract on one SQLite file; one connection per process, shared by its threads under a lock."""

    schemes = ("sqlite",)

    def __init__(
        self,
        path: str | Path,
        *,
        table: str = DEFAULT_TABLE,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
        sweep_every_s: float = DEFAULT_SWEEP_EVERY_S,
    ) -> None:
        self.path = Path(path)
        self.table = check_identifier(table)
        self.busy_timeout_s = busy_timeout_s
        self.clock = clock
        self.sweep_every_s = sweep_every_s
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._pid = 0
        self._swept_at = clock()

    @classmethod
    def from_url(cls, url: str, *, clock: Callable[[], float] = time.time) -> SQLiteStore:
        """``sqlite:///relative.db`` or ``sqlite:////absolute.db``, with ``table`` and ``busy_timeout_s``."""
        parts = urlsplit(url)
        path = unquote(parts.path[1:])
        in_memory = path == ":memory:"
        if parts.scheme not in cls.schemes or parts.netloc or not path or in_memory:
            raise ConfigurationError(
                "expected a state store file as sqlite:///relative/state.db or "
                f"sqlite:////absolute/state.db, got {url!r}"
            )
        options, _ = read_options("sqlite", parts.query, _OPTIONS)
        return cls(
            path,
            table=options.get("table", DEFAULT_TABLE),
            busy_timeout_s=options.get("busy_timeout_s", DEFAULT_BUSY_TIMEOUT_S),
            clock=clock,
        )

    def __repr__(self) -> str:
        return f"<SQLiteStore {str(self.path)!r} table={self.table!r}>"

    # -- the boundary -----------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._connection is not None and self._pid == os.getpid():
            return self._connection
        connection, _ = open_wal(self.path, self.busy_timeout_s)
        try:
            connection.executescript(_schema(self.table))
        except BaseException:
            connection.close()
            raise
        self._connection, self._pid = connection, os.getpid()  # a parent's connection is left alone
        return connection

    @contextlib.contextmanager
    def _write(self) -> Iterator[tuple[sqlite3.Connection, float]]:
        """One write transaction and the time it runs at; driver errors become ``StateError``."""
        with self._lock:
            try:
                connection = self._connect()
                connection.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StateError(f"state store {self.path}: {exc}") from exc
            try:
                now = self.clock()
                yield connection, now
                self._maybe_sweep(connection, now)
                connection.execute("COMMIT")
            except BaseException as exc:
                connection.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StateError(f"state store {self.path}: {exc}") from exc
                raise

    def _maybe_sweep(self, connection: sqlite3.Connection, now: float) -> int:
        if now - self._swept_at < self.sweep_every_s:
            return 0
        self._swept_at = now
        t = self.table
        return sum(
            connection.execute(f"DELETE FROM {t}_{name} WHERE expires_at <= ?", (now,)).rowcount  # noqa: S608
            for name in ("keys", "buckets", "members")
        )

    def sweep(self) -> int:
        """Delete expired rows now; returns how many."""
        with self._write() as (connection, now):
            self._swept_at = -float("inf")
            return self._maybe_sweep(connection, now)

    def now(self) -> float:
        return self.clock()

    def close(self) -> None:
        with self._lock:
            if self._connection is not None and self._pid == os.getpid():
                self._connection.close()
            self._connection = None

    # -- keys (and leases, which are keys holding their owner) ------------------------------

    def _row(self, connection: sqlite3.Connection, key: str) -> _Row | None:
        row: _Row | None = connection.execute(
            f"SELECT value, expires_at FROM {self.table}_keys WHERE key = ?",  # noqa: S608
            (key,),
        ).fetchone()
        return row

    def _store(self, connection: sqlite3.Connection, key: str, value: str, expires_at: float | None) -> None:
        connection.execute(
            f"INSERT OR REPLACE INTO {self.table}_keys (key, value, expires_at) VALUES (?, ?, ?)",  # noqa: S608
            (key, value, expires_at),
        )

    def _remove(self, connection: sqlite3.Connection, key: str) -> None:
        connection.execute(f"DELETE FROM {self.table}_keys WHERE key = ?", (key,))  # noqa: S608

    def acquire(self, name: str, owner: str, *, ttl_s: float) -> bool:
        check_ttl(ttl_s)
        with self._write() as (connection, now):
            row = self._row(connection, name)
            if _live(row, now) and row is not None and row[0] != owner:
                return False
            self._store(connection, name, owner, now + ttl_s)
            return True

    def renew(self, name: str, owner: str, *, ttl_s: float) -> bool:
        check_ttl(ttl_s)
        with self._write() as (connection, now):
            row = self._row(connection, name)
            if not (_live(row, now) and row is not None and row[0] == owner):
                return False
            self._store(connection, name, owner, now + ttl_s)
            return True

    def release(self, name: str, owner: str) -> bool:
        with self._write() as (connection, now):
            row = self._row(connection, name)
            if not (_live(row, now) and row is not None and row[0] == owner):
                return False
            self._remove(connection, name)
            return True

    def holder(self, name: str) -> Lease | None:
        with self._write() as (connection, now):
            row = self._row(connection, name)
        if row is None or not _live(row, now):
            return None
        return Lease(name, row[0], row[1] if row[1] is not None else float("inf"))

    def set_if_absent(self, key: str, value: str, *, ttl_s: float | None = None) -> bool:
        return self.compare_and_set(key, None, value, ttl_s=ttl_s)

    def get(self, key: str) -> str | None:
        with self._write() as (connection, now):
            row = self._row(connection, key)
        return row[0] if row is not None and _live(row, now) else None

    def put(self, key: str, value: str, *, ttl_s: float | None = None) -> None:
        check_ttl(ttl_s, optional=True)
        with self._write() as (connection, now):
            self._store(connection, key, value, None if ttl_s is None else now + ttl_s)

    def delete(self, key: str) -> bool:
        with self._write() as (connection, now):
            row = self._row(connection, key)
            self._remove(connection, key)
            return _live(row, now)

    def compare_and_set(self, key: str, expected: str | None, value: str, *, ttl_s: float | None = None) -> bool:
        check_ttl(ttl_s, optional=True)
        with self._write() as (connection, now):
            row = self._row(connection, key)
            current = row[0] if row is not None and _live(row, now) else None
            if current != expected:
                return False
            self._store(connection, key, value, None if ttl_s is None else now + ttl_s)
            return True

    # -- counters and buckets ---------------------------------------------------------------

    def incr(self, key: str, amount: int = 1, *, window_s: float) -> int:
        check_ttl(window_s, "window_s")
        with self._write() as (connection, now):
            row = self._row(connection, key)
            if row is None or not _live(row, now):
                count, expires_at = amount, now + window_s
            else:
                count, expires_at = _count(key, row[0]) + amount, row[1]
            self._store(connection, key, str(count), expires_at)
            return count

    def take(self, bucket: str, *, rate_per_s: float, burst: float, tokens: float = 1.0) -> float:
        check_bucket(rate_per_s, burst, tokens)
        t = self.table
        with self._write() as (connection, now):
            row = connection.execute(
                f"SELECT tokens, updated_at, expires_at FROM {t}_buckets WHERE key = ?",  # noqa: S608
                (bucket,),
            ).fetchone()
            held = (
                burst
                if row is None or row[2] <= now
                else refill(row[0], row[1], now, rate_per_s=rate_per_s, burst=burst)
            )
            if held < tokens:
                return (tokens - held) / rate_per_s
            left = held - tokens
            connection.execute(
                f"INSERT OR REPLACE INTO {t}_buckets (key, tokens, updated_at, expires_at) VALUES (?, ?, ?, ?)",  # noqa: S608
                (bucket, left, now, now + (burst - left) / rate_per_s + 1.0),
            )
            return 0.0

    # -- heartbeats -------------------------------------------------------------------------

    def heartbeat(self, group: str, member: str, data: Mapping[str, Any], *, ttl_s: float) -> None:
        check_ttl(ttl_s)
        text = encode_data(data)
        with self._write() as (connection, now):
            connection.execute(
                f"INSERT OR REPLACE INTO {self.table}_members (grp, member, data, seen, expires_at) "  # noqa: S608
                "VALUES (?, ?, ?, ?, ?)",
                (group, member, text, now, now + ttl_s),
            )

    def members(self, group: str) -> list[Member]:
        t = self.table
        with self._write() as (connection, now):
            connection.execute(f"DELETE FROM {t}_members WHERE grp = ? AND expires_at <= ?", (group, now))  # noqa: S608
            rows = connection.execute(
                f"SELECT member, data, seen, expires_at FROM {t}_members WHERE grp = ? ORDER BY member",  # noqa: S608
                (group,),
            ).fetchall()
        return [Member(group, m, _data(d), seen, expires) for m, d, seen, expires in rows]

    def forget(self, group: str, member: str) -> bool:
        with self._write() as (connection, now):
            cursor = connection.execute(
                f"DELETE FROM {self.table}_members WHERE grp = ? AND member = ? AND expires_at > ?",  # noqa: S608
                (group, member, now),
            )
            return cursor.rowcount > 0


def _count(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise StateError(f"{key!r} holds {value!r}, not a count: use another name for the counter") from None


def _data(text: str) -> dict[str, Any]:
    import json

    value: dict[str, Any] = json.loads(text)
    return value
