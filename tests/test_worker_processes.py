"""Real worker processes, started through the CLI, on a temporary SQLite bus: the worker contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hedwig_tasks.testing.worker_contract import Broker, WorkerContract

pytestmark = pytest.mark.slow


class TestSQLiteWorkers(WorkerContract):
    exactly_once = True  # the bus hands a message to one consumer at a time and acks in its transaction

    @pytest.fixture
    def broker(self, tmp_path: Path) -> Broker:
        return Broker(f"sqlite:///{tmp_path}/bus.db")


def test_cli_reports_a_missing_app_clearly() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hedwig_tasks", "worker", "-A", "no_such_module"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "no module named 'no_such_module'" in result.stderr
