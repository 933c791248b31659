"""Transport on Kombu: RabbitMQ (``amqp://``) and Redis (``redis://``).

Features: fan-out (one publish reaches every subscribed app), durable queues and persistent
messages, acks after the handler, prefetch through the broker's QoS, leases with attempt
counts, delayed retries kept by the broker (never in the worker's memory), dead letters with
reasons, requeue, binary bodies. Hedwig's wire format rides in the body and the headers (one
header per attribute), so a message decodes to the same ``Message`` as from any transport.

Names: topic ``T`` is the exchange ``hedwig-T``; app ``Q``'s subscription to it is the durable
queue ``hedwig-Q-T`` (one queue per (app, topic), so a consumer can take any subset of its
app's topics); dead letters go to ``hedwig-Q-dlq`` with the reason in ``x-hedwig-reason``.

RabbitMQ: topics are durable ``fanout`` exchanges; publishes use publisher confirms, so a
publish to a topic never provisioned (or one the broker could not take) raises
``PublishError``. They are ``mandatory``: one that no queue takes comes back, and a warning
says (once per topic per process) that the topic has no subscription. A retry goes to
``hedwig-Q-T-delay-<B>s``, one delay queue per power of two ``B`` seconds (created on first
use), with the delay as the message's TTL and dead-lettering back to the subscription.
Per-message TTLs expire only at a queue's head; bucketing by powers of two bounds that
head-of-line wait: a message waits at most its bucket, under twice its delay.

Redis: Kombu's Redis ``fanout`` is PUB/SUB (a message published while no consumer listens is
lost), so fan-out here uses Kombu's binding table of a ``direct`` exchange and the publish puts
one copy on each bound queue's list, all in one transaction; provisioned topics are kept in the
set ``hedwig-topics``; a topic bound to no queue is warned about, as on RabbitMQ.
A receive takes what is waiting, up to what it may hold, with one Lua script that moves the
messages into Kombu's unacked store exactly as Kombu's own delivery records them (Kombu takes
one message per BRPOP and records it in a second round trip); only an empty queue is waited on
with Kombu's BRPOP. An item Kombu cannot read (or could not restore after a crash: it would
drop it) is stored, and handed out, wrapped whole in a message that says why, and so it is
dead-lettered; Kombu's BRPOP reader gets such an item wrapped the same way.
Unacked messages are Kombu's (hash ``unacked`` and index ``unacked_index``); Kombu's
visibility timeout is set to ``lease_s`` plus a grace, so a crashed worker's messages come back
after it, and extending a lease moves the message's score in Kombu's index. A retry is kept in
the sorted set ``hedwig-Q-T-delayed`` (score: when it is due) and moved back to the queue's
list by a Lua script that its consumers run, atomically.

Other publishers: a delivery whose own fields cannot be read (a body of another type, headers
or an attempt count of the wrong types) is handed out with ``Delivery.fault`` saying why; a
text body (what AMQP clients make of one with a ``content_encoding``) is encoded back to bytes.

Leases: neither broker has one (RabbitMQ keeps an unacked message until the channel closes).
The consumer keeps it: a delivery not settled or extended within ``lease_s`` is given back
with its attempt count raised. Attempts travel in ``x-hedwig-attempts``; a redelivery by the
broker (a consumer that died) counts one more.

Connection string: any Kombu URL for these brokers, e.g. ``amqp://guest:guest@localhost:5672//``
or ``redis://localhost:6379/0``.

Options (query string, removed before the URL goes to Kombu): ``lease_s`` (seconds a receive
leases a message; default 30) and ``connect_timeout_s`` (default 5).

Threads: Kombu's connections are not thread-safe. Each publishing thread has its own
connection (so threads wait on RabbitMQ's confirms side by side), and each consumer owns one
connection and channel behind a lock; ``receive`` holds the lock only to read what already arrived and
waits for the socket without it (woken by a pipe when another thread settles something), so
settling never waits on a receive. Broker errors become ``TransportError`` (or
``PublishError``); the connection is dropped and the next call reconnects.

Modules: this one holds the transport (publishing and administration); ``_kombu_consumer``
the consumer; ``_kombu_link`` the names, constants and connection wrapper both use.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import amqp.exceptions
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps

from hedwig_tasks.exceptions import ConfigurationError, PublishError, TransportError
from hedwig_tasks.transports._kombu_consumer import KombuConsumer
from hedwig_tasks.transports._kombu_link import (
    _OPTIONS,
    ATTEMPTS,
    DEAD_AT,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_LEASE_S,
    DEFAULT_PREFETCH,
    DELAY_BUCKETS_S,
    REASON,
    STATUS_SCAN,
    SUBSCRIPTION,
    _attributes,
    _exists,
    _Link,
    _mask,
    _payload,
    _queue_depth,
    _send,
    body_bytes,
    delay_queue_name,
    delayed_key,
    dlq_name,
    exchange_name,
    subscription_name,
    warn_unrouted,
)
from hedwig_tasks.transports.base import (
    Capabilities,
    DeadLetterRecord,
    Progress,
    SubscriptionStatus,
    Transport,
)

__all__ = [
    "DEFAULT_LEASE_S",
    "DELAY_BUCKETS_S",
    "KombuConsumer",
    "KombuTransport",
    "delay_queue_name",
    "delayed_key",
    "dlq_name",
    "exchange_name",
    "subscription_name",
]


class KombuTransport(Transport):
    """RabbitMQ or Redis through Kombu. Construction does no I/O; connecting is lazy."""

    scheme = "kombu"
    # RabbitMQ cannot count unacked messages over AMQP, and a lease that ran out is given back by
    # the consumer at its next receive, so status() counts lag or are None.
    capabilities = Capabilities(max_delay_s=float(DELAY_BUCKETS_S[-1]), status_counts=False)

    def __init__(
        self,
        url: str,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not lease_s > 0:
            raise ConfigurationError(f"lease_s must be positive, got {lease_s!r}")
        scheme = urlsplit(url).scheme
        if scheme not in ("amqp", "amqps", "pyamqp", "redis", "rediss"):
            raise ConfigurationError(f"the kombu transport speaks amqp:// and redis://, not {scheme}://")
        self.url = url
        self.redis = scheme.startswith("redis")
        self.messaging_system = "redis" if self.redis else "rabbitmq"
        self.lease_s = lease_s
        self.connect_timeout_s = connect_timeout_s
        self.clock = clock
        self._lock = threading.Lock()
        self._local = threading.local()  # each publishing thread has its own connection
        self._links: list[tuple[int, _Link]] = []  # (pid, link) of every publishing connection
        self._topics: set[str] = set()  # Redis: known to exist
        self._consumers: list[KombuConsumer] = []

    @classmethod
    def from_url(cls, url: str) -> KombuTransport:
        """A Kombu URL, with ``lease_s`` and ``connect_timeout_s`` taken out of its query."""
        parts = urlsplit(url)
        ours: dict[str, float] = {}
        rest = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key not in _OPTIONS:
                rest.append((key, value))
                continue
            try:
                ours[key] = float(value)
            except ValueError:
                ours[key] = -1.0
            if not ours[key] > 0:
                raise ConfigurationError(f"kombu option {key}={value!r} must be a positive number of seconds")
        return cls(
            urlunsplit(parts._replace(query=urlencode(rest))),
            lease_s=ours.get("lease_s", DEFAULT_LEASE_S),
            connect_timeout_s=ours.get("connect_timeout_s", DEFAULT_CONNECT_TIMEOUT_S),
        )

    def __repr__(self) -> str:
        return f"<KombuTransport {_mask(self.url)!r}>"

    def link(self) -> _Link:
        """A new, unopened connection to the broker."""
        return _Link(self.url, redis=self.redis, lease_s=self.lease_s, connect_timeout_s=self.connect_timeout_s)

    def close(self) -> None:
        """Close the publishing connection and every consumer made here."""
        with self._lock:
            links, self._links = self._links, []
            consumers, self._consumers = self._consumers, []
            self._local = threading.local()
        for pid, link in links:
            if pid == os.getpid():  # never talk on a parent's connection after a fork
                link.reset()
        for consumer in consumers:
            consumer.close()

    def _publisher(self) -> _Link:
        """This thread's publishing connection: publishers in many threads wait on confirms at once."""
        link: _Link | None = getattr(self._local, "link", None)
        if link is None or getattr(self._local, "pid", None) != os.getpid():
            link = self.link()
            self._local.link, self._local.pid = link, os.getpid()
            with self._lock:
                self._links.append((os.getpid(), link))
        return link

    # -- publishing -------------------------------------------------------------------------

    def publish(self, topic: str, body: bytes, attributes: Mapping[str, str], *, owner: str | None = None) -> str:
        return self.publish_many(topic, [(body, attributes)], owner=owner)[0]

    def publish_many(
        self,
        topic: str,
        messages: Sequence[tuple[bytes, Mapping[str, str]]],
        *,
        owner: str | None = None,
    ) -> list[str]:
        """Publish each persistently; on RabbitMQ each is confirmed. Raises ``PublishError``.

        A topic that does not exist raises, naming it; one no queue subscribes to is warned about.
        """
        ids = [uuid.uuid4().hex for _ in messages]
        link = self._publisher()
        with link.errors(f"publish to {topic!r}", PublishError):
            if self.redis:
                self._publish_redis(link.channel, topic, ids, messages)
                return ids
            try:
                for message_id, (body, attributes) in zip(ids, messages, strict=True):
                    exchange = exchange_name(topic)
                    _send(
                        link.channel, topic, body, attributes, exchange=exchange, message_id=message_id, mandatory=True
                    )
            except amqp.exceptions.NotFound as exc:  # the exchange: it closed the channel
                link.reset()
                raise PublishError(_missing_topic(topic)) from exc
        return ids

    def _publish_redis(
        self, channel: Any, topic: str, ids: list[str], messages: Sequence[tuple[bytes, Mapping[str, str]]]
    ) -> None:
        """Check the topic and read its bindings in one round trip; push every copy in another."""
        with channel.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            pipe.sismember("hedwig-topics", topic)
            pipe.smembers(channel.keyprefix_queue % exchange_name(topic))
            exists, bindings = pipe.execute()
            if not exists:
                raise PublishError(_missing_topic(topic))
            queues = sorted({bytes_to_str(b).split(channel.sep)[-1] for b in bindings})
            if not queues:
                warn_unrouted(topic, ids[0] if ids else None)
            pipe = client.pipeline(transaction=True)  # every copy of the batch, or none
            for message_id, (body, attributes) in zip(ids, messages, strict=True):
                for queue in queues:
                    payload = _payload(channel, queue, body, dict(attributes), message_id)
                    pipe.lpush(channel._q_for_pri(queue, 0), dumps(payload))
            pipe.execute()

    # -- administration ---------------------------------------------------------------------

    def consumer(self, queue: str, topics: Sequence[str], *, max_outstanding: int | None = None) -> KombuConsumer:
        names = [subscription_name(queue, t) for t in topics]
        consumer = KombuConsumer(self, queue, names, prefetch=max_outstanding or DEFAULT_PREFETCH)
        with self._lock:
            self._consumers.append(consumer)
        return consumer

    def provision(
        self, queue: str | None, subscribe: Sequence[str], publish: Sequence[str], *, dry_run: bool = False
    ) -> list[str]:
        """Declare the topics' exchanges, the queue's subscriptions and its dead-letter queue."""
        topics = list(dict.fromkeys([*publish, *subscribe]))
        pairs = [(t, subscription_name(queue, t)) for t in dict.fromkeys(subscribe)] if queue else []
        link = self.link()
        try:
            with link.errors("provision"):
                if self.redis:
                    return self._provision_redis(link.channel, queue, topics, pairs, dry_run)
                return self._provision_rabbit(link, queue, topics, pairs, dry_run)
        finally:
            link.reset()

    def _provision_rabbit(
        self, link: _Link, queue: str | None, topics: list[str], pairs: list[tuple[str, str]], dry_run: bool
    ) -> list[str]:
        actions = [f"create topic {t}" for t in topics if not _exists(link, "exchange", exchange_name(t))]
        if pairs and not _exists(link, "queue", dlq_name(queue or "")):
            actions.append(f"create dead-letter queue {dlq_name(queue or '')}")
        actions += [f"subscribe {queue} to {t}" for t, name in pairs if not _exists(link, "queue", name)]
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

    def _provision_redis(
        self, channel: Any, queue: str | None, topics: list[str], pairs: list[tuple[str, str]], dry_run: bool
    ) -> list[str]:
        with channel.conn_or_acquire() as client:
            actions = [f"create topic {t}" for t in topics if not client.sismember("hedwig-topics", t)]
            bound = {t: {q for _, _, q in channel.get_table(exchange_name(t))} for t, _ in pairs}
            actions += [f"subscribe {queue} to {t}" for t, name in pairs if name not in bound[t]]
            if dry_run:
                return actions
            if topics:
                client.sadd("hedwig-topics", *topics)
        for topic, name in pairs:
            channel.exchange_declare(exchange_name(topic), "direct", durable=True)
            channel.queue_declare(name, durable=True, auto_delete=False)
            channel.queue_bind(name, exchange_name(topic), routing_key=topic)
        return actions

    def status(self, queue: str, topics: Sequence[str]) -> list[SubscriptionStatus]:
        """Depth (including delayed retries), in flight (Redis only) and dead letters per subscription."""
        names = [subscription_name(queue, t) for t in topics]
        link = self.link()
        try:
            with link.errors("status"):
                dead = self._dead_counts(link, queue)
                if self.redis:
                    counts = self._redis_counts(link.channel, names)
                else:
                    counts = [(self._rabbit_depth(link, name), None) for name in names]
        finally:
            link.reset()
        return [
            SubscriptionStatus(name, topic, depth, in_flight, None if dead is None else dead.get(name, 0))
            for name, topic, (depth, in_flight) in zip(names, topics, counts, strict=True)
        ]

    def _rabbit_depth(self, link: _Link, name: str) -> int:
        delayed = (_queue_depth(link, delay_queue_name(name, b)) for b in DELAY_BUCKETS_S)
        return (_queue_depth(link, name) or 0) + sum(d or 0 for d in delayed)

    def _redis_counts(self, channel: Any, names: list[str]) -> list[tuple[int, int | None]]:
        with channel.conn_or_acquire() as client:
            unacked = [_routing_key(v) for v in client.hvals(channel.unacked_key)]
            return [(client.llen(n) + client.zcard(delayed_key(n)), unacked.count(n)) for n in names]

    def _dead_counts(self, link: _Link, queue: str) -> dict[str, int] | None:
        if self._dlq_size(link, queue) == 0:
            return {}
        records = self._browse_dead(link, queue, STATUS_SCAN + 1)
        if len(records) > STATUS_SCAN:
            return None
        counts: dict[str, int] = {}
        for record in records:
            counts[record.subscription] = counts.get(record.subscription, 0) + 1
        return counts

    def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetterRecord]:
        """The oldest ``limit`` dead letters, left in place."""
        link = self.link()
        try:
            with link.errors("list dead letters"):
                return self._browse_dead(link, queue, limit)
        finally:
            link.reset()

    def _browse_dead(self, link: _Link, queue: str, limit: int) -> list[DeadLetterRecord]:
        if self.redis:
            channel = link.channel
            with channel.conn_or_acquire() as client:
                raw = client.lrange(dlq_name(queue), -limit, -1) if limit > 0 else []
            return [_record(channel.Message(json.loads(item), channel=channel)) for item in reversed(raw)]
        # RabbitMQ cannot peek: take them unacked, then close the channel, which puts them back in order.
        channel = link.fresh_channel()
        records: list[DeadLetterRecord] = []
        try:
            while len(records) < limit:
                raw = channel.basic_get(dlq_name(queue), no_ack=False)
                if raw is None:
                    break
                records.append(_record(channel.message_to_python(raw)))
        except amqp.exceptions.NotFound:
            return []
        channel.close()
        return records

    def requeue_dead_letters(self, queue: str, *, limit: int | None = None, progress: Progress | None = None) -> int:
        """Move the oldest dead letters back to their subscriptions, attempts reset."""
        link = self.link()
        done = 0
        try:
            with link.errors("requeue dead letters"):
                total = self._dlq_size(link, queue)
                total = total if limit is None else min(limit, total)
                channel = link.channel
                checked: set[str] = set()
                while done < total:
                    raw = channel.basic_get(dlq_name(queue), no_ack=False)
                    if raw is None:
                        break
                    message = channel.message_to_python(raw)
                    self._requeue_one(link, channel, message, checked)
                    done += 1
                    if progress is not None and (done % 100 == 0 or done == total):
                        progress(done, total)
        finally:
            link.reset()
        return done

    def _dlq_size(self, link: _Link, queue: str) -> int:
        if self.redis:
            with link.channel.conn_or_acquire() as client:
                return int(client.llen(dlq_name(queue)))
        return _queue_depth(link, dlq_name(queue)) or 0

    def _requeue_one(self, link: _Link, channel: Any, message: Any, checked: set[str]) -> None:
        target = str(message.headers.get(SUBSCRIPTION, ""))
        if not self.redis and target not in checked:
            if not _exists(link, "queue", target):  # the default exchange would drop it silently
                raise TransportError(f"dead letter's subscription {target!r} no longer exists")
            checked.add(target)
        message_id = message.properties.get("message_id")
        body, _ = body_bytes(message.body, message.content_encoding)
        _send(channel, target, body, _attributes(message.headers), message_id=message_id)
        message.ack()


def _missing_topic(topic: str) -> str:
    return f"topic {topic!r} does not exist: run `hedwig-tasks provision` to create it"


def _routing_key(entry: bytes) -> Any:
    """The queue an entry of Kombu's unacked store goes back to; None if it cannot be read."""
    try:
        return json.loads(entry)[2]
    except (ValueError, TypeError, LookupError):  # the db's store is shared: not every entry is ours
        return None


def _record(message: Any) -> DeadLetterRecord:
    headers = message.headers or {}
    return DeadLetterRecord(
        body=body_bytes(message.body, message.content_encoding)[0],
        attributes=_attributes(headers),
        reason=str(headers.get(REASON, "")),
        subscription=str(headers.get(SUBSCRIPTION, "")),
        attempts=int(headers.get(ATTEMPTS, 0)),
        dead_at=float(headers.get(DEAD_AT, 0.0)),
        transport_id=str(message.properties.get("message_id") or ""),
    )
