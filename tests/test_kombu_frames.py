"""The Kombu transport's reading of frames already in hand (``_ChunkedTCPTransport.buffered_frame``
and ``buffered_delivery``, the properties ``_kombu_wire`` reads itself).

A frame is taken from the read buffer only when all of it, frame end included, has arrived;
anything else is left to py-amqp's ``read_frame`` (whole-path behaviour: tests/test_kombu_workers.py).
"""

from __future__ import annotations

import socket
import struct

import amqp
import amqp.serialization
import pytest

from hedwig_tasks.transports import _kombu_wire as wire
from hedwig_tasks.transports._kombu_link import _ChunkedTCPTransport


def _frame(frame_type: int, channel: int, payload: bytes, end: int = 0xCE) -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + bytes([end])


def _transport(buffered: bytes) -> _ChunkedTCPTransport:
    transport = _ChunkedTCPTransport.__new__(_ChunkedTCPTransport)  # no socket: only the buffer is read
    transport._read_buffer = buffered
    return transport


def test_whole_frames_are_taken_in_order_and_the_rest_kept() -> None:
    first, second = _frame(1, 1, b"method"), _frame(3, 1, b"body")
    transport = _transport(first + second + second[:5])
    assert transport.buffered_frame() == (1, 1, b"method")
    assert transport.buffered_frame() == (3, 1, b"body")
    assert transport.buffered_frame() is None  # partial: left for read_frame
    assert transport._read_buffer == second[:5]


def test_a_frame_without_its_end_octet_or_with_a_bad_one_is_left_alone() -> None:
    frame = _frame(2, 1, b"header")
    for buffered in (frame[:-1], _frame(2, 1, b"header", end=0x00), b"", frame[:7]):
        transport = _transport(buffered)
        assert transport.buffered_frame() is None
        assert transport._read_buffer == buffered


def test_an_empty_payload_heartbeat() -> None:
    transport = _transport(_frame(8, 0, b""))
    assert transport.buffered_frame() == (8, 0, b"")
    assert transport._read_buffer == b""


# -- whole deliveries (``buffered_delivery``) and their properties (``_kombu_wire.properties_of``) --


def _delivery(channel: int, body: bytes, *, frame_max: int = 131072, **properties: object) -> bytes:
    """A ``basic.deliver`` as RabbitMQ writes it: method, content header, body frames."""
    args = amqp.serialization.dumps("sLbss", ("ctag-1", 7, True, "hedwig-t", "t"))
    header = struct.pack(">HHQ", 60, 0, len(body)) + amqp.Message(body, **properties)._serialize_properties()
    chunk = frame_max - 8
    bodies = b"".join(_frame(3, channel, body[i : i + chunk]) for i in range(0, len(body), chunk))
    return _frame(1, channel, wire.DELIVER + args) + _frame(2, channel, header) + bodies


def test_a_whole_delivery_is_taken_with_its_body_joined_and_the_rest_kept() -> None:
    body = bytes(range(256)) * 20
    second = _delivery(1, b"next", message_id="m2")
    transport = _transport(_delivery(1, body, frame_max=1024, message_id="m1") + second[:10])
    method, header, found = transport.buffered_delivery(1) or (b"", b"", b"")
    assert found == body
    assert wire.deliver_args(method) == ("ctag-1", 7, True)
    assert wire.properties_of(header) == {"message_id": "m1"}
    assert transport.buffered_delivery(1) is None  # partial: nothing taken
    assert transport._read_buffer == second[:10]


def test_anything_but_a_whole_delivery_on_the_channel_is_left_to_py_amqp() -> None:
    whole = _delivery(1, b"body")
    for buffered in (whole[:-1], _delivery(2, b"body"), _frame(1, 1, b"\x00\x3c\x00\x50" + bytes(9)), b""):
        transport = _transport(buffered)
        assert transport.buffered_delivery(1) is None
        assert transport._read_buffer == buffered
    empty = _transport(_delivery(1, b""))
    assert empty.buffered_delivery(1) is not None and empty._read_buffer == b""  # no body frame at all


@pytest.mark.parametrize(
    "properties",
    [
        {"content_type": "application/octet-stream", "content_encoding": "binary", "delivery_mode": 2},
        {"application_headers": {"hedwig_id": "café", "x-hedwig-attempts": 3, "": ""}, "message_id": "m"},
        {"expiration": "2500", "application_headers": {}},
        {},
        {  # every property our publishes carry, in the order they are read
            "content_type": "application/octet-stream",
            "content_encoding": "binary",
            "application_headers": {"hedwig_id": "x", "x-hedwig-attempts": 2},
            "delivery_mode": 2,
            "message_id": "id-1",
        },
    ],
)
def test_usual_properties_read_as_py_amqp_reads_them(properties: dict[str, object]) -> None:
    serialized = amqp.Message(b"", **properties)._serialize_properties()
    header = struct.pack(">HHQ", 60, 0, 0) + serialized
    assert wire.properties_of(header) == amqp.serialization.decode_properties_basic(serialized, 0)[0]


@pytest.mark.parametrize(
    "properties",
    [
        {"priority": 5},
        {"application_headers": {"x-death": [{"count": 1}]}},
        {"application_headers": {"big": 2**40}},
        {"application_headers": {"flag": True}},
        {"timestamp": 1700000000},
        {
            "content_type": "a",
            "content_encoding": "b",
            "delivery_mode": 2,
            "message_id": "m",
            "application_headers": {"x-death": [{"count": 1}]},
        },  # ours, but with a header of another type
    ],
)
def test_unusual_properties_are_left_to_py_amqp(properties: dict[str, object]) -> None:
    header = struct.pack(">HHQ", 60, 0, 0) + amqp.Message(b"", **properties)._serialize_properties()
    assert wire.properties_of(header) is None


def test_fill_takes_what_arrived_without_waiting_and_says_when_the_broker_closed() -> None:
    ours, theirs = socket.socketpair()
    try:
        transport = _transport(b"")
        transport.sock = ours
        assert not transport.fill() and not transport.holding()  # nothing arrived: no wait
        delivery = _delivery(1, b"body")
        theirs.sendall(delivery[:20])
        assert transport.fill() and transport.holding()
        assert transport.buffered_delivery(1) is None  # a part of one
        theirs.sendall(delivery[20:])
        assert transport.fill()
        assert transport.buffered_delivery(1) is not None and not transport.holding()
        theirs.close()
        with pytest.raises(OSError, match="closed"):
            transport.fill()
    finally:
        ours.close()
        theirs.close()
