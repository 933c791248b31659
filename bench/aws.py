"""SNS/SQS on one moto server: hedwig-tasks against authedwig 11 and a plain boto3 loop.

Everything runs in this process against one ``moto_server`` (started on a free loopback port
unless ``--endpoint`` names one). Each side gets its own topic and queue, filled before its clock
starts. AWS requests are counted with botocore's ``before-call`` hook on the clients each side
uses (authedwig's through boto3's default session, which it builds its clients from); a
message counts as consumed when its delete succeeded, so every side's clock runs from its first
receive until the N-th message is deleted.

Consume, N messages of ``{"user_id": ...}`` with a ``request_id`` header, JSON-schema validated:

* ``hedwig_tasks``: a :class:`~hedwig_tasks.worker.Worker` (``-c``/``--prefetch``), whose
  transport long-polls ten a call with parallel pollers and batches deletes.
* ``authedwig``: ``hedwig.consumer.listen_for_messages(num_messages=10)``.
* ``plain_boto3``: ``receive_message(MaxNumberOfMessages=10, WaitTimeSeconds=1)`` then
  ``delete_message_batch`` for the batch, in a loop: the best a hand-written consumer does.

Publish, N messages, validated where the library validates:

* ``hedwig_tasks_batched``: ``AWSTransport.publish_many`` (SNS ``PublishBatch``, ten a call).
* ``hedwig_tasks``: ``Hedwig.publish``, one SNS ``Publish`` a message.
* ``authedwig``: ``Message.publish()``, one SNS ``Publish`` a message.
* ``plain_boto3_batched``: ``sns.publish_batch`` with ten entries a call.

Moto serves about 40 consumes and 90 publishes a second whoever asks, so the throughput ratios
mostly show overhead; requests per message is what SQS and SNS bill by.

Usage::

    python bench/aws.py [--n 300] [--rounds 3] [--concurrency 10] [--prefetch 20] [--endpoint URL]

Every side runs ``--rounds`` times, in alternating order (moto slows as it holds more, and its
speed varies from run to run), and the best round of each side is reported.

A table goes to stderr. The last line on stdout is one JSON object with every side's figures and
a ``ratio`` per comparison (throughput: hedwig-tasks divided by the other, higher is better;
``requests_per_message``: hedwig-tasks divided by the other, lower is better), and whether the
targets were met.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import threading
import time
import types
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT / "tests"))  # the moto_server helpers

from aws_server import start_moto, stop  # noqa: E402

from hedwig_tasks import Hedwig, Message  # noqa: E402
from hedwig_tasks.transports.aws import AWSTransport  # noqa: E402
from hedwig_tasks.validators.base import to_transport  # noqa: E402
from hedwig_tasks.worker import Worker, WorkerOptions  # noqa: E402

SCHEMA = ROOT / "tests" / "schemas" / "schema.json"
REGION, ACCOUNT = "us-east-1", "123456789012"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
#: Longest one side may take to consume, in seconds.
TIMEOUT_S = 600.0
TARGETS = {
    "consume_vs_plain_min": 0.95,
    "sqs_requests_per_message_max": 0.25,
    "sns_requests_per_message_batched_max": 0.15,
}


class Tally:
    """AWS calls by operation, and messages deleted, counted from botocore's event hooks."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.deleted = 0
        self.done = threading.Event()
        self.target = 0
        self.finished_at = 0.0
        self._lock = threading.Lock()

    def attach(self, events: Any) -> None:
        events.register("before-call.*.*", self._before)
        events.register("after-call.sqs.DeleteMessageBatch", self._deleted_batch)
        events.register("after-call.sqs.DeleteMessage", self._deleted_one)

    def _before(self, model: Any, **_: Any) -> None:
        with self._lock:
            self.calls[model.name] = self.calls.get(model.name, 0) + 1

    def _deleted_batch(self, parsed: Any, **_: Any) -> None:
        self._add(len(parsed.get("Successful", [])))

    def _deleted_one(self, parsed: Any, **_: Any) -> None:
        self._add(1)

    def _add(self, count: int) -> None:
        with self._lock:
            self.deleted += count
            if self.target and self.deleted >= self.target and not self.done.is_set():
                self.finished_at = time.perf_counter()
                self.done.set()

    def requests(self, service_ops: set[str]) -> int:
        return sum(n for op, n in self.calls.items() if op in service_ops)


SQS_OPS = {
    "ReceiveMessage",
    "DeleteMessage",
    "DeleteMessageBatch",
    "ChangeMessageVisibility",
    "ChangeMessageVisibilityBatch",
    "GetQueueUrl",
    "GetQueueAttributes",
}
SNS_OPS = {"Publish", "PublishBatch"}


