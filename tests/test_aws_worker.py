"""Real worker processes, started through the CLI, on SNS/SQS served by moto: the worker contract,
then what is SQS's own (a retry past its 15-minute delay limit, its names, start-up failures)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aws_server import (  # noqa: F401
    ACCOUNT,
    CREDENTIAL_ENV,
    REGION,
    moto_messages,
    moto_url,
    seconds_hidden,
    start_moto,
    stop,
)

from hedwig_tasks.testing.worker_contract import LATER_S, Broker, Fleet, WorkerContract

pytestmark = pytest.mark.slow


def sqs_broker(server: str) -> Broker:
    return Broker(f"aws://?region={REGION}&endpoint_url={server}&account_id={ACCOUNT}", env=CREDENTIAL_ENV)


class TestSQSWorkers(WorkerContract):
    short_lease_s = 1.0  # SQS's shortest visibility timeout

    @pytest.fixture
    def broker(self, moto_url: str) -> Broker:
        return sqs_broker(moto_url)


@pytest.fixture
def fleet(moto_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    for key, value in CREDENTIAL_ENV.items():
        monkeypatch.setenv(key, value)
    fleet = Fleet(sqs_broker(moto_url), tmp_path, lease_s=1.0, timeout_s=60.0)
    yield fleet
    fleet.close()


def test_a_twenty_minute_retry_is_kept_in_sqs(fleet: Fleet, moto_url: str) -> None:
    fleet.provision()
    [user_id] = fleet.publish([f"later-{fleet.tag}"])
    worker = fleet.worker("-c", "1")  # a 1 s lease: the lease keeper extends every third of a second
    fleet.wait(lambda: fleet.events("start"), "the handler asked for a retry")
    [start] = fleet.events("start")
    # the worker has let go, and several lease-keeper rounds have passed since
    fleet.wait(
        lambda: any(e["held"] == 0 and e["t"] > start["t"] + 1.5 for e in fleet.events("heartbeat")),
        "the worker holds nothing, 1.5 s after the retry",
    )
    assert fleet.stop(worker, timeout_s=15) == 0, fleet.logs()
    assert start["attempt"] == 1
    [start] = fleet.events("start")  # it did not come back meanwhile
    row = fleet.status()
    assert (row.depth, row.in_flight, row.dead_letters) == (0, 1, 0)  # held by SQS, not by the worker
    [message_id] = {m["id"] for m in moto_messages(moto_url) if user_id in m.get("body", "")}
    hidden_s = seconds_hidden(moto_url, message_id)
    elapsed_s = time.time() - start["t"]
    assert LATER_S - elapsed_s - 3 <= hidden_s <= LATER_S, hidden_s  # visible again 20 minutes after the retry


def test_provision_names_the_sqs_queue_and_raw_delivery(fleet: Fleet) -> None:
    planned = fleet.cli("provision", "--dry-run")
    assert planned.returncode == 0, planned.stderr
    queue = f"HEDWIG-{fleet.name()}"
    assert f"would create queue {queue} (messages)" in planned.stdout
    assert f"would create queue {queue}-DLQ" in planned.stdout
    assert f"would subscribe {queue} to {fleet.topic} (raw delivery)" in planned.stdout


# -- start-up failures -------------------------------------------------------------------------


def _start_failure(fleet: Fleet, url: str, **env: str) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    result = fleet.cli("worker", HEDWIG_TRANSPORT_URL=url, **env)
    assert time.monotonic() - started < 30
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return result


def test_an_unreachable_endpoint_fails_once_at_start_up(fleet: Fleet) -> None:
    closed = f"aws://?region={REGION}&endpoint_url=http://127.0.0.1:9&account_id={ACCOUNT}"
    result = _start_failure(fleet, closed)
    assert 'Could not connect to the endpoint URL: "http://127.0.0.1:9/"' in result.stderr


def test_bad_credentials_fail_once_at_start_up(fleet: Fleet) -> None:
    process, server = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # this one checks credentials
    try:
        url = f"aws://?region={REGION}&endpoint_url={server}&account_id={ACCOUNT}"
        result = _start_failure(fleet, url, AWS_ACCESS_KEY_ID="AKIAWRONG", AWS_SECRET_ACCESS_KEY="wrong")
    finally:
        stop(process)
    assert "InvalidClientTokenId: The security token included in the request is invalid." in result.stderr
    assert "(check the AWS credentials)" in result.stderr
    assert "wrong" not in result.stderr


def test_a_missing_queue_fails_once_at_start_up(fleet: Fleet) -> None:
    result = _start_failure(fleet, fleet.broker.with_lease(1.0))
    assert f"SQS queue HEDWIG-{fleet.name()} does not exist; run `hedwig-tasks provision`" in result.stderr
