"""The AWS transport on moto's server: the shared contract, plus what only SNS/SQS shows."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aws_server import ACCOUNT, CREDENTIALS, REGION, aws, aws_transport, moto_url, seconds_hidden, tag  # noqa: F401
from helpers import wait_for

from hedwig_tasks import Hedwig, Message
from hedwig_tasks.exceptions import ConfigurationError, PublishError, TransportError
from hedwig_tasks.settings import HedwigSettings
from hedwig_tasks.testing.contract import ContractClock, ManualClock, Names, RealClock, TransportContract
from hedwig_tasks.transports import from_url
from hedwig_tasks.transports._aws_consumer import SQSConsumer
from hedwig_tasks.transports.aws import DEAD_LETTER_ATTRIBUTE, MAX_MESSAGE_BYTES, AWSTransport
from hedwig_tasks.transports.base import Delivery, Transport
from hedwig_tasks.worker import Worker, WorkerOptions

SCHEMA = Path(__file__).parent / "schemas" / "schema.json"


class TestAWSTransport(TransportContract):
    """SQS keeps time itself, in whole seconds: leases of 2 s, and receives wait whole seconds."""

    lease_s = 2.0
    quiet_s = 1.0
    deliver_timeout_s = 10.0
    at_least_once = True

    @pytest.fixture
    def clock(self) -> ContractClock:
        return RealClock()

    @pytest.fixture
    def transport(self, moto_url: str) -> Iterator[AWSTransport]:
        transport = aws_transport(moto_url, lease_s=self.lease_s)
        yield transport
        transport.close()

    def test_body_and_attributes_round_trip(self, transport: Transport, names: Names) -> None:
        """As the contract's, but SNS refuses empty attribute values: that is refused clearly."""
        consumer = self.subscribed(transport, names.queue, names.topic)
        body = "héllo, wörld ✓ \U0001f989".encode()
        attributes = {"hedwig_id": "6f1e", "name": "Zoë \U0001f989", "quote": "\"a\"='b'"}
        with pytest.raises(PublishError, match="attribute 'empty' must be non-empty"):
            transport.publish(names.topic, body, {**attributes, "empty": ""})
        transport.publish(names.topic, body, attributes)
        (delivery,) = self.receive(consumer, 1)
        assert (delivery.body, dict(delivery.attributes), delivery.attempt) == (body, attributes, 1)
        assert delivery.subscription == self.status(transport, names.queue, names.topic).subscription
        assert delivery.subscription == f"HEDWIG-{names.queue}"

    def test_provision_dry_run_changes_nothing(self, transport: Transport, names: Names) -> None:
        """As the contract's, but receiving from a queue not provisioned is a clear error."""
        transport.provision(names.third_queue, [names.topic], [])
        subscribe, publish = [names.topic], [names.topic, names.other_topic]
        planned = transport.provision(names.queue, subscribe, publish, dry_run=True)
        assert not any(line.startswith(f"create topic {names.topic} ") for line in planned)
        assert any(names.other_topic in line for line in planned)
        assert transport.provision(names.queue, subscribe, publish, dry_run=True) == planned
        with pytest.raises(PublishError):
            transport.publish(names.other_topic, b"x", {})
        with pytest.raises(TransportError, match=f"HEDWIG-{names.queue} does not exist; run `hedwig-tasks provision`"):
            transport.consumer(names.queue, [names.topic]).receive(1, wait_s=0)
        assert transport.provision(names.queue, subscribe, publish) == planned

    def test_status_counts(self, transport: Transport, names: Names, clock: ContractClock) -> None:
        """As the contract's, but per queue, and a delayed retry counts as in flight (SQS cannot tell)."""
        consumer = self.subscribed(transport, names.queue, names.topic, names.other_topic)
        self.publish(transport, names.topic, 4)
        assert self._counts(transport, names) == (4, 0, 0)
        dead, delayed, held = self.receive(consumer, 3)
        assert self._counts(transport, names) == (1, 3, 0)
        consumer.dead_letter(dead, "bad")
        consumer.retry_later(delayed, self.lease_s * 10)
        assert self._counts(transport, names) == (1, 2, 1)
        clock.advance(self.lease_s * 1.5)  # ``held``'s lease ran out: waiting again
        assert self._counts(transport, names) == (2, 1, 1)
        (row,) = transport.status(names.queue, [names.topic, names.other_topic])
        assert (row.subscription, row.topic) == (held.subscription, f"{names.topic},{names.other_topic}")


