"""Every folder under examples/ runs as its README says, each in a fresh copy of the folder.

Commands run in subprocesses, as a user would type them, with no transport or settings in the
environment but those the example sets. Workers are stopped with SIGTERM and must exit 0.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aws_server import CREDENTIAL_ENV, moto_url  # noqa: F401 - moto_url is a fixture
from gcp_server import emulator_host  # noqa: F401 - emulator_host is a fixture

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent
UNSET = ("HEDWIG_TRANSPORT_URL", "SETTINGS_MODULE", "DJANGO_SETTINGS_MODULE", "PYTHONPATH", "PUBSUB_EMULATOR_HOST")


def environment(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in UNSET}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # hedwig-tasks of this interpreter
    return {**env, **extra}


def copy_example(name: str, tmp_path: Path) -> Path:
    folder = tmp_path / name
    shutil.copytree(EXAMPLES / name, folder, ignore=shutil.ignore_patterns(".hedwig", "__pycache__", "*.db"))
    return folder


def run(
    command: list[str], folder: Path, env: dict[str, str], timeout_s: float = 90
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Worker:
    """A ``hedwig-tasks worker`` process whose log goes to a file the test reads."""

    def __init__(self, args: list[str], folder: Path, env: dict[str, str]) -> None:
        self.log = folder / f"worker-{'-'.join(args).replace('/', '_')}.log"
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                ["hedwig-tasks", "worker", *args], cwd=folder, env=env, stderr=out, stdout=out
            )

    def text(self) -> str:
        return self.log.read_text()

    def wait_ready(self) -> None:
        """Until it logged that it consumes (its first receive came back), or fail if it exited."""
        wait_for(lambda: " ready: consuming" in self.text() or self.process.poll() is not None, "a ready worker")
        assert self.process.poll() is None, self.text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()


def test_fanout_publisher_and_two_consumers_as_processes(tmp_path: Path, workers: list[Worker]) -> None:
    folder = copy_example("fanout", tmp_path)
    env = environment()
    workers.extend(Worker(["-A", name], folder, env) for name in ("billing", "emails"))
    for worker in workers:
        worker.wait_ready()
    placed = run([sys.executable, "shop.py", "3"], folder, env)
    assert placed.stdout.count("placed order") == 3
    billing, emails = workers
    wait_for(lambda: billing.text().count("billing: charged") == 3, "billing to charge 3 orders")
    wait_for(lambda: emails.text().count("emails: confirmation") == 3, "emails to confirm 3 orders")
    assert [worker.stop() for worker in workers] == [0, 0]
    for number in (1, 2, 3):  # each order once in each service, none in the other's log
        assert billing.text().count(f"for order O{number}\n") == 1
        assert emails.text().count(f"order O{number} to customer{number}@example.com") == 1
    assert "emails:" not in billing.text() and "billing:" not in emails.text()


def test_protobuf_schemas(tmp_path: Path) -> None:
    folder = copy_example("protobuf", tmp_path)
    env = environment()
    run(["hedwig-tasks", "provision", "-A", "tasks"], folder, env)
    published = run([sys.executable, "publish.py", "2"], folder, env).stdout
    assert published.count("published order-placed 1.1") == 2
    assert "refused: order-placed 1.0: data: Failed to parse total_cents field" in published
    worker = run(["hedwig-tasks", "worker", "-A", "tasks", "--burst"], folder, env).stderr
    assert "picked order O1: SKU-1, SKU-GIFT (version 1.1)" in worker
    assert "picked order O-dict:  (version 1.0)" in worker
    assert sorted(line.split("shipped order ")[1] for line in worker.splitlines() if "shipped order" in line) == [
        "O-dict to 1 Main St",
        "O1 to 1 Main St",
        "O2 to 1 Main St",
    ]
    assert "6 handled, 0 retried, 0 dead-lettered" in worker


def test_django_project(tmp_path: Path) -> None:
    folder = copy_example("django-shop", tmp_path)
    env = environment(DJANGO_SETTINGS_MODULE="mysite.settings")
    placed = run([sys.executable, "place_orders.py"], folder, env).stdout
    assert "rolled back: order O3 could not be saved" in placed
    worker = run(["hedwig-tasks", "worker", "--burst"], folder, env).stderr
    for order, email in (("O1", "ann@example.com"), ("O2", "bob@example.com")):
        assert worker.count(f"receipt for order {order} sent to {email}") == 1
    assert "O3" not in worker  # rolled back: never published
    assert "4 handled, 0 retried, 0 dead-lettered" in worker
    tests = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], folder, env).stdout
    assert "3 passed" in tests


def test_flask_app_and_its_worker(tmp_path: Path) -> None:
    folder = copy_example("flask-app", tmp_path)
    env = environment()
    posted = run([sys.executable, "signups.py", "2"], folder, env).stdout.splitlines()
    assert [line.split()[0] for line in posted] == ["202", "202"]
    worker = run(["hedwig-tasks", "worker", "-A", "web", "--burst"], folder, env).stderr
    assert worker.count("e-mail to user1@example.com: Welcome! (from web)") == 1
    assert worker.count("e-mail to user2@example.com: Welcome! (from web)") == 1
    assert "4 handled, 0 retried, 0 dead-lettered" in worker


def _hedwig_settings_service(folder: Path, env: dict[str, str]) -> str:
    """provision, publish and a burst worker, each from the settings alone; the worker's log."""
    provisioned = run(["hedwig-tasks", "provision"], folder, env).stdout
    assert "order-placed-v1" in provisioned
    published = run([sys.executable, "publish.py", "3"], folder, env).stdout
    assert published.count("published order-placed 1.0") == 3
    worker = run(["hedwig-tasks", "worker", "--burst"], folder, env).stderr
    for number in (1, 2, 3):
        assert worker.count(f"order O{number} placed by customer{number}@example.com (via orders)") == 1
    return worker


