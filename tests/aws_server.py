"""A moto_server for the AWS tests, reached over HTTP like real SNS and SQS.

``.ci/servers/moto.sh`` starts one and exports ``HEDWIG_TEST_MOTO_URL``. Without that variable a
developer's run starts its own on a free loopback port, once per session; under CI (``CI=true``)
a missing variable fails the tests instead, so a broken CI setup cannot pass by skipping.

Test modules import the fixtures they use (``from aws_server import moto_url``).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypedDict

import pytest

from hedwig_tasks.transports.aws import AWSTransport

URL_ENV = "HEDWIG_TEST_MOTO_URL"
REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account


class _Credentials(TypedDict):
    access_key_id: str
    secret_access_key: str


#: Credentials moto accepts (it checks none unless told to).
CREDENTIALS: _Credentials = {"access_key_id": "testing", "secret_access_key": "testing"}
#: The same, for boto3 in child processes and authedwig.
CREDENTIAL_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}

_started: dict[str, str] = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_moto(env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """A new moto_server on a free loopback port, answering; its log goes to a temporary file."""
    launcher = shutil.which("moto_server") or shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if launcher is None:
        raise RuntimeError("moto_server is not installed: pip install 'moto[server]'")
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)
    process = subprocess.Popen(
        [launcher, "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return process, f"http://127.0.0.1:{port}"
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"moto_server did not start on port {port}; see {log.name}")
        time.sleep(0.1)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _session_server() -> str:
    """The URL of the session's moto_server: CI's, or one started once for this process."""
    url = os.environ.get(URL_ENV)
    if url:
        return url
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{URL_ENV} is not set: .ci/run starts moto_server and sets it (CI=true, so no fallback)")
    if "url" not in _started:
        process, _started["url"] = start_moto()
        atexit.register(stop, process)
    return _started["url"]


@pytest.fixture(scope="session")
def moto_url() -> str:
    """The base URL of a moto_server for this test session."""
    return _session_server()


def aws_transport(url: str, **options: Any) -> AWSTransport:
    """An AWSTransport on the moto server at ``url``."""
    return AWSTransport(**{"region": REGION, "account_id": ACCOUNT, "endpoint_url": url, **CREDENTIALS, **options})


def tag() -> str:
    """A short unique suffix, so every test has its own topics and queues."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def aws(moto_url: str) -> Iterator[AWSTransport]:
    transport = aws_transport(moto_url)
    yield transport
    transport.close()


def moto_messages(server: str) -> list[dict[str, Any]]:
    """Every SQS message moto holds, as its ``/moto-api/data.json`` shows them (with copies)."""
    with urllib.request.urlopen(f"{server}/moto-api/data.json", timeout=30) as response:
        state = json.load(response)
    return list(state["sqs"]["Message"])


def seconds_hidden(server: str, message_id: str) -> float:
    """How long moto will keep this SQS message invisible, read from moto's own state."""
    # moto also tracks the copies it handed out; the message itself is hidden the longest
    visible_at = max(m["visible_at"] for m in moto_messages(server) if m.get("id") == message_id)
    return float(visible_at) / 1000 - time.time()
