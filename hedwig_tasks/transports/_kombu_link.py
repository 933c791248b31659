"""Kombu transport internals shared by the transport and its consumer: names, constants,
the connection wrapper, and how a message is built and sent. See ``kombu.py`` for the design."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import amqp.exceptions
import kombu
import kombu.exceptions
import kombu.transport.virtual

from hedwig_tasks.exceptions import TransportError

logger = logging.getLogger("hedwig_tasks.transports.kombu")  # one logger for the whole transport


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
