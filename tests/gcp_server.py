"""Google's Pub/Sub emulator for the GCP tests, reached over gRPC like the real service.

``.ci/servers/pubsub.sh`` starts one and exports ``HEDWIG_TEST_PUBSUB_EMULATOR_HOST``. Without
that variable a developer's run starts its own on a free loopback port, once per session; under
CI (``CI=true``) a missing variable fails the tests instead, so a broken CI setup cannot pass by
skipping.

The emulator keeps nothing across restarts, and after a streaming pull is cancelled it can
starve the next consumer of the same subscription: every test uses names of its own.

Test modules import the fixtures they use (``from gcp_server import emulator_host``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hedwig_tasks.transports.gcp import GooglePubSubTransport

HOST_ENV = "HEDWIG_TEST_PUBSUB_EMULATOR_HOST"
PROJECT = "hedwig-test"
LAUNCHER = "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator"

_started: dict[str, str] = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launcher() -> str:
    """The emulator's start script, from its Debian package (or ``gcloud``'s components)."""
    if Path(LAUNCHER).exists():
        return LAUNCHER
    listed = subprocess.run(
        ["dpkg", "-L", "google-cloud-cli-pubsub-emulator"], capture_output=True, text=True, check=False
    )
    for line in listed.stdout.splitlines():
        if line.endswith("bin/cloud-pubsub-emulator"):
            return line
    found = shutil.which("cloud-pubsub-emulator")
    if found is None:
        raise RuntimeError("the Pub/Sub emulator is not installed (Debian: google-cloud-cli-pubsub-emulator)")
    return found


def wait_until_up(host: str, process: subprocess.Popen[bytes] | None = None, timeout_s: float = 60) -> None:
    address, port = host.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError), socket.create_connection((address, int(port)), 0.5):
            return
        if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
            raise RuntimeError(f"the Pub/Sub emulator did not answer on {host}")
        time.sleep(0.1)


def start_emulator(port: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """A new emulator on a free loopback port (or ``port``), answering; in its own process group."""
    port = port or free_port()
    log = tempfile.NamedTemporaryFile(prefix="pubsub-", suffix=".log", delete=False)
    process = subprocess.Popen(
        [launcher(), "--host=127.0.0.1", f"--port={port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the script execs java; the group catches any child too
    )
    host = f"127.0.0.1:{port}"
    try:
        wait_until_up(host, process)
    except RuntimeError:
        stop(process)
        raise RuntimeError(f"the Pub/Sub emulator did not start on {host}; see {log.name}") from None
    return process, host


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop an emulator started here, and anything in its process group."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _session_host() -> str:
    host = os.environ.get(HOST_ENV)
    if host:
        return host
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{HOST_ENV} is not set: .ci/run starts the Pub/Sub emulator and sets it (CI=true, no fallback)")
    if "host" not in _started:
        process, _started["host"] = start_emulator()
        atexit.register(stop, process)
    return _started["host"]


@pytest.fixture(scope="session")
def emulator_host() -> str:
    """``host:port`` of a Pub/Sub emulator for this test session."""
    return _session_host()


def gcp_transport(host: str, **options: Any) -> GooglePubSubTransport:
    """A GooglePubSubTransport on the emulator at ``host``."""
    return GooglePubSubTransport(**{"project": PROJECT, "emulator": host, **options})


def tag() -> str:
    """A short unique suffix, so every test has its own topics and subscriptions."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def gcp(emulator_host: str) -> Iterator[GooglePubSubTransport]:
    transport = gcp_transport(emulator_host)
    yield transport
    transport.close()
