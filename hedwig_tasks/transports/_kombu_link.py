"""Kombu transport internals shared by the transport and its consumer: names, constants,
the connection wrapper, and how a message is built and sent. See ``kombu.py`` for the design."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import uuid
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import amqp.exceptions
import kombu
import kombu.exceptions
import kombu.transport.virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps

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
#: Why a consumer could not read a delivery: kept on copies it makes (release, retry) of one.
FAULT = "x-hedwig-fault"
#: Redis: an item Kombu cannot read, hex-encoded, in the message that carries it (see ``wrap``).
RAW = "x-hedwig-raw"
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


# -- reading what a broker hands over --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Reading:
    """What a consumer could read of one received Kombu message."""

    body: bytes
    attributes: dict[str, str]  #: the headers that are Hedwig attributes (text values only)
    attempt: int
    message_id: str
    fault: str  #: what could not be read, for the worker to dead-letter it with; empty if nothing


def read(message: Any) -> Reading:
    """Every field the consumer uses of a received message, read so that no value of it can raise.

    Another system may publish to a subscription: a text body (AMQP clients decode a body that
    has a ``content_encoding``), no body, headers or counts of any type. What cannot be read is
    named in ``fault``; the body is then the raw bytes there are and the attempt 1.
    """
    faults: list[str] = []
    headers = message.headers
    if not isinstance(headers, Mapping):
        faults.append(f"headers are {_kind(headers)}, not a table")
        headers = {}
    earlier = headers.get(FAULT)
    if isinstance(earlier, str) and earlier:
        faults.append(earlier)  # found when it was first received; this is a copy the consumer made
    body = _body(message, headers, faults)
    attributes = _text_attributes(headers, faults)
    attempt = _attempt(message, headers, faults)
    properties = message.properties if isinstance(message.properties, Mapping) else {}
    return Reading(body, attributes, attempt, str(properties.get("message_id") or ""), "; ".join(faults))


def body_bytes(body: Any, encoding: Any = None) -> tuple[bytes, str]:
    """A message body as bytes, and what was wrong with it ("" if nothing).

    A text body is what the client decoded with the message's ``content_encoding``: it is
    encoded back with that encoding (or UTF-8 when there is none).
    """
    if body is None:
        return b"", ""
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body), ""
    if isinstance(body, str):
        codec = encoding if isinstance(encoding, str) and encoding else "utf-8"
        try:
            return body.encode(codec), ""
        except (LookupError, UnicodeError):
            return body.encode("utf-8", "surrogatepass"), f"its text body cannot be encoded back as {codec!r}"
    return b"", f"body is {_kind(body)}, not bytes or text"


def _body(message: Any, headers: Mapping[Any, Any], faults: list[str]) -> bytes:
    raw = headers.get(RAW)
    if raw is not None:  # an item Kombu could not read, carried whole (see ``wrap``)
        try:
            return bytes.fromhex(raw)
        except (TypeError, ValueError):
            faults.append(f"{RAW} is not hex")
            return b""
    body, fault = body_bytes(message.body, message.content_encoding)
    if fault:
        faults.append(fault)
    return body


def _text_attributes(headers: Mapping[Any, Any], faults: list[str]) -> dict[str, str]:
    """The Hedwig attributes among the headers (without ours and the broker's); each must be text."""
    found: dict[str, str] = {}
    odd: list[str] = []
    for key, value in headers.items():
        if not isinstance(key, str):
            odd.append(_short(key))
        elif key.startswith(_OURS) or key.startswith(_BROKERS) or (key == "redelivered" and value is True):
            continue
        elif isinstance(value, str):
            found[key] = value
        else:
            odd.append(f"{key} ({_kind(value)})")
    if odd:
        faults.append(f"headers that are not text: {', '.join(sorted(odd))}")
    return found


def _attempt(message: Any, headers: Mapping[Any, Any], faults: list[str]) -> int:
    count = headers.get(ATTEMPTS, 0)
    if type(count) is not int or count < 0:  # a bool is an int, but not a count
        faults.append(f"{ATTEMPTS} is {_short(count)}, not a count")
        return 1
    info = message.delivery_info
    return count + 1 + bool(isinstance(info, Mapping) and info.get("redelivered"))


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


# -- Redis items Kombu cannot read ------------------------------------------------------------


def read_payload(channel: Any, raw: bytes | str) -> tuple[Any, str]:
    """Kombu's message of one item of a Redis list, or None and why Kombu cannot read it.

    Beside parsing, Kombu's restore of an unacked message (a consumer died) needs ``properties``
    and its ``delivery_info`` to be objects and ``headers`` an object if there: else it drops it.
    The fetch script checks the shape alike (its ``tag_of``; keep the two so); only this checks
    that the text is UTF-8, that Python's JSON parser takes it, and that Kombu can decode it.
    """
    try:
        text = raw if isinstance(raw, str) else raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    try:
        payload = json.loads(text)
    except ValueError:
        return None, "not JSON"
    reason = _shape_fault(payload)
    if reason:
        return None, reason
    try:
        return channel.Message(payload, channel=channel), ""
    except Exception as exc:  # Kombu decoding this one item (its body encoding, say)
        return None, f"Kombu cannot decode it: {type(exc).__name__}: {_short(str(exc))}"


def _shape_fault(payload: Any) -> str:
    if not isinstance(payload, dict):
        return "not a JSON object"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "properties is not an object"
    if not isinstance(properties.get("delivery_info"), dict):
        return "delivery_info is not an object"
    tag = properties.get("delivery_tag")
    if not isinstance(tag, str) or not tag:
        return "no delivery tag"
    if "headers" in payload and not isinstance(payload["headers"], dict):
        return "headers is not an object"
    return ""


def wrap(raw: bytes | str, reason: str, tag: str, queue: str) -> dict[str, Any]:
    """A Kombu message for ``queue`` that carries an item Kombu cannot read, whole, with why.

    The consumer hands it out with the fault, so it is dead-lettered like any delivery. The fetch
    script builds the same (its ``wrapped``); keep the two alike.
    """
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    return {
        "body": "",
        "content-encoding": "binary",
        "content-type": "application/octet-stream",
        "headers": {FAULT: f"not a Kombu message ({reason})", RAW: data.hex()},
        "properties": {
            "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": queue},
            "delivery_mode": 2,
            "delivery_tag": tag,
            "priority": 0,
        },
    }


