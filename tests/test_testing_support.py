"""Testing support (issue 16, items 1-3): publishes kept in the process, named buses, drain."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hedwig_tasks import DeadLetter, Hedwig, Message, PublishError, Retry, RetryPolicy, ValidationError
from hedwig_tasks.testing import DrainCounts, Published, drain, eager, record_published
from hedwig_tasks.transports.memory import MemoryTransport

pytest_plugins = ["pytester"]


def _schema(*types: str) -> dict[str, Any]:
    message = {"type": "object", "x-version": "1.0", "required": ["id"], "properties": {"id": {"type": "string"}}}
    return {"id": "https://shop.test/schema", "schemas": {t: {"1.*": message} for t in types}}


SCHEMA = _schema("order-placed", "receipt-sent")
FAST = RetryPolicy(max_retries=3, backoff_s=0.05, jitter=False)


_opened: list[Hedwig] = []


@pytest.fixture(autouse=True)
def close_apps() -> Iterator[None]:
    """Close the transports the test's apps opened (the SQLite bus keeps a wake-up socket)."""
    yield
    while _opened:
        _opened.pop().close()


def shop(transport: str, *, handled: list[str] | None = None) -> tuple[Hedwig, Hedwig]:
    """``orders`` publishes order-placed; ``emails`` handles it and publishes receipt-sent, which orders handles."""
    orders = Hedwig("orders", schema=SCHEMA, transport=transport)
    emails = Hedwig("emails", schema=SCHEMA, transport=transport, retry=FAST)
    seen = handled if handled is not None else []

    @emails.handler("order-placed")
    def placed(message: Message) -> None:
        seen.append(f"emails:{message.data['id']}")
        emails.publish("receipt-sent", "1.0", {"id": message.data["id"]})

    @orders.handler("receipt-sent")
    def receipt(message: Message) -> None:
        seen.append(f"orders:{message.data['id']}")

    for app in (orders, emails):
        app.provision()
    _opened.extend((orders, emails))
    return orders, emails


def depth(app: Hedwig) -> int:
    return sum(s.depth or 0 for s in app.transport.status(app.queue, app.subscribed_topics()))


# -- item 1: hedwig_published keeps publishes in the process -----------------------------------


def test_recorded_publishes_never_reach_the_bus(tmp_path: Path, hedwig_published: Published) -> None:
    orders, emails = shop(f"sqlite:///{tmp_path}/bus.db")
    sent = orders.publish("order-placed", "1.0", {"id": "o-1"})
    assert hedwig_published.assert_published("order-placed", data={"id": "o-1"}).id == sent.id
    assert hedwig_published.topics == ["order-placed-v1"]
    assert depth(emails) == 0  # nothing reached the SQLite file
    with pytest.raises(ValidationError, match="id"):
        orders.publish("order-placed", "1.0", {"id": 7})  # still validated, so a bad publish fails
    with hedwig_published.passthrough():
        orders.publish("order-placed", "1.0", {"id": "o-2"})
    assert depth(emails) == 1
    assert len(hedwig_published.of_type("order-placed")) == 2


def test_an_intercepted_publish_needs_no_provisioned_topic(hedwig_published: Published) -> None:
    orders = Hedwig("orders", schema=SCHEMA, transport="memory://")
    orders.publish("order-placed", "1.0", {"id": "o-1"})  # would raise PublishError if sent
    hedwig_published.assert_published("order-placed", count=1)


def test_record_published_for_one_app_leaves_the_others_alone() -> None:
    orders, emails = shop("memory://one-app")
    with record_published(emails) as published:
        orders.publish("order-placed", "1.0", {"id": "sent"})
        emails.publish("receipt-sent", "1.0", {"id": "kept"})
    assert [m.data["id"] for m in published.messages] == ["kept"]
    assert depth(emails) == 1 and depth(orders) == 0
    with record_published(passthrough=True) as published:
        emails.publish("receipt-sent", "1.0", {"id": "sent too"})
    assert depth(orders) == 1 and len(published.messages) == 1
    orders.publish("order-placed", "1.0", {"id": "after"})  # nothing intercepts after the block
    assert depth(emails) == 2


