"""In-process transport, for unit tests and eager runs.

Features: fan-out to every subscribed queue, leases with visibility deadlines, attempt counts,
delayed publishes and retries (a visibility time on the stored message), dead letters with
reasons (listed, requeued and purged by id). Nothing survives the process. As on every
transport, publishing never provisions: a topic that does not exist raises ``PublishError``,
and a message to a topic no queue subscribes to is kept nowhere (with a warning, once per
topic).

Connection string: ``memory://`` builds a new, empty, private bus for each URL;
``memory://NAME`` (``memory://shop``) is the process's bus of that name, shared by every app
and transport that names it, so two apps in one test meet on it. :func:`reset_named_buses`
empties every named bus in place (the pytest plugin does it before each test); a transport
built earlier keeps working on the emptied bus. Option: ``lease_s``, per URL (two URLs may
name one bus with different leases).

Options: ``clock`` (a ``() -> float`` of seconds) can be injected so tests move time by hand;
``capabilities`` gives the bus another transport's limits (``AWSTransport.capabilities``), so
that unit tests meet those limits (attribute counts, delays, leases) without the cloud.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from urllib.parse import unquote, urlsplit

from hedwig_tasks.exceptions import PublishError
from hedwig_tasks.transports._url import read_options, seconds
from hedwig_tasks.transports.base import (
    Capabilities,
    Consumer,
    DeadLetterRecord,
    Delivery,
    Progress,
    SubscriptionStatus,
    Transport,
)

__all__ = ["MemoryTransport", "reset_named_buses"]

logger = logging.getLogger(__name__)

#: How long a receive leases a message before it becomes visible again, in seconds.
DEFAULT_LEASE_S = 30.0


@dataclasses.dataclass
class _Stored:
    id: str
    topic: str
    body: bytes
    attributes: dict[str, str]
    visible_at: float = 0.0
    attempts: int = 0
    lease: int = 0  # bumped on every receive, so a stale receipt cannot settle a newer lease
    leased: bool = False


class _Bus:
    """What a bus holds, guarded by one condition variable; shared by the transports naming it."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.ids = itertools.count(1)
        self.topics: set[str] = set()
        self.warned: set[str] = set()  # topics already warned of as having no subscription
        self.subscriptions: dict[str, set[str]] = {}  # topic -> queues
        self.queues: dict[str, dict[str, _Stored]] = {}  # subscription -> id -> message
        self.dead: dict[str, list[DeadLetterRecord]] = {}  # queue -> records

    def clear(self) -> None:
        """Empty the bus in place: no topics, subscriptions, messages or dead letters."""
        with self.cond:
            for held in (self.topics, self.warned, self.subscriptions, self.queues, self.dead):
                held.clear()
            self.cond.notify_all()


_named: dict[str, _Bus] = {}
_named_lock = threading.Lock()


def _named_bus(name: str) -> _Bus:
    with _named_lock:
        return _named.setdefault(name, _Bus())


def reset_named_buses() -> None:
    """Empty every named bus (``memory://NAME``) in place, for a test that starts afresh."""
    with _named_lock:
        buses = list(_named.values())
    for bus in buses:
        bus.clear()


def _subscription(queue: str, topic: str) -> str:
    return f"{queue}:{topic}"


def _select(records: list[DeadLetterRecord], limit: int | None, ids: Collection[str] | None) -> list[int]:
    """Indexes of the records chosen: the oldest ``limit`` of those ``ids`` names (all if None)."""
    wanted = None if ids is None else set(ids)
    chosen = [i for i, r in enumerate(records) if wanted is None or r.transport_id in wanted]
    return chosen if limit is None else chosen[:limit]


