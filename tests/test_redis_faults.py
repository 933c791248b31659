"""The Redis Streams transport against entries it did not write and a Redis that goes away.

Odd entries are written with plain XADDs on the machine's Redis (db 9, names of the test's own);
the restart runs on a private redis-server on a free port that the test starts and stops itself.
"""

from __future__ import annotations

import functools
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from helpers import wait_for
from redis_server import cleanup, redis_url

from hedwig_tasks.exceptions import PublishError
from hedwig_tasks.testing import worker_contract
from hedwig_tasks.testing.contract import Names
from hedwig_tasks.testing.worker_contract import Fleet
from hedwig_tasks.transports.base import Consumer, Delivery
from hedwig_tasks.transports.redis import RedisTransport

#: Entries no Hedwig publisher writes, each with (part of) the fault the consumer names.
ODD_ENTRIES: list[tuple[dict[bytes, bytes], str]] = [
    ({b"data": b"no payload here"}, "no hedwig_payload field"),
    ({b"hedwig_payload": b"\xff\xfe not text"}, "hedwig_payload is not UTF-8"),
    ({b"hedwig_payload": b"{}", b"\xc3(": b"v"}, "is not UTF-8 text"),
    ({b"hedwig_payload": b"{}", b"k": b"\xc3("}, "is not UTF-8 text"),
    ({b"hedwig_payload": b"{}", b"hedwig_tasks_attempt": b"many"}, "not a whole number"),
]


@pytest.fixture
def url() -> str:
    return redis_url()


@pytest.fixture
def names(url: str) -> Iterator[Names]:
    names = Names.fresh()
    yield names
    cleanup(url, [names.queue, names.other_queue], [names.topic, names.other_topic])


@pytest.fixture
def transport(url: str) -> Iterator[RedisTransport]:
    bus = RedisTransport(url, lease_s=1.0)
    yield bus
    bus.close()


def _receive(consumer: Consumer, count: int) -> list[Delivery]:
    found: list[Delivery] = []
    deadline = time.monotonic() + 10
    while len(found) < count and time.monotonic() < deadline:
        found += consumer.receive(10, wait_s=0.5)
    assert len(found) == count
    return found


def test_unreadable_entries_come_with_a_fault_and_dead_letter_whole(transport: RedisTransport, names: Names) -> None:
    transport.provision(names.queue, [names.topic], [])
    raw = transport.link.client
    for fields, _ in ODD_ENTRIES:
        raw.xadd(f"hedwig:{names.topic}", fields)
    transport.publish(names.topic, b"fine", {"a": "b"})
    consumer = transport.consumer(names.queue, [names.topic])
    deliveries = _receive(consumer, len(ODD_ENTRIES) + 1)
    faulty = [d for d in deliveries if d.fault]
    (fine,) = [d for d in deliveries if not d.fault]
    assert (fine.body, dict(fine.attributes), fine.attempt) == (b"fine", {"a": "b"}, 1)
    for (_, expected), delivery in zip(ODD_ENTRIES, faulty, strict=True):
        assert expected in delivery.fault
        consumer.dead_letter(delivery, f"unreadable: {delivery.fault}")
    consumer.ack([fine])
    records = transport.dead_letters(names.queue)
    assert [r.reason for r in records] == [f"unreadable: {d.fault}" for d in faulty]
    assert {r.subscription for r in records} == {f"{names.queue}:{names.topic}"}
    # The dead-letter stream keeps each entry's own bytes, whatever they were.
    kept = [fields for _, fields in raw.xrange(f"hedwig:{names.queue}:dlq")]
    for (fields, _), copy in zip(ODD_ENTRIES, kept, strict=True):
        assert {k: v for k, v in copy.items() if not k.startswith(b"hedwig_tasks_")} == {
            k: v for k, v in fields.items() if k != b"hedwig_tasks_attempt"
        }
    assert transport.status(names.queue, [names.topic])[0].dead_letters == len(ODD_ENTRIES)


def test_a_settled_entry_deleted_meanwhile_is_no_trouble(transport: RedisTransport, names: Names) -> None:
    transport.provision(names.queue, [names.topic], [])
    transport.publish_many(names.topic, [(b"one", {}), (b"two", {})])
    consumer = transport.consumer(names.queue, [names.topic])
    one, two = sorted(_receive(consumer, 2), key=lambda d: d.body)
    transport.link.client.xdel(f"hedwig:{names.topic}", one.receipt.entry_id, two.receipt.entry_id)
    consumer.dead_letter(one, "gone")
    consumer.retry_later(two, 0.0)
    assert [r.reason for r in transport.dead_letters(names.queue)] == ["gone"]
    assert transport.status(names.queue, [names.topic])[0].in_flight == 0


# -- a worker meets odd entries -----------------------------------------------------------------


