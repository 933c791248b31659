"""Rate limits: the rate's grammar, the limiter's spacing, and a worker on the SQLite bus keeping to it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SCHEMA_FILE
from helpers import WorkerThread, wait_for

from hedwig_tasks import ConfigurationError, Hedwig, Message
from hedwig_tasks.ratelimit import RateLimit, RateLimiter
from hedwig_tasks.worker import Worker, WorkerOptions


@pytest.mark.parametrize(
    ("text", "per_s"), [("100/s", 100.0), ("30/m", 0.5), ("7200/h", 2.0), (" 2.5 / s ", 2.5), ("1/h", 1 / 3600)]
)
def test_rates_per_second_minute_and_hour(text: str, per_s: float) -> None:
    assert RateLimit.parse(text).per_s == pytest.approx(per_s)


@pytest.mark.parametrize("text", ["100", "0/s", "10/d", "fast", "-1/s", "1/sec", ""])
def test_a_bad_rate_fails_at_registration_naming_the_option(text: str) -> None:
    app = Hedwig("svc", schema=SCHEMA_FILE, transport="memory://")
    with pytest.raises(ConfigurationError, match=r"rate_limit=.*expected a positive count per second, minute or hour"):
        app.handler("user-created", "1.*", rate_limit=text)(lambda message: None)
    assert len(app.registry) == 0


def test_the_limiter_spaces_starts_and_never_lends_ahead() -> None:
    limiter = RateLimiter(RateLimit.parse("4/s"))
    assert [limiter.acquire(10.0) for _ in range(4)] == [0.0, 0.25, 0.5, 0.75]  # each reserves the next turn
    assert limiter.acquire(20.0) == 0.0  # an idle while does not bank turns for a burst
    assert limiter.acquire(20.0) == 0.25


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Hedwig]:
    app = Hedwig("svc", schema=SCHEMA_FILE, transport=f"sqlite:///{tmp_path}/bus.db?lease_s=1")
    yield app
    app.close()


def test_a_worker_keeps_to_the_rate_and_the_prefetch_bound_and_waiting_messages_keep_their_leases(
    app: Hedwig,
) -> None:
    starts: list[tuple[float, int]] = []

    @app.handler("user-created", "1.*", rate_limit="10/s")
    def handle(message: Message) -> None:
        starts.append((time.monotonic(), message.attempt))

    app.provision()
    for n in range(30):
        app.publish("user-created", "1.0", {"user_id": f"U{n}"})
    running = WorkerThread(Worker(app, WorkerOptions(concurrency=4, prefetch=4, wait_s=0.05)))
    peak = [0]

    def done() -> bool:
        peak[0] = max(peak[0], running.worker.held)
        return len(starts) >= 30

    wait_for(done, 20)
    running.stop()
    times = sorted(t for t, _ in starts)
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 9.0 <= rate <= 11.0, rate
    assert peak[0] <= 8  # concurrency + prefetch
    # the last waited about 2.9 s, nearly three leases of 1 s: kept leased, never redelivered
    assert [attempt for _, attempt in starts] == [1] * 30
