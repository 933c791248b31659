"""Embedded transport: a durable bus in one SQLite file, shared by many processes and threads.

Features: fan-out to every subscribed queue, leases with visibility deadlines, attempt counts,
delayed retries, lease extension, dead letters with reasons, requeue, binary bodies. Every
write is one ``BEGIN IMMEDIATE`` transaction, so however many worker and publisher processes
share the file, a message is claimed by one consumer at a time and a fan-out publish lands in
every subscription or in none. Deadlines use the wall clock, which all processes share.

Like the cloud transports, publishing never provisions: a publish to a topic that does not
exist raises ``PublishError``, and one to a topic no queue subscribes to is kept nowhere (with
a warning, once per topic). Rows another program wrote with fields that cannot be read (say,
attributes that are not a JSON object of strings) are received with ``Delivery.fault`` set.

Connection string: ``sqlite:///relative/path.db`` (from the working directory) or
``sqlite:////absolute/path.db``. The parent directory and the file are created on first use,
never at construction.

Options (query string): ``lease_s`` (seconds a receive leases a message; default 30) and
``busy_timeout_s`` (seconds a statement waits for another writer's lock; default 10), e.g.
``sqlite:///.hedwig/bus.db?lease_s=60``. An unknown option raises ``ConfigurationError``.
A ``clock`` (a ``() -> float`` of epoch seconds) can be given to the constructor so tests move
time by hand.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

from hedwig_tasks.exceptions import ConfigurationError, PublishError, TransportError
from hedwig_tasks.transports._boundary import boundary
from hedwig_tasks.transports._url import Option, read_options, seconds
from hedwig_tasks.transports.base import (
    Capabilities,
    Consumer,
    DeadLetterRecord,
    Delivery,
    Progress,
    SubscriptionStatus,
    Transport,
)

__all__ = ["SQLiteConsumer", "SQLiteTransport"]

logger = logging.getLogger(__name__)

#: How long a receive leases a message before it becomes visible again, in seconds.
DEFAULT_LEASE_S = 30.0
#: How long a statement waits for another connection's write lock, in seconds.
DEFAULT_BUSY_TIMEOUT_S = 10.0
#: First pause between polls of an empty subscription, in seconds (doubles each poll).
DEFAULT_POLL_MIN_S = 0.02
#: Longest pause between polls of an empty subscription, in seconds.
DEFAULT_POLL_MAX_S = 0.2
#: Most dead letters moved back per transaction by a requeue, in rows.
DEFAULT_REQUEUE_CHUNK = 500

#: Bumped when the tables change; stored in ``PRAGMA user_version``.
SCHEMA_VERSION = 1

_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS topics (
    name TEXT PRIMARY KEY,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS subscriptions (
    queue TEXT NOT NULL,
    topic TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (queue, topic)
);
CREATE INDEX IF NOT EXISTS subscriptions_by_topic ON subscriptions (topic);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    subscription TEXT NOT NULL,           -- "queue:topic"
    topic TEXT NOT NULL,
    message_id TEXT NOT NULL,             -- shared by the fan-out copies of one publish
    body BLOB NOT NULL,
    attributes TEXT NOT NULL,             -- JSON object of strings
    attempts INTEGER NOT NULL DEFAULT 0,
    visible_at REAL NOT NULL,             -- epoch seconds
    lease INTEGER NOT NULL DEFAULT 0,     -- attempt number of the current lease; 0 when not leased
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_claim ON messages (subscription, visible_at, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    subscription TEXT NOT NULL,
    topic TEXT NOT NULL,
    message_id TEXT NOT NULL,
    body BLOB NOT NULL,
    attributes TEXT NOT NULL,
    reason TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    dead_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_by_queue ON dead_letters (queue, id);
PRAGMA user_version = 1;
COMMIT;
"""

