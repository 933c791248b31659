"""Worker processes on RabbitMQ whose broker goes away mid-run, and comes back.

Each outage is one the test owns: a TCP proxy (``tcp_proxy.py``) the test cuts between the
worker and the machine's RabbitMQ. The machine's own server is shared and never stopped,
restarted or flushed.
"""

from __future__ import annotations

import signal
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from helpers import finish, wait_for
from kombu_server import server_url
from tcp_proxy import TcpProxy
from test_kombu_workers import Broker

pytestmark = pytest.mark.slow


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
