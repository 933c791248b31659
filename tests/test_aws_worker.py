"""Real worker processes, started through the CLI, on SNS/SQS served by moto."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aws_server import (  # noqa: F401
    ACCOUNT,
    CREDENTIAL_ENV,
    REGION,
    aws_transport,
    moto_messages,
    moto_url,
    seconds_hidden,
    start_moto,
    stop,
    tag,
)
from helpers import finish, wait_for

from hedwig_tasks import Hedwig

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
SCHEMA = TESTS / "schemas" / "schema.json"
ROOT = "https://hedwig-tasks.test/schema#/schemas"


class Fleet:
    """One app's queue on moto (its own name per test), worker processes, and what they did."""

    def __init__(self, server: str, tmp_path: Path, *, lease_s: float = 30) -> None:
        self.server = server
        self.name = f"app-{tag()}"
        self.topic = f"user-created-{tag()}"
        self.url = f"aws://?region={REGION}&endpoint_url={server}&account_id={ACCOUNT}&lease_s={lease_s}"
        self.transport = aws_transport(server, lease_s=lease_s)
        self.routing = {"user-created": self.topic}
        self.results = tmp_path / "results.jsonl"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def app(self, name: str | None = None) -> Hedwig:
        app = Hedwig(name or self.name, schema=SCHEMA, transport=self.transport, routing=self.routing)
        app.handler("user-created", "1.*")(lambda message: None)
        return app

    def provision(self) -> None:
        self.app().provision()

    def publish(self, user_ids: list[str]) -> None:
        publisher = Hedwig(f"pub-{tag()}", schema=SCHEMA, transport=self.transport, routing=self.routing)
        for user_id in user_ids:
            publisher.publish("user-created", "1.0", {"user_id": user_id})

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            **CREDENTIAL_ENV,
            "HEDWIG_TRANSPORT_URL": self.url,
            "CLOUD_RESULTS": str(self.results),
            "CLOUD_APP_NAME": self.name,
            "CLOUD_APP_TOPIC": self.topic,
            "PYTHONPATH": str(TESTS),
            **extra,
        }

    def worker(self, *args: str, slow_s: float = 0.5) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "hedwig_tasks", "worker", "-A", "apps.cloud_app", "-l", "WARNING", *args]
        log = self.results.with_name(f"worker-{len(self.processes)}.log")
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, env=self.env(CLOUD_SLOW_S=str(slow_s)), stdout=out, stderr=subprocess.STDOUT
            )
        self.processes.append(process)
        self.logs.append(log)
        return process

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "hedwig_tasks", *args, "-A", "apps.cloud_app"]
        return subprocess.run(command, env=self.env(**env), capture_output=True, text=True, timeout=60)

    def events(self, event: str = "end") -> list[dict[str, Any]]:
        if not self.results.exists():
            return []
        return [e for e in map(json.loads, self.results.read_text().splitlines()) if e["event"] == event]

    def counts(self) -> tuple[int | None, int | None, int | None]:
        [row] = self.transport.status(self.name, [self.topic])
        return row.depth, row.in_flight, row.dead_letters


@pytest.fixture
def fleet(moto_url: str, tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(moto_url, tmp_path)
    yield fleet
    for process in fleet.processes:
        if process.poll() is None:
            process.kill()
            process.wait()
    fleet.transport.close()


def test_a_handler_running_three_leases_is_not_redelivered(moto_url: str, tmp_path: Path) -> None:
    fleet = Fleet(moto_url, tmp_path, lease_s=1)
    fleet.provision()
    fleet.publish(["slow-long", "fine"])
    assert finish(fleet.worker("--burst", "-c", "2", slow_s=3.5)) == 0  # 3.5 leases of 1 s
    starts = fleet.events("start")
    assert sorted((e["user_id"], e["attempt"]) for e in starts) == [("fine", 1), ("slow-long", 1)]
    assert len(fleet.events()) == 2
    assert fleet.counts() == (0, 0, 0)


def test_sigterm_releases_buffered_messages_at_once(fleet: Fleet) -> None:
    fleet.provision()
    fleet.publish([f"slow-{n}" for n in range(12)])
    worker = fleet.worker("-c", "2", "--prefetch", "4", slow_s=1.5)
    wait_for(lambda: len(fleet.events("start")) == 2)
    assert fleet.counts()[1] == 6  # two running, four buffered; the lease is 30 s
    worker.send_signal(signal.SIGTERM)
    assert finish(worker, timeout_s=15) == 0
    started, ended = fleet.events("start"), fleet.events("end")
    assert {e["id"] for e in ended} == {e["id"] for e in started}
    assert fleet.counts() == (12 - len(ended), 0, 0)  # visible now, not after the 30 s lease


def test_a_twenty_minute_retry_is_kept_in_sqs(moto_url: str, tmp_path: Path) -> None:
    fleet = Fleet(moto_url, tmp_path, lease_s=1)  # the lease keeper extends every third of a second
    fleet.provision()
    user_id = f"later-{tag()}"
    fleet.publish([user_id])
    worker = fleet.worker("-c", "1")
    wait_for(lambda: fleet.events("start"))
    time.sleep(1.5)  # several lease-keeper rounds after the retry
    worker.send_signal(signal.SIGTERM)
    assert finish(worker, timeout_s=15) == 0
    [start] = fleet.events("start")
    assert start["attempt"] == 1
    assert fleet.counts() == (0, 1, 0)  # held by SQS, not by the worker
    sqs = fleet.transport._client("sqs")
    url = sqs.get_queue_url(QueueName=f"HEDWIG-{fleet.name}")["QueueUrl"]
    assert sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1).get("Messages", []) == []
    [message_id] = {m["id"] for m in moto_messages(moto_url) if user_id in m.get("body", "")}
    hidden_s = seconds_hidden(moto_url, message_id)
    elapsed_s = time.time() - start["t"]
    assert 1200 - elapsed_s - 3 <= hidden_s <= 1200, hidden_s  # visible again 20 minutes after the retry


