"""The SQLite transport: the shared contract, plus what only a file shared by processes can show."""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hedwig_tasks.exceptions import ConfigurationError, PublishError, TransportError
from hedwig_tasks.testing.contract import ContractClock, RealClock, TransportContract
from hedwig_tasks.transports import _sqlite_acks as sqlite_acks
from hedwig_tasks.transports import _sqlite_consumer as sqlite_consumer
from hedwig_tasks.transports import _sqlite_sql as sqlite_sql
from hedwig_tasks.transports import from_url
from hedwig_tasks.transports.base import Consumer
from hedwig_tasks.transports.sqlite import DEFAULT_LEASE_S, SQLiteTransport


class TestSQLiteTransport(TransportContract):
    quiet_s = 0.05
    deliver_timeout_s = 5.0

    @pytest.fixture
    def transport(self, clock: ContractClock, tmp_path: Path) -> Iterator[SQLiteTransport]:
        bus = SQLiteTransport(tmp_path / "bus.db", lease_s=self.lease_s, clock=clock)
        yield bus
        bus.close()


class TestSQLiteTransportRealTime(TestSQLiteTransport):
    """The lease tests again on the wall clock, as a broker that keeps its own time would run them."""

    lease_s = 0.5

    @pytest.fixture
    def clock(self) -> ContractClock:
        return RealClock()


# Only the tests that move time run again on the wall clock; the rest are not collected twice.
for _name, _test in vars(TransportContract).items():
    if _name.startswith("test_") and "clock" not in inspect.signature(_test).parameters:
        setattr(TestSQLiteTransportRealTime, _name, None)


# -- URLs and construction ---------------------------------------------------------------------


def test_url_paths_relative_and_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = from_url("sqlite:///sub/bus.db")
    absolute = from_url(f"sqlite:///{tmp_path}/abs/bus.db")
    assert isinstance(relative, SQLiteTransport)
    assert isinstance(absolute, SQLiteTransport)
    assert relative.path == tmp_path / "sub" / "bus.db"
    assert absolute.path == tmp_path / "abs" / "bus.db"
    assert relative.lease_s == DEFAULT_LEASE_S


