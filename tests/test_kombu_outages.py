"""Worker processes on RabbitMQ and Redis whose broker goes away mid-run, and comes back.

Each outage is one the test owns: a private redis-server on a free port, or a TCP proxy the
test cuts between the worker and the broker. The machine's own servers are never stopped.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from helpers import finish, wait_for
from test_kombu_workers import Broker

from hedwig_tasks.transports.kombu import KombuTransport
from tests.kombu_server import server_url

pytestmark = pytest.mark.slow


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl on this machine")
def test_rabbitmq_restart_mid_run_is_reconnected_to_and_loses_nothing(tmp_path: Path) -> None:
    broker = Broker(server_url("amqp"), tmp_path)
    try:
        user_ids = [f"slow-{n}" for n in range(40)]
        broker.publish(user_ids)
        worker = broker.worker("-c", "2", "--prefetch", "2", slow_s=0.1)
        wait_for(lambda: len(broker.events()) >= 5)
        _rabbitmqctl("stop_app")
        try:
            time.sleep(1.0)
        finally:
            _rabbitmqctl("start_app")
        wait_for(lambda: {e["user_id"] for e in broker.events()} == set(user_ids), timeout_s=60)
        assert worker.poll() is None, "the worker should have survived the restart"
        worker.send_signal(signal.SIGTERM)
        assert finish(worker) == 0
        assert "failed" in broker.logs()  # it did see the broker go away
    finally:
        broker.close()


def _redis_server(port: int, directory: Path) -> subprocess.Popen[bytes]:
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    command += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: _answers(port), timeout_s=10)
    return process


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on this machine")
def test_redis_restart_mid_run_is_reconnected_to_and_loses_nothing(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = _redis_server(port, tmp_path)
    broker = Broker(f"redis://127.0.0.1:{port}/0", tmp_path)
    try:
        user_ids = [f"slow-{n}" for n in range(40)]
        broker.publish(user_ids)
        worker = broker.worker("-c", "2", "--prefetch", "2", slow_s=0.1, url=f"{broker.url}?lease_s=2")
        wait_for(lambda: len(broker.events()) >= 5)
        server.terminate()  # SIGTERM: Redis flushes its append-only file and stops
        server.wait(10)
        time.sleep(1.0)
        server = _redis_server(port, tmp_path)
        wait_for(lambda: {e["user_id"] for e in broker.events()} == set(user_ids), timeout_s=60)
        assert worker.poll() is None, "the worker should have survived the restart"
        worker.send_signal(signal.SIGTERM)
        assert finish(worker) == 0
        assert "failed" in broker.logs()
        assert KombuTransport(broker.url).status(broker.name("procapp"), [broker.topic])[0].depth == 0
    finally:
        for process in broker.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        server.terminate()
        server.wait(10)