def _readable_item(channel: Any, queue: str, item: Any) -> Any:
    """``item`` as Kombu's BRPOP reader can take it: wrapped if Kombu cannot read it."""
    message, reason = read_payload(channel, item)
    if message is None:
        logger.error("an item on Redis list %s is not a Kombu message (%s): handed out as a fault", queue, reason)
        return dumps(wrap(item, reason, uuid.uuid4().hex, queue))
    info = message._raw["properties"]["delivery_info"]
    if isinstance(info.get("exchange"), str) and isinstance(info.get("routing_key"), str):
        return item
    info.update(exchange="", routing_key=queue)  # Kombu records them to restore it by, and fails without
    return dumps(message._raw)


def _guard_brpop(channel: Any) -> None:
    """Let Kombu's BRPOP reader see only items it can read (it parses one itself and raises).

    The item is already off the list: raising there would lose it and stop the consumer. One
    Kombu cannot read reaches it wrapped (see ``wrap``), and is handed out with a fault.
    """
    client = channel.client
    parse = client.parse_response

    def parse_response(connection: Any, command_name: Any, **options: Any) -> Any:
        reply = parse(connection, command_name, **options)
        if command_name != "BRPOP" or not reply:
            return reply
        dest, item = reply
        return [dest, _readable_item(channel, bytes_to_str(dest).rsplit(channel.sep, 1)[0], item)]

    client.parse_response = parse_response


# -- publishes nobody receives ----------------------------------------------------------------

_unrouted_lock = threading.Lock()
_unrouted: set[str] = set()  # topics warned about in this process


def warn_unrouted(topic: str, message_id: Any) -> None:
    """Warn, once per topic in this process, that a publish reached a topic without subscriptions."""
    with _unrouted_lock:
        if topic in _unrouted:
            return
        _unrouted.add(topic)
    logger.warning(
        "topic %s has no subscription: id=%s was delivered to nobody (said once per topic)", topic, message_id
    )


def _on_return(exc: Any, exchange: str, routing_key: str, message: Any) -> None:
    """RabbitMQ gave back a mandatory publish: no queue is bound to the topic's exchange."""
    topic = exchange[len("hedwig-") :] if exchange.startswith("hedwig-") else exchange
    warn_unrouted(topic, message.properties.get("message_id"))


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
        self._pool: Any = None  # Redis: the pool of the channel's shared client
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
                    self._pool = _reuse_client(self._channel).connection_pool
                    _guard_brpop(self._channel)
                else:
                    self._channel.events["basic_return"].add(_on_return)
            except BaseException:
                with contextlib.suppress(Exception):
                    connection.release()
                raise
            self.connection = connection
            self.generation += 1
        return self._channel

    def reset(self) -> None:
        connection, self.connection, self._channel = self.connection, None, None
        pool, self._pool = self._pool, None
        if connection is None:
            return
        self.generation += 1  # receipts from this connection settle nothing from now on
        raw = connection._connection  # Kombu swallows errors while closing; the socket may stay open
        try:
            connection.release()
        except Exception as exc:  # a broken connection: there is nothing more to say to it
            logger.debug("closing a broken connection to %s: %s", _mask(self.url), exc)
        if pool is not None:  # Kombu's Redis close restores what was unacked after closing its pools
            with contextlib.suppress(Exception):
                pool.disconnect()
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


def _reuse_client(channel: Any) -> Any:
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
    return client


def _send(
    channel: Any,
    routing_key: str,
    body: bytes,
    headers: Mapping[str, Any],
    *,
    exchange: str = "",
    message_id: Any = None,
    expiration: float | None = None,
    mandatory: bool = False,
) -> None:
    """Publish persistently (what ``kombu.Producer.publish`` does, without its per-call setup).

    ``exchange`` defaults to the default exchange: straight to the queue ``routing_key``.
    On RabbitMQ the channel waits for the broker's confirm; a refusal raises. A ``mandatory``
    publish that no queue takes comes back to the channel's return handler before the confirm.
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
        channel.basic_publish(
            message, exchange=exchange, routing_key=routing_key, mandatory=mandatory, timeout=CONFIRM_TIMEOUT_S
        )


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