# -- URLs, construction, names ----------------------------------------------------------------


def test_url_options() -> None:
    transport = from_url(
        "aws://?region=eu-west-1&endpoint_url=http://127.0.0.1:1&account_id=111122223333&lease_s=2.5"
        "&max_receive_count=7&sqs_endpoint_url=http://127.0.0.1:2"
    )
    assert isinstance(transport, AWSTransport)
    assert (transport.region, transport.account_id, transport.lease_s) == ("eu-west-1", "111122223333", 3.0)
    assert (transport.sns_endpoint_url, transport.sqs_endpoint_url) == ("http://127.0.0.1:1", "http://127.0.0.1:2")
    assert transport.max_receive_count == 7
    assert transport.topic_arn("orders") == "arn:aws:sns:eu-west-1:111122223333:hedwig-orders"
    assert transport.topic_arn("orders", "444455556666") == "arn:aws:sns:eu-west-1:444455556666:hedwig-orders"
    full = "arn:aws:sns:eu-west-1:444455556666:somebody-elses"
    assert transport.topic_arn(full) == full
    assert AWSTransport.queue_name("dev-myapp") == "HEDWIG-dev-myapp"
    assert AWSTransport.queue_name("DEV-MYAPP", dlq=True) == "HEDWIG-DEV-MYAPP-DLQ"
    china = AWSTransport(region="cn-north-1", account_id="111122223333")
    assert china.topic_arn("t").startswith("arn:aws-cn:sns:cn-north-1:")
    blank = AWSTransport.from_url("aws://?region=eu-west-1&endpoint_url=&profile=")  # empty: as if not given
    assert (blank.endpoint_url, blank.sqs_endpoint_url, blank.profile) == (None, None, None)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("aws://?region=us-east-1&regoin=x&visibility=3", "unknown aws option 'regoin'; did you mean region?"),
        ("aws://?lease_s=soon", "lease_s='soon'"),
        ("aws://?lease_s=0", "lease_s='0' must be a positive number of seconds"),
        ("aws://?lease_s=0.5", "lease_s must be 1 to 43200"),
        ("aws://?max_receive_count=0", "max_receive_count='0' must be a whole number, 1 or more"),
        ("aws://?max_receive_count=1001", "max_receive_count must be 1 to 1000"),
        ("aws://us-east-1", "expected aws://?region="),
    ],
)
def test_bad_urls_are_refused(url: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        AWSTransport.from_url(url)
    assert complaint in str(caught.value)


def test_bad_names_are_refused() -> None:
    transport = AWSTransport(region=REGION, account_id=ACCOUNT)
    with pytest.raises(ConfigurationError, match="SQS names"):
        transport.consumer("my.app", [])
    with pytest.raises(ConfigurationError, match="SNS names"):
        transport.topic_arn("a topic")


def test_hedwig_settings_and_secrets_stay_out_of_repr() -> None:
    settings = {
        "AWS_REGION": "us-west-2",
        "AWS_ACCOUNT_ID": "111122223333",
        "AWS_ACCESS_KEY": "AKIDEXAMPLEKEY",
        "AWS_SECRET_KEY": "very-secret-value",
        "AWS_SESSION_TOKEN": "session-token-value",
        "AWS_ENDPOINT_SNS": "http://127.0.0.1:1",
        "AWS_ENDPOINT_SQS": "http://127.0.0.1:2",
        "AWS_CONNECT_TIMEOUT_S": 2.0,
        "AWS_READ_TIMEOUT_S": 3.0,
    }
    transport = AWSTransport.from_settings(HedwigSettings.read({**settings, "HEDWIG_QUEUE": "q"}))
    assert transport.client.sns.meta.config.read_timeout == 3.0
    assert transport.client.sqs.meta.config.read_timeout == 30  # past the longest long poll
    assert transport.client.sqs.meta.config.connect_timeout == 2.0
    assert (transport.sns_endpoint_url, transport.sqs_endpoint_url) == ("http://127.0.0.1:1", "http://127.0.0.1:2")
    assert repr(transport) == "<AWSTransport region='us-west-2' account='111122223333' endpoint='http://127.0.0.1:2'>"
    public = {k: v for k, v in vars(transport).items() if not k.startswith("_")}
    for secret in ("AKIDEXAMPLEKEY", "very-secret-value", "session-token-value"):
        assert secret not in repr(transport)
        assert secret not in repr(public)


def test_construction_does_no_io() -> None:
    transport = from_url("aws://?region=us-east-1&endpoint_url=http://127.0.0.1:1&account_id=123456789012")
    assert isinstance(transport, AWSTransport)
    consumer = transport.consumer("lazy", ["t"])
    assert consumer is not None
    assert not transport.client.connected


# -- publishing --------------------------------------------------------------------------------


def _consumer(transport: AWSTransport, queue: str, topic: str) -> Any:
    transport.provision(queue, [topic], [])
    return transport.consumer(queue, [topic])


def test_limits_are_checked_before_sending(aws: AWSTransport) -> None:
    queue, topic = f"q-{tag()}", f"t-{tag()}"
    consumer = _consumer(aws, queue, topic)
    eleven = {f"h{i}": "v" for i in range(11)}
    with pytest.raises(PublishError, match="11 attributes, but SQS delivery carries at most 10"):
        aws.publish(topic, b"x", eleven)
    with pytest.raises(PublishError, match=f"takes at most {MAX_MESSAGE_BYTES}"):
        aws.publish(topic, b"x" * MAX_MESSAGE_BYTES, {"a": "b"})
    with pytest.raises(PublishError, match="not UTF-8"):
        aws.publish(topic, b"\xff\xfe", {})
    with pytest.raises(PublishError, match="characters SQS does not accept"):
        aws.publish(topic, b"nul\x00", {})
    with pytest.raises(PublishError, match="11 attributes"):  # one bad message: none of the batch is sent
        aws.publish_many(topic, [(b"fine", {}), (b"bad", eleven)])
    assert consumer.receive(10, wait_s=1) == []
    just_fits = b"y" * (MAX_MESSAGE_BYTES - len("a") - len("String") - len("b"))
    aws.publish(topic, just_fits, {"a": "b"})
    (delivery,) = consumer.receive(10, wait_s=5)
    assert delivery.body == just_fits


def test_publish_many_batches_by_count_and_size(aws: AWSTransport) -> None:
    queue, topic = f"q-{tag()}", f"t-{tag()}"
    consumer = _consumer(aws, queue, topic)
    calls = _count_calls(aws.client.sns)
    big = b"z" * 100_000  # three of these do not fit one 256 KiB batch
    batch = [(big, {"i": str(i)}) for i in range(3)] + [(f"s{i}".encode(), {"i": str(i)}) for i in range(3, 25)]
    ids = aws.publish_many(topic, batch)
    assert len(set(ids)) == 25
    assert calls == {"PublishBatch": 4}  # [big, big] [big + 9 small] [10 small] [3 small]
    got = _receive_distinct(consumer, 25)
    # SQS is at-least-once: every message must come, and a duplicate is allowed (and counted).
    numbers = [int(d.attributes["i"]) for d in got]
    assert set(numbers) == set(range(25)), f"lost: {set(range(25)) - set(numbers)}"


def test_publish_to_another_accounts_topic_by_owner_and_by_arn(moto_url: str) -> None:
    other_account = "210987654321"
    theirs = aws_transport(moto_url, account_id=other_account)
    # moto keeps that account's resources apart when told which it is
    for client in (theirs.client.sns, theirs.client.sqs):
        client.meta.events.register("before-sign.*.*", _as_account(other_account))
    ours = aws_transport(moto_url)
    queue, topic = f"q-{tag()}", f"t-{tag()}"
    consumer = _consumer(theirs, queue, topic)
    ours.publish(topic, b"by owner", {"a": "1"}, owner=other_account)
    ours.publish(f"arn:aws:sns:{REGION}:{other_account}:hedwig-{topic}", b"by arn", {"a": "2"})
    got = consumer.receive(10, wait_s=5)
    got += consumer.receive(10, wait_s=1) if len(got) < 2 else []
    assert sorted(d.body for d in got) == [b"by arn", b"by owner"]
    with pytest.raises(PublishError, match="does not exist"):
        ours.publish(topic, b"ours has no such topic", {})


def test_publish_fails_after_retries_with_publish_error() -> None:
    default = AWSTransport(region=REGION, account_id=ACCOUNT, endpoint_url="http://127.0.0.1:9", **CREDENTIALS)
    assert default.client.sns.meta.config.retries == {"mode": "standard", "total_max_attempts": 3}
    transport = AWSTransport(
        region=REGION, account_id=ACCOUNT, endpoint_url="http://127.0.0.1:9", max_attempts=2, **CREDENTIALS
    )
    attempts: list[str] = []
    transport.client.sns.meta.events.register("before-send.sns.*", lambda **kw: attempts.append("x"))
    started = time.monotonic()
    with pytest.raises(PublishError, match="Could not connect") as caught:
        transport.publish("t", b"x", {})
    assert len(attempts) == 2  # retried by botocore (standard mode), then one PublishError
    assert caught.value.__cause__ is not None
    assert time.monotonic() - started < 10
    with pytest.raises(PublishError):
        transport.publish_many("t", [(b"x", {})])


# -- consuming ---------------------------------------------------------------------------------


def test_more_than_ten_uses_parallel_pollers(aws: AWSTransport) -> None:
    queue, topic = f"q-{tag()}", f"t-{tag()}"
    consumer = _consumer(aws, queue, topic)
    aws.publish_many(topic, [(f"m{i}".encode(), {}) for i in range(35)])
    calls = _count_calls(aws.client.sqs)
    got = _receive_distinct(consumer, 35, batch=40)
    # Every message; under load moto's concurrent ReceiveMessage calls have handed out one
    # message twice (SQS is at-least-once too), so duplicates are allowed (and counted), a loss is not.
    assert {d.body for d in got} == {f"m{i}".encode() for i in range(35)}
    assert calls["ReceiveMessage"] <= 8
    consumer.ack(got)  # a duplicate's earlier receipt was superseded: 35 deletes, ten a call
    assert calls["DeleteMessageBatch"] == 4
    assert aws.status(queue, [topic])[0].depth == 0


def test_ack_returns_once_deleted_ten_a_call(aws: AWSTransport) -> None:
    """The worker frees a slot when ack returns: by then SQS must hold nothing for it."""
    queue, topic = f"q-{tag()}", f"t-{tag()}"
    consumer = _consumer(aws, queue, topic)
    aws.publish_many(topic, [(f"m{i}".encode(), {}) for i in range(25)])
    got = _receive_distinct(consumer, 25)
    calls = _count_calls(aws.client.sqs)
    consumer.ack(got[:24])
    (row,) = aws.status(queue, [topic])  # read at once: no background send may still be due
    assert (row.depth, row.in_flight) == (0, 1)
    assert calls["DeleteMessageBatch"] == 3  # 10 + 10 + 4
    consumer.ack(got[24:])
    assert aws.status(queue, [topic])[0].in_flight == 0


def test_an_extension_never_undoes_a_later_retry(aws: AWSTransport, moto_url: str) -> None:
    queue, topic = f"q-{tag()}", f"t-{tag()}"
    consumer = _consumer(aws, queue, topic)
    aws.publish(topic, b"retry me", {})
    (delivery,) = consumer.receive(1, wait_s=5)
    consumer.retry_later(delivery, 1200)
    consumer.extend_lease([delivery], 30)  # the lease keeper's stale snapshot: must not shorten the delay
    assert 1190 <= seconds_hidden(moto_url, delivery.transport_id) <= 1201


def test_a_non_raw_subscription_is_unwrapped(aws: AWSTransport) -> None:
    queue, topic = f"q-{tag()}", f"t-{tag()}"
    aws.provision(queue, [], [topic])
    sqs, sns = aws.client.sqs, aws.client.sns
    aws.provision(queue, [], [])
    url = sqs.get_queue_url(QueueName=f"HEDWIG-{queue}")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=aws.topic_arn(topic), Protocol="sqs", Endpoint=queue_arn)  # no raw delivery
    aws.publish(topic, b'{"user_id":"U_1"}', {"hedwig_id": "abc", "request_id": "r-1"})
    (delivery,) = aws.consumer(queue, [topic]).receive(1, wait_s=5)
    assert delivery.body == b'{"user_id":"U_1"}'
    assert dict(delivery.attributes) == {"hedwig_id": "abc", "request_id": "r-1"}
    assert aws.provision(queue, [topic], [])[-1] == f"turn on raw delivery of {topic} to HEDWIG-{queue}"
    assert aws.provision(queue, [topic], []) == []


