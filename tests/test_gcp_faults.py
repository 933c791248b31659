"""Pub/Sub messages whose own hedwig_attempts or hedwig_not_before cannot be read, published raw
at the emulator's topic: each comes back as a delivery with a fault (attempt 1 where the count
is unreadable), the good message beside them is unharmed, and a worker dead-letters the poison.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from gcp_server import PROJECT, emulator_host, gcp_transport, tag  # noqa: F401
from google.cloud import pubsub_v1
from helpers import wait_for

from hedwig_tasks import Hedwig, Message
from hedwig_tasks.transports.base import Delivery
from hedwig_tasks.transports.gcp import ATTEMPTS_ATTRIBUTE, NOT_BEFORE_ATTRIBUTE
from hedwig_tasks.validators.base import to_transport
from hedwig_tasks.worker import Worker, WorkerOptions

SCHEMA = Path(__file__).parent / "schemas" / "schema.json"
#: What each poison message carries beside a valid Hedwig message, by its user id.
POISON = {
    "attempts-abc": {ATTEMPTS_ATTRIBUTE: "abc"},
    "not-before-soon": {NOT_BEFORE_ATTRIBUTE: "soon"},
    "both-odd": {ATTEMPTS_ATTRIBUTE: "-1", NOT_BEFORE_ATTRIBUTE: "1.7e12"},
}
FAULTS = {
    "attempts-abc": f"{ATTEMPTS_ATTRIBUTE}='abc' is not a whole number",
    "not-before-soon": f"{NOT_BEFORE_ATTRIBUTE}='soon' is not a time in epoch ms",
    "both-odd": (
        f"{NOT_BEFORE_ATTRIBUTE}='1.7e12' is not a time in epoch ms; {ATTEMPTS_ATTRIBUTE}='-1' is not a whole number"
    ),
}


class App:
    """One app on the emulator with its own queue and topic, and a raw publisher for that topic."""

    def __init__(self, host: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.transport = gcp_transport(host, publish_timeout_s=5.0)
        self.name, self.topic = f"faults-{tag()}", f"user-created-{tag()}"
        self.handled: list[str] = []
        self.app = Hedwig(self.name, schema=SCHEMA, transport=self.transport, routing={"user-created": self.topic})
        self.app.handler("user-created", "1.*")(self._handle)
        self.app.provision()
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", host)  # read when the raw client is made
        self.publisher = pubsub_v1.PublisherClient()

    def _handle(self, message: Message) -> None:
        self.handled.append(message.data["user_id"])

    def publish_raw(self, user_id: str, extra: dict[str, str]) -> str:
        """A valid Hedwig message plus ``extra`` attributes, straight at the topic; its message id."""
        encoded = self.app.validator.encode(self.app.message("user-created", "1.0", {"user_id": user_id}))
        body, attributes = to_transport(encoded, text_only=False)
        path = self.transport.topic_path(self.topic)
        return str(self.publisher.publish(path, body, **attributes, **extra).result(timeout=30))

    def publish_all(self) -> dict[str, str]:
        """Every poison message and one good one; the user id of each, by message id."""
        ids = {self.publish_raw(user_id, extra): user_id for user_id, extra in POISON.items()}
        ids[self.app.publish("user-created", "1.0", {"user_id": "good"}).id] = "good"
        return ids

    def close(self) -> None:
        self.publisher.stop()
        self.transport.close()


@pytest.fixture
def app(emulator_host: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[App]:
    made = App(emulator_host, monkeypatch)
    yield made
    made.close()


def _user_id(delivery: Delivery) -> str:
    return str(json.loads(delivery.body)["user_id"])


def test_unreadable_attempts_and_not_before_are_faults_beside_a_good_message(app: App) -> None:
    app.publish_all()
    consumer = app.transport.consumer(app.name, [app.topic])
    found: dict[str, Delivery] = {}

    def more() -> bool:
        found.update((_user_id(d), d) for d in consumer.receive(10, wait_s=1))  # never raises for a message
        return len(found) >= 4

    wait_for(more, timeout_s=30)
    assert (found["good"].fault, found["good"].attempt) == ("", 1)
    for user_id, fault in FAULTS.items():
        assert (found[user_id].fault, found[user_id].attempt) == (fault, 1)
        assert found[user_id].attributes["hedwig_encoding"] == "utf8"  # the rest of it read as usual
    consumer.ack(list(found.values()))


def test_a_worker_dead_letters_the_poison_and_handles_the_good_message(app: App) -> None:
    app.publish_all()
    worker = Worker(app.app, WorkerOptions(concurrency=2, prefetch=2, wait_s=1.0))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    def settled() -> bool:
        assert not errors, f"the worker died: {errors[0]!r}"
        return app.handled == ["good"] and len(app.transport.dead_letters(app.name)) == len(POISON)

    thread = threading.Thread(target=run, name="test-worker", daemon=True)
    thread.start()
    try:
        wait_for(settled, timeout_s=60)
    finally:
        worker.stop()
        thread.join(30)
    assert not thread.is_alive()
    assert not errors
    records = {json.loads(r.body)["user_id"]: r for r in app.transport.dead_letters(app.name)}
    assert {user_id: r.reason for user_id, r in records.items()} == {
        user_id: f"unreadable delivery: {fault}" for user_id, fault in FAULTS.items()
    }
    assert all(r.attempts == 1 and r.subscription == f"hedwig-{app.name}-{app.topic}" for r in records.values())
    assert app.handled == ["good"]


def test_dead_letters_listing_reads_odd_counts_safely(app: App) -> None:
    """A message that reaches the DLQ topic carrying our dead-letter attributes with odd values
    (published there by something else) is listed, not an error."""
    dlq = f"projects/{PROJECT}/topics/hedwig-{app.name}-dlq"
    odd = {"hedwig_dead_letter_reason": "by hand", "hedwig_dead_letter_attempts": "x", "hedwig_dead_letter_at": "y"}
    app.publisher.publish(dlq, b"odd", **odd).result(timeout=30)
    wait_for(lambda: len(app.transport.dead_letters(app.name)) == 1, timeout_s=30)
    (record,) = app.transport.dead_letters(app.name)
    assert (record.body, record.reason, record.attempts) == (b"odd", "by hand", 0)
    assert record.dead_at > 0
