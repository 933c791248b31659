"""Idempotent handlers on the SQLite bus, with their keys in every state store (SQLite, Redis db 9,
PostgreSQL): a duplicate is acknowledged without running, a failure frees the key for the retry,
a key held elsewhere defers the message without a failure, a crash frees it when its lease ends,
a store outage defers (logged once). The proof runs two ``hedwig-tasks worker`` processes over
1,000 messages each published twice."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SCHEMA_FILE
from helpers import WorkerThread, wait_for
from state_stores import STORES, own_store

from hedwig_tasks import ConfigurationError, Hedwig, Message, RetryPolicy, signals
from hedwig_tasks._worker_idempotency import DONE
from hedwig_tasks.metrics import Metrics
from hedwig_tasks.state.redis import RedisStore
from hedwig_tasks.worker import Worker, WorkerOptions


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A state store's URL of the test's own: an SQLite file, a Redis prefix, a PostgreSQL schema."""
    with own_store(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def app(tmp_path: Path, store_url: str) -> Iterator[Hedwig]:
    app = Hedwig("svc", schema=SCHEMA_FILE, transport=f"sqlite:///{tmp_path}/bus.db?lease_s=1", state=store_url)
    yield app
    app.close()


def _worker(app: Hedwig) -> WorkerThread:
    return WorkerThread(Worker(app, WorkerOptions(concurrency=4, prefetch=4, wait_s=0.05, heartbeat_s=None)))


def _recorder(signal: Any, app: Hedwig) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        seen.append(kwargs)

    signal.connect(receiver, sender=app, weak=False)
    return seen


def _twice(app: Hedwig, count: int) -> list[str]:
    """Publish ``count`` messages, each twice with the same id (a republished duplicate)."""
    ids = []
    for n in range(count):
        message = app.message("user-created", "1.0", {"user_id": f"U{n}"})
        app.publish_message(message)
        app.publish_message(message)
        ids.append(message.id)
    return ids


def test_a_duplicate_is_acknowledged_without_running_counted_and_signalled(app: Hedwig) -> None:
    runs: list[str] = []

    @app.handler("user-created", "1.*", idempotent=True)
    def handle(message: Message) -> None:
        runs.append(message.id)

    app.provision()
    ids = _twice(app, 20)
    metrics = Metrics(app)
    duplicates = _recorder(signals.message_duplicate, app)
    running = _worker(app)
    wait_for(lambda: running.worker.duplicates == 20 and len(runs) == 20, 30)
    running.stop()
    assert sorted(runs) == sorted(ids)
    assert running.worker.counts["handled"] == 20
    assert metrics.value("hedwig_duplicates_total", "user-created", 1) == 20
    assert sorted(d["message"].id for d in duplicates) == sorted(ids)
    assert duplicates[0]["key"].startswith("idem/svc/user-created/") and duplicates[0]["handler"] is handle
    assert all(app.state.get(f"idem/svc/user-created/{i}") == DONE for i in ids)
    (status,) = app.transport.status("svc", ["user-created-v1"])
    assert (status.depth, status.in_flight) == (0, 0)


def test_a_failure_releases_the_key_so_the_retry_runs(app: Hedwig) -> None:
    attempts: list[int] = []

    @app.handler("user-created", "1.*", idempotent=True, retry=RetryPolicy(backoff_s=0.1, max_backoff_s=0.1))
    def handle(message: Message) -> None:
        attempts.append(message.attempt)
        if message.attempt == 1:
            raise RuntimeError("the first try fails")

    app.provision()
    message = app.publish("user-created", "1.0", {"user_id": "U1"})
    running = _worker(app)
    wait_for(lambda: app.state.get(f"idem/svc/user-created/{message.id}") == DONE, 30)
    running.stop()
    assert attempts == [1, 2] and running.worker.duplicates == 0


def test_a_key_held_elsewhere_defers_the_message_without_a_failure(app: Hedwig) -> None:
    runs: list[str] = []

    @app.handler("user-created", "1.*", idempotent=True)
    def handle(message: Message) -> None:
        runs.append(message.id)

    app.provision()
    message = app.message("user-created", "1.0", {"user_id": "U1"})
    key = f"idem/svc/user-created/{message.id}"
    assert app.state.acquire(key, "another-worker", ttl_s=60)
    app.publish_message(message)
    received = _recorder(signals.message_received, app)
    failures = _recorder(signals.handler_failed, app) + _recorder(signals.handler_retried, app)
    running = _worker(app)
    wait_for(lambda: len(received) >= 2, 30)  # came back after about a lease, not run
    assert runs == []
    app.state.put(key, DONE, ttl_s=60)  # the other worker handled it
    wait_for(lambda: running.worker.duplicates == 1, 30)
    running.stop()
    assert runs == [] and failures == [] and running.worker.counts == {"handled": 0, "retried": 0, "dead_lettered": 0}


def test_a_crashed_holder_lets_the_message_run_once_its_lease_ends(app: Hedwig) -> None:
    runs: list[float] = []

    @app.handler("user-created", "1.*", idempotent=True)
    def handle(message: Message) -> None:
        runs.append(time.monotonic())

    app.provision()
    message = app.message("user-created", "1.0", {"user_id": "U1"})
    assert app.state.acquire(f"idem/svc/user-created/{message.id}", "crashed-worker", ttl_s=1.5)
    app.publish_message(message)
    started = time.monotonic()
    running = _worker(app)
    wait_for(lambda: runs, 30)
    running.stop()
    assert len(runs) == 1 and runs[0] - started >= 1.0


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_a_key_function_names_the_work_and_the_record_lasts_its_ttl(app: Hedwig) -> None:
    runs: list[str] = []

    @app.handler("user-created", "1.*", idempotency_key=lambda m: m.data["user_id"], idempotency_ttl_s=3)
    def handle(message: Message) -> None:
        runs.append(message.data["user_id"])

    app.provision()
    app.publish("user-created", "1.0", {"user_id": "U1"})
    app.publish("user-created", "1.0", {"user_id": "U1"})  # another id, the same work
    running = _worker(app)
    wait_for(lambda: running.worker.duplicates == 1 and runs == ["U1"], 30)
    wait_for(lambda: app.state.get("idem/svc/user-created/U1") is None, 10)  # remembered for the TTL only
    app.publish("user-created", "1.0", {"user_id": "U1"})
    wait_for(lambda: runs == ["U1", "U1"], 30)
    running.stop()


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_a_store_outage_defers_the_messages_logs_once_and_they_run_when_it_answers(
    app: Hedwig, caplog: pytest.LogCaptureFixture
) -> None:
    runs: list[str] = []

    @app.handler("user-created", "1.*", idempotent=True)
    def handle(message: Message) -> None:
        runs.append(message.id)

    app.provision()
    working = app.state
    app._state = unreachable = RedisStore("redis://127.0.0.1:1/9")  # nothing listens there
    ids = [app.publish("user-created", "1.0", {"user_id": f"U{n}"}).id for n in range(3)]
    received = _recorder(signals.message_received, app)
    caplog.set_level(logging.INFO, logger="hedwig_tasks.worker")
    running = _worker(app)
    wait_for(lambda: len(received) >= 6, 30)  # each came back at least once, none ran
    assert runs == [] and running.worker.counts["retried"] == 0
    app._state = working
    wait_for(lambda: sorted(runs) == sorted(ids), 30)
    running.stop()
    unreachable.close()  # after the worker: none of its threads uses it any more
    failed = [r for r in caplog.records if r.getMessage().startswith("state store failed")]
    assert len(failed) == 1 and "messages of idempotent handlers come back later" in failed[0].getMessage()
    assert any(r.getMessage() == "state store answers again" for r in caplog.records)


def test_bad_idempotency_options_fail_at_declaration() -> None:
    app = Hedwig("svc", schema=SCHEMA_FILE, transport="memory://")
    with pytest.raises(ConfigurationError, match=r"idempotency_key=.*expected a function of the message"):
        app.handler("user-created", "1.*", idempotency_key="user_id")(lambda m: None)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="idempotency_ttl_s=0: expected seconds"):
        app.handler("user-created", "1.*", idempotent=True, idempotency_ttl_s=0)(lambda m: None)
    handler = app.handler("user-created", "1.*")(lambda m: None)
    assert handler.idempotency_key is None  # not idempotent unless asked: no store is touched


