"""Embedded transport: a durable bus in one SQLite file, shared by many processes and threads.

Features: fan-out to every subscribed queue, leases with visibility deadlines, attempt counts,
delayed publishes and retries, lease extension, dead letters with reasons, requeue, binary bodies. Every
write is one ``BEGIN IMMEDIATE`` transaction, so however many worker and publisher processes
share the file, a message is claimed by one consumer at a time and a fan-out publish lands in
every subscription or in none. Deadlines use the wall clock, which all processes share. A
waiting consumer is woken within a millisecond of a publish in any process, through a Unix
datagram socket beside the file (``<bus>.wake/``), and polls (20 ms doubling to 200 ms) for
what comes due by the clock or where sockets are missing.

Modules: ``_sqlite_db`` (the file, its connections and transactions), ``_sqlite_sql`` (tables
and statements), ``_sqlite_consumer``, ``_sqlite_acks`` (acks deleted by the next claim),
``_sqlite_rows`` (rows into deliveries), ``_sqlite_wake`` (the wake-up sockets) and
``_sqlite_admin`` (dead letters).

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

import json
import logging
import os
import sqlite3
import time
import uuid
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

from hedwig_tasks.exceptions import ConfigurationError, PublishError
from hedwig_tasks.transports import _sqlite_sql as sql
from hedwig_tasks.transports._sqlite_acks import PendingAcks
from hedwig_tasks.transports._sqlite_admin import DeadLetters
from hedwig_tasks.transports._sqlite_consumer import SQLiteConsumer
from hedwig_tasks.transports._sqlite_db import BusFile
from hedwig_tasks.transports._sqlite_wake import WakeChannel
from hedwig_tasks.transports._url import Option, read_options, seconds
from hedwig_tasks.transports.base import (
    Capabilities,
    DeadLetterRecord,
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

#: The URL's options, each with what it takes.
_OPTIONS: dict[str, Option] = {"busy_timeout_s": seconds, "lease_s": seconds}


def _subscription(queue: str, topic: str) -> str:
    return f"{queue}:{topic}"


class SQLiteTransport(Transport):
    """A bus in one SQLite file (WAL mode), with one connection per thread and process."""

    scheme = "sqlite"
    capabilities = Capabilities(local=True, delayed_publish=True)
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
        self.bus = BusFile(self.path, lease_s=lease_s, busy_timeout_s=busy_timeout_s, clock=clock)
        self.wake = WakeChannel(self.path)
        self._dead = DeadLetters(self.bus, self.wake)
        self._topics: set[str] = set()  # known to exist; topics are never removed
        self._warned: set[str] = set()  # topics already warned of as having no subscription
        self._pending_acks: weakref.WeakSet[PendingAcks] = weakref.WeakSet()  # of this process's consumers

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

    def close(self) -> None:
        """Delete what this process's consumers acknowledged and close every connection it
        opened; a later call reconnects."""
        for pending in list(self._pending_acks):
            pending.close()
        self.bus.close()
        self.wake.close()

    # -- publishing -------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        body: bytes,
        attributes: Mapping[str, str],
        *,
        owner: str | None = None,
        delay_s: float = 0,
    ) -> str:
        """Store one copy per subscription of ``topic``; ``owner`` is ignored (one file, one owner)."""
        return self.publish_many(topic, [(body, attributes)], owner=owner, delay_s=delay_s)[0]

    def publish_many(
        self,
        topic: str,
        messages: Sequence[tuple[bytes, Mapping[str, str]]],
        *,
        owner: str | None = None,
        delay_s: float = 0,
    ) -> list[str]:
        """Store the whole batch in one transaction. Raises ``PublishError`` (nothing stored).

        A delay is the rows' ``visible_at``, as a retry's: claims pass them over until then.
        """
        now = self.clock()
        visible_at = now + delay_s if delay_s > 0 else now
        rows = [
            (uuid.uuid4().hex, bytes(body), json.dumps(dict(attributes), ensure_ascii=False), visible_at, now, topic)
            for body, attributes in messages
        ]
        with self.bus.writing(f"publish to {topic!r}", PublishError) as connection:
            self._require_topic(connection, topic)
            stored = connection.executemany(sql.FAN_OUT, rows).rowcount
        if stored:
            self.wake.notify(topic)
        elif rows:
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
        consumer = SQLiteConsumer(self.bus, self.wake, queue, list(topics))
        self._pending_acks.add(consumer.pending_acks)
        return consumer

    def provision(
        self, queue: str | None, subscribe: Sequence[str], publish: Sequence[str], *, dry_run: bool = False
    ) -> list[str]:
        """Create missing topics and subscriptions in one transaction; ``dry_run`` only reports."""
        topics = list(dict.fromkeys([*publish, *subscribe]))
        pairs = [(queue, topic) for topic in dict.fromkeys(subscribe)] if queue else []
        if dry_run and not self.path.exists():  # report without creating the file
            return self._plan(topics, pairs, set(), set())
        with self.bus.writing("provision") as connection:
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
        """Counts per subscription; an expired lease counts as waiting, not in flight.

        What this process's consumers acknowledged is deleted first, so it never counts.
        """
        for pending in list(self._pending_acks):
            pending.flush()
        now = self.clock()
        rows = []
        with self.bus.reading("status") as connection:
            for topic in topics:
                name = _subscription(queue, topic)
                total, in_flight = connection.execute(sql.COUNT, (now, name)).fetchone()
                (dead,) = connection.execute(sql.COUNT_DEAD, (queue, name)).fetchone()
                rows.append(SubscriptionStatus(name, topic, total - in_flight, in_flight, dead))
        return rows

    def dead_letters(
        self, queue: str, *, limit: int = 100, ids: Collection[str] | None = None
    ) -> list[DeadLetterRecord]:
        """The oldest ``limit`` (of those whose message id ``ids`` holds); unreadable attributes show as ``{}``."""
        return self._dead.records(queue, limit=limit, ids=ids)

    def requeue_dead_letters(
        self,
        queue: str,
        *,
        limit: int | None = None,
        progress: Progress | None = None,
        ids: Collection[str] | None = None,
    ) -> int:
        """Move the oldest dead letters (or those ``ids`` names) back, 500 per transaction, attempts reset."""
        return self._dead.requeue(queue, limit=limit, progress=progress, ids=ids)

    def purge_dead_letters(
        self,
        queue: str,
        *,
        limit: int | None = None,
        progress: Progress | None = None,
        ids: Collection[str] | None = None,
    ) -> int:
        """Delete the oldest dead letters (or those ``ids`` names) for good, 500 per transaction."""
        return self._dead.purge(queue, limit=limit, progress=progress, ids=ids)
