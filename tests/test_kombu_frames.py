"""The Kombu transport's reading of frames already in hand (``_ChunkedTCPTransport.buffered_frame``).

A frame is taken from the read buffer only when all of it, frame end included, has arrived;
anything else is left to py-amqp's ``read_frame`` (whole-path behaviour: tests/test_kombu_workers.py).
"""

from __future__ import annotations

import struct

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
