"""Pub/Sub on one emulator: hedwig-tasks against authedwig 11 and a plain google-cloud-pubsub subscriber.

Everything runs in this process against one Pub/Sub emulator (started on a free loopback port
unless ``--emulator`` names one). Every side gets topics and subscriptions of its own (the
emulator can starve a second streaming pull on a subscription), filled before its clock starts.

Consume, N messages of ``{"user_id": ...}`` with a ``request_id`` header, JSON-schema encoded,
at equal prefetch P (messages held at once: 10, then 100):

* ``hedwig_tasks``: a :class:`~hedwig_tasks.worker.Worker` holding P (``concurrency`` plus
  ``prefetch``), validating and dispatching each message.
* ``authedwig``: ``hedwig.consumer.listen_for_messages(num_messages=P)``.
* ``plain``: ``SubscriberClient.subscribe`` with ``FlowControl(max_messages=P)`` and a callback
  that parses the JSON body and acks: the least a hand-written consumer does.

Publish, validated where the library validates:

* ``sync``: ``Hedwig.publish`` (one Publish call each) against authedwig's
  ``GooglePubSubPublisherBackend`` (it waits out the batch latency for each message).
* ``batched``: ``GooglePubSubTransport.publish_many`` (the batching client, futures) against
  authedwig's ``GooglePubSubAsyncPublisherBackend``, waiting for every future.

Usage::

    python bench/gcp.py [--n 2000] [--rounds 3] [--emulator HOST:PORT]

The emulator is warmed up by every side first; then ``--rounds`` rounds run every side in an
order that rotates from round to round, and each figure is the median of its rounds.

A table goes to stderr. The last line on stdout is one JSON object with every side's figures and
a ``ratio`` per comparison (hedwig-tasks divided by the other; higher is better) and whether the
targets of issue 5 were met.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT / "tests"))  # the emulator helpers and authedwig's settings

from conftest import authedwig_settings  # noqa: E402
from gcp_server import start_emulator, stop  # noqa: E402

from hedwig_tasks import Hedwig, Message  # noqa: E402
from hedwig_tasks.transports.gcp import GooglePubSubTransport  # noqa: E402
from hedwig_tasks.validators.base import to_transport  # noqa: E402
from hedwig_tasks.worker import Worker, WorkerOptions  # noqa: E402

SCHEMA = ROOT / "tests" / "schemas" / "schema.json"
PROJECT = "hedwig-bench"
#: Longest one side may take, in seconds.
TIMEOUT_S = 300.0
TARGETS = {
    "consume_10_vs_authedwig": 1.5,
    "consume_10_vs_plain": 0.9,
    "consume_100_vs_plain": 0.9,
    "publish_sync_vs_authedwig": 5.0,
    "publish_batched_vs_authedwig_async": 1.0,
}


class Side:
    """One side's own topic and queue, provisioned by hedwig-tasks."""

    def __init__(self, host: str, label: str) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.topic, self.queue = f"bench-{label}-{suffix}", f"bq-{label}-{suffix}"
        self.transport = GooglePubSubTransport(PROJECT, emulator=host, lease_s=30)
        self.app = Hedwig("bench", schema=SCHEMA, transport=self.transport, routing={"user-created": self.topic})
        self.app.queue = self.queue
        self.transport.provision(self.queue, [self.topic], [self.topic])

    def fill(self, count: int) -> None:
        rows = []
        for n in range(count):
            encoded = self.app.validator.encode(
                self.app.message("user-created", "1.0", {"user_id": f"U{n}"}, {"request_id": f"r-{n}"})
            )
            rows.append(to_transport(encoded, text_only=False))
        for start in range(0, count, 1000):
            self.transport.publish_many(self.topic, rows[start : start + 1000])


