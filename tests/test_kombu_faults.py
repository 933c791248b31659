"""Messages other systems put on the Kombu transport's queues, on real RabbitMQ.

Each test writes at the broker as another client would (a plain Kombu producer, py-amqp's
``basic_publish``), never through our publisher. A
delivery whose own fields cannot be read comes back with ``Delivery.fault`` and its raw bytes; a
worker dead-letters it with a reason and goes on with the good messages behind it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import amqp
import kombu
import pytest
from kombu_server import cleanup, server_url

from hedwig_tasks import Hedwig, Message
from hedwig_tasks.exceptions import PublishError
from hedwig_tasks.testing.contract import Names
from hedwig_tasks.transports.base import Delivery
from hedwig_tasks.transports.kombu import KombuConsumer, KombuTransport, exchange_name, subscription_name
from hedwig_tasks.validators.base import to_transport
from hedwig_tasks.worker import Worker, WorkerOptions

ATTEMPTS = "x-hedwig-attempts"
SCHEMA_FILE = Path(__file__).parent / "schemas" / "schema.json"


class Bench:
    """An app subscribed to a topic of the test's own on one broker, and a record of what it handled."""

    def __init__(self, broker: str) -> None:
        self.url = server_url(broker)
        self.names = Names.fresh()
        self.bus = KombuTransport(self.url, lease_s=30.0)
        self.app = Hedwig(
            self.names.queue, schema=SCHEMA_FILE, transport=self.bus, routing={"user-created": self.names.topic}
        )
        self.handled: list[str] = []
        self.app.handler("user-created", "1.*")(self._handle)
        self.app.provision()
        self.subscription = subscription_name(self.names.queue, self.names.topic)

    def _handle(self, message: Message) -> None:
        self.handled.append(message.data["user_id"])

    def wire(self, user_id: str) -> tuple[bytes, dict[str, str]]:
        """A valid ``user-created`` 1.0 as it travels: the body and the Hedwig attributes."""
        message = self.app.message("user-created", "1.0", {"user_id": user_id})
        body, attributes = to_transport(self.app.validator.encode(message), text_only=False)
        return body, attributes

    def publish_good(self, count: int) -> list[str]:
        user_ids = [f"good-{n}" for n in range(count)]
        for user_id in user_ids:
            self.app.publish("user-created", "1.0", {"user_id": user_id})
        return user_ids

    def consumer(self) -> KombuConsumer:
        return self.bus.consumer(self.names.queue, [self.names.topic])

    def close(self) -> None:
        self.app.close()  # the bus, and any state store the app opened
        cleanup(self.url, [self.names.queue], [self.names.topic, self.names.other_topic])


@pytest.fixture
def rabbit() -> Iterator[Bench]:
    bench = Bench("amqp")
    yield bench
    bench.close()


def receive_n(consumer: KombuConsumer, count: int, timeout_s: float = 10.0) -> list[Delivery]:
    """Receive until ``count`` deliveries came (or fail after ``timeout_s``)."""
    found: list[Delivery] = []
    deadline = time.monotonic() + timeout_s
    while len(found) < count:
        assert time.monotonic() < deadline, f"received {len(found)} of {count}"
        found += consumer.receive(count - len(found), wait_s=0.5)
    return found


