"""Time limits on the SQLite bus: a hung sync handler's thread is abandoned and replaced, an async one cancelled."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SCHEMA_FILE
from helpers import WorkerThread, wait_for

from hedwig_tasks import ConfigurationError, Hedwig, Message, RetryPolicy, signals
from hedwig_tasks.exceptions import TimeLimitExceeded
from hedwig_tasks.metrics import Metrics
from hedwig_tasks.worker import Worker, WorkerOptions

ONCE = RetryPolicy(max_retries=1, backoff_s=0.05, jitter=False)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Hedwig]:
    app = Hedwig("svc", schema=SCHEMA_FILE, transport=f"sqlite:///{tmp_path}/bus.db", retry=ONCE)
    yield app
    app.close()


@pytest.fixture
def timeouts() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        seen.append(kwargs)

    signals.handler_time_limit_exceeded.connect(receiver)
    yield seen
    signals.handler_time_limit_exceeded.disconnect(receiver)


def _run(app: Hedwig, **options: Any) -> WorkerThread:
    app.provision()
    options.setdefault("wait_s", 0.05)
    return WorkerThread(Worker(app, WorkerOptions(**options)))


def _dead_reasons(app: Hedwig) -> list[str]:
    return [record.reason for record in app.transport.dead_letters("svc")]


def test_a_hung_sync_handler_is_abandoned_its_thread_replaced_and_the_next_message_runs(
    app: Hedwig, timeouts: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()
    done: list[str] = []

    @app.handler("user-created", "1.*", time_limit_s=0.3)
    def handle(message: Message) -> None:
        if message.data["user_id"] == "hung":
            release.wait(30)  # stuck until the test lets it go
            done.append("hung returned")
        else:
            done.append(message.data["user_id"])

    running = _run(app, concurrency=1, prefetch=1)
    metrics = Metrics(app, running.worker)
    app.publish("user-created", "1.0", {"user_id": "hung"})
    wait_for(lambda: timeouts, 10)
    app.publish("user-created", "1.0", {"user_id": "next"})
    wait_for(lambda: "next" in done, 10)  # one handler thread, and it is stuck: a new one ran it
    wait_for(lambda: _dead_reasons(app), 10)  # both attempts ran out of time
    assert _dead_reasons(app) == ["gave up after 2 attempts: TimeLimitExceeded: time limit exceeded (0.3s)"]
    assert [t["abandoned"] for t in timeouts] == ["thread hedwig-handler-0", "thread hedwig-handler-1"]
    assert {t["time_limit_s"] for t in timeouts} == {0.3}
    assert running.worker.abandoned_threads == 2
    assert "hedwig_abandoned_threads 2" in metrics.render()
    assert metrics.value("hedwig_time_limit_exceeded_total", "user-created", 1) == 2
    with caplog.at_level(logging.WARNING, logger="hedwig_tasks.worker"):
        release.set()  # the stuck calls return now: what they return is thrown away
        wait_for(lambda: running.worker.abandoned_threads == 0, 10)
    assert sum("what it returned is discarded" in r.getMessage() for r in caplog.records) == 2
    running.stop()
    assert running.worker.counts == {"handled": 1, "retried": 1, "dead_lettered": 1}
    metrics.close()


def test_an_async_handler_is_cancelled_at_its_limit(app: Hedwig, timeouts: list[dict[str, Any]]) -> None:
    cancelled: list[str] = []

    @app.handler("user-created", "1.*")
    async def handle(message: Message) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(message.data["user_id"])
            raise

    running = _run(app, time_limit_s=0.2)  # the worker's limit, for handlers that set none
    app.publish("user-created", "1.0", {"user_id": "U1"})
    wait_for(lambda: _dead_reasons(app), 10)
    running.stop()
    assert cancelled == ["U1", "U1"]
    assert [t["abandoned"] for t in timeouts] == ["", ""]  # cancelled: no thread given up
    assert running.worker.abandoned_threads == 0


def test_a_handler_within_its_limit_is_untouched(app: Hedwig, timeouts: list[dict[str, Any]]) -> None:
    seen: list[str] = []
    app.handler("user-created", "1.*", time_limit_s=5)(lambda message: seen.append(message.data["user_id"]))
    running = _run(app, time_limit_s=0.01)  # the handler's own limit wins over the worker's
    for n in range(20):
        app.publish("user-created", "1.0", {"user_id": f"U{n}"})
    wait_for(lambda: len(seen) == 20, 10)
    running.stop()
    assert timeouts == [] and running.worker.counts["handled"] == 20


def test_time_limit_exceeded_is_a_timeout_error_and_the_limits_are_checked() -> None:
    assert isinstance(TimeLimitExceeded(1.5), TimeoutError)
    assert str(TimeLimitExceeded(1.5)) == "time limit exceeded (1.5s)"
    app = Hedwig("svc", schema=SCHEMA_FILE, transport="memory://")
    bad: Any
    for bad in (0, -1, "5", True):
        with pytest.raises(ConfigurationError, match="time_limit_s"):
            app.handler("user-created", "1.*", time_limit_s=bad)(lambda message: None)
    with pytest.raises(ConfigurationError, match="time_limit_s"):
        WorkerOptions(time_limit_s=0)
