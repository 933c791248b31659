"""Real worker processes, started through the CLI, on RabbitMQ and on Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import finish, wait_for

from hedwig_tasks import Hedwig
from hedwig_tasks.transports.kombu import KombuTransport
from tests.kombu_server import cleanup, server_url

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
SCHEMA = TESTS / "schemas" / "schema.json"


class Broker:
    """Apps and workers on one broker URL, with a topic and app names unique to the test."""

    def __init__(self, url: str, tmp_path: Path) -> None:
        self.url = url
        self.tag = uuid.uuid4().hex[:8]
        self.topic = f"user-created-{self.tag}"
        self.results = tmp_path / "results.jsonl"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.apps: set[str] = set()

    def name(self, app: str) -> str:
        return f"{app}-{self.tag}"

    def app(self, app: str) -> Hedwig:
        self.apps.add(self.name(app))
        hedwig = Hedwig(self.name(app), schema=SCHEMA, transport=self.url, routing={"user-created": self.topic})
        hedwig.handler("user-created", "1.*")(lambda message: None)
        return hedwig

    def publish(self, user_ids: list[str], apps: tuple[str, ...] = ("procapp",)) -> None:
        for app in apps:
            self.app(app).provision()
        routing = {"user-created": self.topic}
        publisher = Hedwig(f"publisher-{self.tag}", schema=SCHEMA, transport=self.url, routing=routing)
        publisher.provision()
        for user_id in user_ids:
            publisher.publish_message(publisher.message("user-created", "1.0", {"user_id": user_id}))
        publisher.transport.close()

    def worker(self, *args: str, app: str = "procapp", slow_s: float = 0.5, url: str | None = None) -> Any:
        env = {
            **os.environ,
            "HEDWIG_TRANSPORT_URL": url or self.url,
            "PROC_RESULTS": str(self.results),
            "PROC_APP_NAME": self.name(app),
            "PROC_SLOW_S": str(slow_s),
            "KOMBU_TOPIC": self.topic,
            "PYTHONPATH": str(TESTS),
        }
        command = [sys.executable, "-m", "hedwig_tasks", "worker", "-A", "apps.kombu_app", "-l", "WARNING", *args]
        log = self.results.with_name(f"worker-{len(self.processes)}.log")
        with log.open("wb") as out:
            process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def events(self, event: str = "end") -> list[dict[str, Any]]:
        if not self.results.exists():
            return []
        return [e for e in map(json.loads, self.results.read_text().splitlines()) if e["event"] == event]

    def logs(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.results.parent.glob("worker-*.log")))

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        cleanup(self.url, [*self.apps, f"publisher-{self.tag}"], [self.topic])


@pytest.fixture(params=["amqp", "redis"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(server_url(request.param), tmp_path)
    yield broker
    broker.close()


def test_two_apps_on_one_topic_each_handle_every_message_once(broker: Broker) -> None:
    user_ids = [f"U{n}" for n in range(200)]
    broker.publish(user_ids, apps=("billing", "audit"))
    workers = [broker.worker("--burst", "-c", "4", app=app) for app in ("billing", "audit")]
    assert [finish(w) for w in workers] == [0, 0], broker.logs()
    by_pid = Counter(e["pid"] for e in broker.events())
    assert sorted(by_pid.values()) == [200, 200]
    for pid in by_pid:
        handled = Counter(e["user_id"] for e in broker.events() if e["pid"] == pid)
        assert handled == Counter({u: 1 for u in user_ids})  # each app: every message, once


def test_failing_handler_retries_through_the_broker_then_dead_letters(broker: Broker) -> None:
    broker.publish(["fail-1"])
    assert finish(broker.worker("--burst")) == 0, broker.logs()
    assert [e["attempt"] for e in broker.events("start")] == [1, 2, 3]
    app = broker.app("procapp")
    [record] = app.transport.dead_letters(app.queue)
    assert record.reason == "gave up after 3 attempts: ValueError: cannot create fail-1"
    assert record.attempts == 3
    app.transport.close()


def test_kill_9_mid_run_loses_nothing(broker: Broker) -> None:
    url = f"{broker.url}?lease_s=1" if "?" not in broker.url else f"{broker.url}&lease_s=1"
    user_ids = [f"slow-{n}" for n in range(30)]
    broker.publish(user_ids)
    victim = broker.worker("-c", "2", "--prefetch", "4", slow_s=0.2, url=url)
    wait_for(lambda: len(broker.events()) >= 5)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    # On Redis the victim's unacked messages come back after Kombu's visibility timeout (lease + grace).
    assert finish(broker.worker("--burst", "-c", "4", slow_s=0.05, url=url), timeout_s=90) == 0, broker.logs()
    assert {e["user_id"] for e in broker.events()} == set(user_ids)


def cli(broker: Broker, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HEDWIG_TRANSPORT_URL": broker.url,
        "PROC_APP_NAME": broker.name("procapp"),
        "KOMBU_TOPIC": broker.topic,
        "PYTHONPATH": str(TESTS),
    }
    command = [sys.executable, "-m", "hedwig_tasks", *args, "-A", "apps.kombu_app"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_cli_provisions_lists_and_requeues_dead_letters(broker: Broker) -> None:
    broker.apps.add(broker.name("procapp"))
    planned = cli(broker, "provision", "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert f"subscribe {broker.name('procapp')} to {broker.topic}" in planned.stdout + planned.stderr
    assert cli(broker, "provision").returncode == 0
    again = cli(broker, "provision")
    assert again.returncode == 0 and broker.topic not in again.stdout
    broker.publish(["fail-a", "fail-b"])
    assert finish(broker.worker("--burst")) == 0, broker.logs()
    listed = cli(broker, "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    records = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(r["reason"] for r in records) == [
        f"gave up after 3 attempts: ValueError: cannot create {u}" for u in ("fail-a", "fail-b")
    ]
    requeued = cli(broker, "dlq", "requeue")
    assert requeued.returncode == 0 and "requeued 2 message(s)" in requeued.stderr, requeued.stderr
    [row] = KombuTransport(broker.url).status(broker.name("procapp"), [broker.topic])
    assert (row.depth, row.dead_letters) == (2, 0)
