"""The RabbitMQ hot path: draining against a plain pika loop, publishing against Dramatiq.

Both comparisons run in one process, round after round, the order of the contenders rotated
each round; every figure is the median over the rounds, with the spread (lowest and highest
round ratio) beside it. Within a publish round the publishers take turns, ``--batch`` messages
each (the order rotated every turn), so that all of them see the same load on a shared machine.

Drain (``drain``): ``--messages`` valid ``user-created`` messages wait in a subscription queue
before the consumer starts; the clock runs from the first message handled to the last, as seen
by the bench polling a file that the handler appends one byte to per message (the same on both
sides: the handlers are otherwise no-ops). Worker CPU per message is the process's user+system
time over that span (``/proc/<pid>/stat``) divided by the messages.

* ``hedwig``: one ``hedwig-tasks worker`` process, ``-c 4 --prefetch 12`` (16 held), schema
  validation on, acks after the handler, leases kept.
* ``pika``: a plain loop in a process of its own: ``pika.BlockingConnection``,
  ``basic_qos(prefetch_count=16)`` (the same 16 held), ``basic_consume`` with manual acks,
  ``json.loads`` of the body, the byte, ``basic_ack``. No validation, no framework.

Publish (``publish`` and ``publish_many``): one thread of this process sends ``--messages``
messages to a durable queue nobody consumes, persistent, with publisher confirms on both sides.

* ``hedwig``: ``Hedwig.publish()`` per message (validated, encoded, routed; returns once
  RabbitMQ confirmed that message).
* ``hedwig_many``: the app encodes and validates each message, and the transport's
  ``publish_many`` sends ``--batch`` at a time (returns once RabbitMQ confirmed every one).
* ``transport`` (not a contender): the transport's ``publish`` alone, of one message the app
  encoded once: what ``hedwig`` costs without the app's validating and encoding.
* ``dramatiq``: ``RabbitmqBroker(confirm_delivery=True)`` with its default middleware, and
  ``actor.send()`` per message (returns once RabbitMQ confirmed that message); Dramatiq has no
  batch send.
* ``floor`` (not a contender): py-amqp's bare ``basic_publish`` of a persistent message on a
  confirm channel, waiting for each confirm. ``publish`` reports hedwig-tasks's rate over it as
  ``ratio_to_floor``.
* ``broker`` (not a contender, RabbitMQ's own time): the frames of a small persistent message,
  built once, written to a bare socket and read back to the ``basic.ack``: no client library.
  ``us_per_publish`` gives each publisher's microseconds per confirmed message: ``broker``'s is
  RabbitMQ's round trip (it writes a persistent message before confirming it), and the rest of
  any other's is what that client adds.

Usage::

    python bench/rabbitmq.py [--messages 10000] [--rounds 3] [--batch 100]

Progress goes to stderr; stdout gets ONE JSON line, ``{"bench": "rabbitmq", ...,
"comparisons": [{"name": "drain", "ratio": .., "target": 0.7, ...}, {"name": "publish", ...},
{"name": "publish_many", ...}]}``, each ``ratio`` hedwig-tasks's median rate over the
reference's. The broker comes from ``HEDWIG_TEST_AMQP_URL`` or the local default.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# bench/kombu.py is named like the library: never let ``import kombu`` find it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import kombu  # noqa: E402

from hedwig_tasks import Hedwig  # noqa: E402

URL = os.environ.get("HEDWIG_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
CONCURRENCY, PREFETCH = 4, 12
HELD = CONCURRENCY + PREFETCH

SCHEMA = {
    "id": "https://hedwig-tasks.bench/schema",
    "$schema": "http://json-schema.org/draft-04/schema",
    "schemas": {
        "user-created": {
            "1.*": {
                "type": "object",
                "x-version": "1.0",
                "required": ["user_id", "email"],
                "properties": {"user_id": {"type": "string"}, "email": {"type": "string", "minLength": 3}},
            }
        }
    },
}

HEDWIG_APP = """
import os
from hedwig_tasks import Hedwig

hedwig = Hedwig(os.environ["BENCH_APP"], schema=os.environ["BENCH_SCHEMA"],
                routing={"user-created": os.environ["BENCH_TOPIC"]})
