"""Faults the worker itself must survive: stuck handlers, errors nobody expected, late starts.

Transport-specific poison (odd bytes, headers, attributes written at the broker) is tested
beside each transport; these are the worker's own promises, on every local transport.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gcp_server import emulator_host, gcp_transport, tag  # noqa: F401
from helpers import WorkerThread, wait_for

from hedwig_tasks import Hedwig, Message, RetryPolicy
from hedwig_tasks.exceptions import TransportError
from hedwig_tasks.transports.base import Transport
from hedwig_tasks.transports.memory import MemoryTransport
from hedwig_tasks.transports.sqlite import SQLiteTransport
from hedwig_tasks.validators.jsonschema import JSONSchemaValidator
from hedwig_tasks.worker import Worker, WorkerOptions

SCHEMA = Path(__file__).parent / "schemas" / "schema.json"
LEASE_S = 1.0


@pytest.fixture(params=["sqlite", "memory"])
def bus(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Transport]:
    transport: Transport
    if request.param == "sqlite":
        transport = SQLiteTransport(tmp_path / "bus.db", lease_s=LEASE_S)
    else:
        transport = MemoryTransport(lease_s=LEASE_S)
    yield transport
    transport.close()


def _app(transport: str | Transport, handler: Any, **options: Any) -> Hedwig:
    app = Hedwig("faults", schema=options.pop("schema", SCHEMA), transport=transport, **options)
    app.handler("user-created", "1.*")(handler)
    return app


def _publish(app: Hedwig, user_ids: list[str]) -> None:
    app.provision()
    for user_id in user_ids:
        app.publish("user-created", "1.0", {"user_id": user_id})


def test_messages_buffered_behind_a_stuck_handler_go_to_another_worker(bus: Transport) -> None:
    unstick = threading.Event()
    first_handled: list[str] = []
    second_handled: list[str] = []

    def stuck(message: Message) -> None:
        if message.data["user_id"] == "stuck":
            unstick.wait(30)
        else:
            first_handled.append(message.data["user_id"])

    first = _app(bus, stuck)
    others = [f"U{n}" for n in range(4)]
    _publish(first, ["stuck", *others])
    stuck_worker = WorkerThread(Worker(first, WorkerOptions(concurrency=1, prefetch=4, lease_s=LEASE_S)))
    try:
        wait_for(lambda: stuck_worker.worker.held == 5, 10)  # one running, four buffered behind it
        second = _app(bus, lambda message: second_handled.append(message.data["user_id"]))
        helper = WorkerThread(Worker(second, WorkerOptions(concurrency=2, prefetch=0, lease_s=LEASE_S)))
        try:
            # released after one lease of waiting; the idle worker has them well within two
            wait_for(lambda: sorted(second_handled) == others, LEASE_S * 2 + 3)
            assert stuck_worker.worker.running == 1
            assert first_handled == []
        finally:
            helper.stop(abort=True)
    finally:
        unstick.set()
        stuck_worker.stop(abort=True)


class _ExplodingValidator(JSONSchemaValidator):
    """Decodes as usual, except a message for user "boom": an error nobody planned for."""

    def decode(self, body: Any, attributes: Any) -> Message:
        message = super().decode(body, attributes)
        if message.data.get("user_id") == "boom":
            raise RuntimeError("the validator blew up")
        return message


def test_an_unexpected_error_dead_letters_that_delivery_and_the_worker_goes_on(bus: Transport) -> None:
    handled: list[str] = []
    app = _app(bus, lambda message: handled.append(message.data["user_id"]), schema=_ExplodingValidator(SCHEMA))
    _publish(app, ["before", "boom", "after"])
    worker = Worker(app, WorkerOptions(concurrency=1, prefetch=2, burst=True, lease_s=LEASE_S))
    worker.run()
    assert sorted(handled) == ["after", "before"]
    [record] = bus.dead_letters(app.queue)
    assert record.reason == "unexpected error: RuntimeError: the validator blew up"
    assert worker.counts == {"handled": 2, "retried": 0, "dead_lettered": 1}


# -- ready means connected ------------------------------------------------------------------


def test_ready_is_logged_once_the_first_receive_succeeded_naming_the_bus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    app = _app("sqlite:///relative/bus.db", lambda message: None)
    with caplog.at_level(logging.INFO, logger="hedwig_tasks.worker"):
        Worker(app, WorkerOptions(burst=True)).run()
    app.transport.close()
    [ready] = [r.getMessage() for r in caplog.records if "ready" in r.getMessage()]
    assert str(tmp_path / "relative" / "bus.db") in ready
    assert "user-created-v1" in ready


def test_a_broker_that_never_answers_is_never_called_ready(caplog: pytest.LogCaptureFixture) -> None:
    app = _app("amqp://guest:s3cret@127.0.0.1:9//?connect_timeout_s=1", lambda message: None)
    seen: list[Any] = []
    from hedwig_tasks import signals

    signals.worker_ready.connect(lambda sender, **kwargs: seen.append(sender), sender=app, weak=False)
    with caplog.at_level(logging.INFO, logger="hedwig_tasks"), pytest.raises(TransportError):
        Worker(app, WorkerOptions()).run()
    assert seen == []
    assert not [r for r in caplog.records if "ready" in r.getMessage()]
    assert "s3cret" not in caplog.text


# -- burst mode and retries it scheduled itself ---------------------------------------------------


def test_burst_on_a_broker_without_depth_waits_for_its_own_retries(emulator_host: str) -> None:
    attempts: list[int] = []

    def flaky(message: Message) -> None:
        attempts.append(message.delivery.attempt if message.delivery else 0)
        if len(attempts) == 1:
            raise ValueError("first try fails")

    transport = gcp_transport(emulator_host, lease_s=10.0)
    app = Hedwig(
        f"burst-{tag()}",
        schema=SCHEMA,
        transport=transport,
        routing={"user-created": f"user-created-{tag()}"},
    )
    app.handler("user-created", "1.*", retry=RetryPolicy(max_retries=2, backoff_s=1.0, jitter=False))(flaky)
    _publish(app, ["once"])
    worker = Worker(app, WorkerOptions(burst=True, wait_s=0.5))
    runner = threading.Thread(target=worker.run, daemon=True)
    runner.start()
    runner.join(60)
    transport.close()
    assert not runner.is_alive(), "the burst worker did not exit"
    assert attempts == [1, 2]
    assert worker.counts == {"handled": 1, "retried": 1, "dead_lettered": 0}


class _CountsFailOnce(MemoryTransport):
    """A memory bus whose first count fails, as a broker that blips during a burst idle check."""

    failed = False

    def counts(self, queue: str, topics: Any) -> Any:
        if not self.failed:
            self.failed = True
            raise TransportError("counting failed: the broker went away for a moment")
        return super().counts(queue, topics)


def test_a_failed_idle_check_in_burst_mode_does_not_stop_the_worker(caplog: pytest.LogCaptureFixture) -> None:
    bus = _CountsFailOnce(lease_s=LEASE_S)
    handled: list[str] = []
    app = _app(bus, lambda message: handled.append(message.data["user_id"]))
    _publish(app, ["only"])
    with caplog.at_level(logging.WARNING, logger="hedwig_tasks.worker"):
        Worker(app, WorkerOptions(burst=True, wait_s=0.05)).run()
    assert handled == ["only"]
    assert bus.failed
    assert "could not count what is left to do" in caplog.text
