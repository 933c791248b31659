"""The Kombu transport's own frames (``_kombu_wire``): publishes and the publisher that writes them, and acks.

The frames must be byte for byte what py-amqp writes for the same message (checked against
py-amqp's own frame writer, no server); on real RabbitMQ a publish through them arrives with
every property, is confirmed before it returns, and fails as py-amqp's path failed: a refusal,
a lost connection (cut through a TCP proxy the test owns), a missing topic.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import amqp
import amqp.method_framing
import pytest
from kombu_server import cleanup, fresh_bus, server_url
from tcp_proxy import TcpProxy

from hedwig_tasks.exceptions import PublishError, TransportError
from hedwig_tasks.testing.contract import Names
from hedwig_tasks.transports import _kombu_consumer
from hedwig_tasks.transports import _kombu_wire as wire
from hedwig_tasks.transports._kombu_link import Broker, _connection, _KombuTransport
from hedwig_tasks.transports._kombu_messages import message
from hedwig_tasks.transports.kombu import KombuTransport, subscription_name

HEADERS = {"hedwig_format_version": "1.0", "hedwig_id": "abc", "naïve": "café ☕", "": ""}


def _py_amqp_frames(built: Any, exchange: str, routing_key: str, frame_max: int, *, mandatory: bool) -> bytes:
    """What py-amqp's frame writer sends for ``basic_publish`` of ``built`` on channel 1."""
    written: list[bytes] = []
    transport = SimpleNamespace(write=lambda data: written.append(bytes(data)))
    connection = SimpleNamespace(frame_max=frame_max, bytes_sent=0)
    writer = amqp.method_framing.frame_writer(connection, transport)
    args = amqp.serialization.dumps("BssbbZ", (0, exchange, routing_key, mandatory, False))
    writer(1, 1, (60, 40), args, built)
    return b"".join(written)


def _ours(
    body: bytes, headers: dict[str, str], message_id: str, frame_max: int, expiration: str | None = None
) -> bytes:
    method = wire.publish_method(1, "hedwig-t", "t", mandatory=True)
    header = wire.content_header(len(body), headers, message_id, expiration)
    assert method is not None and header is not None
    return wire.message_frames(method, 1, header, body, frame_max)


@pytest.mark.parametrize(
    ("body", "headers", "frame_max"),
    [
        (b'{"user_id": "U1"}', HEADERS, 131072),
        (b"", {}, 131072),  # no body frame at all
        (bytes(range(256)) * 40, HEADERS, 4096),  # a body over several frames
        (b"x" * 4088, {}, 4096),  # exactly one frame's room
    ],
)
def test_frames_are_byte_for_byte_py_amqps(body: bytes, headers: dict[str, str], frame_max: int) -> None:
    theirs = _py_amqp_frames(message(body, headers, message_id="m-1"), "hedwig-t", "t", frame_max, mandatory=True)
    assert _ours(body, headers, "m-1", frame_max) == theirs


def test_a_delayed_message_carries_its_ttl_as_py_amqp_writes_it() -> None:
    built = message(b"later", {"a": "1"}, message_id="m-2", expiration=2.5)
    assert _ours(b"later", {"a": "1"}, "m-2", 131072, expiration="2500") == _py_amqp_frames(
        built, "hedwig-t", "t", 131072, mandatory=True
    )


def test_what_the_wire_does_not_build_is_left_to_py_amqp() -> None:
    assert wire.content_header(1, {"n": 1}, "m") is None  # type: ignore[dict-item]
    assert wire.content_header(1, {"k" * 256: "v"}, "m") is None
    assert wire.content_header(1, {}, "m" * 256) is None
    assert wire.publish_method(1, "e" * 256, "k", mandatory=False) is None
    assert wire.content_header(1, {"k" * 255: "v"}, "m") is not None


def test_ack_frames_are_py_amqps_basic_acks_in_one_buffer() -> None:
    written: list[bytes] = []
    transport = SimpleNamespace(write=lambda data: written.append(bytes(data)))
    writer = amqp.method_framing.frame_writer(SimpleNamespace(frame_max=131072, bytes_sent=0), transport)
    plan = [(5, True), (2**33, False)]
    for tag, multiple in plan:
        writer(1, 3, (60, 80), amqp.serialization.dumps("Lb", (tag, multiple)), None)
    assert wire.ack_frames(3, plan) == b"".join(written)
    assert wire.ack_frames(3, []) == b""


def test_confirm_of_reads_tag_and_multiple() -> None:
    assert wire.confirm_of(wire.ACK + (2**40).to_bytes(8, "big") + b"\x01") == (2**40, True)
    assert wire.confirm_of(wire.NACK + (7).to_bytes(8, "big") + b"\x02") == (7, False)  # requeue, not multiple


def test_a_tls_connection_keeps_py_amqps_path() -> None:
    tls = Broker("amqps://guest:guest@127.0.0.1:5671//", connect_timeout_s=0.01)
    assert _connection(tls.url, tls.connect_timeout_s).transport_cls == "amqps"  # Kombu's, not the chunked reader
    plain = Broker("amqp://guest:guest@127.0.0.1:5672//")
    assert _connection(plain.url, 5.0).transport_cls is _KombuTransport
    assert plain.thread_link()._wire and not plain.link()._wire  # only the publisher's links write frames


# -- on RabbitMQ --------------------------------------------------------------------------------


