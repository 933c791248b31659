"""The process pool on the SQLite bus: children build the app from its spec, run handlers, die and are replaced."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import WorkerThread, wait_for

from hedwig_tasks import ConfigurationError, Hedwig, signals
from hedwig_tasks.exceptions import RemoteError
from hedwig_tasks.pool.framing import ACK_REPLY, decode_header, read_frame, task_header, write_frame
from hedwig_tasks.testing import worker_contract
from hedwig_tasks.testing.worker_contract import APP_SPEC, build_app
from hedwig_tasks.worker import Worker, WorkerOptions

pytestmark = pytest.mark.slow


class Pool:
    """The contract's app on a bus of the test's own, and a worker of it with a process pool."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.results = tmp_path / "results.jsonl"
        for name, value in {
            "HEDWIG_TRANSPORT_URL": f"sqlite:///{tmp_path}/bus.db",
            worker_contract.APP_NAME_ENV: "pooled",
            worker_contract.TOPIC_ENV: "users",
            worker_contract.RESULTS_ENV: str(self.results),
            worker_contract.SLOW_ENV: "1.0",
        }.items():
            monkeypatch.setenv(name, value)  # the children inherit it
        self.app: Hedwig = build_app()
        self.app.provision()
        self.running: WorkerThread | None = None

    def start(self, **options: Any) -> Worker:
        options = {"pool": "processes", "app_spec": APP_SPEC, "concurrency": 1, "wait_s": 0.05, **options}
        self.running = WorkerThread(Worker(self.app, WorkerOptions(**options)))
        return self.running.worker

    def publish(self, *user_ids: str) -> None:
        for user_id in user_ids:
            self.app.publish("user-created", "1.0", {"user_id": user_id})

    def events(self, event: str) -> list[dict[str, Any]]:
        if not self.results.exists():
            return []
        return [e for e in map(json.loads, self.results.read_text().splitlines()) if e["event"] == event]

    def dead_reasons(self) -> list[str]:
        return [record.reason for record in self.app.transport.dead_letters("pooled")]


@pytest.fixture
def pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pool]:
    pool = Pool(tmp_path, monkeypatch)
    yield pool
    if pool.running is not None and pool.running.thread.is_alive():
        pool.running.stop(abort=True)
    pool.app.close()


@pytest.fixture
def seen() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    receivers = {}
    for name in ("handler_failed", "handler_succeeded", "handler_time_limit_exceeded"):

        def receiver(sender: Any, _name: str = name, **kwargs: Any) -> None:
            found.append((_name, kwargs))

        receivers[name] = receiver
        getattr(signals, name).connect(receiver)
    yield found
    for name, receiver in receivers.items():
        getattr(signals, name).disconnect(receiver)


def test_handlers_run_in_children_and_signal_in_the_worker(pool: Pool, seen: list[Any]) -> None:
    pool.start(concurrency=2)
    pool.publish("U1", "fail-1")
    wait_for(lambda: pool.dead_reasons(), 30)
    pool.running.stop()  # type: ignore[union-attr]
    assert pool.dead_reasons() == [worker_contract.GAVE_UP.format("fail-1")]
    assert {e["pid"] for e in pool.events("start")}.isdisjoint({os.getpid()})
    [ok] = [kwargs for name, kwargs in seen if name == "handler_succeeded"]
    assert ok["message"].data == {"user_id": "U1"}
    failures = [kwargs["error"] for name, kwargs in seen if name == "handler_failed"]
    assert len(failures) == 3 and all(isinstance(e, RemoteError) for e in failures)
    assert failures[0].type_name == "ValueError" and "cannot create fail-1" in failures[0].traceback_text
    assert pool.running.worker.counts == {"handled": 1, "retried": 2, "dead_lettered": 1}  # type: ignore[union-attr]


def test_children_are_replaced_after_max_tasks_and_past_max_memory(pool: Pool) -> None:
    pool.start(max_tasks_per_child=2)
    pool.publish(*[f"U{n}" for n in range(6)])
    wait_for(lambda: len(pool.events("end")) == 6, 30)
    pids = [e["pid"] for e in pool.events("start")]
    assert [pids.count(pid) for pid in dict.fromkeys(pids)] == [2, 2, 2]
    pool.running.stop()  # type: ignore[union-attr]
    pool.results.unlink()
    pool.start(max_memory_per_child_kb=1)  # any child is past 1 KiB after its first message
    pool.publish("M1", "M2", "M3")
    wait_for(lambda: len(pool.events("end")) == 3, 30)
    assert len({e["pid"] for e in pool.events("start")}) == 3