def test_dead_letter_with_ten_attributes_keeps_them_all(aws: AWSTransport) -> None:
    queue, topic = f"q-{tag()}", f"t-{tag()}"
    consumer = _consumer(aws, queue, topic)
    ten = {f"hedwig_{i}": str(i) for i in range(5)} | {f"h{i}": str(i) for i in range(5)}
    aws.publish(topic, b"full", ten)
    (delivery,) = consumer.receive(1, wait_s=5)
    consumer.dead_letter(delivery, "no")
    sqs = aws.client.sqs
    dlq = sqs.get_queue_url(QueueName=f"HEDWIG-{queue}-DLQ")["QueueUrl"]
    (raw,) = sqs.receive_message(QueueUrl=dlq, MessageAttributeNames=["All"], VisibilityTimeout=0)["Messages"]
    assert len(raw["MessageAttributes"]) == 10
    assert json.loads(raw["MessageAttributes"][DEAD_LETTER_ATTRIBUTE]["StringValue"])["attributes"] == {"h4": "4"}
    (record,) = aws.dead_letters(queue)
    assert (dict(record.attributes), record.reason) == (ten, "no")
    assert aws.requeue_dead_letters(queue) == 1
    (again,) = consumer.receive(1, wait_s=5)
    assert (again.body, dict(again.attributes)) == (b"full", ten)


