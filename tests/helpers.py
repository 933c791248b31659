"""Small helpers shared by the tests that run worker processes or wait on other threads."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from hedwig_tasks.worker import Worker


def finish(process: subprocess.Popen[bytes], timeout_s: float = 60) -> int:
    """The exit code of ``process``; kills it and fails the test if it outlives ``timeout_s``."""
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError("worker did not exit in time") from None
    return process.returncode


def wait_for(condition: Callable[[], Any], timeout_s: float = 30.0) -> None:
    """Poll ``condition`` until it is true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


class WorkerThread:
    """A worker running on a thread of the test; ``stop()`` stops it and re-raises what it raised."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:
            self.error = exc

    def stop(self, *, abort: bool = False, timeout_s: float = 15.0) -> None:
        """Stop gracefully, or with ``abort`` without waiting for running (stuck) handlers."""
        self.worker.stop()
        if abort:
            self.worker.stop()  # a second request gives up waiting for handlers
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the worker did not stop"
        if self.error:
            raise self.error
