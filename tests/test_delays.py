"""Countdown, ETA and expiry on publish (issue 17 items 1-2), through the app and a worker.

The transports' own delays are pinned by the contract suite on every transport
(``test_delayed_publish_arrives_not_before``); here: the options' grammar, the refusal on a
transport that cannot delay, a delayed message through a worker, and what a worker does with an
expired message in each mode.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import cli, one_error, project
from conftest import SCHEMA_FILE

from hedwig_tasks import ConfigurationError, Hedwig, Message, signals
from hedwig_tasks._publish_timing import EXPIRES_AT_ATTRIBUTE, timing
from hedwig_tasks.metrics import Metrics
from hedwig_tasks.models import Message as HedwigMessage
from hedwig_tasks.transports import from_url
from hedwig_tasks.transports.memory import MemoryTransport
from hedwig_tasks.worker import Worker, WorkerOptions


def make_app(**options: Any) -> Hedwig:
    """An app on a memory bus whose queue takes user-created (so provision subscribes it)."""
    transport = options.pop("transport", None) or MemoryTransport()
    app = Hedwig("svc", schema=SCHEMA_FILE, transport=transport, subscriptions=["user-created-v1"], **options)
    app.provision()
    return app


# -- the options ----------------------------------------------------------------------------------


def test_timing_reads_delays_etas_and_expiries() -> None:
    now = 1_000_000.0
    clock = lambda: now  # noqa: E731
    assert timing(clock=clock).plain
    assert timing(delay_s=30, clock=clock).delay_s == 30.0
    eta = dt.datetime.fromtimestamp(now + 90, dt.timezone.utc)
    assert timing(eta=eta, clock=clock).delay_s == pytest.approx(90.0)
    assert timing(eta=now - 5, clock=clock).delay_s == 0.0  # an eta past is no delay
    assert timing(expires_s=60, clock=clock).expires_at_ms == (now + 60) * 1000
    assert timing(expires_at=now + 1.5, clock=clock).expires_at_ms == (now + 1.5) * 1000
    assert timing(delay_s=10, expires_s=60, clock=clock) == timing(delay_s=10, expires_at=now + 60, clock=clock)


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"delay_s": 1, "eta": 5.0}, "delay_s or eta, not both"),
        ({"expires_s": 1, "expires_at": 5.0}, "expires_s or expires_at, not both"),
        ({"delay_s": -1}, "delay_s=-1: expected seconds"),
        ({"delay_s": "soon"}, "delay_s='soon'"),
        ({"expires_s": float("nan")}, "expires_s=nan"),
        ({"eta": dt.datetime(2030, 1, 1)}, "aware datetime"),
        ({"delay_s": 60, "expires_s": 30}, "expire before its delay is over"),
    ],
)
def test_bad_timing_options_are_refused(options: dict[str, Any], complaint: str) -> None:
    app = make_app()
    with pytest.raises(ConfigurationError, match=complaint):
        app.publish("user-created", "1.0", {"user_id": "U"}, **options)


def test_expired_option_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="expired='drop'"):
        Hedwig("svc", schema=SCHEMA_FILE, transport="memory://", expired="drop")


def test_every_built_in_transport_keeps_delays() -> None:
    urls = ("memory://", "sqlite:///bus.db", "aws://?region=us-east-1", "gcp://hedwig-test", "amqp://", "redis://")
    for url in urls:
        assert from_url(url).capabilities.delayed_publish, url


def test_a_transport_that_cannot_delay_refuses_naming_itself() -> None:
    """A transport whose capabilities say it keeps no delay (a third party's) is never asked for one."""
    bus = MemoryTransport()
    bus.capabilities = dataclasses.replace(bus.capabilities, delayed_publish=False)
    app = make_app(transport=bus)
    with pytest.raises(ConfigurationError, match="the memory transport does not support delayed publish yet"):
        app.publish("user-created", "1.0", {"user_id": "U"}, delay_s=1)
    app.publish("user-created", "1.0", {"user_id": "U"}, delay_s=0)  # no delay: sent as usual
    assert len(bus.consumer(app.queue, app.subscribed_topics()).receive(10, wait_s=0)) == 1


def test_expiry_rides_in_an_attribute_that_is_not_a_header() -> None:
    bus = MemoryTransport()
    app = make_app(transport=bus)
    sent = app.publish("user-created", "1.0", {"user_id": "U"}, expires_s=60)
    (delivery,) = bus.consumer(app.queue, app.published_topics()).receive(10, wait_s=0)
    expires_ms = int(delivery.attributes[EXPIRES_AT_ATTRIBUTE])
    assert 59_000 < expires_ms - time.time() * 1000 <= 60_001  # rounded up to the millisecond
    received = app.decode(delivery)
    assert (received.id, dict(received.headers)) == (sent.id, dict(sent.headers))
    assert EXPIRES_AT_ATTRIBUTE not in received.headers


# -- through a worker ------------------------------------------------------------------------------


def test_a_delayed_message_runs_once_not_before_its_time() -> None:
    """On every publishing path: Hedwig.publish, the handler's publish, models.Message.publish."""
    app = make_app()
    ran: dict[str, float] = {}

    @app.handler("user-created", "1.*")
    def created(message: Message) -> None:
        assert message.data["user_id"] not in ran
        ran[message.data["user_id"]] = time.time()

    due = time.time() + 1.0
    app.publish("user-created", "1.0", {"user_id": "delay"}, delay_s=1.0)
    app.publish("user-created", "1.0", {"user_id": "eta"}, eta=dt.datetime.fromtimestamp(due, dt.timezone.utc))
    HedwigMessage.new("user-created", "1.0", {"user_id": "model"}).publish(app, delay_s=1.0)
    app.publish("user-created", "1.0", {"user_id": "now"})
    Worker(app, WorkerOptions(burst=True, wait_s=0.05)).run()  # burst waits for what is delayed
    assert sorted(ran) == ["delay", "eta", "model", "now"]
    assert ran["now"] < due
    assert all(ran[name] >= due - 0.01 for name in ("delay", "eta", "model"))


@pytest.mark.parametrize("mode", ["ignore", "dead-letter"])
def test_an_expired_message_never_runs_its_handler(mode: str) -> None:
    bus = MemoryTransport()
    app = make_app(transport=bus, expired=mode)
    ran: list[str] = []
    app.handler("user-created", "1.*")(lambda message: ran.append(message.data["user_id"]))
    expired: list[dict[str, Any]] = []

    def on_expired(sender: Any, **kwargs: Any) -> None:
        expired.append(kwargs)

    signals.message_expired.connect(on_expired, sender=app)
    metrics = Metrics(app)
    try:
        app.publish("user-created", "1.0", {"user_id": "late"}, expires_at=time.time() - 1)
        app.publish("user-created", "1.0", {"user_id": "fresh"}, expires_s=60)
        app.publish("user-created", "1.0", {"user_id": "plain"})
        worker = Worker(app, WorkerOptions(burst=True, wait_s=0.05))
        worker.run()
    finally:
        signals.message_expired.disconnect(on_expired, sender=app)
        metrics.close()
    assert sorted(ran) == ["fresh", "plain"]
    ((event),) = expired
    assert event["message"].data == {"user_id": "late"}
    assert event["expired_at_ms"] <= time.time() * 1000
    assert metrics.value("hedwig_expired_total", "user-created", 1) == 1
    dead = bus.dead_letters(app.queue)
    if mode == "ignore":
        assert dead == []
        assert worker.counts["dead_lettered"] == 0
    else:
        (record,) = dead
        assert record.reason.startswith("expired at ")
        assert worker.counts["dead_lettered"] == 1
    assert bus.status(app.queue, app.subscribed_topics())[0].depth == 0  # settled either way


def test_the_handlers_publish_takes_the_timing_options() -> None:
    bus = MemoryTransport()
    app = make_app(transport=bus)
    created = app.handler("user-created", "1.*")(lambda message: None)
    created.publish(user_id="later", delay_s=30)
    created.publish({"user_id": "until"}, expires_s=60)
    consumer = bus.consumer(app.queue, app.subscribed_topics())
    (delivery,) = consumer.receive(10, wait_s=0)  # the delayed one is held by the bus
    assert app.decode(delivery).data == {"user_id": "until"}
    assert EXPIRES_AT_ATTRIBUTE in delivery.attributes


def test_the_publish_command_takes_delay_and_expires(tmp_path: Path) -> None:
    """``hedwig-tasks publish --delay/--expires`` on the quick start's SQLite bus."""
    folder = project(tmp_path)
    assert cli(folder, "provision", "-A", "tasks").returncode == 0
    email = '{"to": "%s@example.com", "subject": "Hi"}'
    started = time.time()
    later = cli(folder, "publish", "-A", "tasks", "send_email", "1.0", email % "later", "--delay", "1.5")
    assert later.returncode == 0, later.stderr
    assert "(due in 1.5s)" in later.stdout
    stale = cli(folder, "publish", "-A", "tasks", "send_email", "1.0", email % "stale", "--expires", "0")
    assert stale.returncode == 0, stale.stderr
    refused = cli(folder, "publish", "-A", "tasks", "send_email", "1.0", email % "x", "--delay", "-1")
    assert "delay_s=-1.0: expected seconds" in one_error(refused)
    worker = cli(folder, "worker", "-A", "tasks", "--burst")
    assert worker.returncode == 0, worker.stderr
    assert "e-mail to later@example.com" in worker.stderr
    assert time.time() - started >= 1.5
    assert "e-mail to stale@example.com" not in worker.stderr
    assert "ignored send_email 1.0" in worker.stderr and "expired at" in worker.stderr