@pytest.fixture
def rabbit() -> Iterator[tuple[KombuTransport, Names]]:
    with fresh_bus() as bus_and_names:
        yield bus_and_names


def _connect(url: str) -> amqp.Connection:
    """A bare py-amqp connection to the test's broker (another client's)."""
    parts = urlsplit(url)
    return amqp.Connection(f"{parts.hostname}:{parts.port or 5672}", userid=parts.username, password=parts.password)


def _get_all(url: str, queue: str, count: int) -> list[Any]:
    with _connect(url) as connection:
        channel = connection.channel()
        found: list[Any] = []
        for _ in range(count):
            got = channel.basic_get(queue, no_ack=True)
            assert got is not None, f"{len(found)} of {count} messages on {queue}"
            found.append(got)
        assert channel.basic_get(queue, no_ack=True) is None
        return found


def test_a_publish_arrives_with_every_property_and_is_confirmed_first(rabbit: tuple[KombuTransport, Names]) -> None:
    bus, names = rabbit
    big = bytes(range(256)) * 1000  # 256 kB: body frames of the broker's frame size
    first = bus.publish(names.topic, b'{"n": 1}', HEADERS)
    ids = bus.publish_many(names.topic, [(big, {"n": "2"}), (b"", {})])
    assert bus._broker.thread_link().confirms._wire is not None  # the wire's path, not py-amqp's
    got = _get_all(bus.url, subscription_name(names.queue, names.topic), 3)  # confirmed: all there
    assert [m.body for m in got[:2]] == [b'{"n": 1}', big]
    assert got[2].body in (b"", "")  # py-amqp reads an empty body with a content encoding as text
    assert [m.properties["message_id"] for m in got] == [first, *ids]
    assert got[0].properties["application_headers"] == HEADERS
    assert got[1].properties["application_headers"] == {"n": "2"}
    for m in got:
        assert (m.properties["delivery_mode"], m.properties["content_type"]) == (2, "application/octet-stream")
        assert m.properties["content_encoding"] == "binary"


def test_headers_the_wire_cannot_write_go_through_py_amqp(rabbit: tuple[KombuTransport, Names]) -> None:
    bus, names = rabbit
    bus.publish(names.topic, b"odd", {"count": 3})  # type: ignore[dict-item]
    [got] = _get_all(bus.url, subscription_name(names.queue, names.topic), 1)
    assert got.properties["application_headers"] == {"count": 3}


def test_a_lost_connection_fails_the_publish_and_the_next_one_reconnects() -> None:
    url = server_url("amqp")
    names = Names.fresh()
    parts = urlsplit(url)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as proxy:
        bus = KombuTransport(proxy.route(url))
        try:
            bus.provision(names.queue, [names.topic], [])
            bus.publish(names.topic, b"before", {})
            connections = proxy.accepted
            proxy.cut()
            with pytest.raises(PublishError, match="publish to") as raised:
                bus.publish(names.topic, b"lost", {})
            assert isinstance(raised.value, TransportError)
            proxy.restore()
            bus.publish(names.topic, b"after", {})
            assert proxy.accepted == connections + 1  # the publisher connected again
        finally:
            bus.close()
    got = _get_all(url, subscription_name(names.queue, names.topic), 2)
    assert [m.body for m in got] == [b"before", b"after"]
    cleanup(url, [names.queue], [names.topic])


def test_a_refusal_and_a_missing_topic_leave_the_publisher_usable(rabbit: tuple[KombuTransport, Names]) -> None:
    bus, names = rabbit
    with pytest.raises(PublishError, match="does not exist"):
        bus.publish(f"never-{uuid.uuid4().hex[:8]}", b"nowhere", {})
    bus.publish(names.topic, b"after", {})
    assert [m.body for m in _get_all(bus.url, subscription_name(names.queue, names.topic), 1)] == [b"after"]


def test_a_consumer_reads_usual_deliveries_itself_and_unusual_ones_through_py_amqp(
    rabbit: tuple[KombuTransport, Names], monkeypatch: pytest.MonkeyPatch
) -> None:
    bus, names = rabbit
    read: list[dict[str, Any] | None] = []  # what the consumer's own reading made of each delivery

    def properties_of(header: bytes) -> dict[str, Any] | None:
        read.append(wire.properties_of(header))
        return read[-1]

    monkeypatch.setattr(_kombu_consumer, "properties_of", properties_of)
    bus.publish_many(names.topic, [(b"ours", {"hedwig_id": "1"})])
    with _connect(bus.url) as connection:  # another publisher
        channel = connection.channel()
        odd = amqp.Message(b"theirs", priority=4, application_headers={"hedwig_id": "2", "x-list": [1]})
        channel.basic_publish(odd, exchange=f"hedwig-{names.topic}", routing_key="")
    consumer = bus.consumer(names.queue, [names.topic])
    taken: list[Any] = []
    try:
        while len(taken) < 2:
            taken += consumer.receive(2, wait_s=5)
        ours, theirs = taken
        assert (ours.body, ours.attributes, ours.attempt, ours.fault) == (b"ours", {"hedwig_id": "1"}, 1, "")
        assert (theirs.body, theirs.attributes) == (b"theirs", {"hedwig_id": "2"})
        assert theirs.fault == "headers that are not text: x-list (list)"  # as py-amqp read it
        assert read[0] is not None and read[1] is None  # ours read here; theirs left to py-amqp
        consumer.ack(taken)
    finally:
        consumer.close()
