"""Transport on Kombu: RabbitMQ (``amqp://``, ``amqps://``, ``pyamqp://``).

Redis has a transport of its own on Redis Streams (``redis://``, ``transports/redis.py``);
this one refuses a Redis URL.

Features: fan-out (one publish reaches every subscribed app), durable queues and persistent
messages, acks after the handler, prefetch through the broker's QoS, leases with attempt
counts, delayed retries kept by the broker (never in the worker's memory), dead letters with
reasons, requeue, binary bodies. Hedwig's wire format rides in the body and the headers (one
header per attribute), so a message decodes to the same ``Message`` as from any transport.

Names: topic ``T`` is the durable ``fanout`` exchange ``hedwig-T``; app ``Q``'s subscription to
it is the durable queue ``hedwig-Q-T`` (one queue per (app, topic), so a consumer can take any
subset of its app's topics); dead letters go to ``hedwig-Q-dlq`` with the reason in
``x-hedwig-reason``.

Publishing uses publisher confirms, so a publish to a topic never provisioned (or one the broker
could not take, or refused) raises ``PublishError``, and no message is reported sent that the
broker did not confirm. ``publish`` returns once the broker confirmed its message; ``publish_many``
sends them all (waiting every ``CONFIRM_WINDOW``) and waits for every confirm once, before it
returns. Both go out on the thread's kept channel: no Kombu ``Producer`` or declare per publish.
On plain TCP each message's frames are built here (``_kombu_wire``, byte for byte py-amqp's) and
written as one buffer, and the confirms are read off the socket without py-amqp's event
machinery; every other frame (a return, a channel closed) still goes to py-amqp, and TLS
connections publish through py-amqp. Publishes are ``mandatory``: one that no queue takes comes
back, and a warning says (once per topic per process) that the topic has no subscription.

Delayed publishes wait in ``hedwig:publish-delay:<B>s:T``, bucketed the same way, and
dead-letter into the topic's exchange when their TTL runs out (so the fan-out happens then;
``status`` does not count them, as they belong to no subscription yet).

Retries: a retry goes to ``hedwig-Q-T-delay-<B>s``, one delay queue per power of two ``B``
seconds (created on first use), with the delay as the message's TTL and dead-lettering back to
the subscription. Per-message TTLs expire only at a queue's head; bucketing by powers of two
bounds that head-of-line wait: a message waits at most its bucket, under twice its delay.

Dead letters: each gets an id of its own (``x-hedwig-dead-id``, its ``transport_id``). Listing,
requeueing and purging them (all, the oldest ``limit``, or those ``ids`` names) take them one by
one unacked, act on those chosen, and leave the others to go back, in order, when the
connection closes (RabbitMQ cannot peek).

Other publishers: a delivery whose own fields cannot be read (a body of another type, headers
or an attempt count of the wrong types) is handed out with ``Delivery.fault`` saying why; a
text body (what AMQP clients make of one with a ``content_encoding``) is encoded back to bytes.

Leases: RabbitMQ has none (it keeps an unacked message until the channel closes). The consumer
keeps it: a delivery not settled or extended within ``lease_s`` is given back with its attempt
count raised. Attempts travel in ``x-hedwig-attempts``; a redelivery by the broker (a consumer
that died) counts one more.

Connection string: any Kombu URL for RabbitMQ, e.g. ``amqp://guest:guest@localhost:5672//``.

Options (query string): ``lease_s`` (seconds a receive leases a message; default 30) and
``connect_timeout_s`` (default 5) are taken out; Kombu's own ``heartbeat``, ``ssl``,
``login_method`` and ``insist`` go on to Kombu. Any other name is refused, naming it.

Threads: py-amqp's connections are not thread-safe. Each thread that publishes (or asks
``counts``) keeps a connection of its own (so threads wait on RabbitMQ's confirms side by
side). Each consumer owns one connection and channel: ``receive`` holds the consumer's lock only
to read what already arrived and waits for the socket without it; acks take no part of that
lock (frames are written one at a time under the connection's write lock, acks in the order
they were planned), so acking never waits on a receive. Contiguous acks go as one ``multiple``
ack, and the ack frames of one ``ack`` call as one write. On plain TCP the consumer reads a
delivery that arrived whole itself (its usual properties: text and integer headers, a few short
strings); any other goes through py-amqp's reader as before. Broker errors become
``TransportError`` (or ``PublishError``); the connection is dropped and the next call reconnects.

Counts: ``status`` (the ``status`` command) counts dead letters per subscription by reading up
to a thousand of them (RabbitMQ takes them unacked and gives them back). ``counts`` (burst
workers, metrics) reads no message: depth with delayed retries per subscription, in flight
None, dead letters only when there are none (0), with a passive declare per queue (the
subscription, each of its 23 delay buckets, the dead-letter queue): AMQP has no cheaper way to
learn which delay buckets exist, and burst workers must count what waits in them.

Modules: this one holds the transport: its settings from a URL, publishing, and handing out
consumers and administration. ``_kombu_link`` the broker every part holds and its connections;
``_kombu_consumer`` the consumer; ``_kombu_admin`` provisioning, counts and dead letters;
``_kombu_messages`` how messages are built, sent and read; ``_kombu_wire`` the frames written
and read without py-amqp (publishes, confirms, acks, deliveries); ``_kombu_names`` what things are called.
"""