_FAN_OUT = """
INSERT INTO messages (subscription, topic, message_id, body, attributes, visible_at, created_at)
SELECT queue || ':' || topic, topic, ?, ?, ?, ?, ? FROM subscriptions WHERE topic = ?
"""
# A row is visible when due, or when its visibility time is not a number (text or a blob from
# some other writer): those sort after every number, so would never come due. Each test is its
# own index range, so a poll never walks the leased and delayed rows in between.
_PEEK = """
SELECT 1 FROM messages WHERE subscription = ? AND visible_at <= ?
UNION ALL SELECT 1 FROM messages WHERE subscription = ? AND visible_at >= '' LIMIT 1
"""
#: The bound value with which ``visible_at >= ?`` picks every text and blob, and no number.
_UNTIMED = ""
# Claims return the fields another writer may have stored as anything as raw bytes (never as
# text Python must decode, which fails the whole statement on one row that is not UTF-8), with
# the body's storage class, so that one row can become a Delivery with a fault.
# Ordered by visible_at (then id) so the claim index is walked in order and never sorted.
_CLAIM_DUE = """
UPDATE messages SET visible_at = ?, attempts = attempts + 1, lease = attempts + 1
WHERE id IN (SELECT id FROM messages WHERE subscription = ? AND visible_at <= ? ORDER BY visible_at, id LIMIT ?)
RETURNING id, lease, typeof(body), CAST(body AS BLOB), CAST(attributes AS BLOB), CAST(message_id AS BLOB)
"""
_CLAIM_UNTIMED = """
UPDATE messages SET visible_at = ?, attempts = attempts + 1, lease = attempts + 1
WHERE id IN (SELECT id FROM messages WHERE subscription = ? AND visible_at >= ? ORDER BY visible_at, id LIMIT ?)
RETURNING id, lease, typeof(body), CAST(body AS BLOB), CAST(attributes AS BLOB), CAST(message_id AS BLOB)
"""
# Older SQLite (no RETURNING) picks, then leases, then reads each row.
_PICK_OLD = {
    _CLAIM_DUE: "SELECT id FROM messages WHERE subscription = ? AND visible_at <= ? ORDER BY visible_at, id LIMIT ?",
    _CLAIM_UNTIMED: """
SELECT id FROM messages WHERE subscription = ? AND visible_at >= ? ORDER BY visible_at, id LIMIT ?
""",
}
_LEASE_OLD = "UPDATE messages SET visible_at = ?, attempts = attempts + 1, lease = attempts + 1 WHERE id = ?"
_LEASED_OLD = """
SELECT id, lease, typeof(body), CAST(body AS BLOB), CAST(attributes AS BLOB), CAST(message_id AS BLOB)
FROM messages WHERE id = ?
"""
_ACK = "DELETE FROM messages WHERE id = ? AND lease = ?"
_UNLEASE = "UPDATE messages SET visible_at = ?, lease = 0 WHERE id = ? AND lease = ?"
_EXTEND = "UPDATE messages SET visible_at = ? WHERE id = ? AND lease = ?"
_BURY = """
INSERT INTO dead_letters (queue, subscription, topic, message_id, body, attributes, reason, attempts, dead_at)
SELECT ?, subscription, topic, message_id, body, attributes, ?, attempts, ? FROM messages WHERE id = ? AND lease = ?
"""
_COUNT = "SELECT count(*), coalesce(sum(lease > 0 AND visible_at > ?), 0) FROM messages WHERE subscription = ?"
_COUNT_DEAD = "SELECT count(*) FROM dead_letters WHERE queue = ? AND subscription = ?"
_COUNT_QUEUE_DEAD = "SELECT count(*) FROM dead_letters WHERE queue = ?"
_DEAD_LETTERS = """
SELECT CAST(body AS BLOB), CAST(attributes AS BLOB), reason, subscription, attempts, dead_at, CAST(message_id AS BLOB)
FROM dead_letters WHERE queue = ? ORDER BY id LIMIT ?
"""
_UNBURY = """
INSERT INTO messages (subscription, topic, message_id, body, attributes, visible_at, created_at)
SELECT subscription, topic, message_id, body, attributes, ?, ? FROM dead_letters WHERE queue = ? ORDER BY id LIMIT ?
"""
_FORGET = "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters WHERE queue = ? ORDER BY id LIMIT ?)"

#: UPDATE ... RETURNING claims a batch in one statement; older SQLite selects then updates.
_HAS_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)

