"""Where ``-A`` finds the app, through the real command: a Flask app in its three obvious forms,
and ``status`` on Pub/Sub (the emulator), which says what it can know and why counts are ``-``."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from cli_helpers import cli, project
from gcp_server import emulator_host  # noqa: F401

FLAPP = """
from pathlib import Path

from flask import Flask

from hedwig_tasks.flask import HedwigTasks
from hedwig_tasks.models import Message

app = Flask(__name__)
app.config.update(
    HEDWIG_QUEUE="flaskshop",
    HEDWIG_JSONSCHEMA_FILE=str(Path(__file__).with_name("schema.json")),
    HEDWIG_MESSAGE_ROUTING={("user-created", "1.*"): "user-created-v1", ("send_email", "1.*"): "send_email-v1"},
)
ext = HedwigTasks(app)


@ext.app.handler("user-created", "1.*")
def welcome(message):
    # no Flask app context in a worker thread: the default app is the one -A found
    Message.new("send_email", "1.0", {"to": message.data["email"], "subject": "Welcome!"}).publish()


@ext.app.handler("send_email", "1.*")
def send(message):
    print("sent to", message.data["to"], flush=True)
"""


@pytest.mark.parametrize("spec", ["flapp", "flapp:app", "flapp:ext.app", "flapp:ext"])
def test_flask_app_forms(spec: str, tmp_path: Path) -> None:
    pytest.importorskip("flask")
    folder = project(tmp_path)
    (folder / "flapp.py").write_text(FLAPP)
    provisioned = cli(folder, "provision", "-A", spec)
    assert provisioned.returncode == 0, provisioned.stderr
    assert "subscribe flaskshop to user-created-v1" in provisioned.stdout
    published = cli(folder, "publish", "-A", spec, "user-created", "1.0", '{"user_id": "U1", "email": "a@b.c"}')
    assert published.returncode == 0, published.stderr
    worker = cli(folder, "worker", "-A", spec, "--burst")
    assert worker.returncode == 0, worker.stderr
    assert "sent to a@b.c" in worker.stdout
    assert "app:         flaskshop" in worker.stderr


def test_a_flask_attribute_that_is_not_an_app(tmp_path: Path) -> None:
    pytest.importorskip("flask")
    folder = project(tmp_path)
    (folder / "flapp.py").write_text(FLAPP)
    result = cli(folder, "status", "-A", "flapp:ext.nothing")
    assert result.returncode == 1
    assert result.stderr.strip().endswith("has no attribute 'nothing'")


def test_status_on_pubsub_says_what_it_knows(emulator_host: str, tmp_path: Path) -> None:
    folder = project(tmp_path)
    url = f"gcp://c1-{uuid.uuid4().hex[:10]}?emulator={emulator_host}"
    assert cli(folder, "provision", "-A", "tasks", "--transport", url).returncode == 0
    result = cli(folder, "status", "-A", "tasks", "--transport", url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split() == ["hedwig-quickstart-user-created-v1", "-", "-", "-"]
    assert "  exists: yes, on topic hedwig-user-created-v1" in lines
    assert "  dead-letter topic: hedwig-quickstart-dlq (after 20 deliveries)" in lines
    assert "  ack deadline: 30 s" in lines
    assert lines[-1].startswith(
        "-: Pub/Sub's API reports no message counts; backlog and dead letters are Cloud Monitoring"
    )
    assert sum(line.startswith("-: ") for line in lines) == 1


def test_a_publish_only_app_provisions_only_its_topics(emulator_host: str, tmp_path: Path) -> None:
    folder = project(tmp_path)
    (folder / "orders.py").write_text(
        "from pathlib import Path\nfrom hedwig_tasks import Hedwig\n"
        "hedwig = Hedwig('orders', schema=Path(__file__).with_name('schema.json'))\n"
    )
    url = f"gcp://c1-{uuid.uuid4().hex[:10]}?emulator={emulator_host}"
    result = cli(folder, "provision", "-A", "orders", "--transport", url)
    assert result.returncode == 0, result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [
        "create topic user-created-v1",
        "create topic send_email-v1",
    ]  # no hedwig-orders topic, no dead-letter topic, no subscription
