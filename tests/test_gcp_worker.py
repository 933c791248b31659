"""Workers on Pub/Sub (Google's emulator): flow control, leases, shutdown, dead letters, outages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gcp_server import PROJECT, emulator_host, free_port, gcp_transport, start_emulator, stop, tag  # noqa: F401
from helpers import finish, wait_for

from hedwig_tasks import Hedwig, Message, signals
from hedwig_tasks.exceptions import PublishError
from hedwig_tasks.transports.gcp import ATTEMPTS_ATTRIBUTE, NOT_BEFORE_ATTRIBUTE, GooglePubSubTransport
from hedwig_tasks.worker import Worker, WorkerOptions

TESTS = Path(__file__).parent
SCHEMA = TESTS / "schemas" / "schema.json"


class Run:
    """One test's app on the emulator: its own queue and topic, worker processes, their results."""

    def __init__(self, tmp_path: Path, host: str, lease_s: float = 30.0) -> None:
        suffix = tag()
        self.host = host
        self.name, self.topic = f"gcpapp-{suffix}", f"user-created-{suffix}"
        self.url = f"gcp://{PROJECT}?emulator={host}&lease_s={lease_s}&publish_timeout_s=3"
        self.results = tmp_path / "results.jsonl"
        self.processes: list[subprocess.Popen[bytes]] = []

    def app(self, handler: Any = None) -> Hedwig:
        app = Hedwig(self.name, schema=SCHEMA, transport=self.url, routing={"user-created": self.topic})
        app.handler("user-created", "1.*")(handler or (lambda message: None))
        return app

    def publish(self, user_ids: list[str], provision: bool = True) -> None:
        app = self.app()
        if provision:
            app.provision()
        for user_id in user_ids:
            app.publish("user-created", "1.0", {"user_id": user_id})

    def env(self, slow_s: float) -> dict[str, str]:
        return {
            **os.environ,
            "HEDWIG_TRANSPORT_URL": self.url,
            "CLOUD_RESULTS": str(self.results),
            "CLOUD_APP_NAME": self.name,
            "CLOUD_APP_TOPIC": self.topic,
            "CLOUD_SLOW_S": str(slow_s),
            "PYTHONPATH": str(TESTS),
        }

    def worker(self, *args: str, slow_s: float = 0.5) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "hedwig_tasks", "worker", "-A", "apps.cloud_app", "-l", "WARNING", *args]
        log = self.results.with_name(f"worker-{len(self.processes)}.log")
        with log.open("wb") as out:
            process = subprocess.Popen(command, env=self.env(slow_s), stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "hedwig_tasks", *args, "-A", "apps.cloud_app"]
        return subprocess.run(command, env=self.env(0), capture_output=True, text=True, timeout=60)

    def events(self, event: str = "end") -> list[dict[str, Any]]:
        if not self.results.exists():
            return []
        return [e for e in map(json.loads, self.results.read_text().splitlines()) if e["event"] == event]

    def transport(self) -> GooglePubSubTransport:
        return GooglePubSubTransport.from_url(self.url)


