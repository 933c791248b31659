"""SQS messages whose own fields the consumer cannot read, sent raw at moto's queue: each comes
back as a delivery with a fault (or, for a body the transport does not own, as it is), the
good message of the same batch is unharmed, and a worker dead-letters the poison with its reason.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aws_server import aws_transport, moto_url, tag  # noqa: F401
from helpers import wait_for

from hedwig_tasks import Hedwig, Message
from hedwig_tasks.transports._aws_wire import read_message
from hedwig_tasks.transports.aws import AWSTransport
from hedwig_tasks.transports.base import Delivery
from hedwig_tasks.validators.base import to_transport
from hedwig_tasks.worker import Worker, WorkerOptions

SCHEMA = Path(__file__).parent / "schemas" / "schema.json"
#: A body that opens like JSON and nests deeper than Python's parser goes (it raises RecursionError).
TOO_DEEP = '{"a":' + "[" * 100_000


class Queue:
    """One app on moto with its own queue and topic, and raw SQS access to that queue."""

    def __init__(self, server: str) -> None:
        self.transport = aws_transport(server)
        self.name, self.topic = f"faults-{tag()}", f"user-created-{tag()}"
        self.handled: list[str] = []
        self.poison_bodies: list[str] = []
        self.app = Hedwig(self.name, schema=SCHEMA, transport=self.transport, routing={"user-created": self.topic})
        self.app.handler("user-created", "1.*")(self._handle)
        self.app.provision()
        self.sqs = self.transport.client.sqs
        self.url = self.sqs.get_queue_url(QueueName=f"HEDWIG-{self.name}")["QueueUrl"]

    def _handle(self, message: Message) -> None:
        self.handled.append(message.data["user_id"])

    def wire(self, user_id: str) -> tuple[str, dict[str, dict[str, Any]]]:
        """A valid Hedwig message for this app as SQS carries it: body and String attributes."""
        encoded = self.app.validator.encode(self.app.message("user-created", "1.0", {"user_id": user_id}))
        body, attributes = to_transport(encoded, text_only=True)
        return body.decode(), {k: {"DataType": "String", "StringValue": v} for k, v in attributes.items()}

    def send(self, body: str, attributes: dict[str, dict[str, Any]] | None = None) -> str:
        sent = self.sqs.send_message(QueueUrl=self.url, MessageBody=body, MessageAttributes=attributes or {})
        return str(sent["MessageId"])

    def send_poison(self) -> dict[str, str]:
        """One raw message per unreadable field, each otherwise a valid Hedwig message; the
        message id of each, by what is wrong with it."""
        body, attributes = self.wire("binary-header")
        binary = self.poison(body, {**attributes, "tenant": {"DataType": "Binary", "BinaryValue": b"\x00\xff"}})
        envelope = {"Type": "Notification", "TopicArn": "arn:x", "Message": "{}", "MessageAttributes": {"a": "b"}}
        body, attributes = self.wire("dead-letter-info")
        info = {"DataType": "String", "StringValue": json.dumps({"attributes": ["not", "a", "map"]})}
        return {
            "binary": binary,
            "envelope": self.poison(json.dumps(envelope)),
            "dead_letter_info": self.poison(body, {**attributes, "hedwig_dead_letter": info}),
            "too_deep": self.poison(TOO_DEEP),
        }

    def poison(self, body: str, attributes: dict[str, dict[str, Any]] | None = None) -> str:
        self.poison_bodies.append(body)
        return self.send(body, attributes)

    def send_good(self) -> str:
        body, attributes = self.wire("good")
        number = {"DataType": "Number", "StringValue": "42"}  # a Number keeps its text: no fault
        return self.send(body, {**attributes, "retries": number})


@pytest.fixture
def queue(moto_url: str) -> Iterator[Queue]:
    made = Queue(moto_url)
    yield made
    made.transport.close()


def _receive_all(transport: AWSTransport, queue: str, count: int) -> list[Delivery]:
    consumer = transport.consumer(queue, [])
    found: dict[str, Delivery] = {}

    def more() -> bool:
        found.update((d.transport_id, d) for d in consumer.receive(10, wait_s=1))  # raises on a broker failure only
        return len(found) >= count

    wait_for(more, timeout_s=30)
    consumer.close()
    return list(found.values())


def test_unreadable_fields_come_back_as_faults_beside_a_good_message(queue: Queue) -> None:
    ids = queue.send_poison()
    good = queue.send_good()
    got = {d.transport_id: d for d in _receive_all(queue.transport, queue.name, 5)}
    assert got[good].fault == ""
    assert (got[good].attributes["retries"], got[good].attempt) == ("42", 1)
    assert json.loads(got[good].body) == {"user_id": "good"}
    binary = got[ids["binary"]]
    assert binary.fault == "attribute 'tenant' is of type Binary, not text (shown as base64)"
    assert binary.attributes["tenant"] == "AP8="  # the value kept, as text SQS can carry
    envelope = got[ids["envelope"]]
    assert envelope.fault == "SNS envelope: attribute 'a' is not text (type ?)"
    assert json.loads(envelope.body)["Type"] == "Notification"  # the body as it came
    info = got[ids["dead_letter_info"]]
    assert info.fault.startswith("attribute hedwig_dead_letter: its displaced attributes are not a map of text")
    assert '["not", "a", "map"]' in info.fault
    deep = got[ids["too_deep"]]  # not an envelope, so not the transport's to judge: the validator's
    assert (deep.fault, deep.body) == ("", TOO_DEEP.encode())
    assert all(d.attempt == 1 for d in got.values())


def test_a_worker_dead_letters_the_poison_and_handles_the_good_message(queue: Queue) -> None:
    queue.send_poison()
    queue.send_good()
    worker = Worker(queue.app, WorkerOptions(concurrency=2, prefetch=2, wait_s=1.0))
    with _running(worker) as run:
        dead = queue.transport.dead_letters
        wait_for(lambda: run.alive() and queue.handled == ["good"] and len(dead(queue.name)) == 4)
    records = {r.body: r for r in queue.transport.dead_letters(queue.name)}
    assert set(records) == {body.encode() for body in queue.poison_bodies}  # nothing lost, nothing else
    # The transport hands the deep body on as it is; what the worker says of it is the validator's.
    assert not records[TOO_DEEP.encode()].reason.startswith("unreadable delivery: ")
    unreadable = sorted(r.reason for body, r in records.items() if body != TOO_DEEP.encode())
    assert all(reason.startswith("unreadable delivery: ") for reason in unreadable), unreadable
    assert any("attribute 'tenant' is of type Binary" in reason for reason in unreadable)
    assert any("SNS envelope: attribute 'a' is not text" in reason for reason in unreadable)
    assert any("hedwig_dead_letter: its displaced attributes" in reason for reason in unreadable)
    binary = next(r for r in records.values() if "Binary" in r.reason)
    assert binary.attributes["tenant"] == "AP8="  # the value kept, as text
    assert queue.handled == ["good"]  # the binary-header message, valid otherwise, was never handled
    (row,) = queue.transport.status(queue.name, [queue.topic])
    assert (row.depth, row.in_flight) == (0, 0)


@pytest.mark.parametrize(
    ("message", "fault"),
    [
        ({"Attributes": {"ApproximateReceiveCount": "many"}}, "ApproximateReceiveCount 'many' is not a whole"),
        ({"Attributes": {"ApproximateReceiveCount": "0"}}, "ApproximateReceiveCount '0' is not a whole number 1"),
        ({"Attributes": {"ApproximateReceiveCount": None}}, "ApproximateReceiveCount None is not"),
        ({"Attributes": "odd"}, ""),  # no count given: a first delivery
        ({"MessageAttributes": ["a"]}, "message attributes are list, not a map"),
        ({"MessageAttributes": {"a": "b"}}, "attribute 'a' is str, not an SQS attribute value"),
        ({"MessageAttributes": {"a": {"DataType": "String"}}}, "attribute 'a' of type String has no text value"),
        ({"MessageAttributes": {"a": {"DataType": "Binary", "BinaryValue": "x"}}}, "attribute 'a' is of type Binary"),
        ({"Body": b"bytes"}, "body is bytes, not text"),
    ],
)
def test_fields_sqs_itself_sets_are_read_safely(message: dict[str, Any], fault: str) -> None:
    """What moto cannot be made to send (its own counts, shapes botocore would not parse) read
    through the same function the consumer uses: never an error, attempt 1 when unreadable."""
    read = read_message({"Body": "{}", **message})
    assert read.fault.startswith(fault) if fault else read.fault == ""
    assert read.attempt == 1


class _running:
    """Runs a worker on a thread for a ``with`` block; a worker that died fails the wait at once."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="test-worker", daemon=True)

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:  # handed to the test thread
            self.errors.append(exc)

    def __enter__(self) -> _running:
        self.thread.start()
        return self

    def alive(self) -> bool:
        """True while the worker runs; fails the test at once if it died."""
        assert not self.errors, f"the worker died: {self.errors[0]!r}"
        return True

    def __exit__(self, *exc_info: object) -> None:
        self.worker.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the worker did not stop"
        assert not self.errors, f"the worker died: {self.errors[0]!r}"