def test_redriven_messages_are_listed_with_a_reason(aws: AWSTransport) -> None:
    transport = aws_transport(aws.endpoint_url or "", lease_s=1, max_receive_count=1)
    queue, topic = f"q-{tag()}", f"t-{tag()}"
    consumer = _consumer(transport, queue, topic)
    transport.publish(topic, b"crashes workers", {"hedwig_id": "x"})
    assert len(consumer.receive(1, wait_s=5)) == 1  # and never settled: the worker "crashed"
    # Once its lease has run out, the next receive finds it gone: SQS moved it to the DLQ.
    wait_for(lambda: consumer.receive(1, wait_s=1) == [] and transport.dead_letters(queue), timeout_s=20)
    (record,) = transport.dead_letters(queue)
    assert record.body == b"crashes workers"
    assert "redrive policy" in record.reason
    assert record.attempts >= 1


def test_provision_sets_policy_redrive_and_raw_delivery(aws: AWSTransport) -> None:
    queue, topics = f"q-{tag()}", [f"t-{tag()}", f"t2-{tag()}"]
    actions = aws.provision(queue, topics, [])
    assert actions == [
        f"create topic {topics[0]} (SNS hedwig-{topics[0]})",
        f"create topic {topics[1]} (SNS hedwig-{topics[1]})",
        f"create queue HEDWIG-{queue}-DLQ (dead letters)",
        f"create queue HEDWIG-{queue} (messages)",
        f"set redrive policy of HEDWIG-{queue}: to HEDWIG-{queue}-DLQ after 20 receives",
        f"allow {topics[0]}, {topics[1]} to deliver to HEDWIG-{queue} (queue policy)",
        f"subscribe HEDWIG-{queue} to {topics[0]} (raw delivery)",
        f"subscribe HEDWIG-{queue} to {topics[1]} (raw delivery)",
    ]
    sqs, sns = aws.client.sqs, aws.client.sns
    url = sqs.get_queue_url(QueueName=f"HEDWIG-{queue}")["QueueUrl"]
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    redrive = json.loads(attributes["RedrivePolicy"])
    assert redrive == {
        "deadLetterTargetArn": f"arn:aws:sqs:{REGION}:{ACCOUNT}:HEDWIG-{queue}-DLQ",
        "maxReceiveCount": 20,
    }
    (statement,) = json.loads(attributes["Policy"])["Statement"]
    assert statement["Principal"] == {"Service": "sns.amazonaws.com"}
    assert statement["Condition"]["ArnEquals"]["aws:SourceArn"] == [aws.topic_arn(t) for t in topics]
    for topic in topics:
        (sub,) = sns.list_subscriptions_by_topic(TopicArn=aws.topic_arn(topic))["Subscriptions"]
        raw = sns.get_subscription_attributes(SubscriptionArn=sub["SubscriptionArn"])["Attributes"]
        assert raw["RawMessageDelivery"] == "true"
    third = f"t3-{tag()}"
    assert aws.provision(queue, [*topics, third], [], dry_run=True) == [
        f"create topic {third} (SNS hedwig-{third})",
        f"allow {third} to deliver to HEDWIG-{queue} (queue policy)",
        f"subscribe HEDWIG-{queue} to {third} (raw delivery)",
    ]
    assert len(aws.provision(queue, [*topics, third], [])) == 3
    assert aws.provision(queue, [*topics, third], []) == []


