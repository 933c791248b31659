"""Small helpers shared by the tests that run worker processes or wait on other threads."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Any


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
