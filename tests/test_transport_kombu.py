"""The Kombu transport on real RabbitMQ: the shared contract, and what only a broker shows."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import kombu
import pytest
from kombu_server import cleanup, server_url
from tcp_proxy import TcpProxy

from hedwig_tasks.exceptions import ConfigurationError, PublishError, TransportError
from hedwig_tasks.testing.contract import ContractClock, Names, RealClock, TransportContract
from hedwig_tasks.transports import from_url
from hedwig_tasks.transports._kombu_consumer import ack_plan
from hedwig_tasks.transports._kombu_names import publish_delay_queue_name
from hedwig_tasks.transports.base import Delivery, SubscriptionStatus
from hedwig_tasks.transports.kombu import (
    DEFAULT_LEASE_S,
    DELAY_BUCKETS_S,
    KombuTransport,
    delay_queue_name,
    dlq_name,
    exchange_name,
    subscription_name,
)


class KombuContract(TransportContract):
    """The contract on a broker that keeps its own time, so leases are short and the clock real."""

    broker = "amqp"
    lease_s = 1.0
    quiet_s = 0.3
    deliver_timeout_s = 10.0

    @pytest.fixture
    def clock(self) -> ContractClock:
        return RealClock()

    @pytest.fixture
    def url(self) -> str:
        return server_url(self.broker)

    @pytest.fixture
    def names(self, url: str) -> Iterator[Names]:
        names = Names.fresh()
        yield names
        topics = [names.topic, names.other_topic]
        cleanup(url, [names.queue, names.other_queue, names.third_queue], topics)

    @pytest.fixture
    def transport(self, url: str, clock: ContractClock) -> Iterator[KombuTransport]:
        bus = KombuTransport(url, lease_s=self.lease_s, clock=clock)
        yield bus
        bus.close()

    # The contract's test_status_counts is skipped (Capabilities.status_counts is False): the
    # lease is kept by the consumer, which gives the message back the next time it runs, and
    # RabbitMQ cannot count unacked messages over AMQP. The version below checks the rest.

    def test_status_counts_on_a_broker(self, transport: KombuTransport, names: Names, clock: ContractClock) -> None:
        self.subscribed(transport, names.queue, names.topic, names.other_topic)
        consumer = transport.consumer(names.queue, [names.topic], max_outstanding=3)  # RabbitMQ pushes up to this
        self.publish(transport, names.topic, 4)
        assert self._counts(transport, names) == (4, None, 0)
        dead, delayed, held = self.receive(consumer, 3)
        assert self._counts(transport, names)[1] is None
        consumer.dead_letter(dead, "bad")
        consumer.retry_later(delayed, self.lease_s * 10)  # a delayed retry still counts as waiting
        # Settling opened the prefetch window: RabbitMQ pushed the fourth to the consumer, unacked, not waiting.
        assert self._counts(transport, names) == (1, None, 1)
        clock.advance(self.lease_s * 1.5)
        (back,) = [d for d in self.receive(consumer, 2) if d.body == held.body]  # lease ran out: given back
        assert back.attempt == 2
        statuses = transport.status(names.queue, [names.topic, names.other_topic])
        assert [s.topic for s in statuses] == [names.topic, names.other_topic]
        assert statuses[0].subscription == held.subscription
        assert (statuses[0].depth, statuses[0].dead_letters) == (1, 1)
        assert (statuses[1].depth, statuses[1].dead_letters) == (0, 0)
        consumer.close()

    def test_counts_agree_with_status_on_depth_delayed_retries_included(
        self, transport: KombuTransport, names: Names
    ) -> None:
        topics = [names.topic, names.other_topic]
        self.subscribed(transport, names.queue, *topics)
        consumer = transport.consumer(names.queue, [names.topic], max_outstanding=3)
        self.publish(transport, names.topic, 4)
        self.publish(transport, names.other_topic, 2)
        assert (
            _depths(transport.counts(names.queue, topics)) == _depths(transport.status(names.queue, topics)) == [4, 2]
        )
        assert [(c.in_flight, c.dead_letters) for c in transport.counts(names.queue, topics)] == [(None, 0)] * 2
        dead, delayed, _ = self.receive(consumer, 3)
        consumer.dead_letter(dead, "bad")
        consumer.retry_later(delayed, self.lease_s * 10)
        counted, full = transport.counts(names.queue, topics), transport.status(names.queue, topics)
        # Waiting: the delayed retry (RabbitMQ pushed the fourth to the consumer).
        assert _depths(counted) == _depths(full) == [1, 2]
        assert [s.subscription for s in counted] == [s.subscription for s in full]
        # The dead-letter queue is shared by the app's subscriptions: only status reads whose each is.
        assert [s.dead_letters for s in full] == [1, 0]
        assert [(c.in_flight, c.dead_letters) for c in counted] == [(None, None)] * 2
        consumer.close()

    def test_counts_read_no_message(self, transport: KombuTransport, names: Names) -> None:
        # status reads the dead letters (RabbitMQ takes each and gives it back); counts reads
        # none: fewer bytes than one message takes.
        body = b"x" * 32768
        self.subscribed(transport, names.queue, names.topic)
        transport.publish_many(names.topic, [(body, {"n": str(n)}) for n in range(16)])
        consumer = transport.consumer(names.queue, [names.topic], max_outstanding=16)
        taken = self.receive(consumer, 16)
        for delivery in taken[:8]:
            consumer.dead_letter(delivery, "bad")  # the other eight stay held
        parts = urlsplit(transport.url)
        with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 0) as proxy:
            through = KombuTransport(proxy.route(transport.url), lease_s=self.lease_s)
            try:
                assert _depths(through.counts(names.queue, [names.topic])) == [0]  # connects
                before = proxy.from_target
                assert _depths(through.counts(names.queue, [names.topic])) == [0]
                counted = proxy.from_target - before
                before = proxy.from_target
                assert through.status(names.queue, [names.topic])[0].dead_letters == 8
                full = proxy.from_target - before
            finally:
                through.close()
        assert counted < len(body) < 8 * len(body) < full
        consumer.close()

    def test_counts_reconnect_once_when_the_kept_connection_went_away(
        self, transport: KombuTransport, names: Names
    ) -> None:
        # status connects anew each time; counts keeps a connection, so a broker that went away and
        # came back between two counts must not fail the second (a burst worker would stop on it).
        self.subscribed(transport, names.queue, names.topic)
        self.publish(transport, names.topic, 2)
        parts = urlsplit(transport.url)
        with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 0) as proxy:
            through = KombuTransport(proxy.route(transport.url), lease_s=self.lease_s)
            try:
                assert _depths(through.counts(names.queue, [names.topic])) == [2]
                proxy.cut()
                with pytest.raises(TransportError):  # gone: a new connection fails too
                    through.counts(names.queue, [names.topic])
                proxy.restore()
                assert _depths(through.counts(names.queue, [names.topic])) == [2]
                accepted = proxy.accepted
                proxy.cut()
                proxy.restore()  # back before the next question: it is answered
                assert _depths(through.counts(names.queue, [names.topic])) == [2]
                assert proxy.accepted == accepted + 1
            finally:
                through.close()


def _depths(statuses: list[SubscriptionStatus]) -> list[int | None]:
    return [s.depth for s in statuses]


class TestRabbitMQ(KombuContract):
    broker = "amqp"

    def test_retry_goes_through_a_delay_queue_of_its_bucket(self, transport: KombuTransport, names: Names) -> None:
        consumer = self.subscribed(transport, names.queue, names.topic)
        transport.publish(names.topic, b"later", {"a": "1"})
        (first,) = self.receive(consumer, 1)
        consumer.retry_later(first, 3.0)
        name = subscription_name(names.queue, names.topic)
        with kombu.Connection(transport.url) as connection:
            declared = connection.channel().queue_declare(delay_queue_name(name, 4), passive=True)
        assert declared.message_count == 1
        self.assert_nothing(consumer)
        (second,) = self.receive(consumer, 1)
        assert (second.body, dict(second.attributes), second.attempt) == (b"later", {"a": "1"}, 2)
        consumer.close()

    def test_counts_leave_no_channel_open_on_the_kept_connection(self, transport: KombuTransport, names: Names) -> None:
        # A passive declare of a missing queue (a delay bucket never used) makes RabbitMQ close the
        # channel and py-amqp open it again: left open, each would hold one of the connection's
        # channel numbers until it ran out of them.
        self.subscribed(transport, names.queue, names.topic)
        transport.counts(names.queue, [names.topic])
        connection = transport._broker.thread_link().connection
        assert connection is not None
        channels = len(connection.connection.channels)
        for _ in range(5):
            transport.counts(names.queue, [names.topic])
        assert transport._broker.thread_link().connection is connection  # kept, not made anew
        assert connection is not None  # for mypy: the `is` above widened it to Any | None again
        assert len(connection.connection.channels) == channels


# -- URLs, errors and the broker's own behaviour -----------------------------------------------


def test_url_options_are_taken_out_and_the_password_is_masked() -> None:
    bus = from_url("amqp://guest:secret@127.0.0.1:5672//?lease_s=2.5&connect_timeout_s=1&heartbeat=0")
    assert isinstance(bus, KombuTransport)
    assert (bus.lease_s, bus.connect_timeout_s) == (2.5, 1.0)
    assert bus.url == "amqp://guest:secret@127.0.0.1:5672//?heartbeat=0"
    assert "secret" not in repr(bus)
    assert from_url("amqp://127.0.0.1//").lease_s == DEFAULT_LEASE_S


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("amqp://h//?lease_s=soon", "lease_s='soon'"),
        ("amqps://h//?lease_s=0", "lease_s='0'"),
        ("sqs://h/", "amqp://, amqps:// and pyamqp://, not sqs://"),
        ("redis://h/0", "RabbitMQ .* only; redis:// is the Redis Streams transport's"),
        ("rediss://h/0", "rediss:// is the Redis Streams transport's"),
        ("amqp://h//?heartbaet=3", "unknown kombu option 'heartbaet'; did you mean heartbeat?"),
        ("amqp://h//?connect_timeout=3", "unknown kombu option 'connect_timeout'; did you mean connect_timeout_s?"),
    ],
)
def test_bad_urls_are_refused(url: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError, match=complaint):
        KombuTransport.from_url(url)


def test_an_unreachable_broker_is_a_transport_error() -> None:
    bus = KombuTransport("amqp://guest:guest@127.0.0.1:9//", connect_timeout_s=0.5)
    with pytest.raises(PublishError) as caught:
        bus.publish("t", b"x", {})
    assert caught.value.__cause__ is not None
    with pytest.raises(TransportError):
        bus.status("q", ["t"])
    with pytest.raises(TransportError):
        bus.consumer("q", ["t"]).receive(1, wait_s=0.1)


def test_messages_are_durable_and_persistent() -> None:
    url = server_url("amqp")
    names = Names.fresh()
    bus = KombuTransport(url)
    try:
        bus.provision(names.queue, [names.topic], [])
        bus.publish(names.topic, b"kept", {"k": "v"})
        with kombu.Connection(url) as connection:
            message = connection.SimpleQueue(subscription_name(names.queue, names.topic), no_ack=False).get(timeout=5)
            assert message.properties["delivery_mode"] == 2
            assert message.headers == {"k": "v"}
            assert message.properties["message_id"]
            message.requeue()
        with kombu.Connection(url) as connection:
            declared = connection.channel().queue_declare(subscription_name(names.queue, names.topic), passive=True)
            assert declared.message_count == 1
    finally:
        bus.close()
        cleanup(url, [names.queue], [names.topic])


def test_a_consumer_reconnects_after_its_connection_drops() -> None:
    url = server_url("amqp")
    names = Names.fresh()
    bus = KombuTransport(url, lease_s=30.0)
    consumer = bus.consumer(names.queue, [names.topic], max_outstanding=5)
    try:
        bus.provision(names.queue, [names.topic], [])
        bus.publish(names.topic, b"one", {})
        (first,) = consumer.receive(1, wait_s=5)
        raw = consumer._link.connection._connection  # type: ignore[union-attr]
        raw.transport.sock.shutdown(socket.SHUT_RDWR)  # the network goes away
        with pytest.raises(TransportError):
            consumer.receive(1, wait_s=0.5)
        consumer.ack([first])  # its connection is gone: settles nothing, raises nothing
        deadline = time.monotonic() + 10
        found: list[Delivery] = []
        while not found and time.monotonic() < deadline:
            found = consumer.receive(1, wait_s=0.5)
        assert [(d.body, d.attempt) for d in found] == [(b"one", 2)]  # redelivered by the broker
        consumer.ack(found)
    finally:
        consumer.close()
        bus.close()
        cleanup(url, [names.queue], [names.topic])


# -- publisher confirms, acks, dead-letter ids -------------------------------------------------


@pytest.fixture
def rabbit() -> Iterator[tuple[KombuTransport, Names]]:
    url = server_url("amqp")
    names = Names.fresh()
    bus = KombuTransport(url, lease_s=30.0)
    yield bus, names
    bus.close()
    cleanup(url, [names.queue], [names.topic])


def test_a_message_the_broker_refuses_is_never_reported_sent(rabbit: tuple[KombuTransport, Names]) -> None:
    # A queue that takes two messages and refuses (nacks) the rest: publish_many waits for every
    # confirm before it returns, so a refused message fails the call; so does a single publish.
    bus, names = rabbit
    bus.provision(None, [], [names.topic])
    full = subscription_name(names.queue, names.topic)
    with kombu.Connection(bus.url) as connection:
        channel = connection.channel()
        channel.queue_declare(full, durable=True, arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
        channel.queue_bind(full, exchange_name(names.topic), routing_key="")
    with pytest.raises(PublishError, match="refused 3 of the messages"):
        bus.publish_many(names.topic, [(f"m{n}".encode(), {}) for n in range(5)])
    with pytest.raises(PublishError, match="refused 1 of the messages"):
        bus.publish(names.topic, b"one more", {})
    with kombu.Connection(bus.url) as connection:
        assert connection.channel().queue_declare(full, passive=True).message_count == 2
    consumer = bus.consumer(names.queue, [names.topic])
    taken: list[Delivery] = []
    while len(taken) < 2:
        taken += consumer.receive(2, wait_s=5)
    assert sorted(d.body for d in taken) == [b"m0", b"m1"]
    consumer.ack(taken)
    consumer.close()


def test_publish_many_returns_once_every_message_is_confirmed(rabbit: tuple[KombuTransport, Names]) -> None:
    bus, names = rabbit
    bus.provision(names.queue, [names.topic], [])
    ids = bus.publish_many(names.topic, [(f"m{n}".encode(), {"n": str(n)}) for n in range(2500)])  # 3 windows
    assert len(set(ids)) == 2500
    with kombu.Connection(bus.url) as connection:  # confirmed: on the queue when the call returns
        declared = connection.channel().queue_declare(subscription_name(names.queue, names.topic), passive=True)
    assert declared.message_count == 2500


def test_acks_in_any_order_settle_exactly_those_acked(rabbit: tuple[KombuTransport, Names]) -> None:
    # Contiguous tags go as one multiple ack; one must never settle a delivery still held.
    bus, names = rabbit
    bus.provision(names.queue, [names.topic], [])
    bus.publish_many(names.topic, [(f"m{n}".encode(), {}) for n in range(6)])
    consumer = bus.consumer(names.queue, [names.topic], max_outstanding=10)
    taken: list[Delivery] = []
    while len(taken) < 6:
        taken += consumer.receive(6 - len(taken), wait_s=5)
    consumer.ack([taken[2], taken[0], taken[1]])
    consumer.ack([taken[4]])
    consumer.close()  # taken[3] and taken[5] were held: the broker gives back those two only
    again = bus.consumer(names.queue, [names.topic], max_outstanding=10)
    back: list[Delivery] = []
    deadline = time.monotonic() + 10
    while len(back) < 2 and time.monotonic() < deadline:
        back += again.receive(10, wait_s=0.5)
    assert sorted(d.body for d in back) == [taken[3].body, taken[5].body]
    again.ack(back)
    assert again.receive(10, wait_s=0.3) == []
    again.close()


def test_ack_plan_acks_below_every_other_held_tag_at_once() -> None:
    unacked = {1, 2, 3, 4, 5, 7}
    assert ack_plan([3, 1, 2, 5], unacked) == [(3, True), (5, False)]
    assert unacked == {4, 7}
    assert ack_plan([7], unacked) == [(7, False)]
    assert ack_plan([4], unacked) == [(4, False)]
    assert ack_plan([], unacked) == []


def test_dead_letters_with_one_message_id_keep_ids_of_their_own(rabbit: tuple[KombuTransport, Names]) -> None:
    # Another publisher may reuse a message id; each dead letter still has its own id.
    bus, names = rabbit
    bus.provision(names.queue, [names.topic], [])
    with kombu.Connection(bus.url) as connection:
        producer = connection.Producer()
        for body in (b"first", b"second"):
            producer.publish(body, exchange=exchange_name(names.topic), routing_key="", message_id="same-id")
    consumer = bus.consumer(names.queue, [names.topic])
    taken: list[Delivery] = []
    while len(taken) < 2:
        taken += consumer.receive(2, wait_s=5)
    for delivery in taken:
        consumer.dead_letter(delivery, "bad")
    records = bus.dead_letters(names.queue)
    assert len({r.transport_id for r in records}) == 2
    first = next(r for r in records if r.body == b"first")
    assert bus.purge_dead_letters(names.queue, ids=[first.transport_id]) == 1
    assert [r.body for r in bus.dead_letters(names.queue)] == [b"second"]
    with kombu.Connection(bus.url) as connection:
        assert connection.channel().queue_declare(dlq_name(names.queue), passive=True).message_count == 1
    consumer.close()


def test_an_ack_never_waits_for_a_receive_reading(rabbit: tuple[KombuTransport, Names]) -> None:
    bus, names = rabbit
    bus.provision(names.queue, [names.topic], [])
    bus.publish_many(names.topic, [(b"a", {}), (b"b", {})])
    consumer = bus.consumer(names.queue, [names.topic])
    taken: list[Delivery] = []
    while len(taken) < 2:
        taken += consumer.receive(2, wait_s=5)
    acked = threading.Event()

    def ack() -> None:
        consumer.ack(taken)
        acked.set()

    with consumer._lock:  # what a receive holds while it reads what arrived
        threading.Thread(target=ack, daemon=True).start()
        assert acked.wait(5), "the ack waited for the receive's lock"
    consumer.close()
    again = bus.consumer(names.queue, [names.topic])
    assert again.receive(2, wait_s=0.5) == []  # settled for good
    again.close()


def test_a_delayed_publish_waits_in_its_topics_bucket(rabbit: tuple[KombuTransport, Names]) -> None:
    """A delayed publish waits in the topic's publish-delay queue of its bucket (the fan-out comes
    when its TTL runs out); a missing topic and a delay past AMQP's longest TTL are refused."""
    bus, names = rabbit
    with pytest.raises(PublishError, match=f"topic {names.topic!r}.*provision"):
        bus.publish(names.topic, b"nowhere", {}, delay_s=1.0)
    bus.provision(names.queue, [names.topic], [])
    with pytest.raises(PublishError, match="past RabbitMQ's longest TTL"):
        bus.publish(names.topic, b"too late", {}, delay_s=DELAY_BUCKETS_S[-1] + 1)
    bus.publish(names.topic, b"later", {"a": "1"}, delay_s=3.0)
    with kombu.Connection(bus.url) as connection:
        waiting = connection.channel().queue_declare(publish_delay_queue_name(names.topic, 4), passive=True)
        assert waiting.message_count == 1
        subscription = connection.channel().queue_declare(subscription_name(names.queue, names.topic), passive=True)
        assert subscription.message_count == 0