def test_provision_recreates_a_queue_deleted_behind_its_back(aws: AWSTransport) -> None:
    """A long-running process provisions again after someone deleted its queue: the broker is
    asked, not the transport's cache of queue URLs."""
    queue, topic = f"q-{tag()}", f"t-{tag()}"
    consumer = _consumer(aws, queue, topic)
    assert consumer.receive(1, wait_s=0) == []  # the consumer has its queue URL cached too
    sqs = aws_transport(aws.endpoint_url or "").client.sqs  # someone else's client
    for name in (f"HEDWIG-{queue}", f"HEDWIG-{queue}-DLQ"):
        sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=name)["QueueUrl"])
    actions = aws.provision(queue, [topic], [])
    assert f"create queue HEDWIG-{queue} (messages)" in actions
    assert f"create queue HEDWIG-{queue}-DLQ (dead letters)" in actions
    assert any(action.startswith("allow ") for action in actions)  # the new queue's policy lets SNS in
    for name in (f"HEDWIG-{queue}", f"HEDWIG-{queue}-DLQ"):
        assert sqs.get_queue_url(QueueName=name)["QueueUrl"]
    aws.publish(topic, b"after the re-provision", {})
    assert [d.body for d in _receive_distinct(consumer, 1)] == [b"after the re-provision"]
    assert aws.provision(queue, [topic], []) == []