@contextlib.contextmanager
def authedwig(host: str, side: Side, **more: Any) -> Iterator[Any]:
    os.environ["PUBSUB_EMULATOR_HOST"] = host
    settings = {
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "HEDWIG_QUEUE": side.queue,
        "HEDWIG_SUBSCRIPTIONS": [side.topic],
        "HEDWIG_PUBLISHER_BACKEND": "hedwig.backends.gcp.GooglePubSubPublisherBackend",
        "HEDWIG_CONSUMER_BACKEND": "hedwig.backends.gcp.GooglePubSubConsumerBackend",
        "HEDWIG_MESSAGE_ROUTING": {("user-created", "1.*"): side.topic},
        "HEDWIG_JSONSCHEMA_FILE": str(SCHEMA),
        **more,
    }
    with authedwig_settings(**settings) as configured:
        yield configured


# -- consume ----------------------------------------------------------------------------------


def consume_hedwig_tasks(host: str, n: int, held: int) -> float:
    side = Side(host, "ht")
    side.fill(n)
    done = threading.Event()
    count = [0]
    lock = threading.Lock()

    def handle(message: Message) -> None:
        with lock:
            count[0] += 1
            if count[0] >= n:
                done.set()

    side.app.handler("user-created", "1.*")(handle)
    concurrency = 2 if held <= 10 else 4
    worker = Worker(side.app, WorkerOptions(concurrency=concurrency, prefetch=held - concurrency, wait_s=0.5))
    thread = threading.Thread(target=worker.run, daemon=True)
    started = time.perf_counter()
    thread.start()
    done.wait(TIMEOUT_S)
    elapsed = time.perf_counter() - started
    worker.stop()
    thread.join(30)
    side.transport.close()
    return count[0] / elapsed


def consume_authedwig(host: str, n: int, held: int) -> float:
    side = Side(host, "aw")
    side.fill(n)
    done = threading.Event()
    count = [0]

    def callback(message):  # type: ignore[no-untyped-def]  # authedwig refuses other annotations
        count[0] += 1
        if count[0] >= n:
            done.set()

    with authedwig(host, side, HEDWIG_CALLBACKS={("user-created", "1.*"): callback}):
        from hedwig.consumer import listen_for_messages

        started = time.perf_counter()
        listen_for_messages(num_messages=held, shutdown_event=done)
        elapsed = time.perf_counter() - started
    return count[0] / elapsed


def consume_plain(host: str, n: int, held: int) -> float:
    from google.cloud import pubsub_v1

    side = Side(host, "pl")
    side.fill(n)
    os.environ["PUBSUB_EMULATOR_HOST"] = host
    subscriber = pubsub_v1.SubscriberClient()
    done = threading.Event()
    count = [0]
    lock = threading.Lock()

    def callback(message: Any) -> None:
        json.loads(message.data)
        message.ack()
        with lock:
            count[0] += 1
            if count[0] >= n:
                done.set()

    path = side.transport.subscription_path(side.transport.subscription_name(side.queue, side.topic))
    started = time.perf_counter()
    future = subscriber.subscribe(path, callback, flow_control=pubsub_v1.types.FlowControl(max_messages=held))
    done.wait(TIMEOUT_S)
    elapsed = time.perf_counter() - started
    future.cancel()
    with contextlib.suppress(Exception):
        future.result(timeout=10)
    subscriber.close()
    return count[0] / elapsed


CONSUMERS = {"hedwig_tasks": consume_hedwig_tasks, "authedwig": consume_authedwig, "plain": consume_plain}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- publish ----------------------------------------------------------------------------------


def publish_sync_hedwig_tasks(host: str, n: int) -> float:
    side = Side(host, "ps")
    started = time.perf_counter()
    for i in range(n):
        side.app.publish("user-created", "1.0", {"user_id": f"U{i}"}, {"request_id": f"r-{i}"})
    return n / (time.perf_counter() - started)


def publish_batched_hedwig_tasks(host: str, n: int) -> float:
    side = Side(host, "pb")
    started = time.perf_counter()
    rows = []
    for i in range(n):
        message = side.app.message("user-created", "1.0", {"user_id": f"U{i}"}, {"request_id": f"r-{i}"})
        rows.append(to_transport(side.app.validator.encode(message), text_only=False))
    side.transport.publish_many(side.topic, rows)
    return n / (time.perf_counter() - started)