def test_url_options(tmp_path: Path) -> None:
    bus = SQLiteTransport.from_url(f"sqlite:///{tmp_path}/bus.db?lease_s=2.5&busy_timeout_s=1")
    assert (bus.lease_s, bus.busy_timeout_s) == (2.5, 1.0)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("sqlite:///bus.db?lease=3&visibility_s=1&lease_s=2", "unknown sqlite option 'lease'; did you mean lease_s?"),
        ("sqlite:///bus.db?lease_s=soon", "lease_s='soon'"),
        ("sqlite:///bus.db?lease_s=0", "lease_s='0'"),
        ("sqlite://host/bus.db", "expected sqlite:///"),
        ("sqlite:///", "expected sqlite:///"),
        ("sqlite:///:memory:", "memory://"),
    ],
)
def test_bad_urls_are_refused(url: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        SQLiteTransport.from_url(url)
    assert complaint in str(caught.value)


def test_construction_touches_nothing_and_repr_shows_the_path(tmp_path: Path) -> None:
    bus = from_url(f"sqlite:///{tmp_path}/lazy/dir/bus.db?lease_s=5")
    assert not (tmp_path / "lazy").exists()
    assert repr(bus) == f"<SQLiteTransport {str(tmp_path / 'lazy/dir/bus.db')!r}>"
    bus.provision("q", ["t"], [])
    assert (tmp_path / "lazy" / "dir" / "bus.db").is_file()
    bus.close()


def test_repr_shows_the_absolute_path_of_a_relative_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    bus = from_url("sqlite:///.hedwig/bus.db")
    monkeypatch.chdir(tmp_path.parent)  # a later chdir changes neither the file nor what repr says
    assert repr(bus) == f"<SQLiteTransport {str(tmp_path / '.hedwig' / 'bus.db')!r}>"


def test_dry_run_on_a_new_file_does_not_create_it(tmp_path: Path) -> None:
    bus = SQLiteTransport(tmp_path / "bus.db")
    assert bus.provision("q", ["t"], ["u"], dry_run=True) == ["create topic u", "create topic t", "subscribe q to t"]
    assert not (tmp_path / "bus.db").exists()


def test_driver_errors_become_transport_errors(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("a file where a directory should be")
    bus = SQLiteTransport(tmp_path / "not-a-dir" / "bus.db")
    with pytest.raises(TransportError) as caught:
        bus.status("q", ["t"])
    assert caught.value.__cause__ is not None
    with pytest.raises(PublishError):
        bus.publish("t", b"x", {})


# -- the file ----------------------------------------------------------------------------------


def test_wal_mode_is_on(tmp_path: Path) -> None:
    bus = SQLiteTransport(tmp_path / "bus.db")
    bus.provision("q", ["t"], [])
    bus.close()
    with sqlite3.connect(tmp_path / "bus.db") as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    raw.close()


def test_messages_survive_reopening(tmp_path: Path) -> None:
    bus = SQLiteTransport(tmp_path / "bus.db")
    bus.provision("q", ["t"], [])
    bus.publish_many("t", [(b"kept", {"a": "1"}), (b"leased", {"a": "2"}), (b"dead", {"a": "3"})])
    consumer = bus.consumer("q", ["t"])
    kept, _leased, dead = consumer.receive(3, wait_s=0)
    consumer.release([kept])
    consumer.dead_letter(dead, "bad")
    bus.close()

    reopened = SQLiteTransport(tmp_path / "bus.db", clock=lambda: time.time() + DEFAULT_LEASE_S + 1)
    found = reopened.consumer("q", ["t"]).receive(10, wait_s=0)
    assert sorted((d.body, d.attempt) for d in found) == [(b"kept", 2), (b"leased", 2)]
    assert [(r.body, r.reason) for r in reopened.dead_letters("q")] == [(b"dead", "bad")]
    assert reopened.provision("q", ["t"], []) == []
    reopened.close()


def test_requeue_works_in_chunks(tmp_path: Path) -> None:
    bus = SQLiteTransport(tmp_path / "bus.db")
    bus.provision("q", ["t"], [])
    bus.publish_many("t", [(str(i).encode(), {}) for i in range(1200)])
    consumer = bus.consumer("q", ["t"])
    for delivery in consumer.receive(1000, wait_s=0) + consumer.receive(1000, wait_s=0):
        consumer.dead_letter(delivery, "x")
    calls: list[tuple[int, int | None]] = []
    assert bus.requeue_dead_letters("q", limit=1100, progress=lambda *a: calls.append(a)) == 1100
    assert calls == [(500, 1100), (1000, 1100), (1100, 1100)]
    assert bus.status("q", ["t"])[0].depth == 1100
    bus.close()


def test_close_then_use_reconnects(tmp_path: Path) -> None:
    bus = SQLiteTransport(tmp_path / "bus.db")
    bus.provision("q", ["t"], [])
    bus.close()
    bus.publish("t", b"after close", {})
    assert [d.body for d in bus.consumer("q", ["t"]).receive(1, wait_s=0)] == [b"after close"]
    bus.close()


def files_open_on(bus_file: Path) -> list[str]:
    """What this process holds open of the bus file (and its -wal and -shm), from /proc."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd listing the directory itself is gone by now
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(bus_file)):
                found.append(target)
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_a_threads_connection_is_closed_when_the_thread_ends(tmp_path: Path) -> None:
    bus = SQLiteTransport(tmp_path / "bus.db")
    bus.provision("q", ["t"], [])
    bus.close()
    assert files_open_on(bus.path) == []
    threads = [threading.Thread(target=bus.publish, args=("t", b"x", {})) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert files_open_on(bus.path) == []  # a worker's threads leave nothing open behind them
    assert bus.status("q", ["t"])[0].depth == 3
    assert files_open_on(bus.path) != []  # this thread's connection stays open until close()
    bus.close()
    assert files_open_on(bus.path) == []


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_a_dropped_transport_closes_its_connections(tmp_path: Path) -> None:
    path = tmp_path / "bus.db"
    buses = [SQLiteTransport(path)]  # the only reference, so that clearing it drops the transport
    buses[0].provision("q", ["t"], [])
    ready, done = threading.Event(), threading.Event()

    def hold_a_connection() -> None:
        buses[0].publish("t", b"x", {})
        ready.set()
        done.wait(10)

    holder = threading.Thread(target=hold_a_connection)
    holder.start()
    ready.wait(10)
    assert files_open_on(path) != []
    buses.clear()
    gc.collect()
    assert files_open_on(path) == []  # this thread's connection and the live thread's alike
    done.set()
    holder.join()


def test_threads_publishing_and_receiving_at_once(tmp_path: Path) -> None:
    bus = SQLiteTransport(tmp_path / "bus.db")
    bus.provision("q", ["t"], [])
    consumer = bus.consumer("q", ["t"])
    got: list[bytes] = []

    def publish(start: int) -> None:
        for i in range(start, start + 200, 20):
            bus.publish_many("t", [(f"{n:04d}".encode(), {}) for n in range(i, i + 20)])

    def drain() -> None:
        deadline = time.monotonic() + 10
        while len(got) < 800 and time.monotonic() < deadline:
            batch = consumer.receive(50, wait_s=0.1)
            consumer.ack(batch)
            got.extend(d.body for d in batch)

    threads = [threading.Thread(target=publish, args=(n * 200,)) for n in range(4)]
    threads += [threading.Thread(target=drain)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(got) == [f"{n:04d}".encode() for n in range(800)]
    bus.close()


# -- several processes -------------------------------------------------------------------------

_WORKER = """
import json, pathlib, sys, time
from hedwig_tasks.transports.sqlite import SQLiteTransport

path, ready, go, out = sys.argv[1:]
bus = SQLiteTransport(path)
bus.status("q", ["t"])  # connect before the start line, claiming nothing
consumer = bus.consumer("q", ["t"])
pathlib.Path(ready).touch()
while not pathlib.Path(go).exists():
    time.sleep(0.005)
got = []
while batch := consumer.receive(10, wait_s=0.5):
    got += [d.body.decode() for d in batch]
    time.sleep(0.002)  # a handler's worth of work; a bare loop can hold the write lock nearly all the time
    consumer.ack(batch)
pathlib.Path(out).write_text(json.dumps(got))
"""


def _wait_for(paths: list[Path], processes: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 30
    while not all(p.exists() for p in paths):
        assert all(p.poll() is None for p in processes), "a worker process died"
        assert time.monotonic() < deadline, "worker processes did not start"
        time.sleep(0.01)


@pytest.mark.slow
def test_two_processes_claim_each_message_exactly_once(tmp_path: Path) -> None:
    bus = SQLiteTransport(tmp_path / "bus.db")
    bus.provision("q", ["t"], [])
    expected = [f"{i:04d}" for i in range(1000)]
    bus.publish_many("t", [(body.encode(), {}) for body in expected])
    ready = [tmp_path / "ready-0", tmp_path / "ready-1"]
    outs = [tmp_path / "out-0.json", tmp_path / "out-1.json"]
    go = tmp_path / "go"
    processes = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(bus.path), str(r), str(go), str(o)])
        for r, o in zip(ready, outs, strict=True)
    ]
    try:
        _wait_for(ready, processes)
        go.touch()
        assert [p.wait(timeout=60) for p in processes] == [0, 0]
    finally:
        for process in processes:
            process.kill()
    first, second = (json.loads(o.read_text()) for o in outs)
    assert first and second, "both processes should have claimed some"
    assert not set(first) & set(second)
    assert sorted(first + second) == expected
    assert bus.status("q", ["t"])[0].depth == 0
    bus.close()


# -- the hot path ------------------------------------------------------------------------------


def test_one_ack_settles_more_receipts_than_one_statement_takes(tmp_path: Path) -> None:
    bus = SQLiteTransport(tmp_path / "bus.db")
    bus.provision("q", ["t"], [])
    bus.publish_many("t", [(str(i).encode(), {}) for i in range(1000)])
    consumer = bus.consumer("q", ["t"])
    batch = consumer.receive(1000, wait_s=0)
    assert len(batch) == 1000 > sqlite_sql.ACK_CHUNK
    consumer.ack(batch)
    assert (bus.status("q", ["t"])[0].depth, bus.status("q", ["t"])[0].in_flight) == (0, 0)
    bus.close()


def test_a_stale_receipt_in_an_ack_batch_deletes_nothing_of_the_new_lease(tmp_path: Path) -> None:
    now = [1000.0]
    bus = SQLiteTransport(tmp_path / "bus.db", lease_s=10, clock=lambda: now[0])
    bus.provision("q", ["t"], [])
    bus.publish_many("t", [(b"a", {}), (b"b", {})])
    consumer = bus.consumer("q", ["t"])
    stale_a, stale_b = consumer.receive(2, wait_s=0)
    now[0] += 11  # both leases ran out
    (fresh_a,) = consumer.receive(1, wait_s=0)
    consumer.ack([stale_a, stale_b])  # a's receipt is stale; b's is still the current lease
    assert fresh_a.body == b"a" and fresh_a.attempt == 2
    assert bus.status("q", ["t"])[0].in_flight == 1  # a kept, b gone
    consumer.ack([fresh_a])
    assert bus.status("q", ["t"])[0].in_flight == 0
    bus.close()


def _rows_in(bus: SQLiteTransport) -> int:
    """Messages in the file, read on a connection of the test's own (no flush of pending acks)."""
    with contextlib.closing(sqlite3.connect(bus.path)) as connection:
        return int(connection.execute("SELECT count(*) FROM messages").fetchone()[0])


def _bus_with(tmp_path: Path, bodies: list[bytes]) -> SQLiteTransport:
    bus = SQLiteTransport(tmp_path / "bus.db")
    bus.provision("q", ["t"], [])
    bus.publish_many("t", [(body, {}) for body in bodies])
    return bus


@contextlib.contextmanager
def _write_lock_held(bus: SQLiteTransport) -> Iterator[None]:
    """Another connection holds the bus's write lock; the bus's own writers give up after 50 ms."""
    with contextlib.closing(sqlite3.connect(bus.path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        busy_timeout_s, bus.bus.busy_timeout_s = bus.bus.busy_timeout_s, 0.05
        try:
            yield
        finally:
            bus.bus.busy_timeout_s = busy_timeout_s
            other.execute("ROLLBACK")


def test_the_next_claim_deletes_what_was_acknowledged_in_its_own_transaction(tmp_path: Path) -> None:
    bus = _bus_with(tmp_path, [b"a", b"b", b"c"])
    consumer = bus.consumer("q", ["t"])
    consumer.pending_acks.delay_s = 3600  # no flusher within the test
    first = consumer.receive(2, wait_s=0)
    consumer.ack(first)
    assert _rows_in(bus) == 3  # handed over, not yet deleted
    (last,) = consumer.receive(2, wait_s=0)
    assert (last.body, _rows_in(bus)) == (b"c", 1)
    consumer.ack([last])
    consumer.close()  # deletes what no claim took
    assert _rows_in(bus) == 0
    bus.close()


def test_closing_the_transport_deletes_what_its_consumers_acknowledged(tmp_path: Path) -> None:
    bus = _bus_with(tmp_path, [b"a"])
    consumer = bus.consumer("q", ["t"])
    consumer.pending_acks.delay_s = 3600
    consumer.ack(consumer.receive(1, wait_s=0))
    bus.close()
    assert _rows_in(bus) == 0
    consumer.close()
    bus.close()


def test_an_ack_no_claim_takes_is_deleted_by_the_flusher(tmp_path: Path) -> None:
    bus = _bus_with(tmp_path, [b"a"])
    consumer = bus.consumer("q", ["t"])
    consumer.ack(consumer.receive(1, wait_s=0))
    deadline = time.monotonic() + 10
    while _rows_in(bus) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert _rows_in(bus) == 0
    consumer.close()
    bus.close()


def test_an_ack_while_the_receive_loop_waits_is_deleted_before_it_returns(tmp_path: Path) -> None:
    bus = _bus_with(tmp_path, [b"a", b"b"])
    consumer = bus.consumer("q", ["t"])
    consumer.pending_acks.delay_s = 3600
    first, second = consumer.receive(2, wait_s=0)
    consumer.ack([first])
    with consumer.pending_acks.waiting():  # as receive() while it waits: no claim is coming
        assert _rows_in(bus) == 1  # what was handed over before goes first
        consumer.ack([second])
        assert _rows_in(bus) == 0
    consumer.close()
    bus.close()


def test_a_failed_claim_keeps_the_acks_it_took(tmp_path: Path) -> None:
    bus = _bus_with(tmp_path, [b"a", b"b"])
    consumer = bus.consumer("q", ["t"])
    consumer.pending_acks.delay_s = 3600
    consumer.ack(consumer.receive(1, wait_s=0))
    with _write_lock_held(bus), pytest.raises(TransportError):
        consumer.receive(1, wait_s=0)
    assert _rows_in(bus) == 2
    consumer.close()
    assert _rows_in(bus) == 1
    bus.close()


def test_an_ack_close_cannot_delete_is_logged_not_dropped_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bus = _bus_with(tmp_path, [b"a"])
    consumer = bus.consumer("q", ["t"])
    consumer.pending_acks.delay_s = 3600
    consumer.ack(consumer.receive(1, wait_s=0))
    with _write_lock_held(bus):
        consumer.close()
    assert "1 acknowledged messages in" in caplog.text
    assert "come back when their lease runs out" in caplog.text
    assert _rows_in(bus) == 1
    bus.close()


def test_the_flusher_tries_again_after_a_failed_delete(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_acks, "RETRY_PAUSE_S", 0.01)
    bus = _bus_with(tmp_path, [b"a"])
    consumer = bus.consumer("q", ["t"])
    consumer.pending_acks.delay_s = 0.001
    (delivery,) = consumer.receive(1, wait_s=0)
    deadline = time.monotonic() + 10
    with _write_lock_held(bus):
        consumer.ack([delivery])
        while "could not delete 1 acknowledged messages" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.005)
    while _rows_in(bus) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert "could not delete 1 acknowledged messages" in caplog.text
    assert _rows_in(bus) == 0
    consumer.close()
    bus.close()


# -- wake-ups ----------------------------------------------------------------------------------

_PUBLISH = """
import sys
from hedwig_tasks.transports.sqlite import SQLiteTransport
bus = SQLiteTransport(sys.argv[1])
bus.publish("t", b"from another process", {})
bus.close()
"""


@pytest.fixture
def slow_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Polls far apart, so a receive that returns soon was woken, not polling."""
    monkeypatch.setattr(sqlite_consumer, "DEFAULT_POLL_MIN_S", 60.0)
    monkeypatch.setattr(sqlite_consumer, "DEFAULT_POLL_MAX_S", 60.0)


def _waiting(bus: SQLiteTransport, consumer: Consumer) -> tuple[threading.Thread, list[list[bytes]]]:
    """A thread blocked in ``consumer.receive``, once its wake-up socket is bound."""
    got: list[list[bytes]] = []
    thread = threading.Thread(target=lambda: got.append([d.body for d in consumer.receive(1, wait_s=60)]))
    thread.start()
    deadline = time.monotonic() + 10
    while not list(bus.wake.directory.glob("*.sock")):
        assert time.monotonic() < deadline, "the consumer never bound its wake-up socket"
        time.sleep(0.01)
    return thread, got


@pytest.mark.usefixtures("slow_polls")
def test_a_publish_in_another_process_wakes_a_waiting_consumer(tmp_path: Path) -> None:
    bus = SQLiteTransport(tmp_path / "bus.db")
    bus.provision("q", ["t"], [])
    consumer = bus.consumer("q", ["t"])
    thread, got = _waiting(bus, consumer)
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", _PUBLISH, str(bus.path)], check=True, timeout=60)
    thread.join(30)
    assert got == [[b"from another process"]]
    assert time.monotonic() - started < 30  # a poll would have taken 60 s
    consumer.close()
    assert list(bus.wake.directory.glob("*.sock")) == []  # close unbinds
    bus.close()


@pytest.mark.usefixtures("slow_polls")
def test_a_release_wakes_a_waiting_consumer(tmp_path: Path) -> None:
    bus = SQLiteTransport(tmp_path / "bus.db")
    bus.provision("q", ["t"], [])
    bus.publish("t", b"held", {})
    holder, waiter = bus.consumer("q", ["t"]), bus.consumer("q", ["t"])
    held = holder.receive(1, wait_s=0)
    thread, got = _waiting(bus, waiter)
    holder.release(held)
    thread.join(30)
    assert got == [[b"held"]]
    waiter.close()
    bus.close()


def test_a_socket_left_by_a_killed_process_is_removed_by_the_next_publish(tmp_path: Path) -> None:
    bus = SQLiteTransport(tmp_path / "bus.db")
    bus.provision("q", ["t"], [])
    bus.wake.directory.mkdir()
    left = bus.wake.directory / "999999-dead.sock"
    orphan = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    orphan.bind(str(left))
    orphan.close()  # the file stays, as a kill -9 leaves it; nobody receives on it
    assert left.exists()
    bus.publish("t", b"x", {})
    assert not left.exists()
    bus.close()


def test_without_a_wake_up_directory_consumers_still_find_messages_by_polling(tmp_path: Path) -> None:
    bus = SQLiteTransport(tmp_path / "bus.db")
    bus.provision("q", ["t"], [])
    bus.wake.directory.write_text("a file where the wake-up directory would go")
    consumer = bus.consumer("q", ["t"])
    assert consumer.receive(1, wait_s=0.1) == []
    threading.Timer(0.05, bus.publish, args=("t", b"polled", {})).start()
    assert [d.body for d in consumer.receive(1, wait_s=10)] == [b"polled"]
    bus.close()


def test_a_bus_path_too_long_for_a_socket_address_wakes_through_the_temporary_directory(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "bus.db"
    bus = SQLiteTransport(deep)
    assert len(os.fsencode(bus.wake.directory)) < 80
    assert bus.wake.directory.parent == Path(tempfile.gettempdir())
    assert SQLiteTransport(deep).wake.directory == bus.wake.directory  # every process finds the same one


# -- dead letters by id ------------------------------------------------------------------------


def test_a_dead_letters_id_is_the_message_id_its_delivery_had(tmp_path: Path) -> None:
    bus = SQLiteTransport(tmp_path / "bus.db")
    bus.provision("q", ["t"], [])
    bus.publish_many("t", [(b"a", {}), (b"b", {}), (b"c", {})])
    consumer = bus.consumer("q", ["t"])
    deliveries = consumer.receive(3, wait_s=0)
    for delivery in deliveries:
        consumer.dead_letter(delivery, "bad")
    a, b, c = deliveries
    assert [r.transport_id for r in bus.dead_letters("q")] == [a.transport_id, b.transport_id, c.transport_id]
    assert [r.body for r in bus.dead_letters("q", ids=[c.transport_id, a.transport_id], limit=1)] == [b"a"]
    assert bus.purge_dead_letters("q", ids=[b.transport_id, "unknown"]) == 1
    assert bus.requeue_dead_letters("q", limit=1) == 1  # the oldest: a
    assert [d.body for d in consumer.receive(5, wait_s=0)] == [b"a"]
    assert [r.body for r in bus.dead_letters("q")] == [b"c"]
    bus.close()


def test_requeue_and_purge_by_many_ids_work_in_chunks(tmp_path: Path) -> None:
    bus = SQLiteTransport(tmp_path / "bus.db")
    bus.provision("q", ["t"], [])
    bus.publish_many("t", [(str(i).encode(), {}) for i in range(1200)])
    consumer = bus.consumer("q", ["t"])
    for delivery in consumer.receive(1200, wait_s=0):
        consumer.dead_letter(delivery, "x")
    records = bus.dead_letters("q", limit=2000)
    calls: list[tuple[int, int | None]] = []
    chosen = [r.transport_id for r in records[:1100]]
    assert bus.requeue_dead_letters("q", ids=chosen, progress=lambda *a: calls.append(a)) == 1100
    assert calls == [(500, 1100), (1000, 1100), (1100, 1100)]
    assert bus.status("q", ["t"])[0].depth == 1100
    assert bus.purge_dead_letters("q", ids=[r.transport_id for r in records]) == 100
    assert bus.dead_letters("q") == []
    bus.close()


def test_a_version_1_bus_file_gains_the_dead_letter_index(tmp_path: Path) -> None:
    path = tmp_path / "bus.db"
    with contextlib.closing(sqlite3.connect(path)) as raw:
        raw.executescript(sqlite_sql.SCHEMA.replace("PRAGMA user_version = 2", "PRAGMA user_version = 1"))
        raw.execute("DROP INDEX dead_letters_by_message")
    bus = SQLiteTransport(path)
    assert bus.dead_letters("q", ids=["x"]) == []
    bus.close()
    with contextlib.closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (sqlite_sql.SCHEMA_VERSION,)
        names = {name for (name,) in raw.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "dead_letters_by_message" in names


# -- waiting for the write lock ----------------------------------------------------------------


def test_a_writer_waits_for_another_writers_lock_then_goes_on(tmp_path: Path) -> None:
    bus = SQLiteTransport(tmp_path / "bus.db", busy_timeout_s=10)
    bus.provision("q", ["t"], [])
    other = sqlite3.connect(bus.path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    threading.Timer(0.2, other.execute, args=("COMMIT",)).start()
    bus.publish("t", b"after the lock", {})  # waits out the other writer
    assert [d.body for d in bus.consumer("q", ["t"]).receive(1, wait_s=0)] == [b"after the lock"]
    other.close()
    bus.close()


def test_a_writer_gives_up_after_busy_timeout_s(tmp_path: Path) -> None:
    bus = SQLiteTransport(tmp_path / "bus.db", busy_timeout_s=0.3)
    bus.provision("q", ["t"], [])
    with contextlib.closing(sqlite3.connect(bus.path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(PublishError, match="database is locked"):
            bus.publish("t", b"x", {})
        assert 0.3 <= time.monotonic() - started < 10
        assert bus.status("q", ["t"])[0].depth == 0  # reads go on beside a writer (WAL)
        other.execute("ROLLBACK")
    bus.close()


def test_a_publish_wakes_only_the_consumers_of_its_topic(tmp_path: Path) -> None:
    bus = SQLiteTransport(tmp_path / "bus.db")
    of_a, of_many = bus.wake.listen(["a"]), bus.wake.listen([f"t{n}" for n in range(6)])
    assert of_a is not None and of_many is not None
    assert of_a.wait(5) and of_many.wait(5)  # each starts with a wake-up of its own (see Listener)
    bus.wake.notify("b")
    assert not of_a.wait(0.05)  # not its topic
    assert of_many.wait(5)  # takes more topics than its name lists: woken by every one
    bus.wake.notify("a")
    assert of_a.wait(5)
    bus.wake.notify()  # a release or requeue: any topic
    assert of_a.wait(5) and of_many.wait(5)
    of_a.close()
    of_many.close()
    bus.close()
