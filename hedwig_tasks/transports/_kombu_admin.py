"""The Kombu transport's administration: provisioning topics and subscriptions, the full
``status`` and the cheap ``counts``, reading and requeueing dead letters. It holds the
transport's :class:`~hedwig_tasks.transports._kombu_link.Broker`. See ``kombu.py`` for the design."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import amqp.exceptions

from hedwig_tasks.exceptions import TransportError
from hedwig_tasks.transports._kombu_link import Broker, Link
from hedwig_tasks.transports._kombu_messages import attributes, body_bytes, headers_of, send
from hedwig_tasks.transports._kombu_names import (
    ATTEMPTS,
    DEAD_AT,
    DEAD_ID,
    DELAY_BUCKETS_S,
    REASON,
    SUBSCRIPTION,
    delay_queue_name,
    dlq_name,
    exchange_name,
    subscription_name,
)
from hedwig_tasks.transports.base import DeadLetterRecord, Progress, SubscriptionStatus

__all__ = ["KombuAdmin"]

#: Most dead letters read to count them per subscription in ``status``.
STATUS_SCAN = 1000
#: Dead letters requeued between calls of the progress callback.
PROGRESS_EVERY = 100


class KombuAdmin:
    """Provisioning, counts and dead letters on one broker.

    Each call but :meth:`counts` opens a connection of its own and closes it; :meth:`counts`,
    asked over and over by burst workers and metrics scrapes, uses the calling thread's kept
    connection. Driver errors become ``TransportError``.
    """

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    # -- provisioning -----------------------------------------------------------------------

    def provision(
        self, queue: str | None, subscribe: Sequence[str], publish: Sequence[str], *, dry_run: bool = False
    ) -> list[str]:
        """Declare the topics' exchanges, the queue's subscriptions and its dead-letter queue."""
        topics = list(dict.fromkeys([*publish, *subscribe]))
        pairs = [(t, subscription_name(queue, t)) for t in dict.fromkeys(subscribe)] if queue else []
        link = self._broker.link()
        try:
            with link.errors("provision"):
                return _provision_rabbit(link, queue, topics, pairs, dry_run)
        finally:
            link.reset()

    # -- counting ---------------------------------------------------------------------------

    def status(self, queue: str, topics: Sequence[str]) -> list[SubscriptionStatus]:
        """Depth (including delayed retries) and dead letters per subscription; in flight is None.

        Dead letters are counted per subscription by reading up to ``STATUS_SCAN`` of them (None
        past that).
        """
        names = [subscription_name(queue, t) for t in topics]
        link = self._broker.link()
        try:
            with link.errors("status"):
                dead = self._dead_counts(link, queue)
                counts = [(depth, None) for depth in _rabbit_counts(link, names, dlq_name(queue))[0]]
        finally:
            link.reset()
        return [
            SubscriptionStatus(name, topic, depth, in_flight, None if dead is None else dead.get(name, 0))
            for name, topic, (depth, in_flight) in zip(names, topics, counts, strict=True)
        ]

    def counts(self, queue: str, topics: Sequence[str]) -> list[SubscriptionStatus]:
        """Depth (including delayed retries) per subscription, reading no message.

        In flight is None (RabbitMQ cannot count unacked messages). Dead letters are 0 where the
        app's dead-letter queue is empty, else None: it is shared by the app's subscriptions, and
        telling them apart means reading it. A passive declare per queue (each subscription, its
        delay buckets, the dead-letter queue), on the calling thread's kept connection; one that
        went stale since (the broker restarted) is replaced once, as ``status`` would connect anew.
        """
        names = [subscription_name(queue, t) for t in topics]
        link = self._broker.thread_link()
        kept = link.connection is not None
        try:
            depths, dead = self._counts(link, names, dlq_name(queue))
        except TransportError:
            if not kept or link.connection is not None:  # not a kept connection that the error dropped
                raise
            depths, dead = self._counts(link, names, dlq_name(queue))
        return [
            SubscriptionStatus(name, topic, depth, None, 0 if dead == 0 else None)
            for name, topic, depth in zip(names, topics, depths, strict=True)
        ]

    def _counts(self, link: Link, names: list[str], dlq: str) -> tuple[list[int], int]:
        with link.errors("counts"):
            return _rabbit_counts(link, names, dlq)

    def _dead_counts(self, link: Link, queue: str) -> dict[str, int] | None:
        if self._dlq_size(link, queue) == 0:
            return {}
        records = self._browse_dead(link, queue, STATUS_SCAN + 1)
        if len(records) > STATUS_SCAN:
            return None
        counts: dict[str, int] = {}
        for record in records:
            counts[record.subscription] = counts.get(record.subscription, 0) + 1
        return counts

    def _dlq_size(self, link: Link, queue: str) -> int:
        return link.depths([dlq_name(queue)])[0] or 0

    # -- dead letters -----------------------------------------------------------------------

    def dead_letters(
        self, queue: str, *, limit: int = 100, ids: Collection[str] | None = None
    ) -> list[DeadLetterRecord]:
        """The oldest ``limit`` dead letters (of those ``ids`` names, if given), left in place."""
        link = self._broker.link()
        try:
            with link.errors("list dead letters"):
                return self._browse_dead(link, queue, limit, None if ids is None else set(ids))
        finally:
            link.reset()

    def _browse_dead(
        self, link: Link, queue: str, limit: int, wanted: set[str] | None = None
    ) -> list[DeadLetterRecord]:
        # RabbitMQ cannot peek: take them unacked, then close the channel, which puts them back in order.
        channel = link.fresh_channel()
        records: list[DeadLetterRecord] = []
        try:
            while len(records) < limit and (wanted is None or wanted):
                raw = channel.basic_get(dlq_name(queue), no_ack=False)
                if raw is None:
                    break
                record = _record(raw)
                if wanted is None or record.transport_id in wanted:
                    records.append(record)
                    if wanted is not None:
                        wanted.discard(record.transport_id)
        except amqp.exceptions.NotFound:
            records = []  # no dead-letter queue; py-amqp opened the channel the broker closed again
        channel.close()
        return records

    def requeue_dead_letters(
        self,
        queue: str,
        *,
        limit: int | None = None,
        progress: Progress | None = None,
        ids: Collection[str] | None = None,
    ) -> int:
        """Move the oldest dead letters (or those ``ids`` names) back to their subscriptions, attempts reset."""
        checked: set[str] = set()

        def requeue(link: Link, raw: Any) -> None:
            self._requeue_one(link, raw, checked)

        return self._sweep("requeue dead letters", queue, limit, progress, ids, requeue)

    def purge_dead_letters(
        self,
        queue: str,
        *,
        limit: int | None = None,
        progress: Progress | None = None,
        ids: Collection[str] | None = None,
    ) -> int:
        """Delete the oldest dead letters (or those ``ids`` names) for good; returns how many."""
        return self._sweep(
            "purge dead letters",
            queue,
            limit,
            progress,
            ids,
            lambda link, raw: link.channel.basic_ack(raw.delivery_tag),
        )

    def _sweep(
        self,
        doing: str,
        queue: str,
        limit: int | None,
        progress: Progress | None,
        ids: Collection[str] | None,
        act: Callable[[Link, Any], None],
    ) -> int:
        """Take the dead letters oldest first and ``act`` on each chosen one (which acks it); those
        not chosen go back, in order, when the connection closes. Returns how many were acted on."""
        wanted = None if ids is None else set(ids)
        link = self._broker.link()
        done = 0
        try:
            with link.errors(doing):
                size = self._dlq_size(link, queue)
                total = min(size, len(wanted) if wanted is not None else size, size if limit is None else limit)
                for _ in range(size):
                    if done >= total:
                        break
                    raw = link.channel.basic_get(dlq_name(queue), no_ack=False)
                    if raw is None:
                        break
                    if wanted is not None and _dead_id(raw) not in wanted:
                        continue
                    act(link, raw)
                    done += 1
                    if progress is not None and (done % PROGRESS_EVERY == 0 or done == total):
                        progress(done, total)
        finally:
            link.reset()
        return done

    def _requeue_one(self, link: Link, raw: Any, checked: set[str]) -> None:
        headers = headers_of(raw)
        target = str(headers.get(SUBSCRIPTION, ""))
        if target not in checked:
            if not link.exists("queue", target):  # the default exchange would drop it silently
                raise TransportError(f"dead letter's subscription {target!r} no longer exists")
            checked.add(target)
        body, _ = body_bytes(raw.body, raw.properties.get("content_encoding"))
        send(link.confirms, target, body, attributes(headers), message_id=raw.properties.get("message_id"))
        link.channel.basic_ack(raw.delivery_tag)


def _provision_rabbit(
    link: Link, queue: str | None, topics: list[str], pairs: list[tuple[str, str]], dry_run: bool
) -> list[str]:
    actions = [f"create topic {t}" for t in topics if not link.exists("exchange", exchange_name(t))]
    if pairs and not link.exists("queue", dlq_name(queue or "")):
        actions.append(f"create dead-letter queue {dlq_name(queue or '')}")
    actions += [f"subscribe {queue} to {t}" for t, name in pairs if not link.exists("queue", name)]
    if dry_run:
        return actions
    channel = link.channel
    for topic in topics:
        channel.exchange_declare(exchange_name(topic), "fanout", durable=True, auto_delete=False)
    if pairs:
        channel.queue_declare(dlq_name(queue or ""), durable=True, auto_delete=False)
    for topic, name in pairs:
        channel.queue_declare(name, durable=True, auto_delete=False)
        channel.queue_bind(name, exchange_name(topic), routing_key="")
    return actions


def _rabbit_counts(link: Link, names: list[str], dlq: str) -> tuple[list[int], int]:
    """Each subscription's ready messages plus those waiting in its delay buckets, and the
    dead-letter queue's: passive declares, reading no message."""
    per_name = [(name, *(delay_queue_name(name, b) for b in DELAY_BUCKETS_S)) for name in names]
    *found, dead = link.depths([*(q for queues in per_name for q in queues), dlq])
    step = 1 + len(DELAY_BUCKETS_S)
    return [sum(d or 0 for d in found[i : i + step]) for i in range(0, len(found), step)], dead or 0


def _dead_id(raw: Any) -> str:
    """A dead letter's own id: the one it was given when it died, else (one from before there were
    such ids) its message id."""
    return str(headers_of(raw).get(DEAD_ID) or raw.properties.get("message_id") or "")


def _record(raw: Any) -> DeadLetterRecord:
    headers = headers_of(raw)
    return DeadLetterRecord(
        body=body_bytes(raw.body, raw.properties.get("content_encoding"))[0],
        attributes=attributes(headers),
        reason=str(headers.get(REASON, "")),
        subscription=str(headers.get(SUBSCRIPTION, "")),
        attempts=int(headers.get(ATTEMPTS, 0)),
        dead_at=float(headers.get(DEAD_AT, 0.0)),
        transport_id=_dead_id(raw),
    )