@pytest.fixture
def run(tmp_path: Path, emulator_host: str) -> Iterator[Run]:
    run = Run(tmp_path, emulator_host)
    yield run
    for process in run.processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def _in_thread(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    wait_for(lambda: worker.ready, 15)
    return thread


# -- flow control and leases (in-process workers, counted through the signals) ----------------


def test_never_leases_more_than_concurrency_plus_prefetch(run: Run) -> None:
    lock, running, peak_running = threading.Lock(), [0], [0]

    def slow(message: Message) -> None:
        time.sleep(0.3)

    app = run.app(slow)

    def started(sender: Any, **kwargs: Any) -> None:
        with lock:
            running[0] += 1
            peak_running[0] = max(peak_running[0], running[0])

    def ended(sender: Any, **kwargs: Any) -> None:
        with lock:
            running[0] -= 1

    signals.handler_started.connect(started, sender=app)
    signals.handler_succeeded.connect(ended, sender=app)
    run.publish([f"U{n}" for n in range(40)])
    worker = Worker(app, WorkerOptions(concurrency=2, prefetch=3))
    thread = _in_thread(worker)
    peak_held = 0
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        peak_held = max(peak_held, worker.held)
        time.sleep(0.01)
    # What the worker does not hold, the broker still offers: another consumer can take it all.
    thief = run.transport().consumer(run.name, [run.topic])
    taken: list[Any] = []
    while batch := thief.receive(100, wait_s=1.0):
        taken += batch
    handled = worker.counts["handled"]
    held = worker.held
    thief.release(taken)
    worker.stop()
    thread.join(30)
    assert peak_held == 5
    assert peak_running[0] == 2
    assert held <= 5
    assert len(taken) >= 40 - handled - 5 - 2  # at most what it held, and what finished meanwhile


def test_a_handler_outliving_its_lease_several_times_is_not_redelivered(tmp_path: Path, emulator_host: str) -> None:
    run = Run(tmp_path, emulator_host, lease_s=2.0)
    starts: list[float] = []
    app = run.app(lambda message: (starts.append(time.monotonic()), time.sleep(7.0)))
    run.publish(["U-slow"])
    worker = Worker(app, WorkerOptions(concurrency=1, prefetch=0))
    thread = _in_thread(worker)
    wait_for(lambda: worker.counts["handled"] == 1, 30)
    time.sleep(3.0)  # a redelivery would have come by now
    worker.stop()
    thread.join(30)
    assert len(starts) == 1
    assert worker.counts == {"handled": 1, "retried": 0, "dead_lettered": 0}


# -- real worker processes through the CLI -----------------------------------------------------


@pytest.mark.slow
def test_sigterm_releases_buffered_at_once_and_finishes_running(run: Run) -> None:
    run.publish([f"slow-{n}" for n in range(10)])
    worker = run.worker("-c", "2", "--prefetch", "4", slow_s=2.0)
    wait_for(lambda: len(run.events("start")) == 2)
    time.sleep(0.5)  # the prefetch fills
    worker.send_signal(signal.SIGTERM)
    assert finish(worker, timeout_s=15) == 0
    started, ended = run.events("start"), run.events("end")
    assert len(started) == 2
    assert {e["id"] for e in ended} == {e["id"] for e in started}
    # released, not left to their 30 s lease: another consumer gets the other eight now
    consumer = run.transport().consumer(run.name, [run.topic])
    got: list[Any] = []
    deadline = time.monotonic() + 5
    while len(got) < 8 and time.monotonic() < deadline:
        got += consumer.receive(10, wait_s=0.5)
    assert sorted(d.attempt for d in got) == [1, 1, 1, 1, 2, 2, 2, 2]  # the four buffered were nacked


@pytest.mark.slow
def test_poison_and_failing_messages_reach_the_dlq_topic_with_their_reasons(run: Run) -> None:
    run.app().provision()
    transport = run.transport()
    transport.publish(run.topic, b"{nope", {"hedwig_format_version": "1.0"})
    run.publish(["fail-1"], provision=False)
    worker = run.worker()  # not --burst: Pub/Sub cannot say a delayed retry is still to come
    wait_for(lambda: len(run.events("start")) == 3, 30)  # RetryPolicy(max_retries=2): three attempts
    time.sleep(0.5)
    worker.send_signal(signal.SIGTERM)
    assert finish(worker, timeout_s=15) == 0
    records = transport.dead_letters(run.name)
    reasons = sorted(r.reason for r in records)
    assert len(records) == 2, reasons
    assert any(r.startswith("invalid message: body is not valid JSON") for r in reasons), reasons
    assert any("gave up after 3 attempts: ValueError: cannot create fail-1" in r for r in reasons)
    assert {r.subscription for r in records} == {f"hedwig-{run.name}-{run.topic}"}
    listed = run.cli("dlq", "list")
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == 2
    requeued = run.cli("dlq", "requeue")
    assert requeued.returncode == 0 and "requeued 2 message(s)" in requeued.stderr, requeued.stderr
    assert transport.dead_letters(run.name) == []


@pytest.mark.slow
def test_worker_is_one_clear_error_when_the_emulator_is_down(tmp_path: Path) -> None:
    run = Run(tmp_path, f"127.0.0.1:{free_port()}")
    result = run.cli("worker")
    assert result.returncode == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert f"pull from subscription hedwig-{run.name}" in errors[0]
    assert "Traceback" not in result.stderr


# -- Pub/Sub's own dead-letter policy, and long delays ----------------------------------------


def test_max_delivery_attempts_dead_letters_as_the_emulator_does(gcp_host_transport: Any) -> None:
    transport, queue, topic = gcp_host_transport
    transport.provision(queue, [topic], [])
    transport.publish(topic, b"never acked", {"k": "v"})
    consumer = transport.consumer(queue, [topic])
    attempts = []
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
    try:
        run = Run(tmp_path, host)
        run.publish(["before"])
        worker = run.worker("-c", "1")
        wait_for(lambda: len(run.events()) == 1)
        stop(emulator)
        with pytest.raises(PublishError):
            run.publish(["while-down"], provision=False)
        emulator, _ = start_emulator(int(host.rsplit(":", 1)[1]))
        run.publish(["after"])  # the emulator kept nothing: provision again, then publish
        wait_for(lambda: len(run.events()) == 2, 60)
        assert worker.poll() is None
        assert [e["user_id"] for e in run.events()] == ["before", "after"]
        assert len({e["pid"] for e in run.events()}) == 1
        worker.send_signal(signal.SIGTERM)
        assert finish(worker, timeout_s=15) == 0
    finally:
        stop(emulator)
        for process in run.processes:
            if process.poll() is None:
                process.kill()