def test_recording_keeps_the_transports_attribute_limit() -> None:
    from hedwig_tasks.transports.aws import AWSTransport

    app = Hedwig("orders", schema=SCHEMA, transport=MemoryTransport(capabilities=AWSTransport.capabilities))
    headers = {f"h{i}": "v" for i in range(8)}
    with record_published(), pytest.raises(PublishError, match="carries at most 10"):
        app.publish("order-placed", "1.0", {"id": "o"}, headers=headers)


def test_marker_and_reset_of_named_buses_through_pytest(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        f"""
        import pytest
        from hedwig_tasks import Hedwig

        SCHEMA = {SCHEMA!r}

        def app():
            return Hedwig("orders", schema=SCHEMA, transport="memory://kept-between-tests", queue="q",
                          subscriptions=["order-placed-v1"])

        def depth(a):
            return a.transport.status("q", ["order-placed-v1"])[0].depth

        def test_1_intercepted(hedwig_published):
            a = app()
            a.provision()
            a.publish("order-placed", "1.0", {{"id": "o"}})
            assert depth(a) == 0

        @pytest.mark.hedwig_passthrough
        def test_2_passthrough(hedwig_published):
            a = app()
            a.provision()
            a.publish("order-placed", "1.0", {{"id": "o"}})
            assert depth(a) == 1 and len(hedwig_published.messages) == 1

        def test_3_the_bus_is_empty_again():
            a = app()
            assert "subscribe q to order-placed-v1" in a.provision()
            assert depth(a) == 0
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:xdist", "--strict-markers")
    result.assert_outcomes(passed=3)


# -- item 2: named in-process buses ------------------------------------------------------------


def test_two_apps_meet_on_a_named_bus_and_not_on_private_ones() -> None:
    handled: list[str] = []
    orders, emails = shop("memory://shop", handled=handled)
    orders.publish("order-placed", "1.0", {"id": "o-1"})
    assert depth(emails) == 1
    private_orders, private_emails = shop("memory://")
    private_orders.publish("order-placed", "1.0", {"id": "o-2"})
    assert depth(private_emails) == 0  # each memory:// URL is its own bus
    assert drain(orders, emails) == {"orders": DrainCounts(handled=1), "emails": DrainCounts(handled=1)}
    assert handled == ["emails:o-1", "orders:o-1"]


# -- item 3: drain and eager for several apps --------------------------------------------------


@pytest.mark.parametrize("bus", ["memory", "sqlite"])
def test_drain_runs_until_everything_is_handled(bus: str, tmp_path: Path) -> None:
    handled: list[str] = []
    url = "memory://drain" if bus == "memory" else f"sqlite:///{tmp_path}/bus.db"
    orders, emails = shop(url, handled=handled)
    for n in range(5):
        orders.publish("order-placed", "1.0", {"id": f"o-{n}"})
    counts = drain(orders, emails, timeout_s=20)
    assert counts == {"orders": DrainCounts(handled=5), "emails": DrainCounts(handled=5)}
    assert sorted(handled) == sorted([f"emails:o-{n}" for n in range(5)] + [f"orders:o-{n}" for n in range(5)])
    assert depth(orders) == depth(emails) == 0
    assert drain(emails) == {"emails": DrainCounts()}  # nothing left: returns at once


def test_drain_fails_fast_with_the_handlers_exception() -> None:
    orders = Hedwig("orders", schema=SCHEMA, transport="memory://fail-fast")
    emails = Hedwig("emails", schema=SCHEMA, transport="memory://fail-fast", retry=FAST)

    calls: list[int] = []

    @emails.handler("order-placed")
    def broken(message: Message) -> None:
        calls.append(message.delivery.attempt if message.delivery else 0)
        raise KeyError(message.data["id"])

    emails.provision()
    orders.publish("order-placed", "1.0", {"id": "o-1"})
    with pytest.raises(KeyError, match="o-1"):
        drain(orders, emails)
    assert calls == [1]  # raised on the first failure, though the policy would retry it


def test_drain_without_fail_fast_lets_retries_and_dead_letters_take_their_course() -> None:
    app = Hedwig("emails", schema=SCHEMA, transport="memory://course", retry=FAST)
    attempts: dict[str, int] = {}

    @app.handler("order-placed")
    def flaky(message: Message) -> None:
        key = message.data["id"]
        attempts[key] = attempts.get(key, 0) + 1
        if key == "poison":
            raise DeadLetter("cannot be shipped")
        if attempts[key] == 1:
            raise ConnectionError("mail server away")

    app.provision()
    for key in ("a", "poison"):
        app.publish("order-placed", "1.0", {"id": key})
    counts = drain(app, fail_fast=False)
    assert counts == {"emails": DrainCounts(handled=1, retried=1, dead_lettered=1)}
    assert attempts == {"a": 2, "poison": 1}
    (dead,) = app.transport.dead_letters(app.queue)
    assert dead.reason == "cannot be shipped"


def test_a_retry_due_after_the_grace_is_left_scheduled() -> None:
    app = Hedwig("emails", schema=SCHEMA, transport="memory://later")

    @app.handler("order-placed")
    def later(message: Message) -> None:
        raise Retry("later", delay_s=60)

    app.provision()
    app.publish("order-placed", "1.0", {"id": "o"})
    started = time.monotonic()
    assert drain(app, retry_grace_s=1) == {"emails": DrainCounts(retried=1)}
    assert time.monotonic() - started < 30  # did not wait the minute out
    assert depth(app) == 1  # still there, for a later drain or worker


def test_an_unreadable_or_unknown_message_fails_the_drain() -> None:
    app = Hedwig("emails", schema=SCHEMA, transport="memory://unreadable", subscriptions=["order-placed-v1"])
    app.provision()
    app.transport.publish("order-placed-v1", b"not json", {})
    with pytest.raises(AssertionError, match="emails dead-lettered an invalid message"):
        drain(app)
    app.publish("order-placed", "1.0", {"id": "o"})  # no handler takes it
    assert drain(app, fail_fast=False) == {"emails": DrainCounts(dead_lettered=1)}


def test_drain_times_out_saying_what_is_left() -> None:
    release = threading.Event()
    app = Hedwig("emails", schema=SCHEMA, transport="memory://stuck")
    app.handler("order-placed")(lambda message: release.wait(10))
    app.provision()
    app.publish("order-placed", "1.0", {"id": "o"})
    try:
        with pytest.raises(TimeoutError, match=r"not settled after 0.3s: workers still starting or handling"):
            drain(app, timeout_s=0.3)
    finally:
        release.set()


def test_hedwig_eager_takes_several_apps(hedwig_eager: Any, hedwig_published: Published) -> None:
    handled: list[str] = []
    orders, emails = shop("memory://eager", handled=handled)
    assert hedwig_eager(orders, emails) is orders
    orders.publish("order-placed", "1.0", {"id": "o-1"})
    assert handled == ["emails:o-1", "orders:o-1"]  # across apps, inline
    assert [m.type for m in hedwig_published.messages] == ["receipt-sent", "order-placed"]
    assert depth(orders) == depth(emails) == 0


def test_eager_apps_run_only_what_they_subscribe_to_and_restore_their_mode() -> None:
    handled: list[str] = []
    orders, emails = shop("memory://", handled=handled)
    other = Hedwig("other", schema=SCHEMA, transport="memory://", subscriptions=["receipt-sent-v1"])
    other.handler("order-placed")(lambda message: handled.append("other"))
    with eager(orders, emails, other):
        orders.publish("order-placed", "1.0", {"id": "o"})
    assert handled == ["emails:o", "orders:o"]  # other takes order-placed but is not subscribed to it
    assert (orders.eager, emails.eager, other.eager) == (False, False, False)
    with eager(emails):
        emails.publish("order-placed", "1.0", {"id": "alone"})
    assert handled[-1] == "emails:alone"  # and orders, not eager, ran nothing of its receipt
    assert depth(orders) == 0  # which stayed in the process like every eager publish
