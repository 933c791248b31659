"""Fuzzing today's hand-written parsers: no bytes a message carries may make them raise.

Ground rule: no message, whatever its bytes, headers or attributes, stops a worker; the worst it
gets is the dead-letter store with a reason. Three fast paths read message bytes by hand:

- the RabbitMQ consumer's own reading of a delivery (``_kombu_wire.properties_of``, used by
  ``KombuConsumer._take_delivery``): compared with py-amqp's ``decode_properties_basic`` on
  headers py-amqp's own frame writer built, hand-built tables of every AMQP field type, and
  mutations of both (truncations, bit flips, wrong lengths, odd property flags);
- the process pool's task header (``framing.task_header`` / ``decode_header``): any strings
  round-trip;
- the JSON-Schema validator's fast JSON parse and fused checks: the same verdict as
  ``json.loads`` + jsonschema, a Message or a DecodeError and nothing else.

Plain ``random`` with fixed seeds: every run throws the same few thousand cases.
"""

from __future__ import annotations

import collections
import datetime
import decimal
import functools
import json
import math
import os
import random
import struct
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import amqp
import amqp.method_framing
import amqp.serialization
import pytest
from conftest import SCHEMA_FILE
from helpers import WorkerThread
from kombu_server import cleanup, fresh_bus, server_url

from hedwig_tasks import DecodeError, Hedwig
from hedwig_tasks.pool.framing import ACK_REPLY, FrameReader, decode_header, frame_of, task_header
from hedwig_tasks.testing.contract import Names
from hedwig_tasks.transports import _kombu_wire as wire
from hedwig_tasks.transports._kombu_consumer import KombuConsumer
from hedwig_tasks.transports._kombu_messages import Reading, body_bytes, read
from hedwig_tasks.transports._kombu_names import REASON, dlq_name
from hedwig_tasks.transports.base import Delivery
from hedwig_tasks.transports.kombu import KombuTransport
from hedwig_tasks.validators import jsonschema as jsonschema_module
from hedwig_tasks.validators.base import to_transport
from hedwig_tasks.validators.jsonschema import JSONSchemaValidator
from hedwig_tasks.worker import Worker, WorkerOptions

# -- RabbitMQ: content headers ---------------------------------------------------------------

_TEXT = "ab-x \u00e9\u2615\0\ud800\U0001f600"


def _text(rnd: random.Random, most: int = 8) -> str:
    return "".join(rnd.choice(_TEXT) for _ in range(rnd.randrange(most)))


def _value(rnd: random.Random, depth: int = 0) -> Any:
    """A header value of any type py-amqp writes."""
    makers: list[Callable[[], Any]] = [
        lambda: _text(rnd),
        lambda: rnd.randrange(-(2**31), 2**31),
        lambda: rnd.randrange(-(2**63), 2**63),
        lambda: rnd.random() * 1e6,
        lambda: rnd.random() < 0.5,
        lambda: None,
        lambda: decimal.Decimal(rnd.randrange(-999, 999)) / 10,
        lambda: datetime.datetime(2000 + rnd.randrange(50), 1, 1),
        lambda: bytes(rnd.randrange(256) for _ in range(rnd.randrange(4))),
        lambda: _text(rnd, 300),
        lambda: {_text(rnd): _value(rnd, depth + 1) for _ in range(rnd.randrange(3))},
        lambda: [_value(rnd, depth + 1) for _ in range(rnd.randrange(3))],
    ]
    return makers[rnd.randrange(len(makers) if depth < 2 else len(makers) - 2)]()


