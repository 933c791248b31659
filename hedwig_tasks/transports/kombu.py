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
``PublishError``. A retry goes to ``hedwig-Q-T-delay-<B>s``, one delay queue per power of two
``B`` seconds (created on first use), with the delay as the message's TTL and dead-lettering
back to the subscription. Per-message TTLs expire only at a queue's head; bucketing by powers
of two bounds that head-of-line wait: a message waits at most its bucket, under twice its delay.

Redis: Kombu's Redis ``fanout`` is PUB/SUB (a message published while no consumer listens is
lost), so fan-out here uses Kombu's binding table of a ``direct`` exchange and the publish puts
one copy on each bound queue's list, all in one transaction; provisioned topics are kept in the
set ``hedwig-topics``.
A receive takes what is waiting, up to what it may hold, with one Lua script that moves the
messages into Kombu's unacked store exactly as Kombu's own delivery records them (Kombu takes
one message per BRPOP and records it in a second round trip); only an empty queue is waited on
with Kombu's BRPOP. What is not Kombu's JSON is moved to ``hedwig-Q-unreadable`` and logged.
Unacked messages are Kombu's (hash ``unacked`` and index ``unacked_index``); Kombu's
visibility timeout is set to ``lease_s`` plus a grace, so a crashed worker's messages come back
after it, and extending a lease moves the message's score in Kombu's index. A retry is kept in
the sorted set ``hedwig-Q-T-delayed`` (score: when it is due) and moved back to the queue's
list by a Lua script that its consumers run, atomically.

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
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import select
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import amqp.exceptions
import kombu
import kombu.exceptions
import kombu.transport.virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps

from hedwig_tasks.exceptions import ConfigurationError, PublishError, TransportError
from hedwig_tasks.transports.base import (
    Capabilities,
    Consumer,
    DeadLetterRecord,
    Delivery,
    Progress,
    SubscriptionStatus,
    Transport,
)

__all__ = ["KombuConsumer", "KombuTransport"]

logger = logging.getLogger(__name__)

#: How long a receive leases a message before it is given back, in seconds.
DEFAULT_LEASE_S = 30.0
#: How long connecting may take, in seconds.
DEFAULT_CONNECT_TIMEOUT_S = 5.0
#: RabbitMQ: longest a publish waits for the broker's confirm, in seconds.
CONFIRM_TIMEOUT_S = 30.0
#: Unsettled deliveries a consumer may hold when the caller gives no ``max_outstanding``.
DEFAULT_PREFETCH = 64
#: Longest a receive waits on the socket before looking again (housekeeping), in seconds.
DRAIN_SLICE_S = 0.05
#: Redis: extra seconds past the lease before Kombu restores a dead consumer's message.
RESTORE_GRACE_S = 5.0
#: Redis: seconds the restore lock outlives a holder that died (restoring takes milliseconds).
UNACKED_MUTEX_EXPIRE_S = 10
#: Redis: seconds between moves of due retries (and restores of dead consumers' messages).
HOUSEKEEPING_S = 0.2
#: Delay buckets, in seconds: powers of two up to about 48 days (AMQP's longest TTL).
DELAY_BUCKETS_S = tuple(1 << k for k in range(23))
#: RabbitMQ: seconds between checks that a missing subscription queue was provisioned.
EXISTENCE_CHECK_S = 5.0
#: Most dead letters read to count them per subscription in ``status``.
STATUS_SCAN = 1000

ATTEMPTS = "x-hedwig-attempts"
REASON = "x-hedwig-reason"
SUBSCRIPTION = "x-hedwig-subscription"
DEAD_AT = "x-hedwig-dead-at"
_OURS = "x-hedwig-"
_BROKERS = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")
_CONTENT = {"content_type": "application/octet-stream", "content_encoding": "binary"}
_OPTIONS = ("lease_s", "connect_timeout_s")

# Moves due retries from a sorted set to the tail of a Kombu list, atomically.
_MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, item in ipairs(due) do
  redis.call('ZREM', KEYS[1], item)
  redis.call('LPUSH', KEYS[2], item)