class Bench:
    def __init__(self, endpoint: str, n: int, concurrency: int, prefetch: int) -> None:
        self.endpoint = endpoint
        self.n = n
        self.concurrency = concurrency
        self.prefetch = prefetch
        self.sns = boto3.client("sns", region_name=REGION, endpoint_url=endpoint, **CREDENTIALS)
        self.sqs = boto3.client("sqs", region_name=REGION, endpoint_url=endpoint, **CREDENTIALS)

    def transport(self) -> AWSTransport:
        return AWSTransport(
            region=REGION,
            account_id=ACCOUNT,
            endpoint_url=self.endpoint,
            access_key_id=CREDENTIALS["aws_access_key_id"],
            secret_access_key=CREDENTIALS["aws_secret_access_key"],
        )

    def app(self, queue: str, topic: str, transport: AWSTransport, handler: Callable[[Message], None]) -> Hedwig:
        app = Hedwig("bench", schema=SCHEMA, transport=transport, routing={"user-created": topic}, queue=queue)
        app.handler("user-created", "1.*")(handler)
        return app

    def fill(self, queue: str, topic: str) -> None:
        """Provision ``queue`` on ``topic`` (hedwig-tasks' provisioning) and publish N, untimed."""
        transport = self.transport()
        publisher = self.app(queue, topic, transport, lambda message: None)
        publisher.provision()
        encoded = [self.encoded(publisher, i) for i in range(self.n)]
        transport.publish_many(topic, encoded)
        transport.close()

    def encoded(self, app: Hedwig, i: int) -> tuple[bytes, dict[str, str]]:
        message = app.message("user-created", "1.0", {"user_id": f"U_{i}"}, headers={"request_id": f"r-{i}"})
        return to_transport(app.validator.encode(message), text_only=True)

    # -- consume ----------------------------------------------------------------------------

    def consume_rounds(self, rounds: int) -> dict[str, dict[str, Any]]:
        runs: dict[str, Callable[[], dict[str, Any]]] = {
            "plain_boto3": self.consume_plain,
            "authedwig": self.consume_authedwig,
            "hedwig_tasks": self.consume_hedwig_tasks,
        }
        return best_of(rounds, runs, "consume")

    def publish_rounds(self, rounds: int) -> dict[str, dict[str, Any]]:
        sides = ["plain_boto3_batched", "hedwig_tasks_batched", "hedwig_tasks", "authedwig"]
        return best_of(rounds, {side: functools.partial(self.publish_side, side) for side in sides}, "publish")

    def consume_hedwig_tasks(self) -> dict[str, Any]:
        queue, topic = _names("ht")
        self.fill(queue, topic)
        tally = Tally()
        tally.target = self.n
        transport = self.transport()
        tally.attach(transport.client.sqs.meta.events)
        seen = [0]
        app = self.app(queue, topic, transport, lambda message: _count(seen))
        options = WorkerOptions(concurrency=self.concurrency, prefetch=self.prefetch, wait_s=1.0)
        worker = Worker(app, options)
        runner = threading.Thread(target=worker.run, daemon=True)
        started = time.perf_counter()
        runner.start()
        tally.done.wait(TIMEOUT_S)
        worker.stop()
        runner.join(30)
        transport.close()
        return self.result("hedwig_tasks", tally, started, seen[0])

    def consume_authedwig(self) -> dict[str, Any]:
        queue, topic = _names("aw")
        self.fill(queue, topic)
        tally = Tally()
        tally.target = self.n
        seen = [0]
        with _authedwig(self.endpoint, queue, topic, lambda message: _count(seen)) as backend:
            boto3.setup_default_session()
            tally.attach(boto3.DEFAULT_SESSION.events)  # authedwig builds its clients from boto3's default session
            from hedwig.consumer import listen_for_messages

            backend.WAIT_TIME_SECONDS = 1  # its 20 s long poll would only delay the stop, not the count
            shutdown = threading.Event()
            runner = threading.Thread(
                target=listen_for_messages, kwargs={"num_messages": 10, "shutdown_event": shutdown}, daemon=True
            )
            started = time.perf_counter()
            runner.start()
            tally.done.wait(TIMEOUT_S)
            shutdown.set()
            runner.join(30)
        return self.result("authedwig", tally, started, seen[0])

    def consume_plain(self) -> dict[str, Any]:
        queue, topic = _names("pl")
        self.fill(queue, topic)
        tally = Tally()
        tally.target = self.n
        sqs = boto3.client("sqs", region_name=REGION, endpoint_url=self.endpoint, **CREDENTIALS)
        tally.attach(sqs.meta.events)
        started = time.perf_counter()
        url = sqs.get_queue_url(QueueName=f"HEDWIG-{queue}")["QueueUrl"]
        seen = 0
        while not tally.done.is_set() and time.perf_counter() - started < TIMEOUT_S:
            found = sqs.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=1,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
            ).get("Messages", [])
            seen += len(found)
            if found:
                entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(found)]
                sqs.delete_message_batch(QueueUrl=url, Entries=entries)
        return self.result("plain_boto3", tally, started, seen)

    def result(self, side: str, tally: Tally, started: float, seen: int) -> dict[str, Any]:
        if tally.deleted < self.n:
            raise SystemExit(f"{side}: only {tally.deleted} of {self.n} messages were consumed")
        elapsed = tally.finished_at - started
        sqs = tally.requests(SQS_OPS)
        return {
            "side": side,
            "messages": self.n,
            "handled": seen,
            "seconds": round(elapsed, 3),
            "per_second": round(self.n / elapsed, 1),
            "sqs_requests": sqs,
            "requests_per_message": round(sqs / self.n, 4),
            "calls": dict(sorted(tally.calls.items())),
        }

    # -- publish ----------------------------------------------------------------------------

    def publish_side(self, side: str) -> dict[str, Any]:
        queue, topic = _names(side[:4])
        tally = Tally()
        transport = self.transport()
        setup = self.app(queue, topic, transport, lambda message: None)
        setup.provision()
        started = time.perf_counter()
        if side == "authedwig":
            with _authedwig(self.endpoint, queue, topic, lambda message: None):
                boto3.setup_default_session()
                tally.attach(boto3.DEFAULT_SESSION.events)
                started = _publish_authedwig(self.n)
        else:
            tally.attach((self.sns if side == "plain_boto3_batched" else transport.client.sns).meta.events)
            started = time.perf_counter()
            self.publish_ours(side, setup, transport, topic)
        elapsed = time.perf_counter() - started
        transport.close()
        sns = tally.requests(SNS_OPS)
        return {
            "side": side,
            "messages": self.n,
            "seconds": round(elapsed, 3),
            "per_second": round(self.n / elapsed, 1),
            "sns_requests": sns,
            "requests_per_message": round(sns / self.n, 4),
        }

    def publish_ours(self, side: str, app: Hedwig, transport: AWSTransport, topic: str) -> None:
        if side == "hedwig_tasks":
            for i in range(self.n):
                app.publish("user-created", "1.0", {"user_id": f"U_{i}"}, headers={"request_id": f"r-{i}"})
        elif side == "hedwig_tasks_batched":
            transport.publish_many(topic, [self.encoded(app, i) for i in range(self.n)])
        else:  # plain_boto3_batched: the same encoded messages, sent by hand
            arn = transport.topic_arn(topic)
            messages = [self.encoded(app, i) for i in range(self.n)]
            for start in range(0, self.n, 10):
                entries = [
                    {
                        "Id": str(j),
                        "Message": body.decode(),
                        "MessageAttributes": {k: {"DataType": "String", "StringValue": v} for k, v in attrs.items()},
                    }
                    for j, (body, attrs) in enumerate(messages[start : start + 10])
                ]
                self.sns.publish_batch(TopicArn=arn, PublishBatchRequestEntries=entries)