def _properties(rnd: random.Random) -> dict[str, Any]:
    """Basic properties of any kind, as another publisher may set them."""
    found: dict[str, Any] = {}
    if rnd.random() < 0.7:
        found["content_type"] = rnd.choice(["application/octet-stream", _text(rnd)])
    if rnd.random() < 0.7:
        found["content_encoding"] = rnd.choice(["binary", "utf-8", "latin-1", "nope", "a\0b", _text(rnd)])
    if rnd.random() < 0.8:
        found["application_headers"] = {_text(rnd): _value(rnd) for _ in range(rnd.randrange(5))}
    if rnd.random() < 0.7:
        found["delivery_mode"] = rnd.randrange(256)
    if rnd.random() < 0.2:
        found["priority"] = rnd.randrange(256)
    for name in ("correlation_id", "reply_to", "expiration", "message_id", "type", "user_id", "app_id", "cluster_id"):
        if rnd.random() < 0.3:
            found[name] = _text(rnd)
    if rnd.random() < 0.2:
        found["timestamp"] = datetime.datetime(2021, 1, 1)
    return found


def _py_amqp_frames(built: amqp.Message, consumer_tag: str = "ctag", tag: int = 7) -> tuple[bytes, bytes, bytes]:
    """The ``basic.deliver`` method payload, content header payload and body of ``built``, as py-amqp's
    frame writer writes them (the broker hands a publisher's content header on as it came)."""
    written: list[bytes] = []
    transport = SimpleNamespace(write=lambda data: written.append(bytes(data)))
    writer = amqp.method_framing.frame_writer(SimpleNamespace(frame_max=131072, bytes_sent=0), transport)
    writer(1, 1, (60, 60), amqp.serialization.dumps("sLbss", (consumer_tag, tag, False, "hedwig-t", "")), built)
    data, payloads, at = b"".join(written), [], 0
    while at < len(data):
        (size,) = struct.unpack_from(">I", data, at + 3)
        payloads.append(data[at + 7 : at + 7 + size])
        at += 8 + size
    method, header, *body = payloads
    return method, header, b"".join(body)


def _field(rnd: random.Random, depth: int = 0) -> bytes:
    """One table value, type letter first, of any AMQP field type (and a few no one knows)."""
    kind = rnd.choice("SsxbBUuIiLlfdDFAtTV?Z" if depth < 2 else "SsxbBUuIiLlfdDtTV")
    if kind in "Sx":
        raw = rnd.choice([_text(rnd).encode("utf-8", "surrogatepass"), bytes([rnd.randrange(256)]), b"\xff\xfe"])
        return kind.encode() + struct.pack(">I", len(raw)) + raw
    sizes = {"s": 2, "b": 1, "B": 1, "U": 2, "u": 2, "I": 4, "i": 4, "L": 8, "l": 8, "f": 4, "d": 8, "D": 5, "t": 1}
    if kind in sizes:
        return kind.encode() + bytes(rnd.randrange(256) for _ in range(sizes[kind]))
    if kind == "T":
        stamp = rnd.choice([rnd.randrange(2**31), rnd.randrange(2**64), 2**63])
        return b"T" + struct.pack(">Q", stamp)
    if kind == "F":
        return b"F" + _table(rnd, depth + 1)
    if kind == "A":
        items = b"".join(_field(rnd, depth + 1) for _ in range(rnd.randrange(3)))
        return b"A" + struct.pack(">I", len(items)) + items
    return kind.encode()  # V (void), and letters py-amqp does not know


def _table(rnd: random.Random, depth: int = 0) -> bytes:
    entries = []
    for _ in range(rnd.randrange(5)):
        key = rnd.choice([_text(rnd).encode("utf-8", "surrogatepass"), b"\xff", b"hedwig_id", b""])[:255]
        entries.append(bytes([len(key)]) + key + _field(rnd, depth))
    table = b"".join(entries)
    return struct.pack(">I", len(table)) + table


def _hand_built_header(rnd: random.Random) -> bytes:
    """A content header with a hand-built table and a few short strings, under flags properties_of reads."""
    flags = rnd.choice([0x2000, 0x2000 | 0x1000, 0xF080, 0xF180, 0x6080, 0x2000 | 0x0800])
    parts = []
    for flag in (0x8000, 0x4000, 0x2000, 0x1000, 0x0800, 0x0100, 0x0080):
        if not flags & flag:
            continue
        if flag == 0x2000:
            parts.append(_table(rnd))
        elif flag in (0x1000, 0x0800):
            parts.append(bytes([rnd.randrange(256)]))
        else:
            raw = rnd.choice(
                [b"binary", b"application/octet-stream", b"\xff", _text(rnd).encode("utf-8", "surrogatepass")]
            )
            parts.append(bytes([len(raw)]) + raw)
    return struct.pack(">HHQH", 60, 0, 1, flags) + b"".join(parts)