def publish_authedwig(host: str, n: int, backend: str) -> float:
    side = Side(host, "pa")
    with authedwig(host, side, HEDWIG_PUBLISHER_BACKEND=f"hedwig.backends.gcp.{backend}"):
        from hedwig.models import Message as AuthedwigMessage

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from distutils.version import StrictVersion
        version = StrictVersion("1.0")
        started = time.perf_counter()
        results = [
            AuthedwigMessage.new(
                "user-created", version, {"user_id": f"U{i}"}, headers={"request_id": f"r-{i}"}
            ).publish()
            for i in range(n)
        ]
        for result in results:
            if hasattr(result, "result"):
                result.result()
        return n / (time.perf_counter() - started)


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="messages per consume and batched-publish run")
    parser.add_argument("--sync-n", type=int, default=300, help="messages per synchronous publish run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds after a warm-up; rates are their medians")
    parser.add_argument("--emulator", help="host:port of a running emulator (default: start one)")
    args = parser.parse_args()
    process = None
    host = args.emulator
    if host is None:
        process, host = start_emulator()
    try:
        figures = run(host, args.n, args.sync_n, args.rounds)
    finally:
        if process is not None:
            stop(process)
    print(json.dumps(figures))


def run(host: str, n: int, sync_n: int, rounds: int) -> dict[str, Any]:
    # The emulator is a JVM: whoever runs first on it would pay for its warm-up. Warm it with
    # every side once, then take the median of rounds whose order rotates.
    log("warming the emulator up with every side ...")
    for held in (10, 100):
        for consume in CONSUMERS.values():
            consume(host, min(n, 500), held)
    samples: dict[str, list[float]] = {}
    for round_ in range(rounds):
        for held in (10, 100):
            sides = list(CONSUMERS.items())
            sides = sides[round_ % len(sides) :] + sides[: round_ % len(sides)]
            for name, consume in sides:
                samples.setdefault(f"consume_{held}_{name}", []).append(consume(host, n, held))
        publishes = [
            ("publish_sync_hedwig_tasks", lambda: publish_sync_hedwig_tasks(host, sync_n)),
            (
                "publish_sync_authedwig",
                lambda: publish_authedwig(host, min(sync_n, 100), "GooglePubSubPublisherBackend"),
            ),
            ("publish_batched_hedwig_tasks", lambda: publish_batched_hedwig_tasks(host, n)),
            (
                "publish_batched_authedwig_async",
                lambda: publish_authedwig(host, n, "GooglePubSubAsyncPublisherBackend"),
            ),
        ]
        for name, publish in publishes if round_ % 2 == 0 else reversed(publishes):
            samples.setdefault(name, []).append(publish())
        log(f"round {round_ + 1} of {rounds} done")
    rates = {name: statistics.median(values) for name, values in samples.items()}
    ratio = {
        "consume_10_vs_authedwig": rates["consume_10_hedwig_tasks"] / rates["consume_10_authedwig"],
        "consume_100_vs_authedwig": rates["consume_100_hedwig_tasks"] / rates["consume_100_authedwig"],
        "consume_10_vs_plain": rates["consume_10_hedwig_tasks"] / rates["consume_10_plain"],
        "consume_100_vs_plain": rates["consume_100_hedwig_tasks"] / rates["consume_100_plain"],
        "publish_sync_vs_authedwig": rates["publish_sync_hedwig_tasks"] / rates["publish_sync_authedwig"],
        "publish_batched_vs_authedwig_async": rates["publish_batched_hedwig_tasks"]
        / rates["publish_batched_authedwig_async"],
    }
    for name, value in rates.items():
        print(f"{name:36} {value:10.1f} msg/s", file=sys.stderr)
    for name, value in ratio.items():
        target = TARGETS.get(name)
        mark = "" if target is None else (" ok" if value >= target else f" BELOW target {target}")
        print(f"{name:36} {value:10.2f}x{mark}", file=sys.stderr)
    met = {name: ratio[name] >= target for name, target in TARGETS.items()}
    return {
        "n": n,
        "rounds": rounds,
        "messages_per_s": {k: round(v, 1) for k, v in rates.items()},
        "ratio": {k: round(v, 3) for k, v in ratio.items()},
        "targets": TARGETS,
        "targets_met": met,
    }


if __name__ == "__main__":
    main()