def run_burst(app: Hedwig, timeout_s: float = 30.0) -> Worker:
    """Run an in-process worker in burst mode until the queue is empty; re-raise what it raised."""
    worker = Worker(app, WorkerOptions(burst=True, concurrency=2, prefetch=4, wait_s=0.2))
    raised: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as exc:  # the test thread re-raises it
            raised.append(exc)

    thread = threading.Thread(target=run, name="burst-worker", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        worker.stop()
        worker.stop()
        thread.join(10)
        raise AssertionError("the burst worker did not finish")
    if raised:
        raise raised[0]
    return worker


# -- RabbitMQ -----------------------------------------------------------------------------------


def amqp_channel(url: str) -> tuple[amqp.Connection, Any]:
    """A bare py-amqp connection, as a client of another system would have."""
    parts = urlsplit(url)
    connection = amqp.Connection(
        f"{parts.hostname}:{parts.port or 5672}", userid=parts.username or "guest", password=parts.password or "guest"
    )
    connection.connect()
    return connection, connection.channel()


def publish_raw(bench: Bench, *messages: tuple[Any, dict[str, Any], dict[str, Any]]) -> None:
    """(body, headers, properties) each, with py-amqp's ``basic_publish`` to the test's topic."""
    connection, channel = amqp_channel(bench.url)
    try:
        for body, headers, properties in messages:
            message = amqp.Message(body, application_headers=headers, **properties)
            channel.basic_publish(message, exchange=exchange_name(bench.names.topic), routing_key="")
    finally:
        connection.close()


def publish_as_text(bench: Bench, user_id: str) -> bytes:
    """A valid message from a plain Kombu producer that sends its body as UTF-8 text; its bytes."""
    body, attributes = bench.wire(user_id)
    with kombu.Connection(bench.url) as connection:
        connection.Producer().publish(
            body.decode("utf-8"),
            exchange=exchange_name(bench.names.topic),
            routing_key="",
            headers={**attributes, "case": "text"},
            content_type="text/plain",
            content_encoding="utf-8",
        )
    return body


def test_rabbitmq_text_and_empty_bodies_are_delivered_as_bytes(rabbit: Bench) -> None:
    # py-amqp decodes a body that has a content_encoding to str, and leaves an empty one as "".
    text = publish_as_text(rabbit, "text-1")
    publish_raw(
        rabbit,
        (b"", {"case": "empty"}, {}),
        (b"", {"case": "empty-utf8"}, {"content_encoding": "utf-8"}),
        (b"caf\xe9", {"case": "latin-1"}, {"content_encoding": "latin-1"}),
    )
    rabbit.publish_good(2)
    consumer = rabbit.consumer()
    found = receive_n(consumer, 6)
    by_case = {d.attributes.get("case"): d for d in found}
    assert by_case["text"].body == text
    assert (by_case["empty"].body, by_case["empty-utf8"].body) == (b"", b"")
    assert by_case["latin-1"].body == b"caf\xe9"  # encoded back with the encoding it was sent with
    assert all(not d.fault and d.attempt == 1 for d in found)
    assert sorted(json.loads(d.body)["user_id"] for d in found if d.attributes.get("case") is None) == [
        "good-0",
        "good-1",
    ]
    consumer.ack(found)
    consumer.close()


ODD_HEADERS: list[tuple[str, dict[str, Any], str]] = [
    ("attempts-text", {ATTEMPTS: "three"}, "x-hedwig-attempts is 'three', not a count"),
    ("attempts-float", {ATTEMPTS: 2.5}, "x-hedwig-attempts is 2.5, not a count"),
    ("attempts-negative", {ATTEMPTS: -4}, "x-hedwig-attempts is -4, not a count"),
    ("attempts-bool", {ATTEMPTS: True}, "x-hedwig-attempts is True, not a count"),
    ("number", {"hedwig_id": 12345}, "headers that are not text: hedwig_id (int)"),
    ("table", {"trace": {"span": 1}, "tags": [1, 2]}, "headers that are not text: tags (list), trace (dict)"),
    ("void", {"nothing": None}, "headers that are not text: nothing (null)"),
]


def test_rabbitmq_odd_headers_are_faults_and_the_rest_of_the_batch_goes_on(rabbit: Bench) -> None:
    body, attributes = rabbit.wire("odd")
    publish_raw(rabbit, *[(body, {**attributes, **odd, "case": case}, {}) for case, odd, _ in ODD_HEADERS])
    # Kombu cannot decompress this one: without an error handler it raises out of the drain.
    publish_raw(rabbit, (body, {**attributes, "compression": "bogus", "case": "compression"}, {}))
    good = rabbit.publish_good(2)
    consumer = rabbit.consumer()
    found = receive_n(consumer, len(ODD_HEADERS) + 3)
    by_case = {d.attributes.get("case"): d for d in found}
    for case, _, fault in ODD_HEADERS:
        assert (by_case[case].fault, by_case[case].body, by_case[case].attempt) == (fault, body, 1), case
        assert by_case[case].attributes["hedwig_schema"] == attributes["hedwig_schema"]  # the text ones are kept
    assert (by_case["compression"].fault, by_case["compression"].body) == ("", body)
    assert sorted(json.loads(d.body)["user_id"] for d in found if "case" not in d.attributes) == good
    # A copy the consumer makes (released at shutdown here) keeps its fault.
    consumer.release([by_case["attempts-text"]])
    [again] = receive_n(consumer, 1)
    assert (again.fault, again.body, again.attempt) == (by_case["attempts-text"].fault, body, 2)
    consumer.ack([again, *(d for d in found if d is not by_case["attempts-text"])])
    consumer.close()


def test_rabbitmq_worker_dead_letters_the_poison_and_handles_the_messages_behind_it(rabbit: Bench) -> None:
    body, attributes = rabbit.wire("poisoned")
    publish_raw(
        rabbit,
        (b"", {"case": "empty"}, {}),
        (body, {**attributes, ATTEMPTS: "many", "case": "attempts"}, {}),
        (body, {**attributes, "hedwig_id": 7, "case": "number"}, {}),
    )
    publish_as_text(rabbit, "text-1")
    good = rabbit.publish_good(5)
    worker = run_burst(rabbit.app)
    assert sorted(rabbit.handled) == sorted([*good, "text-1"])  # none lost; duplicates allowed
    dead = {cast(str, r.attributes.get("case")): r for r in rabbit.bus.dead_letters(rabbit.names.queue)}
    assert sorted(dead) == ["attempts", "empty", "number"]
    assert dead["empty"].body == b""
    assert dead["empty"].reason.startswith("invalid message: ")
    assert dead["attempts"].reason == "unreadable delivery: x-hedwig-attempts is 'many', not a count"
    assert dead["number"].reason == "unreadable delivery: headers that are not text: hedwig_id (int)"
    assert (dead["attempts"].body, dead["attempts"].attempts) == (body, 1)
    assert worker.counts["dead_lettered"] == 3
    # Dead letters go back as they are, an empty body included.
    assert rabbit.bus.requeue_dead_letters(rabbit.names.queue) == 3
    consumer = rabbit.consumer()
    back = receive_n(consumer, 3)
    assert sorted(d.body for d in back) == sorted([b"", body, body])
    consumer.ack(back)
    consumer.close()


# -- publishing to topics nobody reads, or that do not exist ------------------------------------


def test_a_topic_without_subscriptions_is_warned_about_once_and_a_missing_one_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bench = Bench("amqp")
    names = bench.names
    try:
        bench.bus.provision(None, [], [names.other_topic])  # a topic, and no queue subscribed to it
        with caplog.at_level(logging.WARNING, logger="hedwig_tasks.transports.kombu"):
            bench.bus.publish(names.other_topic, b"to nobody", {})
            bench.bus.publish_many(names.other_topic, [(b"again", {}), (b"and again", {})])
            bench.publish_good(1)  # a topic with a subscription: nothing to say
        warned = [r.getMessage() for r in caplog.records if "has no subscription" in r.getMessage()]
        assert len(warned) == 1
        assert warned[0].startswith(f"topic {names.other_topic} has no subscription")
        with pytest.raises(
            PublishError, match=f"topic 'never-{names.topic}' does not exist: run `hedwig-tasks provision`"
        ):
            bench.bus.publish(f"never-{names.topic}", b"lost?", {})
        bench.bus.publish(names.topic, b"after a refusal", {})  # the publisher goes on
        consumer = bench.consumer()
        found = receive_n(consumer, 2)
        assert b"after a refusal" in {d.body for d in found}
        consumer.ack(found)
        consumer.close()
    finally:
        bench.close()
