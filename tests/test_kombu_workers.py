"""Real worker processes, started through the CLI, on RabbitMQ: the worker contract.

The server is the machine's own and shared: every test uses names of its own and deletes
only those (``kombu_server.cleanup``). Outages live in ``test_kombu_outages.py``, on servers
those tests start themselves; they use :class:`Broker` below.
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from kombu_server import cleanup, server_url

from hedwig_tasks.testing import worker_contract
from hedwig_tasks.testing.worker_contract import Fleet, WorkerContract

pytestmark = pytest.mark.slow


def kombu_broker(url: str) -> worker_contract.Broker:
    return worker_contract.Broker(url, cleanup=functools.partial(cleanup, url))


class TestRabbitMQWorkers(WorkerContract):
    # RabbitMQ's own redelivery of a dead connection's messages is immediate; the lease is the worker's.
    @pytest.fixture
    def broker(self) -> worker_contract.Broker:
        return kombu_broker(server_url("amqp"))


class Broker(Fleet):
    """One broker URL, apps with names of the test's own, worker processes and their results.

    The worker contract's :class:`Fleet` with the names ``test_kombu_outages.py`` uses: apps
    are called by role (``"procapp"`` unless told), ``events()`` are handler ends.
    """

    def __init__(self, url: str, tmp_path: Path) -> None:
        super().__init__(kombu_broker(url), tmp_path, lease_s=WorkerContract.lease_s, timeout_s=60.0)
        self.url = url

    def publish(self, user_ids: Sequence[str], apps: Sequence[str] = ("procapp",)) -> list[str]:
        self.provision(*apps)
        return super().publish(user_ids)

    def worker(  # type: ignore[override]  # called with app=, as the outage tests do
        self, *args: str, app: str = "procapp", slow_s: float = 0.5, url: str | None = None
    ) -> subprocess.Popen[bytes]:
        return super().worker(*args, role=app, slow_s=slow_s, url=url)
