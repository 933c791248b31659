"""The Kombu transport's consumer: receiving under prefetch (Redis: the fetch script), leases
kept by the consumer, settling, delayed retries and dead letters, on a connection of its own
made by the transport's :class:`~hedwig_tasks.transports._kombu_link.Broker`. See ``kombu.py``
for the design."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import select
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import kombu
import kombu.transport.virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps

from hedwig_tasks.transports._kombu_link import Broker
from hedwig_tasks.transports._kombu_messages import Reading, read, read_payload, redis_item, send, wrap
from hedwig_tasks.transports._kombu_names import (
    ATTEMPTS,
    DEAD_AT,
    FAULT,
    RAW,
    REASON,
    SUBSCRIPTION,
    bucket,
    delay_queue_name,
    delayed_key,
    dlq_name,
)
from hedwig_tasks.transports.base import Consumer, Delivery

__all__ = ["DEFAULT_PREFETCH", "KombuConsumer"]

logger = logging.getLogger("hedwig_tasks.transports.kombu")  # one logger for the whole transport

#: Unsettled deliveries a consumer may hold when the caller gives no ``max_outstanding``.
DEFAULT_PREFETCH = 64
#: Longest a receive waits on the socket before looking again (housekeeping), in seconds.
DRAIN_SLICE_S = 0.05
#: Redis: seconds between moves of due retries (and restores of dead consumers' messages).
HOUSEKEEPING_S = 0.2
#: RabbitMQ: seconds between checks that a missing subscription queue was provisioned.
EXISTENCE_CHECK_S = 5.0


# Moves due retries from a sorted set to the tail of a Kombu list, atomically.
_MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, item in ipairs(due) do
  redis.call('ZREM', KEYS[1], item)
  redis.call('LPUSH', KEYS[2], item)
end
return #due
"""

# Redis: takes up to ARGV[1] items from the lists KEYS[3..] (subscriptions ARGV[4..]) in turn
# into Kombu's unacked store (hash KEYS[1], index KEYS[2] scored ARGV[2]) as Kombu's own delivery
# records them, atomically, in one round trip instead of a BRPOP and a transaction per message.
# An item Kombu cannot read, or could not restore if its consumer died (it would drop it), is
# stored wrapped whole instead, hex-encoded in a message of its own that says why, tagged
# ARGV[3].n: it is handed out with a fault and dead-lettered, never lost nor received forever.
# ``tag_of`` and ``wrapped`` are the twins of ``_kombu_messages``'s ``read_payload`` and ``wrap``;
# what only Python finds (text that is not UTF-8, JSON that only Redis's parser takes, a body
# Kombu cannot decode) is wrapped in place by ``_taken`` straight after (checking UTF-8 in Lua
# would double the script's time per message).
# Returns (queue number, tag, payload) triples.
_FETCH = """
-- Whether t is a JSON object: cjson reads [] and {} alike, so an empty one is told by the text.
local function object(t, payload, key)
  if type(t) ~= 'table' or t[1] ~= nil then return false end
  return next(t) ~= nil or not payload:find('"' .. key .. '"%s*:%s*%[')
end

local function tag_of(payload)
  local ok, message = pcall(cjson.decode, payload)
  if not ok then return nil, 'not JSON' end
  if type(message) ~= 'table' or not payload:find('^%s*{') then return nil, 'not a JSON object' end
  local props = message['properties']
  if not object(props, payload, 'properties') then return nil, 'properties is not an object' end
  if not object(props['delivery_info'], payload, 'delivery_info') then
    return nil, 'delivery_info is not an object'
  end
  local tag = props['delivery_tag']
  if type(tag) ~= 'string' or tag == '' then return nil, 'no delivery tag' end
  local headers = message['headers']
  if headers ~= nil and not object(headers, payload, 'headers') then return nil, 'headers is not an object' end
  return tag
end

local function hex(s)
  local parts = {}
  for i = 1, #s, 64 do
    local chunk = s:sub(i, i + 63)
    parts[#parts + 1] = string.format(string.rep('%02x', #chunk), chunk:byte(1, -1))
  end
  return table.concat(parts)
end

local function wrapped(payload, reason, tag, queue)
  return cjson.encode({
    body = '', ['content-encoding'] = 'binary', ['content-type'] = 'application/octet-stream',
    headers = {['x-hedwig-fault'] = 'not a Kombu message (' .. reason .. ')', ['x-hedwig-raw'] = hex(payload)},
    properties = {body_encoding = 'base64', delivery_mode = 2, delivery_tag = tag, priority = 0,
                  delivery_info = {exchange = '', routing_key = queue}}})
end

local taken, left, made = {}, tonumber(ARGV[1]), 0
for q = 3, #KEYS do
  local queue = ARGV[q + 1]
  while left > 0 do
    local payload = redis.call('RPOP', KEYS[q])
    if not payload then break end
    local tag, reason = tag_of(payload)
    if not tag then
      made = made + 1
      tag = ARGV[3] .. '.' .. made
      payload = wrapped(payload, reason, tag, queue)
    end
    redis.call('HSET', KEYS[1], tag, '[' .. payload .. ',"",' .. cjson.encode(queue) .. ']')
    redis.call('ZADD', KEYS[2], ARGV[2], tag)
    taken[#taken + 1] = q - 2
    taken[#taken + 1] = tag
    taken[#taken + 1] = payload
    left = left - 1
  end
end
return taken
"""


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
    reading: Reading  # what the delivery handed out was made of; copies are made of it
    generation: int
    expires_at: float

    def headers(self, **extra: Any) -> dict[str, Any]:
        """Headers for a copy: the attributes, the attempt count, and the fault if there was one."""
        found: dict[str, Any] = {**self.reading.attributes, ATTEMPTS: self.reading.attempt, **extra}
        if self.reading.fault:
            found[FAULT] = self.reading.fault
        return found