def _ours(rnd: random.Random) -> bytes:
    """A content header as this transport's publishes carry it (``_kombu_wire.content_header``)."""
    headers = {_text(rnd)[:200]: _text(rnd, 40) for _ in range(rnd.randrange(6))}
    expiration = rnd.choice([None, "2500", _text(rnd)])
    built = wire.content_header(rnd.randrange(100), headers, _text(rnd), expiration)
    assert built is not None
    return built


def _mutate(rnd: random.Random, header: bytes) -> bytes:
    """``header`` cut short, a bit flipped, a byte or a length changed, odd flags, or bytes put in."""
    changed = bytearray(header)
    kind = rnd.randrange(7)
    if kind == 0 and len(changed) > 14:
        del changed[rnd.randrange(14, len(changed)) :]
    elif kind == 1:
        at = rnd.randrange(12, len(changed))
        changed[at] ^= 1 << rnd.randrange(8)
    elif kind == 2:
        changed[rnd.randrange(12, len(changed))] = rnd.randrange(256)
    elif kind == 3:
        struct.pack_into(">H", changed, 12, rnd.randrange(65536))
    elif kind == 4:
        at = rnd.randrange(12, len(changed) + 1)
        changed[at:at] = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 6)))
    elif kind == 5 and len(changed) >= 18:  # a table's or string's length off by a little
        at = rnd.randrange(14, len(changed) - 3)
        (size,) = struct.unpack_from(">I", changed, at)
        struct.pack_into(">I", changed, at, max(0, min(2**32 - 1, size + rnd.randrange(-3, 4))))
    else:
        changed += bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 4)))
    return bytes(changed)


def _headers(seed: int, count: int) -> Iterator[tuple[bytes, bytes]]:
    """``count`` content headers (half of them mutated) and a body each, from py-amqp's writer,
    hand-built tables and our own publishes in turn."""
    rnd = random.Random(seed)
    for n in range(count):
        body = bytes(rnd.randrange(256) for _ in range(rnd.randrange(8)))
        source = n % 3
        if source == 0:
            try:
                _, header, body = _py_amqp_frames(amqp.Message(body, **_properties(rnd)))
            except (struct.error, ValueError, OverflowError):  # py-amqp cannot write it (a string over 255 bytes)
                continue
        elif source == 1:
            header = _hand_built_header(rnd)
        else:
            header = _ours(rnd)
        if source:  # a body as long as the header says, as the consumer's reader takes it
            body = bytes(rnd.randrange(256) for _ in range(int.from_bytes(header[4:12], "big")))
        yield (_mutate(rnd, header) if n % 2 else header), body


def _py_amqp_reads(header: bytes) -> dict[str, Any] | None:
    try:
        return amqp.serialization.decode_properties_basic(header, 12)[0]  # type: ignore[no-any-return]
    except Exception:
        return None


@pytest.mark.parametrize("seed", [1, 2])
def test_properties_of_reads_what_py_amqp_reads_or_leaves_it_to_py_amqp(seed: int) -> None:
    read_here = left = 0
    for header, _ in _headers(seed, 3000):
        found = wire.properties_of(header)  # raises nothing, whatever the bytes
        if found is None:
            left += 1
            continue
        read_here += 1
        assert found == _py_amqp_reads(header), header
    assert read_here > 500 and left > 500  # both ways taken