# id, lease (the attempt number), typeof(body), then body, attributes and message_id as bytes
_Row = tuple[int, object, str, bytes, bytes, bytes]


def _subscription(queue: str, topic: str) -> str:
    return f"{queue}:{topic}"


#: The URL's options, each with what it takes.
_OPTIONS: dict[str, Option] = {"busy_timeout_s": seconds, "lease_s": seconds}


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
    connection.close()  # closing twice (after SQLiteTransport.close) is harmless


class SQLiteTransport(Transport):
    """A bus in one SQLite file (WAL mode), with one connection per thread and process."""

    scheme = "sqlite"
    capabilities = Capabilities(local=True)
    messaging_system = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lease_s: float = DEFAULT_LEASE_S,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not lease_s > 0:
            raise ConfigurationError(f"lease_s must be positive, got {lease_s!r}")
        self.path = Path(os.path.abspath(path))  # fixed now, so a later chdir cannot split the bus
        self.lease_s = lease_s
        self.busy_timeout_s = busy_timeout_s
        self.clock = clock
        self._local = threading.local()  # each thread's _Slot
        # Reentrant: a slot dropped while this thread holds it closes its connection under it.
        self._lock = threading.RLock()
        self._connections: set[tuple[int, sqlite3.Connection]] = set()  # (pid, connection), open ones
        self._generation = 0  # bumped by close(), so threads reconnect afterwards
        self._topics: set[str] = set()  # known to exist; topics are never removed
        self._warned: set[str] = set()  # topics already warned of as having no subscription

    @classmethod
    def from_url(cls, url: str) -> SQLiteTransport:
        """``sqlite:///relative.db`` or ``sqlite:////absolute.db``, with ``lease_s`` and ``busy_timeout_s``."""
        parts = urlsplit(url)
        path = unquote(parts.path[1:])
        if parts.scheme != "sqlite" or parts.netloc or not path:
            raise ConfigurationError(f"expected sqlite:///relative/path.db or sqlite:////absolute/path.db, got {url!r}")
        if path == ":memory:":
            raise ConfigurationError("an in-memory SQLite bus cannot be shared between connections; use memory://")
        options, _ = read_options("sqlite", parts.query, _OPTIONS)
        return cls(
            path,
            lease_s=options.get("lease_s", DEFAULT_LEASE_S),
            busy_timeout_s=options.get("busy_timeout_s", DEFAULT_BUSY_TIMEOUT_S),
        )

    def __repr__(self) -> str:
        return f"<SQLiteTransport {str(self.path)!r}>"

    # -- connections ------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened (with the schema ensured) on first use."""
        key = (os.getpid(), self._generation)
        slot: _Slot | None = getattr(self._local, "slot", None)
        if slot is None or slot.key != key:
            slot = _Slot(key, self._connect(), self._connections, self._lock)
            self._local.slot = slot  # the slot it replaces, if any, closes its own connection
        return slot.connection

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # ``timeout`` is SQLite's busy_timeout: wait for another writer's lock instead of failing.
        connection = sqlite3.connect(
            self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            (mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode != "wal":  # e.g. a network file system: still correct, but readers block writers
                logger.warning("SQLite bus %s runs in %s journal mode, not WAL", self.path, mode)
            connection.execute("PRAGMA synchronous = NORMAL")  # durable across crashes of a process in WAL mode
            if connection.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                connection.executescript(_SCHEMA)
        except BaseException:
            connection.close()
            raise
        with self._lock:
            self._connections.add((os.getpid(), connection))
        return connection

    @contextlib.contextmanager
    def _errors(self, doing: str, error: type[TransportError] = TransportError) -> Iterator[None]:
        """Turn driver and file-system errors into ``error``: the transport boundary."""
        with boundary(f"{doing} on {self.path}", (sqlite3.Error, OSError), error=error):
            yield

    @contextlib.contextmanager
    def _reading(self, doing: str) -> Iterator[sqlite3.Connection]:
        with self._errors(doing):
            yield self._connection()

    @contextlib.contextmanager
    def _writing(self, doing: str, error: type[TransportError] = TransportError) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding the file's write lock from its start; rolled back on error."""
        with self._errors(doing, error):
            connection = self._connection()
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

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

    # -- publishing -------------------------------------------------------------------------

    def publish(self, topic: str, body: bytes, attributes: Mapping[str, str], *, owner: str | None = None) -> str:
        """Store one copy per subscription of ``topic``; ``owner`` is ignored (one file, one owner)."""
        return self.publish_many(topic, [(body, attributes)], owner=owner)[0]

    def publish_many(
        self,
        topic: str,
        messages: Sequence[tuple[bytes, Mapping[str, str]]],
        *,
        owner: str | None = None,
    ) -> list[str]:
        """Store the whole batch in one transaction. Raises ``PublishError`` (nothing stored)."""
        now = self.clock()
        rows = [
            (uuid.uuid4().hex, bytes(body), json.dumps(dict(attributes), ensure_ascii=False), now, now, topic)
            for body, attributes in messages
        ]
        with self._writing(f"publish to {topic!r}", PublishError) as connection:
            self._require_topic(connection, topic)
            stored = connection.executemany(_FAN_OUT, rows).rowcount
        if rows and not stored:
            self._warn_unsubscribed(topic)
        return [row[0] for row in rows]

    def _require_topic(self, connection: sqlite3.Connection, topic: str) -> None:
        if topic in self._topics:
            return
        if connection.execute("SELECT 1 FROM topics WHERE name = ?", (topic,)).fetchone() is None:
            raise PublishError(
                f"topic {topic!r} does not exist in {self.path}: provision it first "
                "(run `hedwig-tasks provision -A <app>`, or call app.provision())"
            )
        self._topics.add(topic)

    def _warn_unsubscribed(self, topic: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            logger.warning(
                "topic %s in %s has no subscriptions: what is published to it is kept nowhere (logged once per topic)",
                topic,
                self.path,
            )

    # -- administration ---------------------------------------------------------------------

    def consumer(self, queue: str, topics: Sequence[str], *, max_outstanding: int | None = None) -> SQLiteConsumer:
        return SQLiteConsumer(self, queue, [_subscription(queue, t) for t in topics])

    def provision(
        self, queue: str | None, subscribe: Sequence[str], publish: Sequence[str], *, dry_run: bool = False
    ) -> list[str]:
        """Create missing topics and subscriptions in one transaction; ``dry_run`` only reports."""
        topics = list(dict.fromkeys([*publish, *subscribe]))
        pairs = [(queue, topic) for topic in dict.fromkeys(subscribe)] if queue else []
        if dry_run and not self.path.exists():  # report without creating the file
            return self._plan(topics, pairs, set(), set())
        with self._writing("provision") as connection:
            have_topics = {row[0] for row in connection.execute("SELECT name FROM topics")}
            have_pairs = set(connection.execute("SELECT queue, topic FROM subscriptions WHERE queue = ?", (queue,)))
            actions = self._plan(topics, pairs, have_topics, have_pairs)
            if not dry_run:
                now = self.clock()
                connection.executemany("INSERT OR IGNORE INTO topics VALUES (?, ?)", [(t, now) for t in topics])
                subscriptions = [(*pair, now) for pair in pairs]
                connection.executemany("INSERT OR IGNORE INTO subscriptions VALUES (?, ?, ?)", subscriptions)
        return actions

    @staticmethod
    def _plan(
        topics: list[str], pairs: list[tuple[str, str]], have_topics: set[str], have_pairs: set[tuple[str, str]]
    ) -> list[str]:
        actions = [f"create topic {topic}" for topic in topics if topic not in have_topics]
        return actions + [f"subscribe {queue} to {topic}" for queue, topic in pairs if (queue, topic) not in have_pairs]

    def status(self, queue: str, topics: Sequence[str]) -> list[SubscriptionStatus]:
        """Counts per subscription; an expired lease counts as waiting, not in flight."""
        now = self.clock()
        rows = []
        with self._reading("status") as connection:
            for topic in topics:
                name = _subscription(queue, topic)
                total, in_flight = connection.execute(_COUNT, (now, name)).fetchone()
                (dead,) = connection.execute(_COUNT_DEAD, (queue, name)).fetchone()
                rows.append(SubscriptionStatus(name, topic, total - in_flight, in_flight, dead))
        return rows

    def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetterRecord]:
        """The oldest ``limit``; attributes that cannot be read (see the reason) show as ``{}``."""
        with self._reading("list dead letters") as connection:
            found = connection.execute(_DEAD_LETTERS, (queue, limit)).fetchall()
        return [
            DeadLetterRecord(
                bytes(body),
                _attributes(attributes)[0],
                reason,
                subscription,
                _whole(attempts),
                dead_at,
                _text(message_id, "message id is")[0],
            )
            for body, attributes, reason, subscription, attempts, dead_at, message_id in found
        ]

    def requeue_dead_letters(self, queue: str, *, limit: int | None = None, progress: Progress | None = None) -> int:
        """Move the oldest dead letters back, ``DEFAULT_REQUEUE_CHUNK`` per transaction, attempts reset."""
        with self._reading("count dead letters") as connection:
            (total,) = connection.execute(_COUNT_QUEUE_DEAD, (queue,)).fetchone()
        total = total if limit is None else min(limit, total)
        done = 0
        while done < total:
            moved = self._requeue_chunk(queue, min(DEFAULT_REQUEUE_CHUNK, total - done))
            if moved == 0:  # someone else requeued them meanwhile
                break
            done += moved
            if progress is not None:
                progress(done, total)
        return done

    def _requeue_chunk(self, queue: str, count: int) -> int:
        with self._writing("requeue dead letters") as connection:
            now = self.clock()
            connection.execute(_UNBURY, (now, now, queue, count))
            return connection.execute(_FORGET, (queue, count)).rowcount


class SQLiteConsumer(Consumer):
    """Leases messages of some of one queue's subscriptions in a :class:`SQLiteTransport`.

    A receipt is ``(row id, lease)``, the lease being the attempt number it was claimed at, so
    a receipt whose lease ran out and was claimed again settles nothing.
    """

    def __init__(self, bus: SQLiteTransport, queue: str, subscriptions: list[str]) -> None:
        self._bus = bus
        self._queue = queue
        self._subscriptions = subscriptions
        self._turn = itertools.count()  # rotates which subscription is claimed from first

    def receive(self, max_messages: int, wait_s: float) -> list[Delivery]:
        """Claim up to ``max_messages``, polling (20 ms doubling to 200 ms) up to ``wait_s``.

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
            time.sleep(min(pause_s, remaining_s))
            pause_s = min(pause_s * 2, DEFAULT_POLL_MAX_S)

    def _ready(self) -> list[str]:
        """The subscriptions with a visible message, starting from the next in turn.

        Only reads, so an idle poll never takes the write lock publishers need.
        """
        start = next(self._turn) % len(self._subscriptions)
        turn = self._subscriptions[start:] + self._subscriptions[:start]
        now = self._bus.clock()
        with self._bus._reading("receive") as connection:
            return [name for name in turn if connection.execute(_PEEK, (name, now, name)).fetchone()]

    def _claim(self, max_messages: int) -> list[Delivery]:
        ready = self._ready()
        if not ready:
            return []
        claimed: list[tuple[str, list[_Row]]] = []
        wanted = max_messages
        # Decode after COMMIT: every Python step inside the transaction may wait for the GIL
        # while holding the write lock that publishers in other processes are waiting for.
        with self._bus._writing("receive") as connection:
            now = self._bus.clock()
            for name in ready:
                rows = _claim_rows(connection, name, now, now + self._bus.lease_s, wanted)
                claimed.append((name, rows))
                wanted -= len(rows)
                if wanted <= 0:
                    break
        return [_delivery(name, row) for name, rows in claimed for row in sorted(rows)]

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Delete them, in one transaction; stale receipts delete nothing."""
        self._settle("ack", _ACK, [d.receipt for d in deliveries])

    def retry_later(self, delivery: Delivery, delay_s: float) -> None:
        self._settle("retry later", _UNLEASE, [(self._bus.clock() + delay_s, *delivery.receipt)])

    def release(self, deliveries: Sequence[Delivery]) -> None:
        now = self._bus.clock()
        self._settle("release", _UNLEASE, [(now, *d.receipt) for d in deliveries])

    def extend_lease(self, deliveries: Sequence[Delivery], lease_s: float) -> None:
        until = self._bus.clock() + lease_s
        self._settle("extend lease", _EXTEND, [(until, *d.receipt) for d in deliveries])

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move it to ``dead_letters`` with ``reason``, in one transaction."""
        with self._bus._writing("dead letter") as connection:
            connection.execute(_BURY, (self._queue, reason, self._bus.clock(), *delivery.receipt))
            connection.execute(_ACK, delivery.receipt)

    def _settle(self, doing: str, sql: str, rows: list[tuple[float | int, ...]]) -> None:
        if rows:
            with self._bus._writing(doing) as connection:
                connection.executemany(sql, rows)


def _claim_rows(connection: sqlite3.Connection, name: str, now: float, until: float, count: int) -> list[_Row]:
    """Lease up to ``count`` visible rows of one subscription (inside a write transaction)."""
    rows = _lease(connection, _CLAIM_DUE, (name, now), until, count)
    if len(rows) < count:
        rows += _lease(connection, _CLAIM_UNTIMED, (name, _UNTIMED), until, count - len(rows))
    return rows


def _lease(
    connection: sqlite3.Connection, claim: str, where: tuple[str, float | str], until: float, count: int
) -> list[_Row]:
    if _HAS_RETURNING:
        return connection.execute(claim, (until, *where, count)).fetchall()
    ids = [(row_id,) for (row_id,) in connection.execute(_PICK_OLD[claim], (*where, count))]
    connection.executemany(_LEASE_OLD, [(until, row_id) for (row_id,) in ids])
    return [connection.execute(_LEASED_OLD, row_id).fetchone() for row_id in ids]


#: SQLite storage classes a body can have that no publisher wrote (text is its UTF-8 bytes).
_STORAGE = {"integer": "an integer", "real": "a real"}
#: JSON's names for the Python types ``json.loads`` returns.
_JSON_TYPES = {
    list: "a JSON array",
    str: "a JSON string",
    int: "a JSON number",
    float: "a JSON number",
    bool: "JSON true or false",
}


def _delivery(subscription: str, row: _Row) -> Delivery:
    """The row as a Delivery; whatever of its own fields cannot be read is named in its ``fault``."""
    row_id, lease, body_type, body, raw_attributes, raw_message_id = row
    attributes, attributes_fault = _attributes(raw_attributes)
    message_id, message_id_fault = _text(raw_message_id, "message id is")
    faults = [
        f"body is {_STORAGE[body_type]}, not bytes" if body_type in _STORAGE else "",
        attributes_fault,
        message_id_fault,
        "" if _whole(lease) == lease else f"attempt count {lease!r} is not a whole number of 1 or more",
    ]
    fault = "; ".join(f for f in faults if f)
    return Delivery(bytes(body), attributes, _whole(lease), (row_id, lease), subscription, message_id, fault)


def _whole(value: object) -> int:
    """A stored attempt count as an int, 1 where it is not a whole number of 1 or more."""
    return value if type(value) is int and value >= 1 else 1


def _text(raw: bytes, what: str) -> tuple[str, str]:
    """``raw`` as text, and a fault (empty if none) that starts with ``what`` ("message id is")."""
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as exc:  # kept, escaped, for the log line and the dead letter
        return raw.decode("utf-8", "backslashreplace"), f"{what} not UTF-8 ({exc.reason} at byte {exc.start})"


def _attributes(raw: bytes) -> tuple[dict[str, str], str]:
    """The attributes column read as a JSON object of strings, or ``{}`` and why it is not one."""
    text, fault = _text(raw, "attributes are")
    if fault:
        return {}, f"{fault}: {text[:80]!r}"
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays nested thousands deep
        return {}, f"attributes are not JSON ({exc}): {text[:80]!r}"
    if not isinstance(value, dict):
        return {}, f"attributes are {_JSON_TYPES.get(type(value), 'JSON null')}, not an object: {text[:80]!r}"
    for key, item in value.items():
        if not isinstance(item, str):
            return {}, f"attribute {key!r} is {repr(item)[:80]}, not a string"
    return value, ""