def test_a_hung_child_is_killed_at_the_time_limit_and_replaced(pool: Pool, seen: list[Any]) -> None:
    pool.start(time_limit_s=1.0)
    pool.publish("hang-1")
    wait_for(lambda: pool.dead_reasons(), 30)
    pool.publish("fine")
    wait_for(lambda: len(pool.events("end")) == 1, 30)
    pool.running.stop()  # type: ignore[union-attr]
    assert pool.dead_reasons() == ["gave up after 3 attempts: TimeLimitExceeded: time limit exceeded (1s)"]
    hung = [e["pid"] for e in pool.events("start") if e["user_id"] == "hang-1"]
    abandoned = [kwargs["abandoned"] for name, kwargs in seen if name == "handler_time_limit_exceeded"]
    assert abandoned == [f"child process {pid}" for pid in hung] and len(set(hung)) == 3
    for pid in hung:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_the_message_waiting_behind_a_killed_child_runs_once_in_the_next(pool: Pool) -> None:
    worker = pool.start(time_limit_s=2.0)  # one child and two lanes: "fine" waits in its pipe behind the hang
    pool.publish("hang-1")
    wait_for(lambda: pool.events("start"), 30)
    assert worker._pool is not None and worker._pool.threads == 2
    pool.publish("fine")
    wait_for(lambda: worker.running == 2, 30)
    wait_for(lambda: pool.events("end"), 30)
    pool.running.stop(abort=True)  # type: ignore[union-attr]
    [hang, *_] = [e for e in pool.events("start") if e["user_id"] == "hang-1"]
    [fine] = [e for e in pool.events("start") if e["user_id"] == "fine"]
    assert fine["attempt"] == 1 and fine["pid"] != hang["pid"]  # it never started there: sent on, not failed
    assert [e["user_id"] for e in pool.events("end")] == ["fine"]


def test_kill_9_of_a_child_fails_only_the_message_it_ran(pool: Pool, caplog: pytest.LogCaptureFixture) -> None:
    worker = pool.start()
    pool.publish("slow-1")
    wait_for(lambda: pool.events("start"), 30)
    pool.publish("U2")
    wait_for(lambda: worker.running == 2, 30)  # U2 waits in the child's pipe
    killed = pool.events("start")[0]["pid"]
    os.kill(killed, signal.SIGKILL)
    wait_for(lambda: len(pool.events("end")) == 2, 30)
    pool.running.stop()  # type: ignore[union-attr]
    starts = sorted((e["user_id"], e["attempt"]) for e in pool.events("start"))
    assert starts == [("U2", 1), ("slow-1", 1), ("slow-1", 2)]
    assert worker.counts == {"handled": 2, "retried": 1, "dead_lettered": 0}
    # nobody in the worker killed it: a warning that says how it ended
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "hedwig_tasks.pool.processes"]
    assert ("WARNING", f"replacing child process {killed}: it died (killed by SIGKILL)") in said


def test_stop_lets_a_child_finish_its_message_then_the_children_exit(pool: Pool) -> None:
    worker = pool.start()
    pool.publish("slow-1")
    wait_for(lambda: pool.events("start"), 30)
    [child] = worker._pool._all  # type: ignore[union-attr]
    pool.running.stop()  # type: ignore[union-attr]
    assert [e["user_id"] for e in pool.events("end")] == ["slow-1"]
    assert child.process.returncode == 0


def test_a_child_that_cannot_load_the_app_fails_the_start(pool: Pool) -> None:
    worker = Worker(pool.app, WorkerOptions(pool="processes", app_spec="no_such_module:app", concurrency=2))
    with pytest.raises(ConfigurationError, match=r"a process-pool child could not load the app: .*no_such_module"):
        worker.run()


def test_pool_options_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="pool must be one of threads, processes"):
        WorkerOptions(pool="forks")
    with pytest.raises(ConfigurationError, match="need pool='processes'"):
        WorkerOptions(max_tasks_per_child=10)