class _Channel:
    """A channel as ``_take_delivery`` uses it; a dispatch is what py-amqp's would do with a delivery."""

    channel_id = 1
    is_open = True

    def __init__(self) -> None:
        self.dispatched: list[Any] = []

    def dispatch_method(self, method_sig: Any, payload: bytes, message: Any) -> None:
        amqp.serialization.loads("sLbss", payload, 4)  # the arguments, read as py-amqp reads them
        encoding = message.properties.get("content_encoding")
        if encoding:  # py-amqp's auto_decode
            try:
                message.body = message.body.decode(encoding)
            except Exception:
                pass
        message.delivery_info = {"delivery_tag": 7, "redelivered": False}
        self.dispatched.append(message)


#: The ``basic.deliver`` method payload the broker sends with every delivery here.
_METHOD = wire.DELIVER + amqp.serialization.dumps("sLbss", ("ctag", 7, False, "hedwig-t", ""))


def _take(header: bytes, body: bytes) -> tuple[list[Reading], bool]:
    """What the consumer reads of a delivery of ``header`` and ``body``, and whether it read it itself."""
    consumer = SimpleNamespace(
        _tags={"ctag": "sub"}, _held_lock=threading.Lock(), _unacked=set(), _buffer=collections.deque()
    )
    channel = _Channel()
    KombuConsumer._take_delivery(consumer, channel, _METHOD, header, body)  # type: ignore[arg-type]
    itself = [message for _, message in consumer._buffer]
    assert len(itself) + len(channel.dispatched) == 1
    assert consumer._unacked == ({7} if itself else set())  # py-amqp's collector adds it otherwise
    return [read(message) for message in itself + channel.dispatched], bool(itself)


def _py_amqp_reading(header: bytes, body: bytes) -> Reading:
    message = amqp.Message(frame_method=(60, 60), frame_args=b"")
    message.inbound_header(header)
    if body:
        message.inbound_body(body)
    channel = _Channel()
    channel.dispatch_method(None, _METHOD, message)
    return read(message)


@pytest.mark.parametrize("seed", [3, 4])
def test_a_delivery_of_any_content_header_is_read_or_handed_out_with_a_fault(seed: int) -> None:
    faults = 0
    for header, body in _headers(seed, 2500):
        (reading,), itself = _take(header, body)  # raises nothing: no exception leaves the receive
        if _py_amqp_reads(header) is None:
            assert itself and "its properties cannot be read" in reading.fault
            faults += 1
        else:  # read here or by py-amqp: the same reading
            assert reading == _py_amqp_reading(header, body), header
    assert faults > 100


def test_properties_py_amqp_cannot_read_are_a_fault_not_an_exception() -> None:
    """RabbitMQ hands on a content type that is not UTF-8 (seen on a real broker) as it came;
    py-amqp's decoder raises on it, and so it did out of the consumer's receive."""
    cases = {
        b"\x80\x00\x01\xff": "UnicodeDecodeError",  # content type b"\xff"
        b"\x20\x00" + struct.pack(">I", 11) + b"\x01tT" + struct.pack(">Q", 2**63): "Error",  # a timestamp too far
        b"\x20\x00" + struct.pack(">I", 3) + b"\x01t?": "FrameSyntaxError",  # a field type no one knows
    }
    for tail, error in cases.items():
        (reading,), itself = _take(struct.pack(">HHQ", 60, 0, 1) + tail, b"x")
        assert itself and reading.body == b"x" and reading.attempt == 1
        assert reading.fault.startswith("its properties cannot be read: ") and error in reading.fault


def test_a_routing_key_py_amqp_cannot_read_is_a_fault_not_an_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    """RabbitMQ routes a publish whose routing key is bytes FF (tried on the test broker); with unusual
    properties (a priority) py-amqp's dispatch read it as UTF-8 and raised UnicodeDecodeError."""
    method = wire.DELIVER + amqp.serialization.dumps("sLb", ("ctag", 7, False)) + b"\x08hedwig-t\x01\xff"
    monkeypatch.setattr(sys.modules[__name__], "_METHOD", method)
    (reading,), itself = _take(struct.pack(">HHQH", 60, 0, 1, 0x0800) + b"\x04", b"x")
    assert itself and reading.body == b"x"
    assert reading.fault.startswith("its exchange or routing key cannot be read: UnicodeDecodeError")
    (reading,), itself = _take(struct.pack(">HHQH", 60, 0, 1, 0x1000) + b"\x02", b"x")  # read here: not looked at
    assert itself and reading.fault == ""