class MemoryTransport(Transport):
    """A whole bus in dicts: private to this transport, or the process's bus named ``name``."""

    scheme = "memory"
    capabilities = Capabilities(local=True, delayed_publish=True)
    messaging_system = "memory"

    def __init__(
        self,
        *,
        name: str | None = None,
        lease_s: float = DEFAULT_LEASE_S,
        clock: Callable[[], float] = time.monotonic,
        capabilities: Capabilities | None = None,
    ) -> None:
        if capabilities is not None:  # another transport's limits; local, since this bus is
            self.capabilities = dataclasses.replace(capabilities, local=True, delayed_publish=True)
        self.name = name
        self.lease_s = lease_s
        self.clock = clock
        self._bus = _named_bus(name) if name else _Bus()

    @classmethod
    def from_url(cls, url: str) -> MemoryTransport:
        """``memory://`` (a private bus) or ``memory://NAME`` (the shared one), with ``lease_s``."""
        parts = urlsplit(url)
        options, _ = read_options("memory", parts.query, {"lease_s": seconds})
        return cls(name=unquote(parts.netloc) or None, **options)

    def __repr__(self) -> str:
        return f"<MemoryTransport {self.name!r}>" if self.name else "<MemoryTransport>"

    def publish(
        self,
        topic: str,
        body: bytes,
        attributes: Mapping[str, str],
        *,
        owner: str | None = None,
        delay_s: float = 0,
    ) -> str:
        bus = self._bus
        visible_at = self.clock() + delay_s if delay_s > 0 else 0.0
        with bus.cond:
            if topic not in bus.topics:
                raise PublishError(
                    f"topic {topic!r} does not exist: provision it first "
                    "(run `hedwig-tasks provision -A <app>`, or call app.provision())"
                )
            message_id = str(next(bus.ids))
            queues = bus.subscriptions.get(topic, ())
            for queue in queues:
                stored = _Stored(message_id, topic, bytes(body), dict(attributes), visible_at)
                bus.queues[_subscription(queue, topic)][message_id] = stored
            bus.cond.notify_all()
            if not queues and topic not in bus.warned:
                bus.warned.add(topic)
                logger.warning(
                    "topic %s has no subscriptions: what is published to it is kept nowhere (logged once per topic)",
                    topic,
                )
        return message_id

    def consumer(self, queue: str, topics: Sequence[str], *, max_outstanding: int | None = None) -> MemoryConsumer:
        return MemoryConsumer(self, queue, [_subscription(queue, t) for t in topics])

    def provision(
        self, queue: str | None, subscribe: Sequence[str], publish: Sequence[str], *, dry_run: bool = False
    ) -> list[str]:
        actions = []
        bus = self._bus
        with bus.cond:
            for topic in dict.fromkeys([*publish, *subscribe]):  # once each, so a dry run plans what a run does
                if topic not in bus.topics:
                    actions.append(f"create topic {topic}")
                    if not dry_run:
                        bus.topics.add(topic)
            for topic in dict.fromkeys(subscribe) if queue else ():
                name = _subscription(queue or "", topic)
                if name not in bus.queues:
                    actions.append(f"subscribe {queue} to {topic}")
                    if not dry_run:
                        bus.queues[name] = {}
                        bus.subscriptions.setdefault(topic, set()).add(queue or "")
        return actions

    def status(self, queue: str, topics: Sequence[str]) -> list[SubscriptionStatus]:
        now = self.clock()
        bus = self._bus
        with bus.cond:
            rows = []
            for topic in topics:
                name = _subscription(queue, topic)
                stored = bus.queues.get(name, {}).values()
                in_flight = sum(1 for s in stored if s.leased and s.visible_at > now)
                dead = sum(1 for r in bus.dead.get(queue, []) if r.subscription == name)
                rows.append(SubscriptionStatus(name, topic, len(stored) - in_flight, in_flight, dead))
            return rows

    def dead_letters(
        self, queue: str, *, limit: int = 100, ids: Collection[str] | None = None
    ) -> list[DeadLetterRecord]:
        with self._bus.cond:
            records = self._bus.dead.get(queue, [])
            return [records[i] for i in _select(records, limit, ids)]

    def _take_dead(self, queue: str, limit: int | None, ids: Collection[str] | None) -> list[DeadLetterRecord]:
        """Remove the chosen dead letters of ``queue`` and return them; hold ``cond``."""
        records = self._bus.dead.get(queue, [])
        chosen = set(_select(records, limit, ids))
        self._bus.dead[queue] = [r for i, r in enumerate(records) if i not in chosen]
        return [r for i, r in enumerate(records) if i in chosen]

    def requeue_dead_letters(
        self,
        queue: str,
        *,
        limit: int | None = None,
        progress: Progress | None = None,
        ids: Collection[str] | None = None,
    ) -> int:
        bus = self._bus
        with bus.cond:
            moving = self._take_dead(queue, limit, ids)
            for record in moving:
                topic = record.subscription.split(":", 1)[1]
                stored = _Stored(str(next(bus.ids)), topic, bytes(record.body), dict(record.attributes))
                bus.queues.setdefault(record.subscription, {})[stored.id] = stored
            bus.cond.notify_all()
        if progress:
            progress(len(moving), len(moving))
        return len(moving)

    def purge_dead_letters(
        self,
        queue: str,
        *,
        limit: int | None = None,
        progress: Progress | None = None,
        ids: Collection[str] | None = None,
    ) -> int:
        with self._bus.cond:
            purged = len(self._take_dead(queue, limit, ids))
        if progress:
            progress(purged, purged)
        return purged


