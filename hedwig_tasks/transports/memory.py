"""In-process transport, for unit tests and eager runs.

Features: fan-out to every subscribed queue, leases with visibility deadlines, attempt counts,
delayed retries, dead letters with reasons. Nothing survives the process. As on every
transport, publishing never provisions: a topic that does not exist raises ``PublishError``,
and a message to a topic no queue subscribes to is kept nowhere (with a warning, once per topic).

Connection string: ``memory://`` (each URL builds a new, empty bus), with ``lease_s``.

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
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import urlsplit

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

__all__ = ["MemoryTransport"]

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


def _subscription(queue: str, topic: str) -> str:
    return f"{queue}:{topic}"


class MemoryTransport(Transport):
    """A whole bus in a dict, guarded by one condition variable."""

    scheme = "memory"
    capabilities = Capabilities(local=True)
    messaging_system = "memory"

    def __init__(
        self,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        clock: Callable[[], float] = time.monotonic,
        capabilities: Capabilities | None = None,
    ) -> None:
        if capabilities is not None:  # another transport's limits; local, since this bus is
            self.capabilities = dataclasses.replace(capabilities, local=True)
        self.lease_s = lease_s
        self.clock = clock
        self._cond = threading.Condition()
        self._topics: set[str] = set()
        self._warned: set[str] = set()  # topics already warned of as having no subscription
        self._subscriptions: dict[str, set[str]] = {}  # topic -> queues
        self._queues: dict[str, dict[str, _Stored]] = {}  # subscription -> id -> message
        self._dead: dict[str, list[DeadLetterRecord]] = {}  # queue -> records
        self._ids = itertools.count(1)

    @classmethod
    def from_url(cls, url: str) -> MemoryTransport:
        """``memory://``, with ``lease_s``."""
        options, _ = read_options("memory", urlsplit(url).query, {"lease_s": seconds})
        return cls(**options)

    def publish(self, topic: str, body: bytes, attributes: Mapping[str, str], *, owner: str | None = None) -> str:
        with self._cond:
            if topic not in self._topics:
                raise PublishError(
                    f"topic {topic!r} does not exist: provision it first "
                    "(run `hedwig-tasks provision -A <app>`, or call app.provision())"
                )
            message_id = str(next(self._ids))
            queues = self._subscriptions.get(topic, ())
            for queue in queues:
                stored = _Stored(message_id, topic, bytes(body), dict(attributes))
                self._queues[_subscription(queue, topic)][message_id] = stored
            self._cond.notify_all()
            if not queues and topic not in self._warned:
                self._warned.add(topic)
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
        with self._cond:
            for topic in dict.fromkeys([*publish, *subscribe]):  # once each, so a dry run plans what a run does
                if topic not in self._topics:
                    actions.append(f"create topic {topic}")
                    if not dry_run:
                        self._topics.add(topic)
            for topic in dict.fromkeys(subscribe) if queue else ():
                name = _subscription(queue or "", topic)
                if name not in self._queues:
                    actions.append(f"subscribe {queue} to {topic}")
                    if not dry_run:
                        self._queues[name] = {}
                        self._subscriptions.setdefault(topic, set()).add(queue or "")
        return actions

    def status(self, queue: str, topics: Sequence[str]) -> list[SubscriptionStatus]:
        now = self.clock()
        with self._cond:
            rows = []
            for topic in topics:
                name = _subscription(queue, topic)
                stored = self._queues.get(name, {}).values()
                in_flight = sum(1 for s in stored if s.leased and s.visible_at > now)
                dead = sum(1 for r in self._dead.get(queue, []) if r.subscription == name)
                rows.append(SubscriptionStatus(name, topic, len(stored) - in_flight, in_flight, dead))
            return rows

    def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetterRecord]:
        with self._cond:
            return list(self._dead.get(queue, [])[:limit])

    def requeue_dead_letters(self, queue: str, *, limit: int | None = None, progress: Progress | None = None) -> int:
        with self._cond:
            records = self._dead.get(queue, [])
            moving, self._dead[queue] = records[:limit], records[len(records[:limit]) :]
            for record in moving:
                stored = _Stored(
                    str(next(self._ids)),
                    record.subscription.split(":", 1)[1],
                    bytes(record.body),
                    dict(record.attributes),
                )
                self._queues.setdefault(record.subscription, {})[stored.id] = stored
            self._cond.notify_all()
        if progress:
            progress(len(moving), len(moving))
        return len(moving)


class MemoryConsumer(Consumer):
    """Leases messages of some subscriptions of one :class:`MemoryTransport`."""

    def __init__(self, bus: MemoryTransport, queue: str, subscriptions: list[str]) -> None:
        self._bus = bus
        self._queue = queue
        self._subscriptions = subscriptions

    def receive(self, max_messages: int, wait_s: float) -> list[Delivery]:
        bus = self._bus
        deadline = time.monotonic() + wait_s
        with bus._cond:
            while True:
                found = self._claim(max_messages)
                remaining = deadline - time.monotonic()
                if found or remaining <= 0:
                    return found
                bus._cond.wait(min(remaining, 0.05))

    def _claim(self, max_messages: int) -> list[Delivery]:
        bus, now = self._bus, self._bus.clock()
        found: list[Delivery] = []
        for name in self._subscriptions:
            for stored in bus._queues.get(name, {}).values():
                if len(found) >= max_messages:
                    return found
                if stored.visible_at > now:
                    continue
                stored.attempts += 1
                stored.lease += 1
                stored.leased = True
                stored.visible_at = now + bus.lease_s
                receipt = (name, stored.id, stored.lease)
                found.append(Delivery(stored.body, dict(stored.attributes), stored.attempts, receipt, name, stored.id))
        return found

    def _held(self, delivery: Delivery) -> _Stored | None:
        name, message_id, lease = delivery.receipt
        stored = self._bus._queues.get(name, {}).get(message_id)
        return stored if stored is not None and stored.lease == lease else None

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        with self._bus._cond:
            for delivery in deliveries:
                if self._held(delivery) is not None:
                    del self._bus._queues[delivery.subscription][delivery.receipt[1]]

    def retry_later(self, delivery: Delivery, delay_s: float) -> None:
        self._set_visible(delivery, self._bus.clock() + delay_s)

    def release(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            self._set_visible(delivery, 0.0)

    def extend_lease(self, deliveries: Sequence[Delivery], lease_s: float) -> None:
        until = self._bus.clock() + lease_s
        for delivery in deliveries:
            self._set_visible(delivery, until, keep_lease=True)

    def _set_visible(self, delivery: Delivery, when: float, *, keep_lease: bool = False) -> None:
        with self._bus._cond:
            stored = self._held(delivery)
            if stored is None:
                return
            stored.visible_at = when
            if not keep_lease:
                stored.lease += 1
                stored.leased = False
            self._bus._cond.notify_all()

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        with self._bus._cond:
            stored = self._held(delivery)
            if stored is None:
                return
            del self._bus._queues[delivery.subscription][stored.id]
            record = DeadLetterRecord(
                stored.body,
                dict(stored.attributes),
                reason,
                delivery.subscription,
                stored.attempts,
                time.time(),
                stored.id,
            )
            self._bus._dead.setdefault(self._queue, []).append(record)