def test_a_text_body_with_an_encoding_name_holding_a_nul_is_a_fault() -> None:
    """``str.encode`` raises ValueError (not LookupError) for a codec name with a NUL: ``read`` let it out."""
    assert body_bytes("x", "a\0b") == (b"x", "its text body cannot be encoded back as 'a\\x00b'")


@pytest.mark.parametrize("encoding", ["binary", "a\0b", "utf-16"])
def test_a_delivery_without_body_frames_reads_as_an_empty_body(encoding: str) -> None:
    """py-amqp leaves a message whose header says 0 bytes the text body ''; with ``binary`` (ours) or a
    codec name with a NUL it read as a fault ('cannot be encoded back'), or raised, on py-amqp's path
    (an x-death array sends a retried message there)."""
    headers = {"hedwig_id": "1", "x-death": [{"count": 1}]}
    _, header, body = _py_amqp_frames(amqp.Message(b"", content_encoding=encoding, application_headers=headers))
    (reading,), itself = _take(header, body)
    assert not itself and (reading.body, reading.attributes, reading.fault) == (b"", {"hedwig_id": "1"}, "")


# -- RabbitMQ end to end -------------------------------------------------------------------------


@pytest.fixture
def rabbit() -> Iterator[tuple[KombuTransport, Names]]:
    with fresh_bus() as bus_and_names:
        yield bus_and_names


def _publish_raw(url: str, exchange: str, header: bytes, body: bytes, routing_key: bytes = b"") -> None:
    """Publish frames built by hand (what py-amqp could not write) with a bare py-amqp connection."""
    parts = urlsplit(url)
    host = f"{parts.hostname}:{parts.port or 5672}"
    with amqp.Connection(host, userid=parts.username, password=parts.password) as connection:
        channel = connection.channel()
        channel.confirm_select()
        names = bytes([len(exchange)]) + exchange.encode() + bytes([len(routing_key)]) + routing_key
        method = wire.frame(1, channel.channel_id, b"\x00\x3c\x00\x28\x00\x00" + names + b"\x00")
        connection.transport.write(wire.message_frames(method, channel.channel_id, header, body, 131072))
        channel.basic_publish(amqp.Message(b"sync"), routing_key="nowhere-" + uuid.uuid4().hex)  # confirmed after it


def test_a_delivery_py_amqp_cannot_read_is_dead_lettered_and_the_next_one_handled(
    rabbit: tuple[KombuTransport, Names],
) -> None:
    bus, names = rabbit
    odd = struct.pack(">HHQH", 60, 0, 5, 0x8000 | 0x2000) + b"\x01\xff" + struct.pack(">I", 0)
    _publish_raw(bus.url, f"hedwig-{names.topic}", odd, b"first")
    bus.publish(names.topic, b"second", {"hedwig_id": "2"})
    consumer = bus.consumer(names.queue, [names.topic])
    taken: list[Delivery] = []
    try:
        for _ in range(20):
            taken += consumer.receive(2, wait_s=1)
            if len(taken) >= 2:
                break
        first, second = taken
        assert first.body == b"first" and "its properties cannot be read: UnicodeDecodeError" in first.fault
        assert (second.body, second.attributes, second.fault) == (b"second", {"hedwig_id": "2"}, "")
        consumer.dead_letter(first, first.fault)
        consumer.ack([second])
    finally:
        consumer.close()
    parts = urlsplit(bus.url)
    with amqp.Connection(f"{parts.hostname}:{parts.port or 5672}", userid="guest", password="guest") as connection:
        dead = connection.channel().basic_get(dlq_name(names.queue), no_ack=True)
    assert dead is not None and dead.body == b"first"
    assert "its properties cannot be read" in dead.properties["application_headers"][REASON]