class KombuConsumer(Consumer):
    """Consumes some of one app's subscriptions on a connection of its own.

    A receipt is a number naming a held delivery; once the delivery is settled, given back or
    its connection lost, the receipt settles nothing.
    """

    def __init__(self, broker: Broker, queue: str, subscriptions: list[str], *, prefetch: int) -> None:
        self._broker = broker
        self._queue = queue
        self._subscriptions = subscriptions
        self._prefetch = prefetch
        self._link = broker.link()
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
        self._restore_failed = False
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
                if not self._buffer and self._broker.redis:
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
            if self._broker.redis:
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
        channel.basic_qos(0, self._prefetch, not self._broker.redis)  # RabbitMQ: shared by the channel
        self._consuming = self._link.generation
        self._move_due = self._fetch = None
        self._missing = list(self._subscriptions)
        self._consume_existing()

    def _consume_existing(self) -> None:
        """Consume the subscriptions that exist; RabbitMQ refuses a queue never provisioned."""
        self._next_existence_check = time.monotonic() + EXISTENCE_CHECK_S
        for name in list(self._missing):
            if not self._broker.redis and not self._link.exists("queue", name):
                if name not in self._warned:
                    logger.warning("queue %s does not exist (not provisioned?): nothing to receive from it", name)
                    self._warned.add(name)
                continue
            queue = kombu.Queue(name, no_declare=True)
            callback = self._collector(name)
            # Kombu raises out of the drain on a message it could not decompress or encode, unless
            # told what to do: collect it all the same (its fields are read with care, in ``read``).
            consumer = kombu.Consumer(
                self._link.channel,
                [queue],
                auto_declare=False,
                on_message=callback,
                on_decode_error=callback,
            )
            consumer.consume()
            self._missing.remove(name)

    def _collector(self, name: str) -> Callable[..., None]:
        def collect(message: Any, error: Exception | None = None) -> None:
            self._buffer.append((name, message))

        return collect

    def _fetch_redis(self, max_messages: int) -> None:
        """Redis: take what is waiting, up to ``max_messages``, in one round trip (see ``_FETCH``).

        Kombu's own BRPOP, one message and two round trips each, stays for waiting on empty queues.
        """
        channel = self._link.channel
        room = min(max_messages, self._prefetch - len(self._held))  # called with an empty buffer
        if room <= 0 or not self._subscriptions:
            return
        names = self._subscriptions[self._rotation :] + self._subscriptions[: self._rotation]
        self._rotation = (self._rotation + 1) % len(self._subscriptions)
        keys = [channel.unacked_key, channel.unacked_index_key, *(channel._q_for_pri(name, 0) for name in names)]
        with channel.conn_or_acquire() as client:
            if self._fetch is None:
                self._fetch = client.register_script(_FETCH)
            taken = self._fetch(keys=keys, args=[room, time.time(), uuid.uuid4().hex, *names], client=client)
        for number, tag, raw in zip(taken[::3], taken[1::3], taken[2::3], strict=True):
            name = names[number - 1]
            message = self._taken(channel, name, bytes_to_str(tag), raw)
            kombu.transport.virtual.QoS.append(channel.qos, message, message.delivery_tag)  # Kombu's prefetch count
            self._buffer.append((name, message))

    def _taken(self, channel: Any, name: str, tag: str, raw: bytes) -> Any:
        """Kombu's message of an item the fetch took; one the script passed and Kombu cannot read
        (JSON that Redis's parser takes and Python's does not) is wrapped in its place."""
        message, reason = read_payload(channel, raw)
        if message is None:
            payload = wrap(raw, reason, tag, name)
            with channel.conn_or_acquire() as client:
                client.hset(channel.unacked_key, tag, dumps([payload, "", name]))
            message = channel.Message(payload, channel=channel)
        if RAW in message.headers:
            logger.error("an item on Redis list %s is not a Kombu message: %s", name, message.headers.get(FAULT))
        return message

    def _drain(self, timeout_s: float) -> None:
        assert self._link.connection is not None
        try:
            self._link.connection.drain_events(timeout=timeout_s)
        except TimeoutError:
            pass

    def _drain_ready(self, max_messages: int) -> None:
        """RabbitMQ: take what the broker already pushed, without waiting, to return a fuller batch."""
        if self._broker.redis:
            return  # every Redis delivery is a BRPOP round trip; waiting for more would only delay these
        assert self._link.connection is not None
        while self._buffer and len(self._buffer) < max_messages:
            before = len(self._buffer)
            self._drain(0.0)
            if len(self._buffer) == before:
                return

    def _hand_out(self, max_messages: int) -> list[Delivery]:
        found: list[Delivery] = []
        expires_at = self._broker.clock() + self._broker.lease_s
        while self._buffer and len(found) < max_messages:
            name, message = self._buffer.popleft()
            reading = read(message)
            token = next(self._tokens)
            self._held[token] = _Held(message, name, reading, self._link.generation, expires_at)
            found.append(
                Delivery(
                    reading.body, reading.attributes, reading.attempt, token, name, reading.message_id, reading.fault
                )
            )
        return found

    def _housekeep(self) -> None:
        """Give back deliveries whose lease ran out; on Redis move due retries and restore the dead's."""
        if self._missing and time.monotonic() >= self._next_existence_check:
            self._consume_existing()
        now = self._broker.clock()
        for token, held in list(self._held.items()):
            if held.generation != self._link.generation:
                del self._held[token]  # its connection is gone; the broker gives it back
            elif held.expires_at <= now:
                logger.warning("lease ran out on id=%s from %s", held.reading.message_id, held.subscription)
                del self._held[token]
                self._resend(held, held.subscription)
        if self._broker.redis and time.monotonic() >= self._next_housekeeping:
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
        try:
            channel.qos.restore_visible(num=100, interval=1)
        except (ValueError, TypeError) as exc:  # an unacked entry Kombu cannot parse, in the db's shared store
            if not self._restore_failed:  # it stays there; restoring every other one goes on each time
                logger.error("restoring dead consumers' messages on Redis failed: %s", exc)
            self._restore_failed = True

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
            if self._broker.redis and messages:
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
            elif self._broker.redis:
                self._delay_redis(held, delay_s)
            else:
                self._delay_rabbit(held, delay_s)

    def _resend(self, held: _Held, routing_key: str, **options: Any) -> None:
        """Publish a copy (confirmed on RabbitMQ) that carries the attempt, then ack the held one."""
        reading = held.reading
        message_id = reading.message_id or None
        send(self._link.channel, routing_key, reading.body, held.headers(), message_id=message_id, **options)
        held.message.ack()

    def _delay_rabbit(self, held: _Held, delay_s: float) -> None:
        bucket_s = bucket(delay_s)
        name = delay_queue_name(held.subscription, bucket_s)
        if name not in self._declared:
            arguments = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": held.subscription}
            self._link.channel.queue_declare(name, durable=True, auto_delete=False, arguments=arguments)
            self._declared.add(name)
        self._resend(held, name, expiration=min(delay_s, float(bucket_s)))

    def _delay_redis(self, held: _Held, delay_s: float) -> None:
        channel = self._link.channel
        reading = held.reading
        payload = redis_item(channel, held.subscription, reading.body, held.headers(), reading.message_id or None)
        with channel.conn_or_acquire() as client:
            client.zadd(delayed_key(held.subscription), {dumps(payload): time.time() + delay_s})
        held.message.ack()

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Publish a copy with the reason to the app's dead-letter queue, then ack the held one."""
        with self._lock, self._link.errors("dead letter"):
            held = self._take(delivery)
            if held is None:
                return
            reading = held.reading
            headers = {
                **reading.attributes,
                REASON: reason,
                SUBSCRIPTION: held.subscription,
                ATTEMPTS: reading.attempt,
                DEAD_AT: repr(time.time()),
            }
            dlq = dlq_name(self._queue)
            if dlq not in self._declared and not self._broker.redis:  # unrouted, it would be dropped
                self._link.channel.queue_declare(dlq, durable=True, auto_delete=False)
                self._declared.add(dlq)
            send(self._link.channel, dlq, reading.body, headers, message_id=reading.message_id or None)
            held.message.ack()

    def extend_lease(self, deliveries: Sequence[Delivery], lease_s: float) -> None:
        """Move the consumer's deadline; on Redis also the score Kombu restores by."""
        with self._lock, self._link.errors("extend lease"):
            expires_at = self._broker.clock() + lease_s
            tags = {}
            for delivery in deliveries:
                held = self._held.get(delivery.receipt)
                if held is not None and held.generation == self._link.generation:
                    held.expires_at = expires_at
                    tags[held.message.delivery_tag] = time.time() + lease_s - self._broker.lease_s
            if tags and self._broker.redis:
                channel = self._link.channel
                with channel.conn_or_acquire() as client:
                    client.zadd(channel.unacked_index_key, tags, xx=True)

    def close(self) -> None:
        """Drop the connection: the broker gives back whatever was not settled."""
        with self._lock:
            self._held.clear()
            self._buffer.clear()
            self._link.reset()
