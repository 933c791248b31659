"""The README's quick start, through the command line in this process, on a copy of examples/quickstart."""

from __future__ import annotations

import contextlib
import logging
import os
import runpy
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hedwig_tasks.cli import EXIT_OK, EXIT_TRANSPORT, main

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart"
MODULES = ("tasks", "publish")


@pytest.fixture
def quickstart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh copy of the example as the working directory; what the CLI changes is put back."""
    folder = tmp_path / "quickstart"
    shutil.copytree(QUICKSTART, folder, ignore=shutil.ignore_patterns(".hedwig", "__pycache__"))
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_app puts the working directory first
    monkeypatch.delenv("HEDWIG_TRANSPORT_URL", raising=False)
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    for name in MODULES:
        sys.modules.pop(name, None)
    yield folder
    for name in MODULES:
        module = sys.modules.pop(name, None)
        if name == "tasks" and module is not None:
            module.hedwig.transport.close()
    for number, handler in handlers.items():
        signal.signal(number, handler)


def open_files_under(folder: Path) -> list[str]:
    """What this process holds open in ``folder`` (the bus file, its -wal and -shm), from /proc."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd listing the directory itself is gone by now
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(f"{folder}{os.sep}"):
                found.append(target)
    return found


def test_publish_before_provisioning_fails_and_says_how(quickstart: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = '{"user_id": "U1", "email": "u1@example.com"}'
    assert main(["publish", "-A", "tasks", "user-created", "1.0", data]) == EXIT_TRANSPORT
    err = capsys.readouterr().err
    assert "topic 'user-created-v1' does not exist" in err
    assert "hedwig-tasks provision -A" in err
    assert main(["provision", "-A", "tasks", "--dry-run"]) == EXIT_OK
    assert "would create topic user-created-v1" in capsys.readouterr().out  # the failed publish created nothing


def test_provision_publish_then_a_burst_worker(
    quickstart: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO)
    assert main(["provision", "-A", "tasks"]) == EXIT_OK
    assert capsys.readouterr().out.splitlines() == [
        "create topic user-created-v1",
        "create topic send_email-v1",
        "subscribe quickstart to user-created-v1",
        "subscribe quickstart to send_email-v1",
    ]
    monkeypatch.setattr(sys, "argv", ["publish.py", "2"])
    runpy.run_path("publish.py", run_name="__main__")
    assert capsys.readouterr().out.count("published user-created 1.0 id=") == 2

    assert main(["worker", "-A", "tasks", "--burst"]) == EXIT_OK
    assert open_files_under(quickstart / ".hedwig") == []  # the command closed the bus it opened
    sent = sorted(r.getMessage() for r in caplog.records if r.name == "quickstart")
    assert sent == [
        "e-mail to user1@example.com: Welcome! (request signup-1)",
        "e-mail to user2@example.com: Welcome! (request signup-2)",
    ]
    assert main(["status", "-A", "tasks"]) == EXIT_OK
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[1:] for row in rows] == [["0", "0", "0"], ["0", "0", "0"]]