def test_publish_to_a_missing_topic_names_it_and_says_how_to_provision(aws: AWSTransport) -> None:
    topic = f"t-{tag()}"
    for publish in (
        lambda: aws.publish(topic, b"x", {}),
        lambda: aws.publish_many(topic, [(b"x", {}), (b"y", {})]),
    ):
        with pytest.raises(PublishError) as caught:
            publish()
        assert f"topic {topic!r} (arn:aws:sns:{REGION}:{ACCOUNT}:hedwig-{topic}) does not exist" in str(caught.value)
        assert "run `hedwig-tasks provision`" in str(caught.value)


def test_a_worker_never_has_more_in_flight_than_concurrency_plus_prefetch(aws: AWSTransport) -> None:
    """SQS's own count of leased messages, polled while a worker drains slow ones, never passes
    concurrency + prefetch: a slot comes back only once the delete was sent."""
    name, topic = f"bound-{tag()}", f"user-created-{tag()}"
    app = Hedwig(name, schema=SCHEMA, transport=aws, routing={"user-created": topic})
    done: list[str] = []

    @app.handler("user-created", "1.*")
    def slow(message: Message) -> None:
        time.sleep(0.1)
        done.append(message.id)

    app.provision()
    for i in range(40):
        app.publish("user-created", "1.0", {"user_id": f"U{i}"})
    sqs = aws_transport(aws.endpoint_url or "").client.sqs
    url = sqs.get_queue_url(QueueName=f"HEDWIG-{name}")["QueueUrl"]
    seen: list[int] = []

    def drained() -> bool:
        found = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessagesNotVisible"])
        seen.append(int(found["Attributes"]["ApproximateNumberOfMessagesNotVisible"]))
        assert not errors, f"the worker died: {errors[0]!r}"
        return len(set(done)) >= 40

    worker = Worker(app, WorkerOptions(concurrency=3, prefetch=2, wait_s=1.0))
    errors: list[BaseException] = []
    thread = threading.Thread(target=_run_collecting, args=(worker, errors), daemon=True)
    thread.start()
    try:
        wait_for(drained, timeout_s=120)
    finally:
        worker.stop()
        thread.join(30)
    assert not thread.is_alive()
    assert max(seen) <= 5, f"{max(seen)} in flight against a bound of 5 (polled {len(seen)} times)"
    assert max(seen) >= 3  # the poll saw the worker busy, so the bound was tested
    assert len(seen) >= 10


