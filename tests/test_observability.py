"""Metrics scraped from a running worker, health probes, and JSON logs."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import SCHEMA_FILE
from helpers import wait_for

from hedwig_tasks import Hedwig
from hedwig_tasks.health import ProbeServer, health_routes
from hedwig_tasks.testing.worker_contract import Broker, Fleet
from hedwig_tasks.transports.base import Delivery
from hedwig_tasks.transports.memory import MemoryConsumer, MemoryTransport
from hedwig_tasks.worker import Worker, WorkerOptions


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def sample(text: str, name: str, **labels: str) -> float | None:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(f"{name}{{{wanted}}}" if labels else name) + r" (\S+)$"
    match = re.search("^" + pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else None


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """The worker contract's app on a temporary SQLite bus, run through the CLI."""
    fleet = Fleet(Broker(f"sqlite:///{tmp_path}/bus.db"), tmp_path, lease_s=30.0, timeout_s=60.0)
    yield fleet
    fleet.close()


def test_metrics_of_a_running_worker_count_exactly(fleet: Fleet) -> None:
    fleet.provision()
    fleet.publish(["U1", "U2", "U3", "fail-1"])
    fleet.transport.publish(fleet.topic, b"{not json", {"hedwig_schema": "x"})
    port = free_port()
    worker = fleet.worker("--metrics-port", str(port))
    text = ""

    def settled() -> bool:
        nonlocal text
        status, text = get(f"http://127.0.0.1:{port}/metrics")
        return status == 200 and sample(text, "hedwig_dead_lettered_total", type="user-created", major="1") == 1

    try:
        fleet.wait(settled, "fail-1 dead-lettered, as the metrics say")
    finally:
        returncode = fleet.stop(worker)
    labels = {"type": "user-created", "major": "1"}
    assert sample(text, "hedwig_handled_total", **labels) == 3
    assert sample(text, "hedwig_failed_total", **labels) == 3  # fail-1: three attempts
    assert sample(text, "hedwig_retried_total", **labels) == 2
    assert sample(text, "hedwig_dead_lettered_total", **labels) == 1
    assert sample(text, "hedwig_dead_lettered_total", type="", major="") == 1  # the undecodable one
    assert sample(text, "hedwig_handler_duration_seconds_count", **labels) == 6
    assert sample(text, "hedwig_running") == 0
    assert returncode == 0


class Stalling(MemoryTransport):
    """A bus whose consumers can be made to hang: in connecting, or in receiving."""

    def __init__(self) -> None:
        super().__init__()
        self.connect_gate = threading.Event()
        self.stall = threading.Event()

    def consumer(self, queue: str, topics: Sequence[str], *, max_outstanding: int | None = None) -> MemoryConsumer:
        self.connect_gate.wait(10)
        bus = self

        class StallingConsumer(MemoryConsumer):
            def receive(self, max_messages: int, wait_s: float) -> list[Delivery]:
                while bus.stall.is_set():
                    time.sleep(0.05)
                return super().receive(max_messages, wait_s)

        return StallingConsumer(self, queue, [f"{queue}:{t}" for t in topics])


def test_readyz_waits_for_the_connection_and_healthz_sees_a_stall() -> None:
    bus = Stalling()
    app = Hedwig("svc", schema=SCHEMA_FILE, transport=bus)
    app.handler("user-created", "1.*")(lambda message: None)
    worker = Worker(app, WorkerOptions(wait_s=0.05))
    server = ProbeServer(health_routes(worker, stall_after_s=0.5), port=0, host="127.0.0.1")
    base = f"http://127.0.0.1:{server.port}"
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        assert get(f"{base}/readyz") == (503, "not consuming yet\n")
        bus.connect_gate.set()
        wait_for(lambda: get(f"{base}/readyz")[0] == 200)
        assert get(f"{base}/healthz") == (200, "ok\n")
        bus.stall.set()
        wait_for(lambda: get(f"{base}/healthz")[0] == 503, timeout_s=5)
        assert "receive loop stalled" in get(f"{base}/healthz")[1]
        bus.stall.clear()
        wait_for(lambda: get(f"{base}/healthz")[0] == 200, timeout_s=5)
    finally:
        bus.stall.clear()
        worker.stop()
        thread.join(10)
        server.close()
    assert get(f"{base}/healthz")[0] == 0  # closed with the worker


def test_json_log_lines_carry_the_message_fields(fleet: Fleet) -> None:
    fleet.provision()
    fleet.publish(["U1"])
    result = fleet.cli("worker", "--burst", "--log-format", "json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    [started] = fleet.events("start")
    [handled] = [line for line in lines if line.get("message_id") == started["id"]]
    assert handled["outcome"] == "ack" and handled["attempt"] == 1 and handled["message_type"] == "user-created"
    assert isinstance(handled["duration_ms"], float)