def best_of(rounds: int, runs: dict[str, Callable[[], dict[str, Any]]], what: str) -> dict[str, dict[str, Any]]:
    """Each side ``rounds`` times, order alternating (moto slows as it holds more); the best run of each."""
    best: dict[str, dict[str, Any]] = {}
    for round_number in range(rounds):
        order = list(runs) if round_number % 2 == 0 else list(reversed(runs))
        for side in order:
            result = runs[side]()
            print(f"  {what} round {round_number + 1} {side}: {result['per_second']} msg/s", file=sys.stderr)
            if side not in best or result["per_second"] > best[side]["per_second"]:
                best[side] = result
    return {side: best[side] for side in runs}


def _publish_authedwig(n: int) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from distutils.version import StrictVersion

        from hedwig.models import Message as AuthedwigMessage
    started = time.perf_counter()
    for i in range(n):
        message = AuthedwigMessage.new(
            "user-created", StrictVersion("1.0"), {"user_id": f"U_{i}"}, headers={"request_id": f"r-{i}"}
        )
        message.publish()
    return started


@contextlib.contextmanager
def _authedwig(endpoint: str, queue: str, topic: str, callback: Callable[[Any], None]) -> Iterator[Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from hedwig.backends.aws import AWSSQSConsumerBackend
        from hedwig.conf import settings
        from hedwig.testing.config import unconfigure

    def handler(message):  # unannotated: authedwig refuses any annotation but its own Message
        callback(message)

    unconfigure()
    settings.configure_with_object(
        types.SimpleNamespace(
            AWS_REGION=REGION,
            AWS_ACCOUNT_ID=ACCOUNT,
            AWS_ACCESS_KEY=CREDENTIALS["aws_access_key_id"],
            AWS_SECRET_KEY=CREDENTIALS["aws_secret_access_key"],
            AWS_ENDPOINT_SNS=endpoint,
            AWS_ENDPOINT_SQS=endpoint,
            HEDWIG_QUEUE=queue,
            HEDWIG_PUBLISHER="bench",
            HEDWIG_JSONSCHEMA_FILE=str(SCHEMA),
            HEDWIG_CONSUMER_BACKEND="hedwig.backends.aws.AWSSQSConsumerBackend",
            HEDWIG_PUBLISHER_BACKEND="hedwig.backends.aws.AWSSNSPublisherBackend",
            HEDWIG_CALLBACKS={("user-created", "1.*"): handler},
            HEDWIG_MESSAGE_ROUTING={("user-created", "1.*"): topic},
        )
    )
    original_wait = AWSSQSConsumerBackend.WAIT_TIME_SECONDS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield AWSSQSConsumerBackend
    finally:
        AWSSQSConsumerBackend.WAIT_TIME_SECONDS = original_wait
        unconfigure()


_count_lock = threading.Lock()


def _count(seen: list[int]) -> None:
    with _count_lock:
        seen[0] += 1


def _names(prefix: str) -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"bench-{prefix}-{tag}", f"bench-{prefix}-{tag}"


def _ratio(ours: float, theirs: float) -> float:
    return round(ours / theirs, 3) if theirs else float("inf")


def summarize(consume: dict[str, dict[str, Any]], publish: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ours, authedwig, plain = consume["hedwig_tasks"], consume["authedwig"], consume["plain_boto3"]
    batched, single = publish["hedwig_tasks_batched"], publish["hedwig_tasks"]
    ratio = {
        "consume_throughput_vs_plain_boto3": _ratio(ours["per_second"], plain["per_second"]),
        "consume_throughput_vs_authedwig": _ratio(ours["per_second"], authedwig["per_second"]),
        "consume_requests_per_message_vs_plain_boto3": _ratio(
            ours["requests_per_message"], plain["requests_per_message"]
        ),
        "consume_requests_per_message_vs_authedwig": _ratio(
            ours["requests_per_message"], authedwig["requests_per_message"]
        ),
        "publish_batched_throughput_vs_plain_boto3_batched": _ratio(
            batched["per_second"], publish["plain_boto3_batched"]["per_second"]
        ),
        "publish_batched_throughput_vs_authedwig": _ratio(batched["per_second"], publish["authedwig"]["per_second"]),
        "publish_throughput_vs_authedwig": _ratio(single["per_second"], publish["authedwig"]["per_second"]),
        "publish_batched_requests_per_message_vs_authedwig": _ratio(
            batched["requests_per_message"], publish["authedwig"]["requests_per_message"]
        ),
    }
    targets = {
        "consume_at_least_0.95x_plain_boto3": ratio["consume_throughput_vs_plain_boto3"]
        >= TARGETS["consume_vs_plain_min"],
        "consume_above_authedwig": ratio["consume_throughput_vs_authedwig"] > 1.0,
        "sqs_requests_per_message_at_most_0.25": ours["requests_per_message"]
        <= TARGETS["sqs_requests_per_message_max"],
        "batched_publish_sns_requests_per_message_at_most_0.15": batched["requests_per_message"]
        <= TARGETS["sns_requests_per_message_batched_max"],
    }
    return {"bench": "aws", "consume": consume, "publish": publish, "ratio": ratio, "targets": targets}


def _table(title: str, rows: dict[str, dict[str, Any]]) -> None:
    print(f"\n{title}", file=sys.stderr)
    print(f"  {'side':24} {'msgs/s':>8} {'seconds':>8} {'requests/msg':>13}", file=sys.stderr)
    for side, row in rows.items():
        print(
            f"  {side:24} {row['per_second']:>8} {row['seconds']:>8} {row['requests_per_message']:>13}", file=sys.stderr
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300, help="messages per side (%(default)s)")
    parser.add_argument("--concurrency", type=int, default=10, help="hedwig-tasks handler threads (%(default)s)")
    parser.add_argument("--prefetch", type=int, default=20, help="hedwig-tasks prefetch (%(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each consumer, best kept (%(default)s)")
    parser.add_argument("--endpoint", help="a running moto_server (default: start one)")
    args = parser.parse_args(argv)
    os.environ.setdefault("AWS_DEFAULT_REGION", REGION)
    process: subprocess.Popen[bytes] | None = None
    endpoint = args.endpoint
    if endpoint is None:
        process, endpoint = start_moto()
    try:
        bench = Bench(endpoint, args.n, args.concurrency, args.prefetch)
        consume = bench.consume_rounds(args.rounds)
        publish = bench.publish_rounds(args.rounds)
    finally:
        if process is not None:
            stop(process)
    _table(f"consume {args.n} (moto at {endpoint})", consume)
    _table(f"publish {args.n}", publish)
    print(json.dumps(summarize(consume, publish)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
