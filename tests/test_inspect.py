"""The live-worker registry: each worker's heartbeat row in the state store (SQLite, Redis db 9,
PostgreSQL), and ``hedwig-tasks inspect`` listing the live ones through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import SCHEMA_FILE
from helpers import WorkerThread, wait_for
from redis_server import cleanup, redis_url
from state_stores import STORES, own_store

from hedwig_tasks import Hedwig, Message
from hedwig_tasks._cli_inspect import inspect_lines
from hedwig_tasks._version import __version__
from hedwig_tasks._worker_heartbeat import transport_text
from hedwig_tasks.state.base import Member
from hedwig_tasks.state.redis import RedisStore
from hedwig_tasks.transports._redis_wire import stream_key
from hedwig_tasks.worker import Worker, WorkerOptions


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A state store's URL of the test's own: an SQLite file, a Redis prefix, a PostgreSQL schema."""
    with own_store(request.param, tmp_path) as url:
        yield url


def test_a_worker_keeps_a_row_of_what_it_runs_and_forgets_it_on_a_clean_stop(tmp_path: Path, store_url: str) -> None:
    app = Hedwig("svc", schema=SCHEMA_FILE, transport=f"sqlite:///{tmp_path}/bus.db", state=store_url)
    release = threading.Event()

    @app.handler("user-created", "1.*")
    def created(message: Message) -> None:
        release.wait(30)

    app.provision()
    message = app.publish("user-created", "1.0", {"user_id": "U1"})
    running = WorkerThread(Worker(app, WorkerOptions(concurrency=2, prefetch=1, wait_s=0.05, heartbeat_s=0.2)))
    store = app.state

    def row() -> Member | None:
        members = store.members("workers/svc")
        return members[0] if members and members[0].data["running"] else None

    wait_for(row, 10)
    member = row()
    assert member is not None and member.member == running.worker.worker_id
    data = member.data
    assert (data["pid"], data["app"], data["queue"], data["version"]) == (os.getpid(), "svc", "svc", __version__)
    assert (data["concurrency"], data["prefetch"], data["pool"], data["topics"]) == (
        2,
        1,
        "threads",
        ["user-created-v1"],
    )
    assert data["transport"] == f"<SQLiteTransport '{tmp_path}/bus.db'>" and data["held"] == 1
    (now_running,) = data["running"]
    assert (now_running["id"], now_running["type"]) == (message.id, "user-created 1.0")
    assert data["started"] <= now_running["since"] <= store.now() + 1
    assert member.expires_at - member.seen == pytest.approx(0.6, abs=0.01)  # three beats: then a dead worker's is gone
    release.set()
    wait_for(lambda: (m := store.members("workers/svc")) and m[0].data["handled"] == 1, 10)
    running.stop()
    assert store.members("workers/svc") == []
    app.close()


def test_a_worker_on_a_shared_broker_keeps_no_row_unless_a_store_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    # the default store is a file in the working directory, which no other host reads
    monkeypatch.delenv("HEDWIG_STATE_URL", raising=False)
    app = Hedwig(f"svc-{uuid.uuid4().hex[:8]}", schema=SCHEMA_FILE, transport=redis_url())
    handled: list[str] = []
    app.handler("user-created", "1.*")(lambda message: handled.append(message.id))
    app.provision()
    running = WorkerThread(Worker(app, WorkerOptions(wait_s=0.05, heartbeat_s=0.05)))
    app.publish("user-created", "1.0", {"user_id": "U1"})
    wait_for(lambda: handled, 10)
    running.stop()
    assert app.state_configured is False and app._state is None  # never built, so never written
    app.close()
    client = redis.Redis.from_url(redis_url())
    client.xgroup_destroy(stream_key("user-created-v1"), app.queue)  # the topic's stream is shared
    client.close()
    cleanup(redis_url(), [app.queue], [])


def test_the_row_names_the_transport_without_secrets() -> None:
    app = Hedwig("svc", schema=SCHEMA_FILE, transport="redis://:s3cret@127.0.0.1:6379/9")
    text = transport_text(app)
    assert "s3cret" not in text and text.startswith("<RedisTransport 'redis://:") and "@127.0.0.1:6379/9" in text