DONE = os.open(os.environ["BENCH_DONE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)

@hedwig.handler("user-created", "1.*")
def user_created(message):
    os.write(DONE, b".")
"""

PIKA_LOOP = """
import json, os, sys
import pika

DONE = os.open(os.environ["BENCH_DONE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
connection = pika.BlockingConnection(pika.URLParameters(os.environ["BENCH_URL"]))
channel = connection.channel()
channel.basic_qos(prefetch_count=int(os.environ["BENCH_HELD"]))

def on_message(channel, method, properties, body):
    json.loads(body)
    os.write(DONE, b".")
    channel.basic_ack(method.delivery_tag)

channel.basic_consume(os.environ["BENCH_QUEUE"], on_message, auto_ack=False)
channel.start_consuming()
"""


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _data(n: int) -> dict[str, str]:
    return {"user_id": f"U{n}", "email": "u@example.com"}


def _pika_url(url: str) -> str:
    """Kombu's ``//`` (the vhost ``/``) as pika spells it."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/%2F")) if parts.path in ("", "/", "//") else url


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Fixture:
    """An app with a subscription of its own on the broker, filled with valid messages."""

    def __init__(self, workdir: Path, side: str) -> None:
        self.workdir = workdir
        self.tag = f"bench-{side}-{uuid.uuid4().hex[:8]}"
        self.app = Hedwig(self.tag, schema=workdir / "schema.json", transport=URL, routing={"user-created": self.tag})
        self.app.handler("user-created", "1.*")(lambda message: None)
        self.app.provision()
        self.queue = f"hedwig-{self.tag}-{self.tag}"
        self.done = workdir / f"{self.tag}.done"
        self.done.touch()

    def fill(self, messages: int, batch: int = 500) -> None:
        for start in range(0, messages, batch):
            chunk = range(start, min(messages, start + batch))
            encoded = [self.app.encode(self.app.message("user-created", "1.0", _data(n))) for n in chunk]
            self.app.transport.publish_many(self.tag, encoded)

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "BENCH_APP": self.tag,
            "BENCH_TOPIC": self.tag,
            "BENCH_QUEUE": self.queue,
            "BENCH_URL": _pika_url(URL),
            "BENCH_HELD": str(HELD),
            "BENCH_SCHEMA": str(self.workdir / "schema.json"),
            "BENCH_DONE": str(self.done),
            "HEDWIG_TRANSPORT_URL": URL,
            "PYTHONPATH": os.pathsep.join([str(self.workdir), *sys.path[1:]]),
        }

    def drain(self, command: list[str], messages: int) -> tuple[float, float]:
        """Run ``command`` until it handled every message: (messages per second, CPU µs per message)."""
        log_file = (self.workdir / f"{self.tag}.log").open("wb")
        process = subprocess.Popen(command, env=self.env(), cwd=self.workdir, stdout=log_file, stderr=log_file)
        try:
            self._wait(process, 1, 60)
            started, cpu = time.perf_counter(), _cpu_s(process.pid)
            self._wait(process, messages, 600)
            elapsed, used = time.perf_counter() - started, _cpu_s(process.pid) - cpu
            return (messages - 1) / elapsed, used / (messages - 1) * 1e6
        finally:
            process.terminate()
            process.wait(30)
            log_file.close()

    def _wait(self, process: subprocess.Popen[bytes], count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.done.stat().st_size < count:
            if process.poll() is not None:
                output = (self.workdir / f"{self.tag}.log").read_text(errors="replace")
                raise SystemExit(f"{self.tag}: the consumer exited with {process.returncode}:\n{output}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.tag}: {self.done.stat().st_size} of {count} handled in {timeout_s:.0f}s")
            time.sleep(0.001)

    def close(self) -> None:
        self.app.transport.close()
        _cleanup([self.queue, f"hedwig-{self.tag}-dlq"], [f"hedwig-{self.tag}"])


def drain_hedwig(workdir: Path, messages: int) -> tuple[float, float]:
    fixture = Fixture(workdir, "drain-hedwig")
    try:
        fixture.fill(messages)
        command = [sys.executable, "-m", "hedwig_tasks", "worker", "-A", "hedwig_bench_app", "-l", "WARNING"]
        return fixture.drain([*command, "-c", str(CONCURRENCY), "--prefetch", str(PREFETCH)], messages)
    finally:
        fixture.close()


def drain_pika(workdir: Path, messages: int) -> tuple[float, float]:
    fixture = Fixture(workdir, "drain-pika")
    try:
        fixture.fill(messages)
        return fixture.drain([sys.executable, str(workdir / "pika_loop.py")], messages)
    finally:
        fixture.close()


#: A publisher opened for a round: ``send(numbers)`` publishes those messages, ``close()`` cleans up.
Opened = tuple[Callable[[range], None], Callable[[], None]]


def open_hedwig(workdir: Path, batch: int) -> Opened:
    fixture = Fixture(workdir, "publish-hedwig")
    app = fixture.app
    app.publish("user-created", "1.0", _data(-1))  # connects

    def send(numbers: range) -> None:
        for n in numbers:
            app.publish("user-created", "1.0", _data(n))

    return send, fixture.close


def open_transport(workdir: Path, batch: int) -> Opened:
    """hedwig-tasks's transport alone: ``publish`` of a message the app encoded once (no app work)."""
    fixture = Fixture(workdir, "publish-transport")
    app = fixture.app
    body, attributes = app.encode(app.message("user-created", "1.0", _data(0)))
    app.transport.publish(fixture.tag, body, attributes)

    def send(numbers: range) -> None:
        for _ in numbers:
            app.transport.publish(fixture.tag, body, attributes)

    return send, fixture.close


def open_hedwig_many(workdir: Path, batch: int) -> Opened:
    fixture = Fixture(workdir, "publish-many")
    app = fixture.app
    app.publish("user-created", "1.0", _data(-1))

    def send(numbers: range) -> None:
        for start in range(numbers.start, numbers.stop, batch):
            chunk = range(start, min(numbers.stop, start + batch))
            app.transport.publish_many(
                fixture.tag, [app.encode(app.message("user-created", "1.0", _data(n))) for n in chunk]
            )

    return send, fixture.close


def open_dramatiq(workdir: Path, batch: int) -> Opened:
    import dramatiq
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    queue = f"bench-dramatiq-{uuid.uuid4().hex[:8]}"
    broker = RabbitmqBroker(url=_pika_url(URL), confirm_delivery=True)

    @dramatiq.actor(broker=broker, queue_name=queue)
    def user_created(user_id: str, email: str) -> None:
        pass

    user_created.send(**_data(-1))  # connects and declares

    def send(numbers: range) -> None:
        for n in numbers:
            user_created.send(**_data(n))

    def close() -> None:
        broker.close()
        _cleanup([queue, f"{queue}.DQ", f"{queue}.XQ"], [])

    return send, close


def open_floor(workdir: Path, batch: int) -> Opened:
    """The least py-amqp does: its ``basic_publish`` and a wait for the confirm, per message."""
    import amqp

    queue = f"bench-floor-{uuid.uuid4().hex[:8]}"
    parts = urlsplit(URL)
    connection = amqp.Connection(
        f"{parts.hostname}:{parts.port or 5672}",
        userid=parts.username or "guest",
        password=parts.password or "guest",
        confirm_publish=True,
    )
    connection.connect()
    channel = connection.channel()
    channel.queue_declare(queue, durable=True, auto_delete=False)
    body = json.dumps(_data(0)).encode()
    channel.basic_publish(amqp.Message(body, delivery_mode=2), routing_key=queue)

    def send(numbers: range) -> None:
        for _ in numbers:
            channel.basic_publish(amqp.Message(body, delivery_mode=2), routing_key=queue)

    def close() -> None:
        connection.close()
        _cleanup([queue], [])

    return send, close


def open_broker(workdir: Path, batch: int) -> Opened:
    """RabbitMQ's own time: prebuilt frames of a persistent message written to a socket, read to the confirm."""
    queue = f"bench-broker-{uuid.uuid4().hex[:8]}"
    link = _RawAMQP(URL)
    link.call(50, 10, b"\x00\x00" + _short(queue) + b"\x02\x00\x00\x00\x00", 11)  # durable queue
    body = json.dumps(_data(0)).encode()
    method = _frame(1, 1, b"\x00\x3c\x00\x28\x00\x00" + _short("") + _short(queue) + b"\x01")
    header = _frame(2, 1, struct.pack(">HHQH", 60, 0, len(body), 0x1000) + b"\x02")  # delivery mode 2
    message = method + header + _frame(3, 1, body)
    link.sock.sendall(message)
    link.expect(60, 80)

    def send(numbers: range) -> None:
        for _ in numbers:
            link.sock.sendall(message)
            link.expect(60, 80)

    def close() -> None:
        link.sock.close()
        _cleanup([queue], [])

    return send, close


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"


def _short(text: str) -> bytes:
    return bytes((len(text.encode()),)) + text.encode()


class _RawAMQP:
    """An AMQP 0-9-1 connection spoken over a bare socket: channel 1 open, in confirm mode."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.sock.sendall(b"AMQP\x00\x00\x09\x01")
        self.expect(10, 10)
        login = f"\x00{parts.username or 'guest'}\x00{parts.password or 'guest'}".encode()
        plain = b"\x00\x00\x00\x00" + _short("PLAIN") + struct.pack(">I", len(login)) + login + _short("en_US")
        tune = self.call(10, 11, plain, 30, channel=0)
        self.send(0, 10, 31, tune[4:10] + b"\x00\x00")  # channel max and frame max as offered, no heartbeat
        vhost = parts.path[1:] if parts.path not in ("", "/", "//") else "/"
        self.call(10, 40, _short(vhost) + _short("") + b"\x00", 41, channel=0)
        self.call(20, 10, _short(""), 11)
        self.call(85, 10, b"\x00", 11)  # confirm.select

    def send(self, channel: int, class_id: int, method_id: int, args: bytes) -> None:
        self.sock.sendall(_frame(1, channel, struct.pack(">HH", class_id, method_id) + args))

    def call(self, class_id: int, method_id: int, args: bytes, reply: int, channel: int = 1) -> bytes:
        self.send(channel, class_id, method_id, args)
        return self.expect(class_id, reply)

    def expect(self, class_id: int, method_id: int) -> bytes:
        """Read frames until the method ``class_id.method_id``; a close from the broker raises."""
        while True:
            while len(self.buffer) < 7 or len(self.buffer) < 8 + int.from_bytes(self.buffer[3:7], "big"):
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("RabbitMQ closed the connection")
                self.buffer += chunk
            size = int.from_bytes(self.buffer[3:7], "big")
            kind, payload, self.buffer = self.buffer[0], self.buffer[7 : 7 + size], self.buffer[8 + size :]
            if kind == 1 and payload[:4] == struct.pack(">HH", class_id, method_id):
                return payload
            if kind == 1 and payload[:4] in (b"\x00\x0a\x00\x32", b"\x00\x14\x00\x28"):
                raise ConnectionError(f"RabbitMQ closed: {payload[6:].decode(errors='replace')}")


PUBLISHERS: dict[str, Callable[[Path, int], Opened]] = {
    "hedwig": open_hedwig,
    "hedwig_many": open_hedwig_many,
    "transport": open_transport,
    "dramatiq": open_dramatiq,
    "floor": open_floor,
    "broker": open_broker,
}


def publish_round(workdir: Path, messages: int, batch: int, round_: int) -> dict[str, float]:
    """Every publisher's rate in one round: each sends ``batch`` messages in turn (the order
    rotated each turn) until each sent ``messages``, so all of them see the same load."""
    opened: dict[str, Opened] = {}
    spent = dict.fromkeys(PUBLISHERS, 0.0)
    try:
        for name, open_ in PUBLISHERS.items():
            opened[name] = open_(workdir, batch)
        names = list(PUBLISHERS)
        for turn, start in enumerate(range(0, messages, batch)):
            numbers = range(start, min(messages, start + batch))
            shift = (turn + round_) % len(names)
            for name in names[shift:] + names[:shift]:
                started = time.perf_counter()
                opened[name][0](numbers)
                spent[name] += time.perf_counter() - started
    finally:
        for _, close in opened.values():
            close()
    return {name: messages / spent[name] for name in PUBLISHERS}


def _cleanup(queues: list[str], exchanges: list[str]) -> None:
    with kombu.Connection(URL) as connection:
        channel = connection.channel()
        for queue in queues:
            channel.queue_delete(queue)
        for exchange in exchanges:
            try:
                channel.exchange_delete(exchange)
            except Exception:
                channel = connection.channel()


def rounds(contenders: dict[str, Callable[[], Any]], count: int, label: str) -> dict[str, list[Any]]:
    """Each contender once per round, the order rotated by one each round."""
    results: dict[str, list[Any]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_ in range(count):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            results[name].append(contenders[name]())
            log(f"{label} round {round_ + 1}: {name} {results[name][-1]}")
    return results


def comparison(name: str, ours: list[float], theirs: list[float], target: float, reference: str) -> dict[str, Any]:
    ratios = [o / t for o, t in zip(ours, theirs, strict=True)]
    return {
        "name": name,
        "reference": reference,
        "hedwig_per_s": round(statistics.median(ours), 1),
        f"{reference}_per_s": round(statistics.median(theirs), 1),
        "ratio": round(statistics.median(ours) / statistics.median(theirs), 3),
        "target": target,
        "spread": [round(min(ratios), 3), round(max(ratios), 3)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3, help="rotated rounds; figures are their medians")
    parser.add_argument("--batch", type=int, default=100, help="messages per publish_many")
    parser.add_argument("--only", choices=["drain", "publish"], help="run one of the two comparisons")
    args = parser.parse_args()
    n, batch = args.messages, args.batch
    comparisons: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hedwig-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "schema.json").write_text(json.dumps(SCHEMA))
        (workdir / "hedwig_bench_app.py").write_text(HEDWIG_APP)
        (workdir / "pika_loop.py").write_text(PIKA_LOOP)
        if args.only != "publish":
            drained = rounds(
                {"hedwig": lambda: drain_hedwig(workdir, n), "pika": lambda: drain_pika(workdir, n)},
                args.rounds,
                "drain",
            )
            row = comparison("drain", [r for r, _ in drained["hedwig"]], [r for r, _ in drained["pika"]], 0.7, "pika")
            row["hedwig_cpu_us_per_msg"] = round(statistics.median(c for _, c in drained["hedwig"]), 1)
            row["pika_cpu_us_per_msg"] = round(statistics.median(c for _, c in drained["pika"]), 1)
            comparisons.append(row)
        if args.only != "drain":
            published: dict[str, list[float]] = {name: [] for name in PUBLISHERS}
            for round_ in range(args.rounds):
                rates = publish_round(workdir, n, batch, round_)
                log(f"publish round {round_ + 1}: " + ", ".join(f"{k} {v:.0f}/s" for k, v in rates.items()))
                for name, rate in rates.items():
                    published[name].append(rate)
            row = comparison("publish", published["hedwig"], published["dramatiq"], 1.5, "dramatiq")
            for reference in ("transport", "floor", "broker"):
                row[f"{reference}_per_s"] = round(statistics.median(published[reference]), 1)
                row[f"ratio_to_{reference}"] = round(row["hedwig_per_s"] / row[f"{reference}_per_s"], 3)
            # Where one confirmed publish's time goes: RabbitMQ's round trip, then what the client adds.
            per_message_us = {name: round(1e6 / statistics.median(rates), 1) for name, rates in published.items()}
            row["us_per_publish"] = per_message_us
            comparisons.append(row)
            many = comparison("publish_many", published["hedwig_many"], published["dramatiq"], 1.5, "dramatiq")
            comparisons.append({**many, "batch": batch})
    run = {"messages": n, "rounds": args.rounds, "concurrency": CONCURRENCY, "held": HELD}
    print(json.dumps({"bench": "rabbitmq", **run, "comparisons": comparisons}))


if __name__ == "__main__":
    main()
