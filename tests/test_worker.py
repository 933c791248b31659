"""The worker over the in-process transport: outcomes, retries, dead letters, prefetch, leases, shutdown."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import SCHEMA_FILE
from helpers import WorkerThread, wait_for

from hedwig_tasks import (
    ConfigurationError,
    DeadLetter,
    Hedwig,
    Ignore,
    Message,
    Retry,
    RetryPolicy,
    ValidationError,
    signals,
)
from hedwig_tasks.metrics import Metrics
from hedwig_tasks.retry import NON_RETRYABLE, decide
from hedwig_tasks.transports.memory import MemoryTransport
from hedwig_tasks.worker import Worker, WorkerOptions

FAST = RetryPolicy(max_retries=2, backoff_s=0.05, jitter=False)


def make_app(bus: MemoryTransport | None = None, **options: Any) -> Hedwig:
    options.setdefault("retry", FAST)
    return Hedwig("svc", schema=SCHEMA_FILE, transport=bus or MemoryTransport(), **options)


class Running(WorkerThread):
    """A worker of ``app`` on a thread; ``stop()`` joins it."""

    def __init__(self, app: Hedwig, **options: Any) -> None:
        options.setdefault("wait_s", 0.05)
        app.provision()  # the worker would, in its thread; the test publishes straight away
        super().__init__(Worker(app, WorkerOptions(**options)))


@pytest.fixture
def outcomes() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    seen: list[tuple[str, dict[str, Any]]] = []
    receivers = {}
    for name in (
        "handler_succeeded",
        "handler_failed",
        "handler_dead_lettered",
        "handler_retried",
        "message_dead_lettered",
        "message_invalid",
        "message_unknown",
    ):

        def receiver(sender: Any, _name: str = name, **kwargs: Any) -> None:
            seen.append((_name, kwargs))

        receivers[name] = receiver
        getattr(signals, name).connect(receiver)
    yield seen
    for name, receiver in receivers.items():
        getattr(signals, name).disconnect(receiver)


def _counts(bus: Any) -> tuple[int | None, int | None]:
    [row] = bus.status("svc", ["user-created-v1"])
    return row.depth, row.in_flight


def test_handles_and_acks() -> None:
    app = make_app()
    handled: list[str] = []
    app.handler("user-created", "1.*")(lambda m: handled.append(m.data["user_id"]))
    runner = Running(app)
    for n in range(20):
        app.publish("user-created", "1.0", {"user_id": f"U{n}"})
    wait_for(lambda: len(handled) == 20)
    runner.stop()
    assert sorted(handled) == sorted(f"U{n}" for n in range(20))
    [row] = app.transport.status("svc", ["user-created-v1"])
    assert (row.depth, row.in_flight, row.dead_letters) == (0, 0, 0)


def test_failures_retry_with_backoff_then_dead_letter(outcomes: list[Any]) -> None:
    app = make_app()
    attempts: list[tuple[int, float]] = []

    @app.handler("user-created", "1.*")
    def flaky(message: Message) -> None:
        attempts.append((message.delivery.attempt, time.monotonic()))
        raise ValueError("mail server down")

    runner = Running(app)
    app.publish("user-created", "1.0", {"user_id": "U"})
    wait_for(lambda: any(name == "message_dead_lettered" for name, _ in outcomes))
    runner.stop()
    assert [a for a, _ in attempts] == [1, 2, 3]
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1  # backoff_s * 2**(n-1), no jitter
    [record] = app.transport.dead_letters("svc")
    assert record.reason == "gave up after 3 attempts: ValueError: mail server down"
    assert record.attempts == 3
    retried = [kw for name, kw in outcomes if name == "handler_retried"]
    assert [kw["delay_s"] for kw in retried] == [0.05, 0.1]


def test_handler_control_exceptions(outcomes: list[Any]) -> None:
    app = make_app()
    calls: dict[str, int] = {}

    @app.handler("user-created", "1.*")
    def control(message: Message) -> None:
        kind = message.data["user_id"]
        calls[kind] = calls.get(kind, 0) + 1
        if kind == "retry" and calls[kind] == 1:
            raise Retry("not yet", delay_s=0.01)
        if kind == "ignore":
            raise Ignore()
        if kind == "dead":
            raise DeadLetter("customer unknown")

    runner = Running(app)
    for kind in ("retry", "ignore", "dead"):
        app.publish("user-created", "1.0", {"user_id": kind})
    wait_for(lambda: calls.get("retry") == 2 and "ignore" in calls and "dead" in calls)
    wait_for(lambda: len(app.transport.dead_letters("svc")) == 1)
    runner.stop()
    assert calls == {"retry": 2, "ignore": 1, "dead": 1}
    assert [r.reason for r in app.transport.dead_letters("svc")] == ["customer unknown"]
    assert app.transport.status("svc", ["user-created-v1"])[0].depth == 0


def test_exceptions_outside_retry_on_dead_letter_at_once() -> None:
    app = make_app()
    policy = RetryPolicy(max_retries=5, backoff_s=0.01, dont_retry_on=(KeyError,))
    calls: list[int] = []

    @app.handler("user-created", "1.*", retry=policy)
    def handler(message: Message) -> None:
        calls.append(1)
        raise KeyError("email")

    runner = Running(app)
    app.publish("user-created", "1.0", {"user_id": "U"})
    wait_for(lambda: app.transport.dead_letters("svc"))
    runner.stop()
    assert calls == [1]
    assert app.transport.dead_letters("svc")[0].reason == "not retried: KeyError: 'email'"


@pytest.mark.parametrize(
    ("body", "attributes", "reason"),
    [
        (b"not json", {"hedwig_schema": "x"}, "invalid message: body is not valid JSON"),
        (b'{"user_id": 5}', None, "invalid message: user-created 1.0: data.user_id: 5 is not of type 'string'"),
        (
            b'{"user_id": "U"}',
            {"hedwig_schema": "https://hedwig-tasks.test/schema#/schemas/nope/1.0"},
            "unknown message type 'nope'",
        ),
        (
            b'{"user_id": "U"}',
            {"hedwig_schema": "https://hedwig-tasks.test/schema#/schemas/user-created/9.0"},
            "no major version 9",
        ),
        (b'{"user_id": "U"}', {"hedwig_id": None}, "missing Hedwig attribute(s): hedwig_id"),
        (
            b'{"user_id":"U","email":"e"}',
            {"hedwig_schema": "https://hedwig-tasks.test/schema#/schemas/user-created/2.0"},
            "no handler for 'user-created' major 2",
        ),
    ],
)
def test_poison_goes_to_dead_letters_and_worker_goes_on(body: bytes, attributes: Any, reason: str) -> None:
    bus = MemoryTransport()
    app = make_app(bus)
    good: list[str] = []
    app.handler("user-created", "1.*")(lambda m: good.append(m.data["user_id"]))
    app.provision()
    raw = {
        "hedwig_format_version": "1.0",
        "hedwig_id": "6a8d6c4e-5d0e-4b8e-9a59-6ad1c0d3b1f1",
        "hedwig_message_timestamp": "1795719926586",
        "hedwig_publisher": "other",
        "hedwig_schema": "https://hedwig-tasks.test/schema#/schemas/user-created/1.0",
    }
    for key, value in (attributes or {}).items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    bus.publish("user-created-v1", body, raw)
    runner = Running(app)
    app.publish("user-created", "1.0", {"user_id": "after"})
    wait_for(lambda: good == ["after"] and bus.dead_letters("svc"))
    runner.stop()
    [record] = bus.dead_letters("svc")
    assert reason in record.reason
    assert record.body == body


def test_prefetch_bounds_what_is_held() -> None:
    app = make_app()
    release = threading.Event()
    running: list[int] = []

    @app.handler("user-created", "1.*")
    def hold(m: Message) -> None:
        running.append(1)
        release.wait(5)

    app.provision()
    for n in range(50):
        app.publish("user-created", "1.0", {"user_id": f"U{n}"})
    runner = Running(app, concurrency=2, prefetch=3)
    wait_for(lambda: len(running) == 2 and runner.worker.held == 5)
    # Two more rounds of the receive loop with every slot taken: a worker that hoarded would now hold more.
    for _ in range(2):
        last = runner.worker.last_beat

        def beat_since(last: float = last) -> bool:
            return runner.worker.last_beat > last

        wait_for(beat_since)
    assert runner.worker.held == 5
    [row] = app.transport.status("svc", ["user-created-v1"])
    assert (row.in_flight, row.depth) == (5, 45)
    release.set()
    wait_for(lambda: len(running) == 50)
    runner.stop()


def test_lease_keeper_stops_redelivery_of_slow_handlers() -> None:
    bus = MemoryTransport(lease_s=0.3)
    app = make_app(bus)
    attempts: list[int] = []

    @app.handler("user-created", "1.*")
    def slow(message: Message) -> None:
        attempts.append(message.delivery.attempt)
        time.sleep(1.0)  # three leases long

    # Both run at once, each for three leases; a third slot would take a redelivery at once.
    runner = Running(app, concurrency=3, prefetch=0, lease_s=0.3)
    app.publish("user-created", "1.0", {"user_id": "A"})
    app.publish("user-created", "1.0", {"user_id": "B"})
    # Settled means both acked; a redelivery of either would have run again (and been acked) first.
    wait_for(lambda: len(attempts) == 2 and _counts(bus) == (0, 0), timeout_s=6)
    runner.stop()
    assert attempts == [1, 1]


def test_stop_releases_buffered_at_once_and_finishes_running() -> None:
    app = make_app()
    started = threading.Event()
    finished: list[str] = []

    @app.handler("user-created", "1.*")
    def slow(message: Message) -> None:
        started.set()
        time.sleep(0.5)
        finished.append(message.data["user_id"])

    app.provision()
    for n in range(6):
        app.publish("user-created", "1.0", {"user_id": f"U{n}"})
    runner = Running(app, concurrency=1, prefetch=4)
    started.wait(5)
    runner.stop()
    assert len(finished) == 1
    [row] = app.transport.status("svc", ["user-created-v1"])
    assert (row.depth, row.in_flight) == (5, 0)  # released, visible now; none acked twice


def test_a_raising_signal_receiver_never_changes_the_outcome() -> None:
    app = make_app()
    handled: list[str] = []
    app.handler("user-created", "1.*")(lambda m: handled.append(m.data["user_id"]))

    def broken(sender: Any, **kwargs: Any) -> None:
        raise RuntimeError("metrics down")

    with signals.handler_started.connected_to(broken), signals.handler_succeeded.connected_to(broken):
        runner = Running(app)
        app.publish("user-created", "1.0", {"user_id": "U"})
        wait_for(lambda: handled == ["U"] and _counts(app.transport) == (0, 0))
        runner.stop()
    assert app.transport.dead_letters("svc") == []


def test_async_handlers_and_burst_mode() -> None:
    app = make_app()
    handled: list[str] = []

    @app.handler("user-created", "1.*")
    async def created(message: Message) -> None:
        handled.append(message.data["user_id"])

    app.provision()
    for n in range(5):
        app.publish("user-created", "1.0", {"user_id": f"U{n}"})
    worker = Worker(app, WorkerOptions(burst=True, wait_s=0.05))
    worker.run()  # returns by itself
    assert sorted(handled) == [f"U{n}" for n in range(5)]


def test_signals_of_a_run() -> None:
    app = make_app()
    app.handler("user-created", "1.*")(lambda m: None)
    names: list[str] = []
    catalogue = (
        "worker_init",
        "worker_ready",
        "worker_shutting_down",
        "worker_shutdown",
        "message_received",
        "handler_started",
        "handler_succeeded",
    )
    receivers = []
    for name in catalogue:

        def receiver(sender: Any, _name: str = name, **kwargs: Any) -> None:
            assert sender is app
            names.append(_name)

        receivers.append(receiver)
        getattr(signals, name).connect(receiver, sender=app)
    app.provision()
    app.publish("user-created", "1.0", {"user_id": "U"})
    Worker(app, WorkerOptions(burst=True, wait_s=0.05)).run()
    assert names == [
        "worker_init",
        "worker_ready",
        "message_received",
        "handler_started",
        "handler_succeeded",
        "worker_shutting_down",
        "worker_shutdown",
    ]


def test_unknown_subscription_is_refused() -> None:
    app = make_app()
    app.handler("user-created", "1.*")(lambda m: None)
    with pytest.raises(ConfigurationError, match="no handler of 'svc' consumes nope; its topics are user-created-v1"):
        Worker(app, WorkerOptions(topics=["nope"]))
    with pytest.raises(ConfigurationError, match="concurrency must be 1 or more"):
        WorkerOptions(concurrency=0)


def test_message_attempt_counts_deliveries_in_a_worker() -> None:
    app = make_app()
    attempts: list[tuple[int, int]] = []

    @app.handler("user-created", "1.*")
    def flaky(message: Message) -> None:
        attempts.append((message.attempt, message.delivery.attempt))
        if message.attempt < 3:
            raise Retry("not yet", delay_s=0.01)

    runner = Running(app)
    app.publish("user-created", "1.0", {"user_id": "U"})
    wait_for(lambda: len(attempts) == 3 and runner.worker.counts["handled"] == 1)
    runner.stop()
    assert attempts == [(1, 1), (2, 2), (3, 3)]


def test_a_validation_error_from_a_publish_in_a_handler_dead_letters_at_once(outcomes: list[Any]) -> None:
    app = make_app(retry=RetryPolicy(max_retries=5, backoff_s=0.01))
    calls: list[int] = []

    @app.handler("user-created", "1.*")
    def forwards(message: Message) -> None:
        calls.append(1)
        app.publish("send_email", "1.0", {"to": "x"})  # breaks the schema: "subject" is required

    runner = Running(app)
    app.publish("user-created", "1.0", {"user_id": "U"})
    wait_for(lambda: app.transport.dead_letters("svc"))
    runner.stop()
    assert calls == [1]
    [record] = app.transport.dead_letters("svc")
    assert record.reason.startswith("not retried: ValidationError: send_email 1.0: ")
    assert [name for name, _ in outcomes] == ["handler_failed", "message_dead_lettered"]


def test_non_retryable_errors_are_a_list_a_policy_extends() -> None:
    assert RetryPolicy().dont_retry_on == NON_RETRYABLE
    assert ValidationError in NON_RETRYABLE
    assert decide(RetryPolicy(), ValidationError("bad"), 1).action == "dead_letter"
    assert decide(RetryPolicy(), KeyError("k"), 1).action == "retry"
    extended = RetryPolicy(dont_retry_on=(*NON_RETRYABLE, KeyError))
    assert decide(extended, KeyError("k"), 1).reason == "not retried: KeyError: 'k'"
    assert decide(extended, ValidationError("bad"), 1).action == "dead_letter"
    assert decide(RetryPolicy(dont_retry_on=()), ValidationError("bad"), 1).action == "retry"


class _Lines(logging.Handler):
    """Every log line written at WARNING and above, as the CLI's formatter writes them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.extend(self.format(record).splitlines())