def test_unreachable_endpoint_is_one_clear_error() -> None:
    transport = AWSTransport(region=REGION, account_id=ACCOUNT, endpoint_url="http://127.0.0.1:9", **CREDENTIALS)
    with pytest.raises(TransportError, match="finding SQS queue HEDWIG-app failed: Could not connect"):
        transport.consumer("app", ["t"]).receive(10, wait_s=1)
    with pytest.raises(TransportError, match="Could not connect"):
        transport.status("app", ["t"])


# -- helpers -----------------------------------------------------------------------------------


def _receive_distinct(consumer: Any, count: int, *, batch: int = 10, timeout_s: float = 20) -> list[Any]:
    """Receive until ``count`` distinct messages came; the newest delivery of each (SQS may
    deliver one twice, and a later receive supersedes the earlier receipt)."""
    found: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    while len(found) < count and time.monotonic() < deadline:
        found.update((d.transport_id, d) for d in consumer.receive(batch, wait_s=1))
    assert len(found) == count, f"{count - len(found)} of {count} messages never came"
    return list(found.values())


def _run_collecting(worker: Worker, errors: list[BaseException]) -> None:
    try:
        worker.run()
    except BaseException as exc:  # handed to the test thread
        errors.append(exc)


def _as_account(account: str) -> Any:
    def add_header(request: Any, **_: Any) -> None:
        request.headers["x-moto-account-id"] = account

    return add_header


def _count_calls(client: Any) -> dict[str, int]:
    """Counts of the API calls ``client`` makes from now on, by operation name."""
    counts: dict[str, int] = {}

    def count(model: Any, **_: Any) -> None:
        counts[model.name] = counts.get(model.name, 0) + 1

    client.meta.events.register("before-call.*.*", count)
    return counts


class _Holds(logging.Handler):
    """Collects the consumer's lines about holding a delayed message with SQS."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "is due in" in record.getMessage():
            self.lines.append(record.getMessage())


def test_a_twenty_minute_delay_arrives_once_not_before(aws: AWSTransport) -> None:
    """Past SQS's 15-minute DelaySeconds: the consumer's clock is injected and moved by hand, and
    each hold with SQS is cut to a second, so 20 minutes pass in a few. The message is hidden by
    visibility on its first receive, sent again with a delay after that, never handed out early,
    and arrives once, as a first attempt."""
    names = Names.fresh()
    aws.provision(names.queue, [names.topic], [])
    aws.publish(names.topic, b"later", {"hedwig_id": "x"}, delay_s=1200)
    clock = ManualClock()  # started after the publish, so due (by it) is not before the message's time
    due = clock() + 1200
    consumer = SQSConsumer(aws.client, names.queue, lease_s=2, clock=clock, max_hold_s=1)
    holds, aws_logger = _Holds(), logging.getLogger("hedwig_tasks.transports.aws")
    aws_logger.addHandler(holds)
    previous_level = aws_logger.level
    aws_logger.setLevel(logging.DEBUG)
    try:
        for step_s in (0, 400, 399, 400):  # 1200, 800, 401 and 1 seconds early
            clock.advance(step_s)
            seen = len(holds.lines)
            deadline = time.monotonic() + 15
            while len(holds.lines) == seen and time.monotonic() < deadline:
                assert consumer.receive(10, wait_s=1) == [], f"handed out {due - clock():.0f}s early"
            assert len(holds.lines) > seen, "the early message was not seen again"
        assert "hidden for 1s" in holds.lines[0]
        assert any("sent again with a delay of 1s" in line for line in holds.lines[1:])
        clock.advance(due - clock())
        deadline = time.monotonic() + 15
        found: list[Delivery] = []
        while not found and time.monotonic() < deadline:
            found = consumer.receive(10, wait_s=1)
        (delivery,) = found
        assert (delivery.body, delivery.attempt) == (b"later", 1)
        consumer.ack([delivery])
        assert consumer.receive(10, wait_s=2) == []
    finally:
        aws_logger.removeHandler(holds)
        aws_logger.setLevel(previous_level)
        consumer.close()
