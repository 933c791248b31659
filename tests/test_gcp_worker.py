"""Workers on Pub/Sub (Google's emulator): the worker contract with real processes, then what is
Pub/Sub's own (its dead-letter policy, long delays, an emulator that is down or restarts)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gcp_server import PROJECT, emulator_host, free_port, gcp_transport, start_emulator, stop, tag  # noqa: F401

from hedwig_tasks.exceptions import PublishError
from hedwig_tasks.testing.worker_contract import Broker, Fleet, WorkerContract
from hedwig_tasks.transports.gcp import ATTEMPTS_ATTRIBUTE, NOT_BEFORE_ATTRIBUTE, GooglePubSubTransport


def pubsub_broker(host: str) -> Broker:
    return Broker(f"gcp://{PROJECT}?emulator={host}&publish_timeout_s=3")


@pytest.mark.slow
class TestPubSubWorkers(WorkerContract):
    @pytest.fixture
    def broker(self, emulator_host: str) -> Broker:
        return pubsub_broker(emulator_host)


@pytest.mark.slow
def test_worker_is_one_clear_error_when_the_emulator_is_down(tmp_path: Path) -> None:
    fleet = Fleet(pubsub_broker(f"127.0.0.1:{free_port()}"), tmp_path, lease_s=30.0, timeout_s=60.0)
    try:
        result = fleet.cli("worker")
    finally:
        fleet.close()
    assert result.returncode == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert f"pull from subscription hedwig-{fleet.name()}" in errors[0]
    assert "Traceback" not in result.stderr


# -- Pub/Sub's own dead-letter policy, and long delays ----------------------------------------


def test_max_delivery_attempts_dead_letters_as_the_emulator_does(gcp_host_transport: Any) -> None:
    transport, queue, topic = gcp_host_transport
    transport.provision(queue, [topic], [])
    transport.publish(topic, b"never acked", {"k": "v"})
    consumer = transport.consumer(queue, [topic])
    attempts: list[int] = []
    deadline = time.monotonic() + 20
    while len(attempts) < 5 and time.monotonic() < deadline:
        for delivery in consumer.receive(1, wait_s=0.5):
            attempts.append(delivery.attempt)
            consumer.release([delivery])
    assert attempts == [1, 2, 3, 4, 5]
    assert consumer.receive(1, wait_s=1.0) == []
    (record,) = transport.dead_letters(queue)
    assert (record.body, dict(record.attributes)) == (b"never acked", {"k": "v"})
    assert record.reason == "Pub/Sub dead-letter policy: not acknowledged after 5 deliveries"
    assert (record.subscription, record.attempts) == (f"hedwig-{queue}-{topic}", 5)


def test_long_retries_wait_in_the_apps_own_topic_not_in_memory(gcp_host_transport: Any) -> None:
    transport, queue, topic = gcp_host_transport
    transport.provision(queue, [topic], [])
    transport.publish(topic, b"later", {"k": "v"})
    consumer = transport.consumer(queue, [topic])
    (delivery,) = consumer.receive(1, wait_s=5)
    consumer.retry_later(delivery, 1200.0)
    assert consumer.receive(10, wait_s=1.5) == []  # seen, sent back to the broker, not handed out
    # a republished retry that is due comes back with its attempts counted and our marks removed
    due = str(int(time.time() * 1000) + 2000)
    transport.publish(queue, b"soon", {"k": "v", NOT_BEFORE_ATTRIBUTE: due, ATTEMPTS_ATTRIBUTE: "3"})
    started = time.monotonic()
    found: list[Any] = []
    while not found and time.monotonic() - started < 10:
        found = consumer.receive(1, wait_s=0.5)
    (soon,) = found
    assert time.monotonic() - started >= 1.5
    assert (soon.body, dict(soon.attributes), soon.attempt) == (b"soon", {"k": "v"}, 4)
    assert soon.subscription == f"hedwig-{queue}"


@pytest.fixture
def gcp_host_transport(emulator_host: str) -> Iterator[tuple[GooglePubSubTransport, str, str]]:
    transport = gcp_transport(emulator_host, lease_s=5.0, max_delivery_attempts=5)
    yield transport, f"q-{tag()}", f"t-{tag()}"
    transport.close()


# -- an emulator that restarts mid-run ---------------------------------------------------------


@pytest.mark.slow
def test_worker_resumes_after_the_emulator_restarts_and_publishes_meanwhile_raise(tmp_path: Path) -> None:
    emulator, host = start_emulator()
    fleet = Fleet(pubsub_broker(host), tmp_path, lease_s=30.0, timeout_s=60.0)
    try:
        fleet.provision()
        fleet.publish(["before"])
        worker = fleet.worker("-c", "1")
        fleet.wait(lambda: fleet.handled() == {"before"}, "the first message handled")
        stop(emulator)
        with pytest.raises(PublishError):
            fleet.publish(["while-down"])
        emulator, _ = start_emulator(int(host.rsplit(":", 1)[1]))
        fleet.provision()  # the emulator kept nothing: provision again, then publish
        fleet.publish(["after"])
        fleet.wait(lambda: fleet.handled() == {"before", "after"}, "the worker resumed")
        assert worker.poll() is None
        assert [e["user_id"] for e in fleet.events()] == ["before", "after"]
        assert len({e["pid"] for e in fleet.events()}) == 1
        assert fleet.stop(worker, timeout_s=15) == 0, fleet.logs()
    finally:
        fleet.close()
        stop(emulator)