def test_a_store_outage_skips_beats_and_the_worker_goes_on(tmp_path: Path) -> None:
    app = Hedwig("svc", schema=SCHEMA_FILE, transport=f"sqlite:///{tmp_path}/bus.db")
    handled: list[str] = []
    app.handler("user-created", "1.*")(lambda message: handled.append(message.id))
    app.provision()
    working = app.state
    app._state = unreachable = RedisStore("redis://127.0.0.1:1/9")  # nothing listens there
    running = WorkerThread(Worker(app, WorkerOptions(wait_s=0.05, heartbeat_s=0.1)))
    wait_for(lambda: running.worker._state_outage.errors >= 2, 10)
    app.publish("user-created", "1.0", {"user_id": "U1"})
    wait_for(lambda: handled, 10)
    app._state = working
    wait_for(lambda: working.members("workers/svc"), 10)
    running.stop()
    unreachable.close()  # after the worker: none of its threads uses it any more
    app.close()


def test_the_table_shows_each_worker_and_its_running_messages() -> None:
    row = {"version": "1.2.3", "pool": "threads", "concurrency": 4, "held": 3, "handled": 7, "failed": 1}
    row |= {"duplicates": 2, "started": 900.0, "transport": "sqlite:///bus.db", "topics": ["a-v1"]}
    row["running"] = [{"id": "m-1", "type": "send_email 1.0", "since": 990.0}]
    lines = inspect_lines([Member("workers/svc", "vm:12:abcdef", row, seen=998.0, expires_at=1013.0)], now=1000.0)
    assert lines[1].split() == ["vm:12:abcdef", "1.2.3", "threads", "x4", "3", "1", "7", "1", "2", "1m40s", "2.0s"]
    assert lines[2].split() == ["sqlite:///bus.db", "topics:", "a-v1"]
    assert lines[3] == "  running send_email 1.0 id=m-1 for 10.0s"
    assert inspect_lines([], now=0.0)[1].startswith("(no live workers")


# -- the real CLI -------------------------------------------------------------------------------

TASKS = """
import time
from pathlib import Path
from hedwig_tasks import Hedwig, Message

HERE = Path(__file__).parent
hedwig = Hedwig("inspectapp", schema=HERE / "schema.json", transport=f"sqlite:///{HERE}/bus.db")


@hedwig.handler("user-created", "1.*")
def created(message: Message) -> None:
    deadline = time.monotonic() + 60
    while not (HERE / "release").exists() and time.monotonic() < deadline:  # held until the test says
        time.sleep(0.05)
"""


@pytest.mark.slow
def test_inspect_lists_live_workers_and_what_each_runs_and_drops_dead_ones(tmp_path: Path) -> None:
    from cli_helpers import UNSET, cli

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "schema.json").write_text(SCHEMA_FILE.read_text())
    (folder / "tasks.py").write_text(TASKS)
    assert cli(folder, "provision", "-A", "tasks").returncode == 0
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    command = [sys.executable, "-m", "hedwig_tasks", "worker", "-A", "tasks", "-c", "2", "--prefetch", "0"]
    command += ["--heartbeat", "1"]  # a killed worker's row expires in three seconds
    workers = [subprocess.Popen(command, cwd=folder, env=env, stderr=subprocess.DEVNULL) for _ in range(2)]

    def rows() -> list[dict[str, Any]]:
        result = cli(folder, "inspect", "-A", "tasks", "--json")
        assert result.returncode == 0, result.stderr
        found: list[dict[str, Any]] = json.loads(result.stdout)
        return found

    try:
        wait_for(lambda: len(rows()) == 2, 20)
        published = cli(folder, "publish", "-A", "tasks", "user-created", "1.0", '{"user_id": "U1"}')
        message_id = published.stdout.split("id=")[1].strip()
        wait_for(lambda: any(r["running"] for r in rows()), 20)  # within a heartbeat
        (busy,) = [r for r in rows() if r["running"]]
        assert busy["running"][0]["id"] == message_id and busy["running"][0]["type"] == "user-created 1.0"
        assert {r["pid"] for r in rows()} == {w.pid for w in workers}
        table = cli(folder, "inspect", "-A", "tasks").stdout
        assert f"running user-created 1.0 id={message_id}" in table and str(busy["pid"]) in table
        idle = next(w for w in workers if w.pid != busy["pid"])
        idle.send_signal(signal.SIGKILL)  # its row stays until it expires: three heartbeats (3 s)
        (folder / "release").touch()
        busy_worker = next(w for w in workers if w.pid == busy["pid"])
        busy_worker.send_signal(signal.SIGTERM)  # a clean stop forgets its row at once
        assert busy_worker.wait(30) == 0
        assert [r["pid"] for r in rows()] == [idle.pid]
        wait_for(lambda: rows() == [], 20)
        assert "(no live workers" in cli(folder, "inspect", "-A", "tasks").stdout
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
            w.wait()