# -- process pool: task headers ------------------------------------------------------------------

_POOL_TEXT = [
    "",
    "\0",
    "a",
    "\u00e9",
    "\u2615",
    "\U0001f600",
    "\ud800",
    "\udcff",
    "\x7f",
    "{",
    '"',
    "\\",
    "\n",
    "x" * 70000,
]


def _pool_text(rnd: random.Random) -> str:
    return "".join(rnd.choice(_POOL_TEXT[:-1]) for _ in range(rnd.randrange(6))) + (
        _POOL_TEXT[-1] if rnd.random() < 0.01 else ""
    )


def test_a_task_header_round_trips_any_strings() -> None:
    rnd = random.Random(5)
    nul = 0
    for _ in range(4000):
        attributes = {_pool_text(rnd): _pool_text(rnd) for _ in range(rnd.randrange(5))}
        sub, tid, attempt = _pool_text(rnd), _pool_text(rnd), rnd.randrange(1, 2**40)
        limit = rnd.choice([None, 0.0, 1.5, rnd.random() * 1e9, 1e-300, math.inf])
        head = task_header(sub, attempt, tid, limit, attributes)
        nul += head[:1] == b"\0"
        expected: dict[str, Any] = {"sub": sub, "attempt": attempt, "id": tid, "attrs": attributes}
        if limit is not None:
            expected["limit"] = limit
        if head[:1] != b"\0":  # JSON: a lone high surrogate and a low one after it come back as one character
            expected = json.loads(json.dumps(expected))
        assert decode_header(head) == expected, (sub, tid, attributes)
    assert 1000 < nul < 4000  # both encodings taken


def test_a_task_header_with_a_lone_surrogate_round_trips() -> None:
    """A header py-amqp read leniently (surrogatepass) may hold a lone surrogate: the NUL-joined header
    raised UnicodeEncodeError for it on the dispatcher (strict UTF-8)."""
    attributes = {"a": "\ud800", "\udcff": "", "": "\U0001f600"}
    head = task_header("sub", 1, "id", None, attributes)
    assert head[:1] == b"\0"
    assert decode_header(head) == {"sub": "sub", "attempt": 1, "id": "id", "attrs": attributes}


def test_task_frames_through_a_pipe_come_back_whole_in_order() -> None:
    rnd = random.Random(6)
    sent = []
    read_fd, write_fd = os.pipe()
    try:
        reader = FrameReader(read_fd)
        got: list[tuple[dict[str, Any], bytes]] = []
        for n in range(300):
            attributes = {_pool_text(rnd)[:50]: _pool_text(rnd)[:50] for _ in range(rnd.randrange(4))}  # a pipe's room
            body = bytes(rnd.randrange(256) for _ in range(rnd.randrange(50)))
            head = task_header("s", n + 1, str(n), None, attributes)
            task = {"sub": "s", "attempt": n + 1, "id": str(n), "attrs": attributes}
            sent.append((task if head[:1] == b"\0" else json.loads(json.dumps(task)), body))
            os.write(write_fd, frame_of(head, body))
            got += reader.read_some() or []
        duration = b"%s%r}" % (ACK_REPLY, 1.25e-05)
        os.write(write_fd, frame_of(duration))
        while len(got) < len(sent) + 1:
            got += reader.read_some() or []
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert got[:-1] == sent
    assert got[-1] == ({"action": "ack", "duration_s": 1.25e-05}, b"")


# -- validators: the fast JSON parse and the fused checks -------------------------------------------


def _data(rnd: random.Random) -> Any:
    """Data near what the schema file's types take: right, wrong type, missing or extra fields."""

    def text() -> str:
        return rnd.choice(["", "U1", "ab", "abc", "\u00e9\u2615", "\ud800", "a" * rnd.randrange(10)])

    def value() -> Any:
        return rnd.choice([text(), 1, 1.5, None, True, [], {}, {"name": text()}, [{"name": "n"}, {}]])

    data: dict[str, Any] = {}
    for key in ("user_id", "email", "profile", "to", "subject", "attachments", "x"):
        if rnd.random() < 0.6:
            data[key] = text() if rnd.random() < 0.6 and key not in ("profile", "attachments") else value()
    return data if rnd.random() < 0.9 else rnd.choice([[], "s", 1, None])