@pytest.fixture
def warning_lines() -> Iterator[_Lines]:
    lines = _Lines()
    root = logging.getLogger("hedwig_tasks")
    root.addHandler(lines)
    yield lines
    root.removeHandler(lines)


def test_deliberate_dead_letters_log_one_line_each_and_are_not_failures(
    outcomes: list[Any], warning_lines: _Lines
) -> None:
    app = make_app()
    metrics = Metrics(app)

    @app.handler("user-created", "1.*")
    def reject(message: Message) -> None:
        raise DeadLetter(f"customer {message.data['user_id']} unknown")

    runner = Running(app)
    for n in range(25):
        app.publish("user-created", "1.0", {"user_id": f"U{n}"})
    wait_for(lambda: len(app.transport.dead_letters("svc")) == 25)
    runner.stop()
    metrics.close()
    assert len(warning_lines.lines) == 25, warning_lines.lines  # one line per message, no traceback
    assert {r.levelno for r in warning_lines.records} == {logging.WARNING}
    assert all(r.exc_info is None for r in warning_lines.records)
    assert "dead-lettered user-created 1.0 id=" in warning_lines.lines[0]
    assert "attempt=1" in warning_lines.lines[0] and "unknown" in warning_lines.lines[0]
    names = [name for name, _ in outcomes]
    assert names.count("handler_dead_lettered") == 25 and names.count("message_dead_lettered") == 25
    assert "handler_failed" not in names
    assert metrics.value("hedwig_failed_total", "user-created", 1) == 0
    assert metrics.value("hedwig_handler_dead_lettered_total", "user-created", 1) == 25
    assert metrics.value("hedwig_dead_lettered_total", "user-created", 1) == 25


def test_an_unexpected_error_logs_one_line_with_its_traceback(warning_lines: _Lines) -> None:
    app = make_app(retry=RetryPolicy(max_retries=0))

    @app.handler("user-created", "1.*")
    def broken(message: Message) -> None:
        raise ZeroDivisionError("oops")

    runner = Running(app)
    app.publish("user-created", "1.0", {"user_id": "U"})
    wait_for(lambda: app.transport.dead_letters("svc"))
    runner.stop()
    [record] = warning_lines.records
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "gave up after 1 attempts: ZeroDivisionError: oops; dead-lettered" in record.getMessage()