from __future__ import annotations

import difflib
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from urllib.parse import urlencode, urlsplit, urlunsplit

import amqp.exceptions

from hedwig_tasks.exceptions import ConfigurationError, PublishError
from hedwig_tasks.transports._kombu_admin import KombuAdmin
from hedwig_tasks.transports._kombu_consumer import DEFAULT_PREFETCH, KombuConsumer
from hedwig_tasks.transports._kombu_link import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_LEASE_S, Broker, mask
from hedwig_tasks.transports._kombu_names import (
    DELAY_BUCKETS_S,
    bucket,
    delay_queue_name,
    dlq_name,
    exchange_name,
    publish_delay_queue_name,
    subscription_name,
)
from hedwig_tasks.transports._url import read_options, seconds
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
    "dlq_name",
    "exchange_name",
    "subscription_name",
]

#: A message to publish: its id, body and attributes.
_Outgoing = tuple[str, bytes, Mapping[str, str]]

#: Most messages ``publish_many`` sends before it waits for their confirms.
CONFIRM_WINDOW = 1000
#: The options a URL's query may carry for the transport.
URL_OPTIONS = {"lease_s": seconds, "connect_timeout_s": seconds}
#: The options a URL's query may carry for Kombu, passed on as they are.
KOMBU_OPTIONS = ("heartbeat", "ssl", "login_method", "insist")