def test_a_worker_dead_letters_odd_entries_with_reasons_and_goes_on(url: str, tmp_path: Path) -> None:
    broker = worker_contract.Broker(url, cleanup=functools.partial(cleanup, url))
    fleet = Fleet(broker, tmp_path, lease_s=30.0, timeout_s=60.0)
    try:
        fleet.provision()
        raw = redis.Redis.from_url(url)
        for fields, _ in ODD_ENTRIES:
            raw.xadd(f"hedwig:{fleet.topic}", fields)
        raw.xadd(f"hedwig:{fleet.topic}", {"hedwig_payload": "{}", "hedwig_encoding": "base64", "x": "!"})
        raw.close()
        fleet.publish(["fine"])
        worker = fleet.worker()
        fleet.wait(lambda: "fine" in fleet.handled(), "the fine message handled")
        odd = len(ODD_ENTRIES) + 1
        fleet.wait(lambda: len(fleet.transport.dead_letters(fleet.name())) == odd, "the odd entries dead-lettered")
        assert worker.poll() is None, fleet.logs()
        assert fleet.stop(worker) == 0, fleet.logs()
        reasons = [r.reason for r in fleet.transport.dead_letters(fleet.name())]
        for _, expected in ODD_ENTRIES:
            assert any(expected in reason for reason in reasons), (expected, reasons)
        assert fleet.status().depth == 0
    finally:
        fleet.close()


# -- Redis restarts mid-run -------------------------------------------------------------------------


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
    except OSError:
        return False
    return True


def _redis_server(port: int, directory: Path) -> subprocess.Popen[bytes]:
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    command += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: _answers(port), timeout_s=10)
    return process


def _failures(log: Path) -> int:
    """How many times the worker has logged that a call to Redis failed."""
    return log.read_text().count("failed") if log.exists() else 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on this machine")
def test_redis_restart_mid_run_is_reconnected_to_and_loses_nothing(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = _redis_server(port, tmp_path)
    fleet = Fleet(worker_contract.Broker(f"redis://127.0.0.1:{port}/0"), tmp_path, lease_s=2.0, timeout_s=60.0)
    try:
        fleet.provision()
        user_ids = fleet.publish([f"slow-{n}" for n in range(40)])
        worker = fleet.worker("-c", "2", "--prefetch", "2", slow_s=0.1)
        log = tmp_path / "worker-0.log"
        fleet.wait(lambda: len(fleet.events()) >= 5, "some handled")
        failures = _failures(log)
        server.terminate()  # SIGTERM: Redis flushes its append-only file and stops
        server.wait(10)
        fleet.wait(lambda: _failures(log) > failures, "the worker saw Redis go away", 20)
        server = _redis_server(port, tmp_path)
        fleet.wait(lambda: fleet.handled() >= set(user_ids), "everything handled", 60)
        # an ack refused during the outage leaves its entry pending: the running worker takes it
        # over once its lease runs out and settles it, so wait for that before stopping
        fleet.wait(lambda: fleet.status().depth == fleet.status().in_flight == 0, "nothing left")
        assert worker.poll() is None, "the worker should have survived the restart"
        worker.send_signal(signal.SIGTERM)
        assert fleet.finish(worker) == 0, fleet.logs()
    finally:
        fleet.close()
        server.terminate()
        server.wait(10)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on this machine")
def test_a_publisher_gets_over_a_redis_restart_on_its_kept_connection(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = _redis_server(port, tmp_path)
    bus = RedisTransport(f"redis://:s3cret@127.0.0.1:{port}/0", connect_timeout_s=0.5)
    try:
        redis.Redis(port=port).config_set("requirepass", "s3cret")
        bus.provision("q", ["t"], [])
        first = [bus.publish("t", b"{}", {"n": "1"}), *bus.publish_many("t", [(b"{}", {"n": "2"})])]
        server.terminate()  # SIGTERM: Redis flushes its append-only file and stops
        server.wait(10)
        with pytest.raises(PublishError, match=f"127.0.0.1:{port}") as raised:
            bus.publish("t", b"{}", {"n": "lost"})
        assert "s3cret" not in str(raised.value)
        server = _redis_server(port, tmp_path)
        redis.Redis(port=port).config_set("requirepass", "s3cret")
        later = [bus.publish("t", b"{}", {"n": "3"}), *bus.publish_many("t", [(b"{}", {"n": "4"})])]
        server.terminate()
        server.wait(10)
        server = _redis_server(port, tmp_path)  # a restart between two publishes: no error at all
        redis.Redis(port=port).config_set("requirepass", "s3cret")
        later.append(bus.publish("t", b"{}", {"n": "5"}))
        entries = redis.Redis(port=port, password="s3cret").xrange("hedwig:t")
        assert [(e.decode(), f[b"n"]) for e, f in entries] == [
            (entry_id, str(n).encode()) for entry_id, n in zip([*first, *later], [1, 2, 3, 4, 5], strict=True)
        ]
    finally:
        bus.close()
        server.terminate()
        server.wait(10)