@pytest.mark.slow
def test_hedwig_settings_on_aws(tmp_path: Path, moto_url: str) -> None:
    folder = copy_example("hedwig-settings", tmp_path)
    queue = f"EXAMPLE-{uuid.uuid4().hex[:8]}"
    env = environment(SETTINGS_MODULE="aws_settings", AWS_ENDPOINT_URL=moto_url, ORDERS_QUEUE=queue, **CREDENTIAL_ENV)
    worker = _hedwig_settings_service(folder, env)
    assert f"HEDWIG-{queue}" in worker or queue in worker


@pytest.mark.slow
def test_hedwig_settings_on_pubsub(tmp_path: Path, emulator_host: str) -> None:
    folder = copy_example("hedwig-settings", tmp_path)
    queue = f"example-{uuid.uuid4().hex[:8]}"
    env = environment(SETTINGS_MODULE="gcp_settings", PUBSUB_EMULATOR_HOST=emulator_host, ORDERS_QUEUE=queue)
    worker = _hedwig_settings_service(folder, env)
    assert queue in worker


def test_every_example_has_a_readme_and_a_test() -> None:
    folders = sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    assert len(folders) >= 6, folders
    no_readme_yet: set[str] = set()
    assert [name for name in folders if not (EXAMPLES / name / "README.md").is_file()] == sorted(
        no_readme_yet & set(folders)
    )
    tests = "\n".join(path.read_text() for path in Path(__file__).parent.glob("test_*.py"))
    named = {name for name in folders if f'copy_example("{name}"' in tests or f"examples/{name}" in tests}
    named |= {name for name in folders if f'"examples" / "{name}"' in tests}
    assert sorted(set(folders) - named) == [], "examples that no test runs"
    docs = (ROOT / "docs" / "examples.md").read_text()
    assert [name for name in folders if f"`examples/{name}`" not in docs] == []