end
return #due
"""

# Redis: takes up to ARGV[1] messages from the queues KEYS[4..] in turn into Kombu's unacked
# store (hash KEYS[1], index KEYS[2] scored ARGV[2]) exactly as Kombu's own delivery records
# them, atomically, in one round trip instead of a BRPOP and a transaction per message. Returns
# (queue number, payload) pairs; one that is not Kombu's JSON is moved to the list KEYS[3] and
# returned with queue number 0, so it is kept and reported, never lost nor received forever.
_FETCH = """
local taken, left = {}, tonumber(ARGV[1])
for q = 4, #KEYS do
  while left > 0 do
    local payload = redis.call('RPOP', KEYS[q])
    if not payload then break end
    local ok, message = pcall(cjson.decode, payload)
    local props = ok and type(message) == 'table' and message['properties']
    local info = type(props) == 'table' and props['delivery_info']
    local tag = type(props) == 'table' and props['delivery_tag']
    if type(info) ~= 'table' or (type(tag) ~= 'string' and type(tag) ~= 'number') then
      redis.call('LPUSH', KEYS[3], payload)
      taken[#taken + 1] = 0
    else
      local entry = '[' .. payload .. ',' .. cjson.encode(info['exchange'] or '') .. ','
        .. cjson.encode(info['routing_key'] or '') .. ']'
      redis.call('HSET', KEYS[1], tag, entry)
      redis.call('ZADD', KEYS[2], ARGV[2], tag)
      taken[#taken + 1] = q - 3
      left = left - 1
    end
    taken[#taken + 1] = payload
  end
end
return taken
"""


def _errors() -> tuple[type[BaseException], ...]:
    """The driver errors mapped to ours at the boundary."""
    found: list[type[BaseException]] = [kombu.exceptions.KombuError, amqp.exceptions.AMQPError, OSError]
    with contextlib.suppress(ImportError):
        import redis.exceptions

        found.append(redis.exceptions.RedisError)
    return tuple(found)


_ERRORS = _errors()


def exchange_name(topic: str) -> str:
    return f"hedwig-{topic}"


def subscription_name(queue: str, topic: str) -> str:
    return f"hedwig-{queue}-{topic}"


def dlq_name(queue: str) -> str:
    return f"hedwig-{queue}-dlq"


def delay_queue_name(subscription: str, bucket_s: int) -> str:
    return f"{subscription}-delay-{bucket_s}s"


def delayed_key(subscription: str) -> str:
    return f"{subscription}-delayed"


def unreadable_key(queue: str) -> str:
    """Redis: the list keeping what app ``queue``'s consumers found on a queue that is not a message."""
    return f"hedwig-{queue}-unreadable"


def _bucket(delay_s: float) -> int:
    return next((b for b in DELAY_BUCKETS_S if b >= delay_s), DELAY_BUCKETS_S[-1])


def _attributes(headers: Mapping[str, Any]) -> dict[str, str]:
    """The Hedwig attributes among a message's headers: without ours and the broker's."""
    found = {}
    for key, value in headers.items():
        if key.startswith(_OURS) or key.startswith(_BROKERS) or (key == "redelivered" and value is True):
            continue
        found[key] = value if isinstance(value, str) else str(value)
    return found


def _mask(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":**@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class _Link:
    """One Kombu connection and channel, opened on first use and dropped on any error."""

    def __init__(self, url: str, *, redis: bool, lease_s: float, connect_timeout_s: float) -> None:
        self.url = url
        self.redis = redis
        options: dict[str, Any] = {"confirm_publish": True}
        if redis:
            options = {
                "visibility_timeout": lease_s + RESTORE_GRACE_S,
                "unacked_restore_throttle": 1,
                # Restoring holds a Redis lock; a worker killed (-9) while holding it would stop
                # every other worker restoring for Kombu's default of 5 minutes.
                "unacked_mutex_expire": UNACKED_MUTEX_EXPIRE_S,
            }
        self.transport_options = options
        self.connect_timeout_s = connect_timeout_s
        self.connection: kombu.Connection | None = None
        self._channel: Any = None
        self.generation = 0

    @property
    def channel(self) -> Any:
        if self.connection is None:
            connection = kombu.Connection(
                self.url, transport_options=self.transport_options, connect_timeout=self.connect_timeout_s
            )
            try:
                connection.ensure_connection(max_retries=0)
                self._channel = connection.channel()
                if self.redis:
                    _reuse_client(self._channel)
            except BaseException:
                with contextlib.suppress(Exception):
                    connection.release()
                raise
            self.connection = connection
            self.generation += 1
        return self._channel

    def reset(self) -> None:
        connection, self.connection, self._channel = self.connection, None, None
        if connection is None:
            return
        self.generation += 1  # receipts from this connection settle nothing from now on
        raw = connection._connection  # Kombu swallows errors while closing; the socket may stay open
        try:
            connection.release()
        except Exception as exc:  # a broken connection: there is nothing more to say to it
            logger.debug("closing a broken connection to %s: %s", _mask(self.url), exc)
        if getattr(raw, "_transport", None) is not None and hasattr(raw, "collect"):
            with contextlib.suppress(Exception):
                raw.collect()  # py-amqp: close the socket without talking

    @contextlib.contextmanager
    def errors(self, doing: str, error: type[TransportError] = TransportError) -> Iterator[None]:
        """The boundary: driver errors drop the connection and become ``error``."""
        try:
            yield
        except _ERRORS as exc:
            self.reset()
            raise error(f"{doing} on {_mask(self.url)} failed: {exc}") from exc

    def fresh_channel(self) -> Any:
        """A new channel on the connection, for calls that may close it (passive declares)."""
        self.channel  # noqa: B018 - connects
        assert self.connection is not None
        return self.connection.channel()


def _reuse_client(channel: Any) -> None:
    """Make a Kombu Redis channel run its commands on one client instead of a new one each time.

    Kombu builds a ``redis.Redis`` per ack, restore and publish (``conn_or_acquire``); with
    redis-py 8 that costs more than the command. The client shares the channel's pool and is
    thread-safe; the channel's own BRPOP client is separate and untouched.
    """
    client = channel._create_client()

    @contextlib.contextmanager
    def conn_or_acquire(given: Any = None) -> Iterator[Any]:
        yield given or client

    channel.conn_or_acquire = conn_or_acquire


def _send(
    channel: Any,
    routing_key: str,
    body: bytes,
    headers: Mapping[str, Any],
    *,
    exchange: str = "",
    message_id: Any = None,
    expiration: float | None = None,
) -> None:
    """Publish persistently (what ``kombu.Producer.publish`` does, without its per-call setup).

    ``exchange`` defaults to the default exchange: straight to the queue ``routing_key``.
    On RabbitMQ the channel waits for the broker's confirm; a refusal raises.
    """
    properties: dict[str, Any] = {"delivery_mode": 2, "message_id": message_id}
    if expiration is not None:
        properties["expiration"] = str(max(0, int(expiration * 1000)))
    message = channel.prepare_message(
        body, 0, _CONTENT["content_type"], _CONTENT["content_encoding"], dict(headers), properties
    )
    if isinstance(message, dict):  # Kombu's virtual (Redis) channel
        channel.basic_publish(message, exchange=exchange, routing_key=routing_key)
    else:  # py-amqp: a confirm that never comes (a blocked broker) must not hang the caller
        channel.basic_publish(message, exchange=exchange, routing_key=routing_key, timeout=CONFIRM_TIMEOUT_S)


def _payload(channel: Any, queue: str, body: bytes, headers: dict[str, Any], message_id: Any) -> Any:
    """A message as Kombu's Redis channel stores it on ``queue``'s list (what ``basic_publish`` builds)."""
    properties = {"delivery_mode": 2, "message_id": message_id}
    payload = channel.prepare_message(body, headers=headers, properties=properties, **_CONTENT)
    channel._inplace_augment_message(payload, "", queue)
    return payload


def _exists(link: _Link, kind: str, name: str) -> bool:
    """Whether an exchange or queue exists (a passive declare; a missing one closes its channel)."""
    channel = link.fresh_channel()
    try:
        if kind == "exchange":
            channel.exchange_declare(name, "fanout", passive=True)
        else:
            channel.queue_declare(name, passive=True)
    except amqp.exceptions.NotFound:
        return False
    with contextlib.suppress(*_ERRORS):
        channel.close()
    return True


def _queue_depth(link: _Link, name: str) -> int | None:
    """Messages ready in a RabbitMQ queue; None if it does not exist."""
    channel = link.fresh_channel()
    try:
        depth = int(channel.queue_declare(name, passive=True).message_count)
    except amqp.exceptions.NotFound:
        return None
    with contextlib.suppress(*_ERRORS):
        channel.close()
    return depth


class KombuTransport(Transport):
    """RabbitMQ or Redis through Kombu. Construction does no I/O; connecting is lazy."""

    scheme = "kombu"
    capabilities = Capabilities(max_delay_s=float(DELAY_BUCKETS_S[-1]))

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
        """Publish each persistently; on RabbitMQ each is confirmed. Raises ``PublishError``."""
        ids = [uuid.uuid4().hex for _ in messages]
        link = self._publisher()
        with link.errors(f"publish to {topic!r}", PublishError):
            if self.redis:
                self._publish_redis(link.channel, topic, ids, messages)
                return ids
            for message_id, (body, attributes) in zip(ids, messages, strict=True):
                _send(link.channel, topic, body, attributes, exchange=exchange_name(topic), message_id=message_id)
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
                raise PublishError(f"topic {topic!r} does not exist; provision it first")
            queues = sorted({bytes_to_str(b).split(channel.sep)[-1] for b in bindings})
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
            unacked = [json.loads(v)[2] for v in client.hvals(channel.unacked_key)]
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
        _send(channel, target, message.body, _attributes(message.headers), message_id=message_id)
        message.ack()


def _record(message: Any) -> DeadLetterRecord:
    headers = message.headers or {}
    return DeadLetterRecord(
        body=bytes(message.body),
        attributes=_attributes(headers),
        reason=str(headers.get(REASON, "")),
        subscription=str(headers.get(SUBSCRIPTION, "")),
        attempts=int(headers.get(ATTEMPTS, 0)),
        dead_at=float(headers.get(DEAD_AT, 0.0)),
        transport_id=str(message.properties.get("message_id") or ""),
    )


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _ack_redis(channel: Any, messages: list[Any]) -> None:
    """Kombu's Redis ack, for a batch in one round trip instead of one each."""
    tags = [message.delivery_tag for message in messages]
    with channel.conn_or_acquire() as client:
        client.pipeline().zrem(channel.unacked_index_key, *tags).hdel(channel.unacked_key, *tags).execute()
    for message in messages:
        kombu.transport.virtual.QoS.ack(channel.qos, message.delivery_tag)  # the channel's own bookkeeping
        message._state = "ACK"


@dataclasses.dataclass
class _Held:
    message: Any  # a kombu Message
    subscription: str
    attempt: int
    generation: int
    expires_at: float


class KombuConsumer(Consumer):
    """Consumes some of one app's subscriptions on a connection of its own.

    A receipt is a number naming a held delivery; once the delivery is settled, given back or
    its connection lost, the receipt settles nothing.
    """

    def __init__(self, transport: KombuTransport, queue: str, subscriptions: list[str], *, prefetch: int) -> None:
        self._transport = transport
        self._queue = queue
        self._subscriptions = subscriptions
        self._prefetch = prefetch
        self._link = transport.link()
        self._lock = threading.RLock()
        self._buffer: deque[tuple[str, Any]] = deque()
        self._held: dict[int, _Held] = {}
        self._tokens = itertools.count(1)
        self._consuming = 0  # the link generation consumption was set up on
        self._declared: set[str] = set()
        self._next_housekeeping = 0.0
        self._move_due: Any = None
        self._fetch: Any = None
        self._rotation = 0  # Redis: the subscription a fetch starts with, in turn
        self._missing: list[str] = []  # subscriptions whose queue does not exist (yet)
        self._warned: set[str] = set()
        self._next_existence_check = 0.0
        self._wake_r, self._wake_w = os.pipe()  # settling wakes a receive waiting on the socket
        os.set_blocking(self._wake_r, False)  # several waiters may see one byte; only one gets it
        os.set_blocking(self._wake_w, False)
        weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)

    # -- receiving --------------------------------------------------------------------------

    def receive(self, max_messages: int, wait_s: float) -> list[Delivery]:
        """Up to ``max_messages``, waiting up to ``wait_s``. Raises ``TransportError``."""
        deadline = time.monotonic() + wait_s
        while True:
            with self._lock, self._link.errors("receive"):
                self._ensure_consuming()
                self._housekeep()
                if not self._buffer and self._transport.redis:
                    self._fetch_redis(max_messages)
                if not self._buffer:
                    self._drain(0.0)
                self._drain_ready(max_messages)
                if self._buffer and max_messages > 0:
                    return self._hand_out(max_messages)
                sock = self._socket()
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return []
            # Wait without the lock, so acks and retries from other threads go ahead meanwhile; a
            # settle frees prefetch room (Redis then needs a new BRPOP), so it wakes this wait.
            self._wait(sock, min(DRAIN_SLICE_S, remaining_s))

    def _wait(self, sock: Any, timeout_s: float) -> None:
        """Until ``sock`` has something to read, something was settled, or ``timeout_s`` passed."""
        waiting = [self._wake_r] if sock is None else [sock, self._wake_r]
        with contextlib.suppress(OSError, ValueError):  # closed meanwhile: the next drain says why
            readable, _, _ = select.select(waiting, [], [], timeout_s)
            if self._wake_r in readable:
                os.read(self._wake_r, 4096)  # BlockingIOError: another waiter took the byte first

    def _woken(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe is already a wake-up
            os.write(self._wake_w, b"!")

    def _socket(self) -> Any:
        """The socket deliveries arrive on (RabbitMQ's connection, Redis's pending BRPOP), if known."""
        try:
            if self._transport.redis:
                return self._link.channel.client.connection._sock
            assert self._link.connection is not None
            return self._link.connection.connection.sock
        except AttributeError:
            return None

    def _ensure_consuming(self) -> None:
        channel = self._link.channel
        if self._consuming == self._link.generation:
            return
        self._buffer.clear()
        self._declared.clear()
        channel.basic_qos(0, self._prefetch, not self._transport.redis)  # RabbitMQ: shared by the channel
        self._consuming = self._link.generation
        self._move_due = self._fetch = None
        self._missing = list(self._subscriptions)
        self._consume_existing()

    def _consume_existing(self) -> None:
        """Consume the subscriptions that exist; RabbitMQ refuses a queue never provisioned."""
        self._next_existence_check = time.monotonic() + EXISTENCE_CHECK_S
        for name in list(self._missing):
            if not self._transport.redis and not _exists(self._link, "queue", name):
                if name not in self._warned:
                    logger.warning("queue %s does not exist (not provisioned?): nothing to receive from it", name)
                    self._warned.add(name)
                continue
            queue = kombu.Queue(name, no_declare=True)
            callback = self._collector(name)
            consumer = kombu.Consumer(self._link.channel, [queue], auto_declare=False, on_message=callback)
            consumer.consume()
            self._missing.remove(name)

    def _collector(self, name: str) -> Callable[[Any], None]:
        def collect(message: Any) -> None:
            self._buffer.append((name, message))

        return collect

    def _fetch_redis(self, max_messages: int) -> None:
        """Redis: take what is waiting, up to ``max_messages``, in one round trip (see ``_FETCH``).

        Kombu's own BRPOP, one message and two round trips each, stays for waiting on empty queues.
        """
        channel = self._link.channel
        room = min(max_messages, self._prefetch - len(self._held) - len(self._buffer))
        if room <= 0 or not self._subscriptions:
            return
        names = self._subscriptions[self._rotation :] + self._subscriptions[: self._rotation]
        self._rotation = (self._rotation + 1) % len(self._subscriptions)
        keys = [channel.unacked_key, channel.unacked_index_key, unreadable_key(self._queue)]
        keys += [channel._q_for_pri(name, 0) for name in names]
        with channel.conn_or_acquire() as client:
            if self._fetch is None:
                self._fetch = client.register_script(_FETCH)
            taken = self._fetch(keys=keys, args=[room, time.time()], client=client)
        for number, raw in zip(taken[::2], taken[1::2], strict=True):
            if not number:
                logger.error("a message on Redis that is not Kombu's JSON was moved to %s", unreadable_key(self._queue))
                continue
            message = channel.Message(json.loads(raw), channel=channel)
            kombu.transport.virtual.QoS.append(channel.qos, message, message.delivery_tag)  # Kombu's prefetch count
            self._buffer.append((names[number - 1], message))

    def _drain(self, timeout_s: float) -> None:
        assert self._link.connection is not None
        try:
            self._link.connection.drain_events(timeout=timeout_s)
        except TimeoutError:
            pass

    def _drain_ready(self, max_messages: int) -> None:
        """RabbitMQ: take what the broker already pushed, without waiting, to return a fuller batch."""
        if self._transport.redis:
            return  # every Redis delivery is a BRPOP round trip; waiting for more would only delay these
        assert self._link.connection is not None
        while self._buffer and len(self._buffer) < max_messages:
            before = len(self._buffer)
            self._drain(0.0)
            if len(self._buffer) == before:
                return

    def _hand_out(self, max_messages: int) -> list[Delivery]:
        found: list[Delivery] = []
        expires_at = self._transport.clock() + self._transport.lease_s
        while self._buffer and len(found) < max_messages:
            name, message = self._buffer.popleft()
            headers = message.headers or {}
            attempt = int(headers.get(ATTEMPTS, 0)) + 1 + bool(message.delivery_info.get("redelivered"))
            token = next(self._tokens)
            self._held[token] = _Held(message, name, attempt, self._link.generation, expires_at)
            message_id = str(message.properties.get("message_id") or "")
            found.append(Delivery(bytes(message.body), _attributes(headers), attempt, token, name, message_id))
        return found

    def _housekeep(self) -> None:
        """Give back deliveries whose lease ran out; on Redis move due retries and restore the dead's."""
        if self._missing and time.monotonic() >= self._next_existence_check:
            self._consume_existing()
        now = self._transport.clock()
        for token, held in list(self._held.items()):
            if held.generation != self._link.generation:
                del self._held[token]  # its connection is gone; the broker gives it back
            elif held.expires_at <= now:
                logger.warning(
                    "lease ran out on id=%s from %s", held.message.properties.get("message_id"), held.subscription
                )
                del self._held[token]
                self._resend(held, held.subscription)
        if self._transport.redis and time.monotonic() >= self._next_housekeeping:
            self._next_housekeeping = time.monotonic() + HOUSEKEEPING_S
            self._redis_housekeeping()

    def _redis_housekeeping(self) -> None:
        channel = self._link.channel
        with channel.conn_or_acquire() as client:
            if self._move_due is None:
                self._move_due = client.register_script(_MOVE_DUE)
            now = time.time()
            for name in self._subscriptions:
                self._move_due(keys=[delayed_key(name), channel._q_for_pri(name, 0)], args=[now, 100], client=client)
        channel.qos.restore_visible(num=100, interval=1)

    # -- settling ---------------------------------------------------------------------------

    def _take(self, delivery: Delivery) -> _Held | None:
        self._woken()
        held = self._held.pop(delivery.receipt, None)
        if held is None or held.generation != self._link.generation:
            return None
        return held

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        with self._lock, self._link.errors("ack"):
            messages = [held.message for held in map(self._take, deliveries) if held is not None]
            if self._transport.redis and messages:
                _ack_redis(self._link.channel, messages)
                return
            for message in messages:
                message.ack()

    def release(self, deliveries: Sequence[Delivery]) -> None:
        """Put each back at the tail of its queue, attempt kept, then ack the held copy."""
        with self._lock, self._link.errors("release"):
            for delivery in deliveries:
                held = self._take(delivery)
                if held is not None:
                    self._resend(held, held.subscription)

    def retry_later(self, delivery: Delivery, delay_s: float) -> None:
        with self._lock, self._link.errors("retry later"):
            held = self._take(delivery)
            if held is None:
                return
            if delay_s <= 0:
                self._resend(held, held.subscription)
            elif self._transport.redis:
                self._delay_redis(held, delay_s)
            else:
                self._delay_rabbit(held, delay_s)

    def _resend(self, held: _Held, routing_key: str, **options: Any) -> None:
        """Publish a copy (confirmed on RabbitMQ) that carries the attempt, then ack the held one."""
        message = held.message
        headers = {**_attributes(message.headers or {}), ATTEMPTS: held.attempt}
        message_id = message.properties.get("message_id")
        _send(self._link.channel, routing_key, message.body, headers, message_id=message_id, **options)
        message.ack()

    def _delay_rabbit(self, held: _Held, delay_s: float) -> None:
        bucket = _bucket(delay_s)
        name = delay_queue_name(held.subscription, bucket)
        if name not in self._declared:
            arguments = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": held.subscription}
            self._link.channel.queue_declare(name, durable=True, auto_delete=False, arguments=arguments)
            self._declared.add(name)
        self._resend(held, name, expiration=min(delay_s, float(bucket)))

    def _delay_redis(self, held: _Held, delay_s: float) -> None:
        channel = self._link.channel
        message = held.message
        headers = {**_attributes(message.headers or {}), ATTEMPTS: held.attempt}
        payload = _payload(channel, held.subscription, message.body, headers, message.properties.get("message_id"))
        with channel.conn_or_acquire() as client:
            client.zadd(delayed_key(held.subscription), {dumps(payload): time.time() + delay_s})
        message.ack()

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Publish a copy with the reason to the app's dead-letter queue, then ack the held one."""
        with self._lock, self._link.errors("dead letter"):
            held = self._take(delivery)
            if held is None:
                return
            message = held.message
            headers = {
                **_attributes(message.headers or {}),
                REASON: reason,
                SUBSCRIPTION: held.subscription,
                ATTEMPTS: held.attempt,
                DEAD_AT: repr(time.time()),
            }
            message_id = message.properties.get("message_id")
            dlq = dlq_name(self._queue)
            if dlq not in self._declared and not self._transport.redis:  # unrouted, it would be dropped
                self._link.channel.queue_declare(dlq, durable=True, auto_delete=False)
                self._declared.add(dlq)
            _send(self._link.channel, dlq, message.body, headers, message_id=message_id)
            message.ack()

    def extend_lease(self, deliveries: Sequence[Delivery], lease_s: float) -> None:
        """Move the consumer's deadline; on Redis also the score Kombu restores by."""
        with self._lock, self._link.errors("extend lease"):
            expires_at = self._transport.clock() + lease_s
            tags = {}
            for delivery in deliveries:
                held = self._held.get(delivery.receipt)
                if held is not None and held.generation == self._link.generation:
                    held.expires_at = expires_at
                    tags[held.message.delivery_tag] = time.time() + lease_s - self._transport.lease_s
            if tags and self._transport.redis:
                channel = self._link.channel
                with channel.conn_or_acquire() as client:
                    client.zadd(channel.unacked_index_key, tags, xx=True)

    def close(self) -> None:
        """Drop the connection: the broker gives back whatever was not settled."""
        with self._lock:
            self._held.clear()
            self._buffer.clear()
            self._link.reset()
