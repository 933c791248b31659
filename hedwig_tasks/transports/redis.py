"""Redis transport: Redis Streams (redis-py), in the Hedwig library's own layout.

Features: fan-out by consumer groups (every app's group reads its own copy of each topic
stream), publishing in one round trip (one ``XADD``; ``publish_many`` pipelined), leases from
the group's pending list with attempt counts, lease extension, takeover of leases that ran out,
delayed retries kept in Redis (never in the worker's memory), dead letters with reasons,
requeue and purge, trimming of acknowledged entries, exact counts. Wire- and
layout-compatible with the Hedwig library's ``RedisStreamsPublisherBackend`` and
``RedisStreamsConsumerBackend`` (authedwig 11), so a fleet can move app by app.

Layout (the Hedwig library's names):

- topic ``T`` is the stream ``hedwig:T``; app ``Q`` reads it as the consumer group ``Q``;
- ``hedwig:Q``, the queue's own stream, read by the same group: due retries land there, and
  dead letters requeued (by ``hedwig-tasks dlq requeue`` or the Hedwig library's requeue);
- ``hedwig:Q:dlq``, the dead-letter stream (group ``Q``, which the Hedwig library's requeue reads);
- ``hedwig:Q:delayed``, a sorted set of retries waiting to be due (score: due time in ms by
  Redis's clock; member: the entry's fields as netstrings), moved into ``hedwig:Q`` by a Lua
  script that consumers run, atomically;
- ``hedwig:T:publish-delayed``, the same for delayed publishes to topic ``T``, moved into
  ``hedwig:T`` (so every group gets them then) by the consumers reading ``T``: with none of
  ours running (only the Hedwig library's), they wait.

An entry is ``hedwig_payload`` (the body as text: base64 with ``hedwig_encoding=base64`` when
the message is binary, as the Hedwig library writes it) plus one field per attribute. This
transport adds fields the Hedwig library ignores (it drops unknown ``hedwig_*`` attributes) and
never hands out as attributes: ``hedwig_tasks_attempt`` (attempts made before a retry's copy),
``hedwig_tasks_subscription`` (``Q:T``, where a retry's copy or a dead letter came from), and on
dead letters ``hedwig_tasks_reason``, ``hedwig_tasks_attempts`` and ``hedwig_tasks_dead_at``
(epoch seconds).

Provisioning (``hedwig-tasks provision``, which a Hedwig fleet can use too: the Hedwig library
creates no groups) creates a topic's stream, the queue's group on each topic stream at ``$``
(a new subscription gets what is published from then on, as on SNS or RabbitMQ), and the group
on ``hedwig:Q`` and ``hedwig:Q:dlq`` at ``0``. Publishing never provisions: the first publish
to a topic in a process checks that its stream exists (``PublishError`` naming ``hedwig-tasks
provision`` if not; a warning, once, if no group reads it) and later ones are one ``XADD``.

Leases: ``XREADGROUP`` (``COUNT``, ``BLOCK``) over all of the consumer's streams at once puts each
entry in the group's pending list under the consumer's own name; nothing is in flight without
being there, so a consumer killed with ``-9`` loses nothing. Extending re-claims with idle 0
(a lease longer than ``lease_s`` is kept up by the consumer's receives); an entry idle for
``lease_s`` is taken over by any consumer of the group (``XAUTOCLAIM``), and the attempt is the
pending entry's delivery count (plus ``hedwig_tasks_attempt``). Release hands an entry to the
consumer ``hedwig-tasks-released``, idle a whole lease, so the next takeover takes it at once.
Settling (ack, release, retry, dead letter) runs a Lua script that acts only on entries still
pending to this consumer at the receipt's delivery count: a receipt whose lease ran out settles
nothing. Acks of a batch are one round trip.

Trimming: now and then (``trim_every_s``) each consumer trims its streams, and each publisher its
topics, to the oldest entry any group on the stream (the Hedwig library's too) still needs; a
topic stream no group reads is emptied. Counts (``status`` and ``counts``, one script, one round
trip): depth is what the group has not been handed plus leases that ran out plus delayed
retries; in flight what is leased; dead letters what the dead-letter stream holds that the
group has not acknowledged. What the queue's own streams hold is counted under the subscription
its entries name.

Trade-offs: a consumer of some of a queue's topics also reads the queue's own stream, so it
gets retries and requeued dead letters of its other topics (``per_topic_consumption`` is
False). Redis keeps time for leases and delays: a consumer's ``clock`` is not used. Redis
Cluster is not supported (the scripts touch several keys). Entries carry text, so bodies must
be UTF-8 (binary messages arrive base64-encoded from the app). Durability is Redis's: without
``appendonly`` a Redis crash loses what it had not written.

Server: Redis 6.2 or later (``XAUTOCLAIM``); on Redis 7 ``XINFO GROUPS`` reports each group's lag,
so counts read no entry of a topic stream.

Connection string: ``redis://[[user]:password@]host[:port][/db]`` or ``rediss://`` for TLS,
e.g. ``redis://localhost:6379/0?lease_s=60``. The password never appears in a repr or a log.

Options (query string): ``lease_s`` (seconds a receive leases an entry; default 30),
``block_s`` (longest single ``XREADGROUP`` block; default 1), ``trim_every_s`` (default 30),
``socket_timeout_s`` (default 10), ``connect_timeout_s`` (default 5), ``client_name`` (what
``CLIENT LIST`` shows for every connection), and for ``rediss://`` redis-py's ``ssl_cert_reqs``,
``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile`` and ``ssl_check_hostname``. An unknown option
raises ``ConfigurationError``.

Modules: this one holds the transport (construction, publishing); ``_redis_client`` the
connection, scripts and error boundary; ``_redis_publish`` the publishers' kept connections (one
per thread: ``XADD`` packed and its reply read without redis-py's client layer, which costs
twice the command itself); ``_redis_consumer`` the consumer; ``_redis_admin`` provisioning,
counts and dead letters; ``_redis_trim`` trimming; ``_redis_scripts`` the Lua scripts;
``_redis_wire`` names and fields.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections.abc import Collection, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from hedwig_tasks.exceptions import ConfigurationError, PublishError
from hedwig_tasks.transports._redis_admin import RedisAdmin
from hedwig_tasks.transports._redis_client import (
    DEFAULT_BLOCK_S,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_LEASE_S,
    DEFAULT_SOCKET_TIMEOUT_S,
    DEFAULT_TRIM_EVERY_S,
    DRIVER_ERRORS,
    RedisLink,
    mask,
)
from hedwig_tasks.transports._redis_consumer import RedisConsumer
from hedwig_tasks.transports._redis_publish import Publisher
from hedwig_tasks.transports._redis_trim import Trimmer
from hedwig_tasks.transports._redis_wire import delayed_member, entry_fields, publish_delayed_key, stream_key
from hedwig_tasks.transports._url import Option, read_options, seconds, text
from hedwig_tasks.transports.base import (
    Capabilities,
    DeadLetterRecord,
    Progress,
    SubscriptionStatus,
    Transport,
)

__all__ = ["DEFAULT_LEASE_S", "RedisConsumer", "RedisTransport"]

logger = logging.getLogger("hedwig_tasks.transports.redis")

_URL_OPTIONS: dict[str, Option] = {
    "lease_s": seconds,
    "block_s": seconds,
    "trim_every_s": seconds,
    "socket_timeout_s": seconds,
    "connect_timeout_s": seconds,
}
#: redis-py's own options a URL may carry (TLS), passed on to it.
_DRIVER_OPTIONS: dict[str, Option] = {
    name: text
    for name in ("client_name", "ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
}


class RedisTransport(Transport):
    """Redis Streams in the Hedwig library's layout. Construction does no I/O; connecting is lazy.

    Raises ``ConfigurationError`` for a URL that is not ``redis://`` or ``rediss://`` or a
    duration that is not positive.
    """

    scheme = "redis"
    messaging_system = "redis"
    capabilities = Capabilities(
        text_only=True,  # stream fields are read as text by the Hedwig library
        # a consumer of some topics also reads the queue's own stream: retries of all its topics
        per_topic_consumption=False,
        delayed_publish=True,  # a topic's delayed set, moved into its stream by its consumers
    )

    def __init__(
        self,
        url: str,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        block_s: float = DEFAULT_BLOCK_S,
        trim_every_s: float = DEFAULT_TRIM_EVERY_S,
        socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> None:
        self.link = RedisLink(
            url,
            lease_s=lease_s,
            block_s=block_s,
            trim_every_s=trim_every_s,
            socket_timeout_s=socket_timeout_s,
            connect_timeout_s=connect_timeout_s,
        )
        self.url, self.lease_s = url, lease_s
        self._admin = RedisAdmin(self.link)
        self._trimmer = Trimmer(self.link)
        self._publisher = Publisher(self.link)
        self._lock = threading.Lock()
        self._topics: set[str] = set()  # topics whose stream was seen to exist
        self._consumers: list[RedisConsumer] = []

    @classmethod
    def from_url(cls, url: str) -> RedisTransport:
        """``redis://host:port/db?lease_s=...``; see the module docstring for the options."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigurationError(f"expected redis://host:port/db or rediss://..., got {mask(url)!r}")
        ours, _ = read_options("redis", parts.query, {**_URL_OPTIONS, **_DRIVER_OPTIONS})
        driver = {name: ours.pop(name) for name in list(ours) if name in _DRIVER_OPTIONS}
        return cls(urlunsplit(parts._replace(query=urlencode(driver))), **ours)

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> RedisTransport:
        """Build from the Hedwig library's settings: ``REDIS_URL`` and ``HEDWIG_VISIBILITY_TIMEOUT_S``."""
        try:
            url = settings["REDIS_URL"]
        except KeyError:
            url = None
        if not url:
            raise ConfigurationError("REDIS_URL must be set for the Redis Streams backend")
        given: dict[str, Any] = {}
        try:
            if settings["HEDWIG_VISIBILITY_TIMEOUT_S"]:
                given["lease_s"] = float(settings["HEDWIG_VISIBILITY_TIMEOUT_S"])
        except KeyError:
            pass
        parts = urlsplit(url)
        if parts.query:  # options in REDIS_URL are read as in HEDWIG_TRANSPORT_URL
            made = cls.from_url(url)
            given = {"lease_s": made.lease_s, **given}
            url = made.url
        return cls(url, **{**given, **overrides})

    def __repr__(self) -> str:
        return f"<RedisTransport {mask(self.url)!r}>"

    def close(self) -> None:
        """Stop the consumers made here and drop this process's connections."""
        with self._lock:
            consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            consumer.close()
        self._publisher.close()
        self.link.close()

    # -- publishing ---------------------------------------------------------------------------

    def publish(
        self, topic: str, body: bytes, attributes: Mapping[str, str], *, owner: str | None = None, delay_s: float = 0
    ) -> str:
        """One ``XADD`` (the first to a topic in this process checks that it exists). Raises ``PublishError``.

        A delayed one waits in the topic's delayed set instead (see :meth:`_publish_delayed`).
        """
        if delay_s > 0:
            return self._publish_delayed(topic, [(body, attributes)], delay_s)[0]
        fields = entry_fields(topic, body, attributes)
        if topic not in self._topics:
            self._check_topic(topic)
        key = stream_key(topic)
        try:
            entry_id = self._publisher.xadd(key, fields)
        except DRIVER_ERRORS as exc:  # the boundary, inline: this is the hot path
            raise self.link.failure(f"publish to {topic!r}", exc, PublishError) from exc
        self._trimmer.maybe([key], empty_ok=[key])
        return entry_id.decode()

    def publish_many(
        self,
        topic: str,
        messages: Sequence[tuple[bytes, Mapping[str, str]]],
        *,
        owner: str | None = None,
        delay_s: float = 0,
    ) -> list[str]:
        """Every ``XADD`` written at once, one round trip; ids in order. Raises ``PublishError``."""
        if delay_s > 0:
            return self._publish_delayed(topic, messages, delay_s)
        entries = [entry_fields(topic, body, attributes) for body, attributes in messages]
        if not entries:
            return []
        self._check_topic(topic)
        with self.link.errors(f"publish to {topic!r}", PublishError):
            ids = self._publisher.xadd_many(stream_key(topic), entries)
        self._trimmer.maybe([stream_key(topic)], empty_ok=[stream_key(topic)])
        return [entry_id.decode() for entry_id in ids]

    def _publish_delayed(
        self, topic: str, messages: Sequence[tuple[bytes, Mapping[str, str]]], delay_s: float
    ) -> list[str]:
        """Into ``hedwig:<topic>:publish-delayed``, due at Redis's now + ``delay_s``, in one script.

        The topic's consumers (every hedwig-tasks consumer reading it) move what is due into the
        topic's stream as they move due retries, so every group, the Hedwig library's too, gets
        it then. The ids returned are the members' tokens (the stream entry comes later).
        """
        tokens = [uuid.uuid4().hex for _ in messages]
        members = [
            delayed_member(token, topic, entry_fields(topic, body, attributes))
            for token, (body, attributes) in zip(tokens, messages, strict=True)
        ]
        if not members:
            return []
        self._check_topic(topic)
        delay_ms = max(1, math.ceil(delay_s * 1000))
        with self.link.errors(f"delayed publish to {topic!r}", PublishError):
            self.link.script("add_delayed")(keys=[publish_delayed_key(topic)], args=[delay_ms, *members])
        return tokens

    def _check_topic(self, topic: str) -> None:
        """Once per topic: its stream must exist; warn (once) if no group reads it."""
        if topic in self._topics:
            return
        key = stream_key(topic)
        with self.link.errors(f"publish to {topic!r}", PublishError):
            pipe = self.link.client.pipeline(transaction=False)
            pipe.exists(key)
            pipe.xinfo_groups(key)
            exists, groups = pipe.execute(raise_on_error=False)
        if not exists:
            raise PublishError(f"topic {topic!r} does not exist: run `hedwig-tasks provision` to create it")
        if not groups or isinstance(groups, Exception):
            logger.warning("topic %s has no subscription: what is published to it is kept nowhere", topic)
        self._topics.add(topic)

    # -- consuming and administration ---------------------------------------------------------

    def consumer(self, queue: str, topics: Sequence[str], *, max_outstanding: int | None = None) -> RedisConsumer:
        consumer = RedisConsumer(self.link, queue, topics)
        with self._lock:
            self._consumers.append(consumer)
        return consumer

    def provision(
        self, queue: str | None, subscribe: Sequence[str], publish: Sequence[str], *, dry_run: bool = False
    ) -> list[str]:
        """Create the topics' streams and the queue's groups; see the module docstring."""
        return self._admin.provision(queue, subscribe, publish, dry_run=dry_run)

    def status(self, queue: str, topics: Sequence[str]) -> list[SubscriptionStatus]:
        """Depth, in flight and dead letters per subscription, in one script."""
        return self._admin.status(queue, topics)

    def counts(self, queue: str, topics: Sequence[str]) -> list[SubscriptionStatus]:
        """As :meth:`status`, reading fewer entries of the queue's own streams."""
        return self._admin.counts(queue, topics)

    def dead_letters(
        self, queue: str, *, limit: int = 100, ids: Collection[str] | None = None
    ) -> list[DeadLetterRecord]:
        """The oldest ``limit`` dead letters (or those of ``ids``: dead-letter stream entry ids), left in place."""
        return self._admin.dead_letters(queue, limit=limit, ids=ids)

    def requeue_dead_letters(
        self,
        queue: str,
        *,
        limit: int | None = None,
        progress: Progress | None = None,
        ids: Collection[str] | None = None,
    ) -> int:
        """Move dead letters into ``hedwig:<queue>``, attempts reset; returns how many."""
        return self._admin.requeue_dead_letters(queue, limit=limit, progress=progress, ids=ids)

    def purge_dead_letters(
        self,
        queue: str,
        *,
        limit: int | None = None,
        progress: Progress | None = None,
        ids: Collection[str] | None = None,
    ) -> int:
        """Delete dead letters for good; returns how many."""
        return self._admin.purge_dead_letters(queue, limit=limit, progress=progress, ids=ids)
