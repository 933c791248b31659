"""The transport contract suite: one class of tests that every transport's test module subclasses.

A subclass provides a ``transport`` fixture built with the suite's ``clock`` and ``lease_s``::

    class TestSQLiteTransport(TransportContract):
        lease_s = 30.0

        @pytest.fixture
        def transport(self, clock: ContractClock, tmp_path: Path) -> Iterator[Transport]:
            bus = SQLiteTransport(tmp_path / "bus.db", lease_s=self.lease_s, clock=clock)
            yield bus
            bus.close()

Time: ``clock`` is a :class:`ManualClock` by default, so leases and delays run out the moment a
test calls ``clock.advance(...)``. A transport whose broker keeps time itself overrides the
``clock`` fixture to return a :class:`RealClock` (``advance`` sleeps) and sets ``lease_s`` as
short as its broker allows. Every duration in the tests is a multiple of ``lease_s``.

Brokers that deliver eventually (rather than the moment a publish returns) set ``quiet_s``, how
long a receive must stay empty before "nothing came" is believed, and ``deliver_timeout_s``.
Brokers that may deliver a message twice (SQS, Pub/Sub) set ``at_least_once``: the tests then
assert that nothing was lost, and count repeats instead of failing on them.

Tests of an optional capability skip, naming it, on a transport whose ``capabilities`` say it
lacks it, so ``pytest -ra`` lists what was not tested and why.
Names are unique per test, so a shared broker or emulator needs no cleaning between tests.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Sequence
from typing import ClassVar, Protocol

import pytest

from hedwig_tasks.exceptions import PublishError
from hedwig_tasks.transports.base import Consumer, Delivery, SubscriptionStatus, Transport

__all__ = ["ContractClock", "ManualClock", "Names", "RealClock", "TransportContract"]


class ContractClock(Protocol):
    """Epoch seconds when called; ``advance`` moves time forward (or waits for it to pass)."""

    def __call__(self) -> float: ...

    def advance(self, seconds: float) -> None: ...


class ManualClock:
    """Time that moves only when told; injected into transports that take a ``clock``."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RealClock:
    """Wall time; ``advance`` sleeps. For transports whose broker keeps the time."""

    def __call__(self) -> float:
        return time.time()

    def advance(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclasses.dataclass(frozen=True)
class Names:
    """Queue and topic names unique to one test."""

    queue: str
    other_queue: str
    third_queue: str
    topic: str
    other_topic: str

    @classmethod
    def fresh(cls) -> Names:
        tag = uuid.uuid4().hex[:8]
        return cls(f"q-{tag}", f"q2-{tag}", f"q3-{tag}", f"t-{tag}", f"t2-{tag}")


#: What each optional capability means, for the reason a skipped contract test gives.
_CAPABILITY_DOCS = {
    "per_topic_consumption": "consumers of some of a queue's topics",
    "status_counts": "counts in status()",
}


def _bodies(deliveries: Sequence[Delivery]) -> list[bytes]:
    return sorted(d.body for d in deliveries)


class TransportContract:
    """What every transport must do; subclass it in ``tests/test_transport_<name>.py``."""

    #: Seconds a receive leases a message; the subclass builds its transport with it.
    lease_s: ClassVar[float] = 30.0
    #: Seconds an empty receive waits before "nothing is there" is believed.
    quiet_s: ClassVar[float] = 0.5
    #: Longest wait for messages that should arrive, in seconds.
    deliver_timeout_s: ClassVar[float] = 10.0
    #: The broker may hand out a message again while it is leased (SQS, Pub/Sub): receiving
    #: keeps the newest delivery of each message and counts the repeats in ``duplicates``.
    at_least_once: ClassVar[bool] = False
    #: Repeats this test received and set aside (``at_least_once`` brokers only).
    duplicates: int = 0

    # -- fixtures and helpers ---------------------------------------------------------------

    @pytest.fixture
    def clock(self) -> ContractClock:
        return ManualClock()

    @pytest.fixture
    def transport(self) -> Transport:
        raise NotImplementedError("a TransportContract subclass provides the 'transport' fixture")

    @pytest.fixture
    def names(self) -> Names:
        return Names.fresh()

    def subscribed(self, transport: Transport, queue: str, *topics: str) -> Consumer:
        """Provision ``queue``'s subscriptions to ``topics`` and return its consumer."""
        transport.provision(queue, topics, [])
        return transport.consumer(queue, topics)

    def publish(self, transport: Transport, topic: str, count: int, prefix: str = "m") -> list[bytes]:
        bodies = [f"{prefix}-{i:04d}".encode() for i in range(count)]  # sorted as bytes
        for body in bodies:
            transport.publish(topic, body, {"n": body.decode()})
        return bodies

    def receive(self, consumer: Consumer, count: int, *, batch: int = 10) -> list[Delivery]:
        """Receive until ``count`` deliveries came (or the timeout); fails if more came.

        With ``at_least_once``, ``count`` distinct messages: the newest delivery of each.
        """
        found: list[Delivery] = []
        deadline = time.monotonic() + self.deliver_timeout_s
        while len(found) < count and time.monotonic() < deadline:
            found = self._distinct(found + consumer.receive(min(batch, count - len(found)), wait_s=0.5))
        assert len(found) == count, f"expected {count} deliveries, got {len(found)}"
        return found

    def _distinct(self, deliveries: list[Delivery]) -> list[Delivery]:
        if not self.at_least_once:
            return deliveries
        newest = {d.transport_id or d.body: d for d in deliveries}
        self.duplicates += len(deliveries) - len(newest)
        return list(newest.values())

    def assert_all_came(self, bodies: Sequence[bytes], expected: Sequence[bytes]) -> None:
        """Every expected body came, and nothing else; repeats too on an ``at_least_once`` broker."""
        if self.at_least_once:
            missing = sorted(set(expected) - set(bodies))
            assert sorted(set(bodies)) == sorted(expected), (
                f"lost {missing!r}; {len(bodies) - len(set(bodies))} repeats"
            )
        else:
            assert sorted(bodies) == sorted(expected)  # each exactly once

    def assert_nothing(self, consumer: Consumer) -> None:
        found = consumer.receive(10, wait_s=self.quiet_s)
        assert found == [], f"expected nothing, got {_bodies(found)!r}"

    def skip_without(self, transport: Transport, capability: str) -> None:
        """Skip the test, saying why, when the transport declares it lacks ``capability``."""
        if not getattr(transport.capabilities, capability):
            described = _CAPABILITY_DOCS.get(capability, capability)
            pytest.skip(f"{type(transport).__name__}.capabilities.{capability} is False: it does not offer {described}")

    def status(self, transport: Transport, queue: str, topic: str) -> SubscriptionStatus:
        (row,) = transport.status(queue, [topic])
        return row

    # -- provisioning and publishing -------------------------------------------------------

    def test_provision_is_idempotent(self, transport: Transport, names: Names) -> None:
        first = transport.provision(names.queue, [names.topic], [names.other_topic])
        assert any(names.topic in line for line in first)
        assert any(names.other_topic in line for line in first)
        assert transport.provision(names.queue, [names.topic], [names.other_topic]) == []

    def test_provision_dry_run_changes_nothing(self, transport: Transport, names: Names) -> None:
        transport.provision(names.third_queue, [names.topic], [])  # the bus exists; the topic too
        subscribe, publish = [names.topic], [names.topic, names.other_topic]  # one topic in both lists
        planned = transport.provision(names.queue, subscribe, publish, dry_run=True)
        assert f"create topic {names.topic}" not in " ".join(planned)
        assert any(names.other_topic in line for line in planned)
        assert transport.provision(names.queue, subscribe, publish, dry_run=True) == planned
        with pytest.raises(PublishError):
            transport.publish(names.other_topic, b"x", {})
        transport.publish(names.topic, b"before the subscription", {})
        self.assert_nothing(transport.consumer(names.queue, [names.topic]))
        assert transport.provision(names.queue, subscribe, publish) == planned

    def test_publish_to_unprovisioned_topic_raises(self, transport: Transport, names: Names) -> None:
        transport.provision(names.queue, [names.other_topic], [])
        with pytest.raises(PublishError, match=names.topic):
            transport.publish(names.topic, b"lost?", {"a": "b"})
        with pytest.raises(PublishError):
            transport.publish_many(names.topic, [(b"lost?", {})])

    def test_fan_out_gives_every_subscribed_queue_a_copy(self, transport: Transport, names: Names) -> None:
        first = self.subscribed(transport, names.queue, names.topic)
        second = self.subscribed(transport, names.other_queue, names.topic)
        elsewhere = self.subscribed(transport, names.third_queue, names.other_topic)
        bodies = self.publish(transport, names.topic, 3)
        assert _bodies(self.receive(first, 3)) == bodies
        assert _bodies(self.receive(second, 3)) == bodies
        self.assert_nothing(elsewhere)
        self.assert_nothing(transport.consumer(names.third_queue, [names.topic]))

    def test_publish_to_topic_without_subscribers_is_kept_nowhere(self, transport: Transport, names: Names) -> None:
        transport.provision(None, [], [names.topic])
        assert transport.publish(names.topic, b"into the void", {})
        consumer = self.subscribed(transport, names.queue, names.topic)
        self.assert_nothing(consumer)

    def test_publish_many(self, transport: Transport, names: Names) -> None:
        consumer = self.subscribed(transport, names.queue, names.topic)
        batch = [(f"b-{i}".encode(), {"i": str(i)}) for i in range(25)]
        ids = transport.publish_many(names.topic, batch)
        assert len(ids) == 25
        assert len(set(ids)) == 25
        received = self.receive(consumer, 25)
        assert sorted((d.body, dict(d.attributes)) for d in received) == sorted(batch)

    # -- delayed publishes -------------------------------------------------------------------

    #: Delay of the delayed-publish test, in seconds.
    publish_delay_s: ClassVar[float] = 2.0

    def test_delayed_publish_arrives_not_before(self, transport: Transport, names: Names, clock: ContractClock) -> None:
        """``delay_s`` on publish and publish_many: each arrives once, as a first attempt, not before."""
        self.skip_without(transport, "delayed_publish")
        consumer = self.subscribed(transport, names.queue, names.topic)
        delay_s, due = self.publish_delay_s, clock() + self.publish_delay_s
        transport.publish(names.topic, b"later-1", {"n": "1"}, delay_s=delay_s)
        transport.publish_many(names.topic, [(b"later-2", {"n": "2"}), (b"later-3", {"n": "3"})], delay_s=delay_s)
        transport.publish(names.topic, b"now", {"n": "0"})
        arrived: dict[bytes, tuple[float, Delivery]] = {}
        deadline = time.monotonic() + delay_s + self.deliver_timeout_s
        while len(arrived) < 4 and time.monotonic() < deadline:
            if isinstance(clock, ManualClock) and b"now" in arrived:
                self.assert_nothing(consumer)  # held however long a receive waits, until time moves
                clock.advance(delay_s)
            for delivery in consumer.receive(10, wait_s=0.5):
                arrived.setdefault(delivery.body, (clock(), delivery))
                consumer.ack([delivery])
        assert sorted(arrived) == [b"later-1", b"later-2", b"later-3", b"now"]
        for body in (b"later-1", b"later-2", b"later-3"):
            when, delivery = arrived[body]
            assert when >= due - 0.01, f"{body!r} came {due - when:.3f}s early"
            assert delivery.attempt == 1
        if not self.at_least_once:
            self.assert_nothing(consumer)

    # -- receiving --------------------------------------------------------------------------

    def test_body_and_attributes_round_trip(self, transport: Transport, names: Names) -> None:
        consumer = self.subscribed(transport, names.queue, names.topic)
        if transport.capabilities.text_only:
            body = "héllo, wörld ✓ \U0001f989".encode()
        else:
            body = bytes(range(256)) + b"\r\n\xff\x00"  # NULs at both ends, CRLF, invalid UTF-8
        attributes = {"hedwig_id": "6f1e", "name": "Zoë \U0001f989", "empty": "", "quote": "\"a\"='b'"}
        transport.publish(names.topic, body, attributes)
        (delivery,) = self.receive(consumer, 1)
        assert delivery.body == body
        assert isinstance(delivery.body, bytes)
        assert dict(delivery.attributes) == attributes
        assert delivery.attempt == 1
        assert delivery.subscription == self.status(transport, names.queue, names.topic).subscription

    def test_receive_respects_max_messages(self, transport: Transport, names: Names) -> None:
        consumer = self.subscribed(transport, names.queue, names.topic)
        bodies = self.publish(transport, names.topic, 5)
        first = consumer.receive(2, wait_s=self.deliver_timeout_s)
        assert 1 <= len(first) <= 2
        rest = self.receive(consumer, 5 - len(first))
        self.assert_all_came(_bodies(first + rest), bodies)

    def test_empty_receive_returns_after_wait(self, transport: Transport, names: Names) -> None:
        consumer = self.subscribed(transport, names.queue, names.topic)
        started = time.monotonic()
        assert consumer.receive(10, wait_s=0.3) == []
        elapsed = time.monotonic() - started
        assert 0.15 <= elapsed < 1.3, f"an empty receive(wait_s=0.3) took {elapsed:.2f}s"

    def test_receive_wakes_when_a_message_arrives(self, transport: Transport, names: Names) -> None:
        consumer = self.subscribed(transport, names.queue, names.topic)
        timer = threading.Timer(0.2, transport.publish, (names.topic, b"late", {}))
        timer.start()
        started = time.monotonic()
        try:
            found = consumer.receive(1, wait_s=10.0)
        finally:
            timer.join()
        assert _bodies(found) == [b"late"]
        assert time.monotonic() - started < 5.0

    def test_consumer_of_some_topics_receives_only_those(self, transport: Transport, names: Names) -> None:
        self.skip_without(transport, "per_topic_consumption")
        self.subscribed(transport, names.queue, names.topic, names.other_topic)
        only_first = transport.consumer(names.queue, [names.topic])
        only_second = transport.consumer(names.queue, [names.other_topic])
        firsts = self.publish(transport, names.topic, 2, prefix="first")
        seconds = self.publish(transport, names.other_topic, 3, prefix="second")
        assert _bodies(self.receive(only_first, 2)) == firsts
        self.assert_nothing(only_first)
        assert _bodies(self.receive(only_second, 3)) == seconds

    def test_consumer_is_thread_safe(self, transport: Transport, names: Names) -> None:
        consumer = self.subscribed(transport, names.queue, names.topic)
        bodies = self.publish(transport, names.topic, 120)
        seen: list[bytes] = []
        lock = threading.Lock()
        deadline = time.monotonic() + self.deliver_timeout_s

        def work() -> None:
            while time.monotonic() < deadline:
                with lock:
                    if len(seen) >= len(bodies):
                        return
                batch = consumer.receive(7, wait_s=0.1)
                consumer.ack(batch)
                with lock:
                    seen.extend(d.body for d in batch)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(self.deliver_timeout_s + 10)
        assert not any(thread.is_alive() for thread in threads), "a receiving thread is stuck"
        self.assert_all_came(seen, bodies)

    # -- leases and settling ----------------------------------------------------------------

    def test_expired_lease_redelivers_with_next_attempt(
        self, transport: Transport, names: Names, clock: ContractClock
    ) -> None:
        consumer = self.subscribed(transport, names.queue, names.topic)
        transport.publish(names.topic, b"slow", {"k": "v"})
        (first,) = self.receive(consumer, 1)
        self.assert_nothing(consumer)
        clock.advance(self.lease_s * 1.5)
        (second,) = self.receive(consumer, 1)
        assert (second.body, dict(second.attributes)) == (b"slow", {"k": "v"})
        assert (first.attempt, second.attempt) == (1, 2)
        clock.advance(self.lease_s * 1.5)
        (third,) = self.receive(consumer, 1)
        assert third.attempt == 3

    def test_ack_removes(self, transport: Transport, names: Names, clock: ContractClock) -> None:
        consumer = self.subscribed(transport, names.queue, names.topic)
        self.publish(transport, names.topic, 3)
        received = self.receive(consumer, 3)
        consumer.ack(received[:2])
        consumer.ack([])
        clock.advance(self.lease_s * 1.5)
        (again,) = self.receive(consumer, 1)
        assert again.body == received[2].body
        consumer.ack([again])
        clock.advance(self.lease_s * 1.5)
        self.assert_nothing(consumer)
        assert self.status(transport, names.queue, names.topic).depth in (0, None)

    def test_stale_receipt_settles_nothing(self, transport: Transport, names: Names, clock: ContractClock) -> None:
        consumer = self.subscribed(transport, names.queue, names.topic)
        transport.publish(names.topic, b"twice", {})
        (stale,) = self.receive(consumer, 1)
        clock.advance(self.lease_s * 1.5)
        (current,) = self.receive(consumer, 1)
        consumer.ack([stale])
        consumer.release([stale])
        consumer.retry_later(stale, 0.0)
        consumer.dead_letter(stale, "stale")
        self.assert_nothing(consumer)  # still leased to ``current``
        assert transport.dead_letters(names.queue) == []
        consumer.release([current])
        (last,) = self.receive(consumer, 1)
        assert (last.body, last.attempt) == (b"twice", 3)

    def test_retry_later_delays_then_redelivers(self, transport: Transport, names: Names, clock: ContractClock) -> None:
        consumer = self.subscribed(transport, names.queue, names.topic)
        transport.publish(names.topic, b"again", {"k": "v"})
        (first,) = self.receive(consumer, 1)
        consumer.retry_later(first, self.lease_s * 3)
        clock.advance(self.lease_s * 1.5)  # past the lease, not past the delay
        self.assert_nothing(consumer)
        clock.advance(self.lease_s * 2)
        (second,) = self.receive(consumer, 1)
        assert (second.body, dict(second.attributes), second.attempt) == (b"again", {"k": "v"}, 2)

    def test_release_makes_visible_at_once(self, transport: Transport, names: Names) -> None:
        consumer = self.subscribed(transport, names.queue, names.topic)
        self.publish(transport, names.topic, 2)
        received = self.receive(consumer, 2)
        self.assert_nothing(consumer)
        consumer.release(received)
        again = self.receive(consumer, 2)
        assert _bodies(again) == _bodies(received)
        assert [d.attempt for d in again] == [2, 2]

    def test_extend_lease_keeps_it_invisible(self, transport: Transport, names: Names, clock: ContractClock) -> None:
        consumer = self.subscribed(transport, names.queue, names.topic)
        self.publish(transport, names.topic, 2)
        done, kept = sorted(self.receive(consumer, 2), key=lambda d: d.body)
        consumer.extend_lease([done, kept], self.lease_s * 3)
        clock.advance(self.lease_s * 1.5)  # past the first lease, inside the extended one
        self.assert_nothing(consumer)
        consumer.ack([done])  # the receipt still settles after an extension
        clock.advance(self.lease_s * 2)
        (back,) = self.receive(consumer, 1)
        assert (back.body, back.attempt) == (kept.body, 2)

    # -- dead letters and status ------------------------------------------------------------

    def test_dead_letter_keeps_body_attributes_and_reason(self, transport: Transport, names: Names) -> None:
        consumer = self.subscribed(transport, names.queue, names.topic)
        bystander = self.subscribed(transport, names.other_queue, names.topic)
        transport.publish(names.topic, b"poison", {"why": "b\u00e4d"})
        (delivery,) = self.receive(consumer, 1)
        consumer.dead_letter(delivery, "DecodeError: no schema for 'x'")
        self.assert_nothing(consumer)
        (record,) = transport.dead_letters(names.queue)
        assert (record.body, dict(record.attributes)) == (b"poison", {"why": "b\u00e4d"})
        assert record.reason == "DecodeError: no schema for 'x'"
        assert (record.subscription, record.attempts) == (delivery.subscription, 1)
        assert record.dead_at > 0
        assert transport.dead_letters(names.other_queue) == []
        assert _bodies(self.receive(bystander, 1)) == [b"poison"]

    def test_dead_letters_limit(self, transport: Transport, names: Names) -> None:
        consumer = self.subscribed(transport, names.queue, names.topic)
        self.publish(transport, names.topic, 3)
        for delivery in self.receive(consumer, 3):
            consumer.dead_letter(delivery, f"reason {delivery.body.decode()}")
        assert len(transport.dead_letters(names.queue, limit=2)) == 2
        assert sorted(r.reason for r in transport.dead_letters(names.queue)) == [f"reason m-{i:04d}" for i in range(3)]

    def test_requeue_dead_letters(self, transport: Transport, names: Names) -> None:
        consumer = self.subscribed(transport, names.queue, names.topic)
        bodies = self.publish(transport, names.topic, 3)
        for delivery in self.receive(consumer, 3):
            consumer.dead_letter(delivery, "failed")
        calls: list[tuple[int, int | None]] = []
        assert transport.requeue_dead_letters(names.queue, limit=2, progress=lambda *a: calls.append(a)) == 2
        assert calls
        assert calls[-1][0] == 2
        assert calls[-1][1] in (2, None)
        assert len(transport.dead_letters(names.queue)) == 1
        requeued = self.receive(consumer, 2)
        assert all(d.attempt == 1 for d in requeued)
        assert all(dict(d.attributes) == {"n": d.body.decode()} for d in requeued)
        assert transport.requeue_dead_letters(names.queue) == 1
        assert transport.dead_letters(names.queue) == []
        assert _bodies([*requeued, *self.receive(consumer, 1)]) == bodies

    def dead_lettered(self, transport: Transport, names: Names, count: int) -> tuple[Consumer, list[bytes]]:
        """``count`` messages of ``names.topic`` dead-lettered by ``names.queue``'s consumer."""
        consumer = self.subscribed(transport, names.queue, names.topic)
        bodies = self.publish(transport, names.topic, count)
        for delivery in self.receive(consumer, count):
            consumer.dead_letter(delivery, f"reason {delivery.body.decode()}")
        return consumer, bodies

    def test_dead_letters_have_unique_stable_ids(self, transport: Transport, names: Names) -> None:
        self.dead_lettered(transport, names, 3)
        records = transport.dead_letters(names.queue)
        ids = [r.transport_id for r in records]
        assert all(ids) and len(set(ids)) == 3
        assert sorted(r.transport_id for r in transport.dead_letters(names.queue)) == sorted(ids)

    def test_dead_letters_by_id(self, transport: Transport, names: Names) -> None:
        self.dead_lettered(transport, names, 3)
        first, *_ = transport.dead_letters(names.queue)
        (found,) = transport.dead_letters(names.queue, ids=[first.transport_id, "no-such-id"])
        assert (found.transport_id, found.body, found.reason) == (first.transport_id, first.body, first.reason)
        assert transport.dead_letters(names.queue, ids=["no-such-id"]) == []
        assert transport.dead_letters(names.queue, ids=[]) == []
        assert len(transport.dead_letters(names.queue)) == 3  # reading by id leaves them all there

    def test_requeue_dead_letters_by_id(self, transport: Transport, names: Names) -> None:
        consumer, _ = self.dead_lettered(transport, names, 3)
        chosen = transport.dead_letters(names.queue)[1]
        assert transport.requeue_dead_letters(names.queue, ids=["no-such-id"]) == 0
        assert transport.requeue_dead_letters(names.queue, ids=[chosen.transport_id]) == 1
        (back,) = self.receive(consumer, 1)
        assert back.body == chosen.body
        left = transport.dead_letters(names.queue)
        assert sorted(r.body for r in left) == sorted({b"m-0000", b"m-0001", b"m-0002"} - {chosen.body})

    def test_purge_dead_letters(self, transport: Transport, names: Names) -> None:
        consumer, _ = self.dead_lettered(transport, names, 3)
        chosen = transport.dead_letters(names.queue)[0]
        assert transport.purge_dead_letters(names.queue, ids=["no-such-id"]) == 0
        assert transport.purge_dead_letters(names.queue, ids=[chosen.transport_id]) == 1
        assert sorted(r.body for r in transport.dead_letters(names.queue)) == sorted(
            {b"m-0000", b"m-0001", b"m-0002"} - {chosen.body}
        )
        calls: list[tuple[int, int | None]] = []
        assert transport.purge_dead_letters(names.queue, progress=lambda *a: calls.append(a)) == 2
        assert calls and calls[-1][0] == 2
        assert transport.dead_letters(names.queue) == []
        self.assert_nothing(consumer)  # purged means gone, not requeued

    def test_status_counts(self, transport: Transport, names: Names, clock: ContractClock) -> None:
        self.skip_without(transport, "status_counts")
        consumer = self.subscribed(transport, names.queue, names.topic, names.other_topic)
        self.publish(transport, names.topic, 4)
        assert self._counts(transport, names) == (4, 0, 0)
        dead, delayed, held = self.receive(transport.consumer(names.queue, [names.topic]), 3)
        assert self._counts(transport, names) == (1, 3, 0)
        consumer.dead_letter(dead, "bad")
        consumer.retry_later(delayed, self.lease_s * 10)  # a delayed retry still counts as waiting
        assert self._counts(transport, names) == (2, 1, 1)
        clock.advance(self.lease_s * 1.5)  # ``held``'s lease ran out: waiting again
        assert self._counts(transport, names) == (3, 0, 1)
        statuses = transport.status(names.queue, [names.topic, names.other_topic])
        assert [s.topic for s in statuses] == [names.topic, names.other_topic]
        assert statuses[0].subscription == held.subscription
        assert (statuses[1].depth, statuses[1].in_flight, statuses[1].dead_letters) == (0, 0, 0)

    def _counts(self, transport: Transport, names: Names) -> tuple[int | None, int | None, int | None]:
        row = self.status(transport, names.queue, names.topic)
        return row.depth, row.in_flight, row.dead_letters