_SCHEMAS = [
    "user-created/1.0",
    "user-created/1.2",
    "user-created/1.9",
    "user-created/2.0",
    "send_email/1.1",
    "nope/1.0",
]


def _json_mutation(rnd: random.Random, body: bytes) -> bytes:
    kind = rnd.randrange(12)
    if kind == 0:
        return body[: rnd.randrange(len(body) + 1)]
    if kind == 1 and body:
        at = rnd.randrange(len(body))
        return body[:at] + bytes([body[at] ^ (1 << rnd.randrange(8))]) + body[at + 1 :]
    if kind == 2:
        at = rnd.randrange(len(body) + 1)
        return (
            body[:at] + rnd.choice([b",", b"}", b"]", b'"', b"\\", b"\xff", b"\xed\xa0\x80", b" ", b"NaN"]) + body[at:]
        )
    if kind == 3:
        return rnd.choice([b" ", b"\n", b"\xef\xbb\xbf", b"\t"]) + body
    if kind == 4:
        return body + rnd.choice([b" ", b"\n", b"x", b"{}", b"\0"])
    if kind == 5:
        return body.decode("utf-8", "surrogatepass").encode(
            rnd.choice(["utf-16", "utf-16-le", "utf-32-be"]), "surrogatepass"
        )
    if kind == 6:
        depth = rnd.choice([10, 1000, 100000])
        return b'{"user_id":"u","x":' + b"[" * depth + b"]" * depth + b"}"
    if kind == 7:
        return b'{"user_id":' + b"9" * rnd.choice([10, 5000]) + b"}"
    if kind == 8:
        return b'{"user_id":"a","user_id":' + rnd.choice([b"1", b'"b"']) + b"}"
    if kind == 9:
        return rnd.choice([b'{"user_id":"\\ud800"}', b'{"user_id":"\\udc00\\ud800"}', b'{"user_id":Infinity}'])
    if kind == 10:
        return bytes(rnd.randrange(256) for _ in range(rnd.randrange(12)))
    return body


def _bodies(seed: int, count: int) -> Iterator[tuple[bytes, dict[str, str]]]:
    rnd = random.Random(seed)
    for _ in range(count):
        schema = f"https://hedwig-tasks.test/schema#/schemas/{rnd.choice(_SCHEMAS)}"
        data = _data(rnd)
        if rnd.random() < 0.7:  # the data as body, the meta attributes alongside
            attributes = {
                "hedwig_format_version": "1.0",
                "hedwig_id": str(uuid.UUID(int=rnd.getrandbits(128))),
                "hedwig_message_timestamp": "1795719926586",
                "hedwig_publisher": "other",
                "hedwig_schema": schema,
            }
        else:  # a container
            attributes = {}
            data = {
                "format_version": rnd.choice(["1.0", "2.0"]),
                "schema": schema,
                "id": "6a8d6c4e-5d0e-4b8e-9a59-6ad1c0d3b1f1",
                "metadata": {"timestamp": 1, "publisher": "p", "headers": rnd.choice([{}, {"a": "b"}, {"a": 1}])},
                "data": data,
            }
        body = json.dumps(data, ensure_ascii=rnd.random() < 0.5, separators=rnd.choice([(",", ":"), (", ", ": ")]))
        raw = body.encode("utf-8", "surrogatepass")
        yield (_json_mutation(rnd, raw) if rnd.random() < 0.6 else raw), attributes


def _outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "value", call()
    except RecursionError:
        return "error", RecursionError
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits
        return "error", type(exc)


