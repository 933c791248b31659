"""Worker processes on RabbitMQ and Redis whose broker goes away mid-run, and comes back.

Each outage is one the test owns: a TCP proxy (``tcp_proxy.py``) the test cuts between the
worker and the machine's RabbitMQ, or a private redis-server on a free port. The machine's own
servers are shared and never stopped, restarted or flushed.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from helpers import finish, wait_for
from kombu_server import server_url
from tcp_proxy import TcpProxy
from test_kombu_workers import Broker

from hedwig_tasks.transports.kombu import KombuTransport

pytestmark = pytest.mark.slow


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
    except OSError:
        return False
    return True


def _failures(log: Path) -> int:
    """How many times the worker has logged that a call to the broker failed."""
    return log.read_text().count("failed") if log.exists() else 0


def test_rabbitmq_outage_mid_run_is_reconnected_to_and_loses_nothing(tmp_path: Path) -> None:
    url = server_url("amqp")
    parts = urlsplit(url)
    broker = Broker(url, tmp_path)
    try:
        with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as proxy:
            user_ids = [f"slow-{n}" for n in range(40)]
            broker.publish(user_ids)  # straight to the broker; only the worker goes through the proxy
            worker = broker.worker("-c", "2", "--prefetch", "2", slow_s=0.1, url=proxy.route(url))
            log = tmp_path / "worker-0.log"
            wait_for(lambda: len(broker.events()) >= 5)
            failures, connections = _failures(log), proxy.accepted
            proxy.cut()  # mid-run: connections closed, new ones refused
            wait_for(lambda: _failures(log) > failures, timeout_s=20)  # it saw the broker go away
            proxy.restore()
            wait_for(lambda: {e["user_id"] for e in broker.events()} == set(user_ids), timeout_s=30)
            assert proxy.accepted > connections, "the worker should have reconnected through the proxy"
            assert worker.poll() is None, "the worker should have survived the outage"
            worker.send_signal(signal.SIGTERM)
            assert finish(worker) == 0, broker.logs()
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
        log = tmp_path / "worker-0.log"
        wait_for(lambda: len(broker.events()) >= 5)
        failures = _failures(log)
        server.terminate()  # SIGTERM: Redis flushes its append-only file and stops
        server.wait(10)
        wait_for(lambda: _failures(log) > failures, timeout_s=20)  # it saw the server go away
        server = _redis_server(port, tmp_path)
        wait_for(lambda: {e["user_id"] for e in broker.events()} == set(user_ids), timeout_s=60)
        assert worker.poll() is None, "the worker should have survived the restart"
        worker.send_signal(signal.SIGTERM)
        assert finish(worker) == 0, broker.logs()
        bus = KombuTransport(broker.url)
        assert bus.status(broker.name("procapp"), [broker.topic])[0].depth == 0
        bus.close()
    finally:
        for process in broker.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        server.terminate()
        server.wait(10)