class MemoryConsumer(Consumer):
    """Leases messages of some subscriptions of one :class:`MemoryTransport`."""

    def __init__(self, transport: MemoryTransport, queue: str, subscriptions: list[str]) -> None:
        self._transport = transport
        self._bus = transport._bus
        self._queue = queue
        self._subscriptions = subscriptions

    def receive(self, max_messages: int, wait_s: float) -> list[Delivery]:
        cond = self._bus.cond
        deadline = time.monotonic() + wait_s
        with cond:
            while True:
                found = self._claim(max_messages)
                remaining = deadline - time.monotonic()
                if found or remaining <= 0:
                    return found
                cond.wait(min(remaining, 0.05))

    def _claim(self, max_messages: int) -> list[Delivery]:
        now, lease_s = self._transport.clock(), self._transport.lease_s
        found: list[Delivery] = []
        for name in self._subscriptions:
            for stored in self._bus.queues.get(name, {}).values():
                if len(found) >= max_messages:
                    return found
                if stored.visible_at > now:
                    continue
                stored.attempts += 1
                stored.lease += 1
                stored.leased = True
                stored.visible_at = now + lease_s
                receipt = (name, stored.id, stored.lease)
                found.append(Delivery(stored.body, dict(stored.attributes), stored.attempts, receipt, name, stored.id))
        return found

    def _held(self, delivery: Delivery) -> _Stored | None:
        name, message_id, lease = delivery.receipt
        stored = self._bus.queues.get(name, {}).get(message_id)
        return stored if stored is not None and stored.lease == lease else None

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        with self._bus.cond:
            for delivery in deliveries:
                if self._held(delivery) is not None:
                    del self._bus.queues[delivery.subscription][delivery.receipt[1]]

    def retry_later(self, delivery: Delivery, delay_s: float) -> None:
        self._set_visible(delivery, self._transport.clock() + delay_s)

    def release(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            self._set_visible(delivery, 0.0)

    def extend_lease(self, deliveries: Sequence[Delivery], lease_s: float) -> None:
        until = self._transport.clock() + lease_s
        for delivery in deliveries:
            self._set_visible(delivery, until, keep_lease=True)

    def _set_visible(self, delivery: Delivery, when: float, *, keep_lease: bool = False) -> None:
        with self._bus.cond:
            stored = self._held(delivery)
            if stored is None:
                return
            stored.visible_at = when
            if not keep_lease:
                stored.lease += 1
                stored.leased = False
            self._bus.cond.notify_all()

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        bus = self._bus
        with bus.cond:
            stored = self._held(delivery)
            if stored is None:
                return
            del bus.queues[delivery.subscription][stored.id]
            record = DeadLetterRecord(
                stored.body,
                dict(stored.attributes),
                reason,
                delivery.subscription,
                stored.attempts,
                time.time(),
                stored.id,
            )
            bus.dead.setdefault(self._queue, []).append(record)