def test_the_fast_json_parse_is_json_loads_on_any_bytes() -> None:
    values = 0
    for body, _ in _bodies(7, 4000):
        fast = _outcome(functools.partial(jsonschema_module._loads, body))
        slow = _outcome(functools.partial(json.loads, body))
        assert (fast[0], repr(fast[1])) == (slow[0], repr(slow[1])), body[:200]
        values += fast[0] == "value"
    assert values > 1000


def _json_loads(body: bytes) -> Any:
    return json.loads(body)


def _verdict(validator: JSONSchemaValidator, body: bytes, attributes: dict[str, str]) -> Any:
    delivery = Delivery(body, attributes, 1, None, "sub")
    try:
        message = validator.decode_delivery(body, attributes, delivery)
    except DecodeError as exc:
        return "refused", str(exc)
    return "message", (message.type, message.version, repr(message.data), message.id)


def test_a_body_of_any_bytes_decodes_as_json_loads_and_jsonschema_decide() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    fast = JSONSchemaValidator(schema)
    slow = JSONSchemaValidator(schema)
    assert any(check is not None for _, _, check in fast._checks.values())
    slow._checks = {key: (validator, minor, None) for key, (validator, minor, _) in slow._checks.items()}
    taken = collections.Counter[str]()
    for body, attributes in _bodies(8, 3000):
        got = _verdict(fast, body, attributes)  # a Message or a DecodeError, nothing else
        loads, jsonschema_module._loads = jsonschema_module._loads, _json_loads  # the reference: json.loads
        try:
            expected = _verdict(slow, body, attributes)
        finally:
            jsonschema_module._loads = loads
        assert got == expected, body[:200]
        taken[got[0]] += 1
    assert taken["message"] > 150 and taken["refused"] > 1000


def test_a_worker_dead_letters_deliveries_py_amqp_cannot_read_and_handles_the_ones_behind() -> None:
    """End to end: raw publishes RabbitMQ routes as they came (a content type of bytes FF, a table
    timestamp past time_t, a routing key of bytes FF with a priority), then good messages."""
    url = server_url("amqp")
    names = Names.fresh()
    bus = KombuTransport(url)
    app = Hedwig(names.queue, schema=SCHEMA_FILE, transport=bus, routing={"user-created": names.topic})
    handled: list[str] = []
    app.handler("user-created", "1.*")(lambda message: handled.append(message.data["user_id"]))
    try:
        app.provision()
        encoded = app.validator.encode(app.message("user-created", "1.0", {"user_id": "poisoned"}))
        body, _ = to_transport(encoded, text_only=False)
        exchange, table = f"hedwig-{names.topic}", b"\x01tT" + struct.pack(">Q", 2**63)
        _publish_raw(url, exchange, struct.pack(">HHQH", 60, 0, len(body), 0x8000) + b"\x01\xff", body)
        _publish_raw(url, exchange, struct.pack(">HHQHI", 60, 0, len(body), 0x2000, len(table)) + table, body)
        _publish_raw(url, exchange, struct.pack(">HHQHB", 60, 0, len(body), 0x0800, 4), body, routing_key=b"\xff")
        good = [f"good-{n}" for n in range(4)]
        for user_id in good:
            app.publish("user-created", "1.0", {"user_id": user_id})
        worker = Worker(app, WorkerOptions(burst=True, concurrency=2, prefetch=4, wait_s=0.2))
        runner = WorkerThread(worker)
        runner.thread.join(30)
        runner.stop()  # re-raises what the worker raised
        assert sorted(handled) == good
        reasons = sorted(record.reason for record in bus.dead_letters(names.queue))
        assert len(reasons) == 3 and all(r.startswith("unreadable delivery: ") for r in reasons), reasons
        assert "its exchange or routing key cannot be read: UnicodeDecodeError" in reasons[0]
        assert "its properties cannot be read: " in reasons[1] and "its properties cannot be read: " in reasons[2]
        assert worker.counts["dead_lettered"] == 3
    finally:
        app.close()
        cleanup(url, [names.queue], [names.topic])