def test_frames_carry_bytes_and_json_and_end_cleanly() -> None:
    read_fd, write_fd = os.pipe()
    body = bytes(range(256)) * 300  # past one read and a pipe's buffer is not needed: the reader is here
    write_frame(write_fd, {"attrs": {"hedwig_id": "x"}, "attempt": 2}, body[:1000])
    assert read_frame(read_fd) == ({"attrs": {"hedwig_id": "x"}, "attempt": 2}, body[:1000])
    os.close(write_fd)
    assert read_frame(read_fd) is None
    os.close(read_fd)


@pytest.mark.parametrize(
    ("attributes", "limit_s"),
    [
        ({"hedwig_id": "x", "hedwig_schema": "https://x/s#/schemas/a/1.0", "note": "é"}, None),
        ({}, 2.5),
        ({"k": "a\0b"}, 0.1),  # a NUL in a string: the header is JSON
        ({"k\0": "v"}, None),
    ],
)
def test_a_task_header_reads_back_whatever_its_strings_hold(attributes: dict[str, str], limit_s: float | None) -> None:
    header = decode_header(task_header("users", 3, "id-1", limit_s, attributes))
    expected: dict[str, Any] = {"sub": "users", "attempt": 3, "id": "id-1", "attrs": attributes}
    if limit_s is not None:
        expected["limit"] = limit_s
    assert header == expected


def test_a_usual_reply_reads_back_and_anything_more_goes_to_json() -> None:
    assert decode_header(ACK_REPLY + b"1.5e-05}") == {"action": "ack", "duration_s": 1.5e-05}
    longer = ACK_REPLY + b'0.25,"rss_kb":1024}'
    assert decode_header(longer) == {"action": "ack", "duration_s": 0.25, "rss_kb": 1024}


def test_a_rate_limited_handler_waits_in_the_worker_and_runs_in_a_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(worker_contract.RATE_ENV, "50/s")  # its start waits on a handler thread
    pool = Pool(tmp_path, monkeypatch)
    try:
        pool.start(concurrency=2)
        pool.publish(*[f"U{n}" for n in range(8)])
        wait_for(lambda: len(pool.events("end")) == 8, 30)
        pool.running.stop()  # type: ignore[union-attr]
        assert {e["pid"] for e in pool.events("start")}.isdisjoint({os.getpid()})
        assert pool.running.worker.counts == {"handled": 8, "retried": 0, "dead_lettered": 0}  # type: ignore[union-attr]
    finally:
        pool.app.close()


def test_a_message_past_the_pipe_buffer_reaches_its_child_whole(pool: Pool) -> None:
    big = "B" * 300_000  # several times a pipe's buffer: written as the child reads
    worker = pool.start()
    pool.publish("U1", big, "U2")
    wait_for(lambda: len(pool.events("end")) == 3, 30)
    pool.running.stop()  # type: ignore[union-attr]
    assert sorted(len(e["user_id"]) for e in pool.events("end")) == [2, 2, len(big)]
    assert worker.counts["handled"] == 3


def test_a_traced_delivery_keeps_its_span_open_while_a_child_runs_it(pool: Pool) -> None:
    worker = pool.start()
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    pool.app.publish("user-created", "1.0", {"user_id": "T1"}, headers={"traceparent": traceparent})
    pool.publish("U1")
    wait_for(lambda: len(pool.events("end")) == 2, 30)
    pool.running.stop()  # type: ignore[union-attr]
    assert {e["user_id"] for e in pool.events("end")} == {"T1", "U1"}
    assert {e["pid"] for e in pool.events("start")}.isdisjoint({os.getpid()})
    assert worker.counts["handled"] == 2


def test_recycling_counts_each_message_sent_when_quick_runs_queue_more_per_child(pool: Pool) -> None:
    worker = pool.start(max_tasks_per_child=5)  # one child; quick runs let many wait for it
    pool.publish(*[f"U{n}" for n in range(12)])
    wait_for(lambda: len(pool.events("end")) == 12, 30)
    pool.running.stop()  # type: ignore[union-attr]
    pids = [e["pid"] for e in pool.events("start")]
    assert [pids.count(pid) for pid in dict.fromkeys(pids)] == [5, 5, 2]
    assert sorted(e["user_id"] for e in pool.events("end")) == sorted(f"U{n}" for n in range(12))
    assert worker.counts == {"handled": 12, "retried": 0, "dead_lettered": 0}
