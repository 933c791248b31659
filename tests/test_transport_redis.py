"""The Redis Streams transport on the machine's Redis (db 9): the shared contract, and what only
Redis shows (layout, trimming, options)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from helpers import wait_for
from redis_server import cleanup, redis_url

from hedwig_tasks.exceptions import ConfigurationError, PublishError, TransportError
from hedwig_tasks.testing.contract import ContractClock, Names, RealClock, TransportContract
from hedwig_tasks.transports import from_url
from hedwig_tasks.transports.base import Consumer, Delivery
from hedwig_tasks.transports.redis import RedisTransport


class TestRedisTransport(TransportContract):
    """Redis keeps the time (idle times, due retries): leases are short and the clock real."""

    lease_s = 1.0
    quiet_s = 0.3
    deliver_timeout_s = 10.0

    @pytest.fixture
    def clock(self) -> ContractClock:
        return RealClock()

    @pytest.fixture
    def url(self) -> str:
        return redis_url()

    @pytest.fixture
    def names(self, url: str) -> Iterator[Names]:
        names = Names.fresh()
        yield names
        cleanup(url, [names.queue, names.other_queue, names.third_queue], [names.topic, names.other_topic])

    @pytest.fixture
    def transport(self, url: str) -> Iterator[RedisTransport]:
        bus = RedisTransport(url, lease_s=self.lease_s)
        yield bus
        bus.close()


# -- what only Redis shows ----------------------------------------------------------------------


@pytest.fixture
def url() -> str:
    return redis_url()


@pytest.fixture
def names(url: str) -> Iterator[Names]:
    names = Names.fresh()
    yield names
    cleanup(url, [names.queue, names.other_queue, names.third_queue], [names.topic, names.other_topic])


@pytest.fixture
def bus(url: str) -> Iterator[RedisTransport]:
    transport = RedisTransport(url, lease_s=1.0)
    yield transport
    transport.close()


def _receive(consumer: Consumer, count: int) -> list[Delivery]:
    found: list[Delivery] = []
    deadline = time.monotonic() + 10
    while len(found) < count and time.monotonic() < deadline:
        found += consumer.receive(count - len(found), wait_s=0.5)
    assert len(found) == count
    return found


def _groups(client: redis.Redis, key: str) -> dict[str, dict[str, object]]:
    return {g["name"].decode(): g for g in client.xinfo_groups(key)}


def test_layout_is_the_hedwig_librarys(bus: RedisTransport, names: Names) -> None:
    actions = bus.provision(names.queue, [names.topic], [names.other_topic])
    assert f"subscribe {names.queue} to {names.topic}" in actions
    raw = bus.link.client
    assert set(_groups(raw, f"hedwig:{names.topic}")) == {names.queue}
    assert set(_groups(raw, f"hedwig:{names.queue}")) == {names.queue}
    assert set(_groups(raw, f"hedwig:{names.queue}:dlq")) == {names.queue}
    assert raw.exists(f"hedwig:{names.other_topic}") and _groups(raw, f"hedwig:{names.other_topic}") == {}
    entry_id = bus.publish(names.topic, b'{"x": 1}', {"hedwig_id": "i-1", "request_id": "r"})
    ((found_id, fields),) = raw.xrange(f"hedwig:{names.topic}")
    assert found_id.decode() == entry_id
    assert fields == {b"hedwig_payload": b'{"x": 1}', b"hedwig_id": b"i-1", b"request_id": b"r"}


def test_a_subscription_gets_what_is_published_after_it(bus: RedisTransport, names: Names) -> None:
    bus.provision(names.queue, [names.topic], [])
    bus.publish(names.topic, b"before", {})
    bus.provision(names.other_queue, [names.topic], [])
    bus.publish(names.topic, b"after", {})
    assert [d.body for d in _receive(bus.consumer(names.queue, [names.topic]), 2)] == [b"before", b"after"]
    assert [d.body for d in _receive(bus.consumer(names.other_queue, [names.topic]), 1)] == [b"after"]


def test_a_retry_carries_its_attempts_in_a_field_the_hedwig_library_ignores(bus: RedisTransport, names: Names) -> None:
    bus.provision(names.queue, [names.topic], [])
    bus.publish(names.topic, b"again", {"k": "v"})
    consumer = bus.consumer(names.queue, [names.topic])
    (first,) = _receive(consumer, 1)
    consumer.retry_later(first, 0.2)
    raw = bus.link.client
    assert raw.zcard(f"hedwig:{names.queue}:delayed") == 1
    (second,) = _receive(consumer, 1)
    assert (second.body, dict(second.attributes), second.attempt) == (b"again", {"k": "v"}, 2)
    assert second.subscription == first.subscription == f"{names.queue}:{names.topic}"
    ((_, fields),) = raw.xrange(f"hedwig:{names.queue}")
    assert fields[b"hedwig_tasks_attempt"] == b"1"
    assert fields[b"hedwig_tasks_subscription"] == first.subscription.encode()
    assert raw.zcard(f"hedwig:{names.queue}:delayed") == 0


def test_dead_letters_by_id_requeue_and_purge(bus: RedisTransport, names: Names) -> None:
    bus.provision(names.queue, [names.topic], [])
    bus.publish_many(names.topic, [(f"m-{i}".encode(), {"i": str(i)}) for i in range(4)])
    consumer = bus.consumer(names.queue, [names.topic])
    for delivery in sorted(_receive(consumer, 4), key=lambda d: d.body):
        consumer.dead_letter(delivery, f"bad {delivery.body.decode()}")
    records = bus.dead_letters(names.queue)
    assert [r.reason for r in records] == [f"bad m-{i}" for i in range(4)]
    first, second, third, fourth = (r.transport_id for r in records)
    assert [r.body for r in bus.dead_letters(names.queue, ids=[third, "0-1", "nonsense"])] == [b"m-2"]
    assert bus.purge_dead_letters(names.queue, ids=[second, "nonsense"]) == 1
    assert bus.requeue_dead_letters(names.queue, ids=[third]) == 1
    assert [r.transport_id for r in bus.dead_letters(names.queue)] == [first, fourth]
    (back,) = _receive(consumer, 1)
    assert (back.body, back.attempt, back.subscription) == (b"m-2", 1, f"{names.queue}:{names.topic}")
    consumer.ack([back])
    assert bus.purge_dead_letters(names.queue, limit=1) == 1
    assert [r.transport_id for r in bus.dead_letters(names.queue)] == [fourth]


def test_dead_letters_the_hedwig_librarys_requeue_acknowledged_are_gone(bus: RedisTransport, names: Names) -> None:
    bus.provision(names.queue, [names.topic], [])
    bus.publish_many(names.topic, [(b"one", {}), (b"two", {})])
    consumer = bus.consumer(names.queue, [names.topic])
    for delivery in _receive(consumer, 2):
        consumer.dead_letter(delivery, "bad")
    raw = bus.link.client
    dlq = f"hedwig:{names.queue}:dlq"
    # What the Hedwig library's requeue does: read the dead letters as the group, re-add, ack.
    ((_, entries),) = raw.xreadgroup(names.queue, "hedwig-requeue", {dlq: ">"}, count=1)
    ((taken_id, fields),) = entries
    raw.xadd(f"hedwig:{names.queue}", fields)
    raw.xack(dlq, names.queue, taken_id)
    assert [r.body for r in bus.dead_letters(names.queue)] == [b"two"]
    assert bus.status(names.queue, [names.topic])[0].dead_letters == 1
    (requeued,) = _receive(consumer, 1)
    assert (requeued.body, requeued.attempt, requeued.subscription) == (b"one", 1, f"{names.queue}:{names.topic}")


def test_trimming_keeps_what_any_group_still_needs(url: str, names: Names) -> None:
    bus = RedisTransport(url, lease_s=1.0, trim_every_s=0.05)
    try:
        bus.provision(names.queue, [names.topic], [])
        bus.provision(names.other_queue, [names.topic], [])
        raw = bus.link.client
        stream = f"hedwig:{names.topic}"
        ids = bus.publish_many(names.topic, [(f"m-{i}".encode(), {}) for i in range(10)])
        fast, slow = bus.consumer(names.queue, [names.topic]), bus.consumer(names.other_queue, [names.topic])
        fast.ack(_receive(fast, 10))
        held = sorted(_receive(slow, 6), key=lambda d: d.body)
        slow.ack(held[:2] + held[3:])  # m-2 stays pending: it and all after are needed
        wait_for(lambda: fast.receive(1, wait_s=0.1) == [] and raw.xlen(stream) == 8, timeout_s=10)
        assert [i.decode() for i, _ in raw.xrange(stream)] == ids[2:]
        slow.ack([held[2]])
        slow.ack(_receive(slow, 4))
        wait_for(lambda: slow.receive(1, wait_s=0.1) == [] and raw.xlen(stream) == 0, timeout_s=10)
        # A topic no group reads keeps nothing; the queue's own streams keep what is not acked.
        bus.provision(None, [], [names.other_topic])
        other = f"hedwig:{names.other_topic}"
        wait_for(lambda: bus.publish(names.other_topic, b"nobody", {}) and raw.xlen(other) == 0, timeout_s=10)
        (row,) = bus.status(names.queue, [names.topic])
        assert (row.subscription, row.depth, row.in_flight, row.dead_letters) == (
            f"{names.queue}:{names.topic}",
            0,
            0,
            0,
        )
        assert row.details["stream"] == stream
    finally:
        bus.close()


def test_url_options_and_repr(url: str) -> None:
    bus = from_url("redis://:s3cret@127.0.0.1:6379/9?lease_s=7&block_s=0.5&trim_every_s=60")
    assert isinstance(bus, RedisTransport)
    assert (bus.lease_s, bus.link.block_s, bus.link.trim_every_s) == (7.0, 0.5, 60.0)
    assert "s3cret" not in repr(bus) and "s3cret" not in repr(bus.link)
    with pytest.raises(ConfigurationError, match="lease_s"):
        from_url("redis://127.0.0.1/9?lease_S=7")
    with pytest.raises(ConfigurationError, match="block_s"):
        from_url("redis://127.0.0.1/9?block_s=0")
    tls = from_url("rediss://127.0.0.1:6380/0?ssl_cert_reqs=none")
    assert isinstance(tls, RedisTransport) and tls.url.startswith("rediss://")
    built = RedisTransport.from_settings({"REDIS_URL": url, "HEDWIG_VISIBILITY_TIMEOUT_S": 45})
    assert (built.url, built.lease_s) == (url, 45.0)
    with pytest.raises(ConfigurationError, match="REDIS_URL"):
        RedisTransport.from_settings({})


def test_an_outage_is_a_transport_error_naming_the_server_without_its_password() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bus = RedisTransport(f"redis://:s3cret@127.0.0.1:{port}/0", connect_timeout_s=0.5)
    with pytest.raises(PublishError) as raised:
        bus.publish("t", b"x", {})
    assert f"127.0.0.1:{port}" in str(raised.value) and "s3cret" not in str(raised.value)
    with pytest.raises(TransportError):
        bus.consumer("q", ["t"]).receive(1, wait_s=0.1)


def test_a_refused_publish_leaves_the_publishing_connection_in_step(bus: RedisTransport, names: Names) -> None:
    bus.provision(names.queue, [names.topic], [])
    raw = bus.link.client
    raw.set(f"hedwig:{names.other_topic}", "not a stream")  # exists, so only the XADD fails
    with pytest.raises(PublishError, match="WRONGTYPE"):
        bus.publish(names.other_topic, b"{}", {})
    with pytest.raises(PublishError, match="WRONGTYPE"):
        bus.publish_many(names.other_topic, [(b"{}", {})] * 3)
    first = bus.publish(names.topic, b'{"n": 1}', {"k": "1"})
    many = bus.publish_many(names.topic, [(b'{"n": %d}' % n, {"k": str(n)}) for n in (2, 3)])
    found = raw.xrange(f"hedwig:{names.topic}")
    assert [entry_id.decode() for entry_id, _ in found] == [first, *many]
    assert [fields[b"k"] for _, fields in found] == [b"1", b"2", b"3"]


def test_each_thread_publishes_on_a_connection_of_its_own_kept_until_close(url: str, names: Names) -> None:
    named = f"hedwig-tasks-test-{names.queue}"
    bus = from_url(f"{url}?client_name={named}")
    assert isinstance(bus, RedisTransport)
    bus.provision(names.queue, [names.topic], [])
    raw = redis.Redis.from_url(url)  # a client of the test's own, unnamed
    ids: list[str] = []
    published, finish = threading.Semaphore(0), threading.Event()

    def publish(n: int) -> None:
        ids.extend(bus.publish(names.topic, b"{}", {"n": str(n)}) for _ in range(2))
        published.release()
        finish.wait(10)  # alive (its connection kept) until the count below

    threads = [threading.Thread(target=publish, args=(n,)) for n in range(3)]
    for thread in threads:  # one after another: a pool would hand each the same connection
        thread.start()
        assert published.acquire(timeout=10)
    ours = [c for c in raw.client_list() if c["name"] == named]
    finish.set()
    for thread in threads:
        thread.join()
    assert sorted(ids) == sorted(entry_id.decode() for entry_id, _ in raw.xrange(f"hedwig:{names.topic}"))
    assert [c["cmd"] for c in ours].count("xadd") == 3  # one per thread (kept while it lives)
    bus.close()
    wait_for(lambda: not [c for c in raw.client_list() if c["name"] == named], timeout_s=5)
    assert bus.publish(names.topic, b"{}", {}) in {e.decode() for e, _ in raw.xrange(f"hedwig:{names.topic}")}
    bus.close()
    raw.close()


def test_a_delayed_publish_waits_in_the_topics_set_then_every_group_gets_it(
    bus: RedisTransport, names: Names, url: str
) -> None:
    """Held in ``hedwig:<topic>:publish-delayed`` by Redis's clock, then moved into the topic's
    stream by a consumer of the topic, so a group that runs none of ours (a Hedwig-library
    app's) gets it too, as a new entry."""
    bus.provision(names.queue, [names.topic], [])
    bus.provision(names.other_queue, [names.topic], [])  # read by nobody here: the Hedwig library's
    client = redis.Redis.from_url(url)
    try:
        (token,) = bus.publish_many(names.topic, [(b"later", {"a": "1"})], delay_s=1.0)
        assert client.zcard(f"hedwig:{names.topic}:publish-delayed") == 1
        assert client.xlen(f"hedwig:{names.topic}") == 0
        consumer = bus.consumer(names.queue, [names.topic])
        found: list[Delivery] = []
        deadline = time.monotonic() + 10
        while not found and time.monotonic() < deadline:
            found = consumer.receive(10, wait_s=0.5)
        (delivery,) = found
        assert (delivery.body, dict(delivery.attributes), delivery.attempt) == (b"later", {"a": "1"}, 1)
        assert delivery.subscription == f"{names.queue}:{names.topic}"
        consumer.ack(found)
        consumer.close()
        assert client.zcard(f"hedwig:{names.topic}:publish-delayed") == 0
        other = client.xreadgroup(names.other_queue, "hedwig-library", {f"hedwig:{names.topic}": ">"}, count=10)
        ((_, entries),) = other
        assert [fields[b"hedwig_payload"] for _, fields in entries] == [b"later"]
        assert len(token) == 32
    finally:
        client.close()