def test_poison_messages_reach_the_dlq_with_their_reasons(fleet: Fleet) -> None:
    good = {
        "hedwig_format_version": "1.0",
        "hedwig_id": "6a8d6c4e-5d0e-4b8e-9a59-6ad1c0d3b1f1",
        "hedwig_message_timestamp": "1795719926586",
        "hedwig_publisher": "other",
        "hedwig_schema": f"{ROOT}/user-created/1.0",
    }
    missing = {k: v for k, v in good.items() if k != "hedwig_publisher"}
    poison = [
        (b"{nope", good, "body is not valid JSON"),
        (b'{"user_id": 7}', good, "data.user_id: 7 is not of type 'string'"),
        (b'{"user_id": "U"}', {**good, "hedwig_schema": f"{ROOT}/sms/1.0"}, "unknown message type 'sms'"),
        (b'{"user_id": "U"}', missing, "missing Hedwig attribute(s): hedwig_publisher"),
    ]
    fleet.provision()
    for body, attributes, _ in poison:
        fleet.transport.publish(fleet.topic, body, attributes)
    fleet.publish(["fine", "fail-1"])
    assert finish(fleet.worker("--burst")) == 0
    assert [e["user_id"] for e in fleet.events()] == ["fine"]
    assert [e["attempt"] for e in fleet.events("start") if e["user_id"] == "fail-1"] == [1, 2, 3]
    listed = fleet.cli("dlq", "list")
    assert listed.returncode == 0, listed.stderr
    records = [json.loads(line) for line in listed.stdout.splitlines()]
    reasons = [r["reason"] for r in records]
    for _, _, expected in poison:
        assert any(expected in reason for reason in reasons), (expected, reasons)
    assert "gave up after 3 attempts: ValueError: cannot create fail-1" in reasons
    assert fleet.counts() == (0, 0, 5)
    requeued = fleet.cli("dlq", "requeue")
    assert requeued.returncode == 0 and "requeued 5 message(s)" in requeued.stderr, requeued.stderr
    assert fleet.counts() == (5, 0, 0)


def test_two_workers_share_the_queue_exactly_once(fleet: Fleet) -> None:
    fleet.provision()
    fleet.publish([f"U{n}" for n in range(60)])
    workers = [fleet.worker("--burst", "-c", "4") for _ in range(2)]
    assert [finish(w) for w in workers] == [0, 0]
    handled = fleet.events()
    assert Counter(e["user_id"] for e in handled) == Counter({f"U{n}": 1 for n in range(60)})
    assert fleet.counts() == (0, 0, 0)


def test_provision_and_status_through_the_cli(fleet: Fleet) -> None:
    planned = fleet.cli("provision", "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert f"would create queue HEDWIG-{fleet.name} (messages)" in planned.stdout
    assert f"would subscribe HEDWIG-{fleet.name} to {fleet.topic} (raw delivery)" in planned.stdout
    done = fleet.cli("provision")
    assert done.stdout.replace("would ", "") == planned.stdout.replace("would ", "")
    assert fleet.cli("provision").stdout.strip() == "nothing to do: everything exists"
    fleet.publish(["U1", "U2"])
    status = fleet.cli("status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[1].split() == [f"HEDWIG-{fleet.name}", "2", "0", "0"]


# -- start-up failures -------------------------------------------------------------------------


def _start_failure(fleet: Fleet, url: str, **env: str) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    result = fleet.cli("worker", HEDWIG_TRANSPORT_URL=url, **env)
    assert time.monotonic() - started < 30
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return result


def test_an_unreachable_endpoint_fails_once_at_start_up(fleet: Fleet) -> None:
    closed = f"aws://?region={REGION}&endpoint_url=http://127.0.0.1:9&account_id={ACCOUNT}"
    result = _start_failure(fleet, closed)
    assert 'Could not connect to the endpoint URL: "http://127.0.0.1:9/"' in result.stderr


def test_bad_credentials_fail_once_at_start_up(fleet: Fleet) -> None:
    process, server = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # this one checks credentials
    try:
        url = f"aws://?region={REGION}&endpoint_url={server}&account_id={ACCOUNT}"
        result = _start_failure(fleet, url, AWS_ACCESS_KEY_ID="AKIAWRONG", AWS_SECRET_ACCESS_KEY="wrong")
    finally:
        stop(process)
    assert "InvalidClientTokenId: The security token included in the request is invalid." in result.stderr
    assert "(check the AWS credentials)" in result.stderr
    assert "wrong" not in result.stderr


def test_a_missing_queue_fails_once_at_start_up(fleet: Fleet) -> None:
    result = _start_failure(fleet, fleet.url)
    assert f"SQS queue HEDWIG-{fleet.name} does not exist; run `hedwig-tasks provision`" in result.stderr