class KombuTransport(Transport):
    """RabbitMQ through Kombu. Construction does no I/O; connecting is lazy.

    Raises ``ConfigurationError`` for a lease that is not positive or a URL it does not speak.
    """

    scheme = "kombu"
    messaging_system = "rabbitmq"
    # RabbitMQ cannot count unacked messages over AMQP, and a lease that ran out is given back by
    # the consumer at its next receive, so status() counts lag or are None.
    capabilities = Capabilities(max_delay_s=float(DELAY_BUCKETS_S[-1]), status_counts=False, delayed_publish=True)

    def __init__(
        self,
        url: str,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        broker = Broker(url, lease_s=lease_s, connect_timeout_s=connect_timeout_s, clock=clock)
        self._broker = broker
        self._admin = KombuAdmin(broker)
        self.url, self.lease_s, self.connect_timeout_s = url, lease_s, connect_timeout_s
        self._lock = threading.Lock()
        self._consumers: list[KombuConsumer] = []
        self._delay_queues: set[str] = set()  # publish delay queues declared (their topics exist)

    @classmethod
    def from_url(cls, url: str) -> KombuTransport:
        """A Kombu URL, with ``lease_s`` and ``connect_timeout_s`` taken out of its query."""
        parts = urlsplit(url)
        ours, kombus = read_options("kombu", parts.query, URL_OPTIONS, pass_on=True)
        for name, _ in kombus:
            if name not in KOMBU_OPTIONS:
                known = [*URL_OPTIONS, *KOMBU_OPTIONS]
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise ConfigurationError(f"unknown kombu option {name!r}{hint} (known: {', '.join(sorted(known))})")
        return cls(urlunsplit(parts._replace(query=urlencode(kombus))), **ours)

    def __repr__(self) -> str:
        return f"<KombuTransport {mask(self.url)!r}>"

    def close(self) -> None:
        """Close every thread's publishing connection and every consumer made here."""
        with self._lock:
            consumers, self._consumers = self._consumers, []
        self._broker.close()
        for consumer in consumers:
            consumer.close()

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
        """Publish one message persistently, on this thread's connection; returns once the broker
        confirmed it. See :meth:`publish_many` for what raises."""
        message_id = uuid.uuid4().hex
        self._publish(topic, [(message_id, body, attributes)], delay_s)
        return message_id

    def publish_many(
        self,
        topic: str,
        messages: Sequence[tuple[bytes, Mapping[str, str]]],
        *,
        owner: str | None = None,
        delay_s: float = 0,
    ) -> list[str]:
        """Publish each persistently, on this thread's connection, then wait for the broker's
        confirms of them all (every ``CONFIRM_WINDOW`` messages and at the end): it returns once
        every one is confirmed.

        A topic that does not exist raises ``PublishError``, naming it; one no queue subscribes to
        is warned about. A refusal, or any other failure, raises ``PublishError`` too; messages
        before the failing window may have been sent. A delay waits in a delay queue of the topic
        (see :meth:`_publish_delayed`); one longer than the last bucket raises ``PublishError``.
        """
        ids = [uuid.uuid4().hex for _ in messages]
        pairs = zip(ids, messages, strict=True)
        self._publish(topic, [(i, body, attributes) for i, (body, attributes) in pairs], delay_s)
        return ids

    def _publish(self, topic: str, messages: list[_Outgoing], delay_s: float = 0) -> None:
        if delay_s > 0:
            self._publish_delayed(topic, messages, delay_s)
            return
        link = self._broker.thread_link()
        exchange = exchange_name(topic)
        with link.errors(f"publish to {topic!r}", PublishError):
            try:
                confirms = link.confirms
                for n, (message_id, body, attributes) in enumerate(messages, 1):
                    confirms.send(
                        body, attributes, message_id=message_id, exchange=exchange, routing_key=topic, mandatory=True
                    )
                    if n % CONFIRM_WINDOW == 0:
                        confirms.wait()
                confirms.wait()
            except amqp.exceptions.NotFound as exc:  # the exchange: it closed the channel
                link.reset()
                raise PublishError(_missing_topic(topic)) from exc

    def _publish_delayed(
        self, topic: str, messages: list[tuple[str, bytes, Mapping[str, str]]], delay_s: float
    ) -> None:
        """Into ``hedwig:publish-delay:<B>s:<topic>`` with the delay as each message's TTL; it
        dead-letters into the topic's exchange, so the fan-out happens when the delay is over.

        As for retries, ``B`` is the power of two that holds the delay (a message waits at most
        its bucket behind longer ones, never less than its delay). The topic's exchange is
        checked before the first delayed publish to it (``PublishError`` naming provision).
        """
        if delay_s > DELAY_BUCKETS_S[-1]:
            raise PublishError(f"publish to {topic!r}: a delay of {delay_s:g}s is past RabbitMQ's longest TTL")
        name = publish_delay_queue_name(topic, bucket(delay_s))
        link = self._broker.thread_link()
        with link.errors(f"delayed publish to {topic!r}", PublishError):
            try:
                if name not in self._delay_queues:
                    channel = link.channel
                    channel.exchange_declare(exchange_name(topic), "fanout", passive=True)
                    arguments = {"x-dead-letter-exchange": exchange_name(topic), "x-dead-letter-routing-key": topic}
                    channel.queue_declare(name, durable=True, auto_delete=False, arguments=arguments)
                    self._delay_queues.add(name)
                confirms = link.confirms
                for message_id, body, attributes in messages:
                    confirms.send(body, attributes, message_id=message_id, routing_key=name, expiration=delay_s)
                confirms.wait()
            except amqp.exceptions.NotFound as exc:  # the exchange: it closed the channel
                link.reset()
                raise PublishError(_missing_topic(topic)) from exc

    # -- consuming and administration -------------------------------------------------------

    def consumer(self, queue: str, topics: Sequence[str], *, max_outstanding: int | None = None) -> KombuConsumer:
        names = [subscription_name(queue, t) for t in topics]
        consumer = KombuConsumer(self._broker, queue, names, prefetch=max_outstanding or DEFAULT_PREFETCH)
        with self._lock:
            self._consumers.append(consumer)
        return consumer

    def provision(
        self, queue: str | None, subscribe: Sequence[str], publish: Sequence[str], *, dry_run: bool = False
    ) -> list[str]:
        """Declare the topics' exchanges, the queue's subscriptions and its dead-letter queue."""
        return self._admin.provision(queue, subscribe, publish, dry_run=dry_run)

    def status(self, queue: str, topics: Sequence[str]) -> list[SubscriptionStatus]:
        """Depth (including delayed retries) and dead letters per subscription; in flight is None."""
        return self._admin.status(queue, topics)

    def counts(self, queue: str, topics: Sequence[str]) -> list[SubscriptionStatus]:
        """Depth (including delayed retries) per subscription, reading no message; see ``_kombu_admin``."""
        return self._admin.counts(queue, topics)

    def dead_letters(
        self, queue: str, *, limit: int = 100, ids: Collection[str] | None = None
    ) -> list[DeadLetterRecord]:
        """The oldest ``limit`` dead letters (of those ``ids`` names, if given), left in place."""
        return self._admin.dead_letters(queue, limit=limit, ids=ids)

    def requeue_dead_letters(
        self,
        queue: str,
        *,
        limit: int | None = None,
        progress: Progress | None = None,
        ids: Collection[str] | None = None,
    ) -> int:
        """Move the oldest dead letters (or those ``ids`` names) back to their subscriptions, attempts reset."""
        return self._admin.requeue_dead_letters(queue, limit=limit, progress=progress, ids=ids)

    def purge_dead_letters(
        self,
        queue: str,
        *,
        limit: int | None = None,
        progress: Progress | None = None,
        ids: Collection[str] | None = None,
    ) -> int:
        """Delete the oldest dead letters (or those ``ids`` names) for good; returns how many."""
        return self._admin.purge_dead_letters(queue, limit=limit, progress=progress, ids=ids)


def _missing_topic(topic: str) -> str:
    return f"topic {topic!r} does not exist: run `hedwig-tasks provision` to create it"