# -- two real worker processes ----------------------------------------------------------------

TASKS = """
import os
from pathlib import Path
from hedwig_tasks import Hedwig, Message

HERE = Path(__file__).parent
hedwig = Hedwig("idemapp", schema=HERE / "schema.json", transport=f"sqlite:///{HERE}/bus.db?lease_s=2")


@hedwig.handler("user-created", "1.*", idempotent=True)
def created(message: Message) -> None:
    # the handler's own record of each run: one line, one write (O_APPEND)
    fd = os.open(HERE / "runs.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{message.id} {os.getpid()}\\n".encode())
    finally:
        os.close(fd)
"""


@pytest.mark.slow
@pytest.mark.parametrize("store_url", ["redis", "postgres"], indirect=True)
def test_two_worker_processes_run_each_of_1000_messages_delivered_twice_once(tmp_path: Path, store_url: str) -> None:
    from cli_helpers import UNSET

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "schema.json").write_text(SCHEMA_FILE.read_text())
    (folder / "tasks.py").write_text(TASKS)
    app = Hedwig("idemapp", schema=SCHEMA_FILE, transport=f"sqlite:///{folder}/bus.db")
    app.handler("user-created", "1.*")(lambda m: None)
    app.provision()
    ids = _twice(app, 1000)
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env["HEDWIG_STATE_URL"] = store_url
    command = [sys.executable, "-m", "hedwig_tasks", "worker", "-A", "tasks", "--burst", "-c", "4", "-l", "WARNING"]
    logs = [folder / f"worker-{n}.log" for n in range(2)]
    workers = []
    for log in logs:
        with log.open("w") as stderr:
            workers.append(subprocess.Popen(command, cwd=folder, env=env, stderr=stderr))
    try:
        codes = [w.wait(120) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGKILL)
                w.wait()
    assert codes == [0, 0], [log.read_text() for log in logs]
    runs = [line.split() for line in (folder / "runs.txt").read_text().splitlines()]
    assert len(runs) == 1000 and sorted({i for i, _ in runs}) == sorted(ids)  # each body ran once
    assert {int(pid) for _, pid in runs} == {w.pid for w in workers}  # and both workers ran some
    (status,) = app.transport.status("idemapp", ["user-created-v1"])
    assert (status.depth, status.in_flight, status.dead_letters) == (0, 0, 0)  # every copy settled
    app.close()


def test_a_bad_state_url_fails_the_worker_at_start(tmp_path: Path) -> None:
    app = Hedwig("svc", schema=SCHEMA_FILE, transport=f"sqlite:///{tmp_path}/bus.db", state="sqlit:///state.db")
    app.handler("user-created", "1.*", idempotent=True)(lambda m: None)
    with pytest.raises(ConfigurationError, match=r"unknown state store 'sqlit'.*did you mean 'sqlite'"):
        Worker(app, WorkerOptions(burst=True, heartbeat_s=None)).run()  # not at the first message
