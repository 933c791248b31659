"""Hedwig-style settings: a project configured for Hedwig runs unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apps import hedwig_callbacks
from conftest import SCHEMA_FILE

from hedwig_tasks import ConfigurationError, Hedwig, SchemaError, Version, conf
from hedwig_tasks.models import Message
from hedwig_tasks.settings import HedwigSettings
from hedwig_tasks.transports.redis import RedisTransport
from hedwig_tasks.worker import Worker, WorkerOptions

TESTS = Path(__file__).parent

QUICK_START = {
    "HEDWIG_QUEUE": "DEV-MYAPP",
    "HEDWIG_PUBLISHER": "myapp",
    "HEDWIG_JSONSCHEMA_FILE": str(SCHEMA_FILE),
    "HEDWIG_CALLBACKS": {("send_email", "1.*"): "apps.hedwig_callbacks.send_email"},
    "HEDWIG_MESSAGE_ROUTING": {("send_email", "1.*"): "send-email-v1"},
}


@pytest.fixture(autouse=True)
def clean_settings() -> Iterator[None]:
    conf.reset()
    hedwig_callbacks.handled.clear()
    yield
    conf.reset()


def test_quick_start_settings_publish_and_consume_on_the_sqlite_bus(tmp_path: Path) -> None:
    conf.settings.configure_with_object({**QUICK_START, "HEDWIG_TRANSPORT_URL": f"sqlite:///{tmp_path}/bus.db"})
    app = conf.default_app()
    app.provision()
    sent = Message.new("send_email", "1.0", {"to": "a@b.c", "subject": "hi"}, headers={"request_id": "r"}).publish()
    assert (sent.publisher, app.queue) == ("myapp", "DEV-MYAPP")
    Worker(app, WorkerOptions(burst=True, wait_s=0.05)).run()
    [handled] = hedwig_callbacks.handled
    assert (handled.id, handled.version, handled.data) == (sent.id, Version(1, 0), {"to": "a@b.c", "subject": "hi"})
    assert dict(handled.headers) == {"request_id": "r"}


def test_settings_module_and_attribute_access(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SETTINGS_MODULE", "apps.hedwig_settings")
    assert conf.settings.HEDWIG_QUEUE == "DEV-MYAPP"
    assert conf.settings.HEDWIG_SYNC is False  # the default
    with pytest.raises(AttributeError, match="not a hedwig-tasks setting"):
        _ = conf.settings.NOT_A_SETTING


def test_object_settings_and_hooks(tmp_path: Path) -> None:
    calls: list[str] = []
    settings = types.SimpleNamespace(
        **QUICK_START,
        HEDWIG_TRANSPORT_URL=f"sqlite:///{tmp_path}/bus.db",
        HEDWIG_DEFAULT_HEADERS=lambda message: {"tenant": "acme"},
        HEDWIG_PRE_PROCESS_HOOK=lambda **kw: calls.append("pre"),
        HEDWIG_POST_PROCESS_HOOK=lambda **kw: calls.append("post"),
    )
    conf.settings.configure_with_object(settings)
    app = conf.default_app()
    app.provision()
    sent = Message.new("send_email", "1.0", {"to": "a@b.c", "subject": "hi"}).publish()
    assert dict(sent.headers) == {"tenant": "acme"}
    Worker(app, WorkerOptions(burst=True, wait_s=0.05)).run()
    assert calls == ["pre", "post"]
    assert [m.id for m in hedwig_callbacks.handled] == [sent.id]


def test_hedwig_sync_runs_the_callback_inline() -> None:
    conf.settings.configure_with_object({**QUICK_START, "HEDWIG_SYNC": True, "HEDWIG_TRANSPORT_URL": "memory://"})
    Message.new("send_email", "1.0", {"to": "a@b.c", "subject": "hi"}).publish()
    assert [m.data["to"] for m in hedwig_callbacks.handled] == ["a@b.c"]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"HEDWIG_QUEUEE": "x"}, "unknown setting HEDWIG_QUEUEE; did you mean HEDWIG_QUEUE?"),
        ({"HEDWIG_PUBLISHER_GCP_BATCH_SETTINGS": ()}, "HEDWIG_PUBLISHER_GCP_BATCH_SETTINGS is not supported"),
        (
            {"HEDWIG_CALLBACKS": {("send_email", "1.*"): "apps.nowhere.send_email"}},
            r"HEDWIG_CALLBACKS\[\('send_email', '1.\*'\)\]: cannot import 'apps.nowhere.send_email'",
        ),
        ({"HEDWIG_MESSAGE_ROUTING": {}}, "no route for message type 'send_email' major 1"),
        ({"HEDWIG_MESSAGE_ROUTING": {("sms", "1.*"): "sms"}}, "routing names 'sms'"),
        ({"HEDWIG_CONSUMER_BACKEND": "hedwig.backends.redis.RedisStreamsBackend"}, "HEDWIG_CONSUMER_BACKEND"),
        ({"HEDWIG_CONSUMER_BACKEND": "hedwig.backends.redis.RedisStreamsConsumerBackend"}, "REDIS_URL must be set"),
        (
            {
                "REDIS_URL": "redis://127.0.0.1:6379/9",
                "HEDWIG_CONSUMER_BACKEND": "hedwig.backends.redis.RedisStreamsConsumerBackend",
                "HEDWIG_PUBLISHER_BACKEND": "hedwig.backends.aws.AWSSNSPublisherBackend",
            },
            "name different backends",
        ),
        ({"HEDWIG_DATA_VALIDATOR_CLASS": "hedwig.validators.protobuf.ProtobufJSONValidator"}, "is not supported"),
        ({"HEDWIG_QUEUE": None, "HEDWIG_PUBLISHER": None}, "HEDWIG_QUEUE"),
        ({"HEDWIG_MAX_DELIVERY_ATTEMPTS": 0}, "HEDWIG_MAX_DELIVERY_ATTEMPTS"),
        ({"HEDWIG_JSONSCHEMA_FILE": "/nonexistent.json"}, "cannot read schema file"),
        (
            {"HEDWIG_PUBLISHER": None, "HEDWIG_PUBLISHER_BACKEND": "hedwig.backends.gcp.GooglePubSubPublisherBackend"},
            "HEDWIG_PUBLISHER must be set when HEDWIG_PUBLISHER_BACKEND is",
        ),
    ],
)
def test_bad_settings_fail_at_start_up_naming_them(changes: dict[str, Any], match: str) -> None:
    conf.settings.configure_with_object({**QUICK_START, **changes})
    with pytest.raises(ConfigurationError, match=match):
        conf.default_app()


def test_an_invalid_json_schema_fails_at_start_up_naming_the_file_and_the_part(tmp_path: Path) -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    schema["schemas"]["send_email"]["1.*"]["properties"]["subject"]["type"] = "integr"
    bad = tmp_path / "schema.json"
    bad.write_text(json.dumps(schema))
    conf.settings.configure_with_object({**QUICK_START, "HEDWIG_JSONSCHEMA_FILE": str(bad)})
    with pytest.raises(SchemaError) as caught:
        conf.default_app()
    assert str(caught.value) == (
        f"schema file {str(bad)!r}: schemas/send_email/1.*/properties/subject/type is not valid JSON Schema: "
        "'integr' is not valid under any of the given schemas"
    )
    del schema["schemas"]["send_email"]["1.*"]["properties"]["subject"]["type"]
    schema["definitions"]["profile"]["minProperties"] = -1
    bad.write_text(json.dumps(schema))
    with pytest.raises(SchemaError, match=r"definitions/profile/minProperties is not valid JSON Schema: -1"):
        Hedwig("myapp", schema=bad)


def test_unconfigured_settings_say_how_to_configure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SETTINGS_MODULE", raising=False)
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    with pytest.raises(ConfigurationError, match="configure_with_object"):
        Message.new("send_email", "1.0", {"to": "a@b.c", "subject": "hi"}).publish()


def test_secrets_stay_out_of_reprs() -> None:
    settings = HedwigSettings.read({"AWS_SECRET_KEY": "hunter2", "AWS_ACCESS_KEY": "AKIA1", "AWS_REGION": "us-east-1"})
    assert "hunter2" not in repr(settings) and "AKIA1" not in repr(settings)
    assert "us-east-1" in repr(settings)
    urls = HedwigSettings.read({"REDIS_URL": "redis://:hunter2@cache:6379/0", "HEDWIG_STATE_URL": "redis://u:pw@h/1"})
    assert "hunter2" not in repr(urls) and ":pw@" not in repr(urls)
    assert "redis://:***@cache:6379/0" in repr(urls) and "redis://u:***@h/1" in repr(urls)


def test_the_hedwig_librarys_redis_settings_choose_the_redis_transport() -> None:
    conf.settings.configure_with_object(
        {
            **QUICK_START,
            "REDIS_URL": "redis://:hunter2@127.0.0.1:6379/9",
            "HEDWIG_CONSUMER_BACKEND": "hedwig.backends.redis.RedisStreamsConsumerBackend",
            "HEDWIG_PUBLISHER_BACKEND": "hedwig.backends.redis.RedisStreamsPublisherBackend",
            "HEDWIG_VISIBILITY_TIMEOUT_S": 45,
            "HEDWIG_MAX_DELIVERY_ATTEMPTS": 4,
        }
    )
    app = conf.default_app()  # builds without connecting
    transport = app.transport
    assert isinstance(transport, RedisTransport)
    assert (transport.url, transport.lease_s) == ("redis://:hunter2@127.0.0.1:6379/9", 45.0)
    assert "hunter2" not in repr(transport)
    assert app.retry.max_retries == 3


def test_a_redis_url_for_something_else_is_left_alone(tmp_path: Path) -> None:
    """A Django project's REDIS_URL (its cache, say) neither fails nor picks the transport."""
    url = f"sqlite:///{tmp_path}/bus.db"
    conf.settings.configure_with_object(
        {**QUICK_START, "REDIS_URL": "redis://cache:6379/0", "HEDWIG_TRANSPORT_URL": url}
    )
    assert conf.default_app().transport.scheme == "sqlite"


def test_other_libraries_aws_settings_are_left_alone() -> None:
    settings = HedwigSettings.read({"AWS_STORAGE_BUCKET_NAME": "media", "AWS_REGION": "eu-west-1"})
    assert settings["AWS_REGION"] == "eu-west-1"


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def test_worker_cli_builds_the_app_from_a_settings_module(tmp_path: Path) -> None:
    env = {
        "HEDWIG_TEST_BUS_URL": f"sqlite:///{tmp_path}/bus.db",
        "PROC_RESULTS": str(tmp_path / "results.jsonl"),
        "PYTHONPATH": str(TESTS),
    }
    cli = [sys.executable, "-m", "hedwig_tasks"]
    provision = run([*cli, "provision", "--settings", "apps.hedwig_settings"], env)
    assert provision.returncode == 0, provision.stderr
    published = run(
        [*cli, "publish", "--settings", "apps.hedwig_settings", "send_email", "1.1", '{"to": "x@y.z", "subject": "s"}'],
        env,
    )
    assert published.returncode == 0, published.stderr
    worker = run([*cli, "worker", "--settings", "apps.hedwig_settings", "--burst"], env)
    assert worker.returncode == 0, worker.stderr
    [line] = (tmp_path / "results.jsonl").read_text().splitlines()
    assert json.loads(line)["to"] == "x@y.z"


def test_worker_cli_without_app_or_settings_says_what_to_do() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("SETTINGS_MODULE", "DJANGO_SETTINGS_MODULE")}
    result = subprocess.run(
        [sys.executable, "-m", "hedwig_tasks", "worker"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "settings are not configured" in result.stderr


def test_django_project_publishes_on_commit_and_worker_discovers_handlers(tmp_path: Path) -> None:
    env = {
        "DJANGO_SETTINGS_MODULE": "apps.django_project.settings",
        "HEDWIG_TEST_BUS_URL": f"sqlite:///{tmp_path}/bus.db",
        "PROC_RESULTS": str(tmp_path / "results.jsonl"),
        "PYTHONPATH": str(TESTS),
    }
    published = run([sys.executable, str(TESTS / "apps" / "django_project" / "publish.py")], env)
    assert published.returncode == 0, published.stderr
    assert published.stdout.split() == ["inside", "1", "after", "2", "rolled", "back", "2"]
    worker = run([sys.executable, "-m", "hedwig_tasks", "worker", "--burst"], env)
    assert worker.returncode == 0, worker.stderr
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(line.get("user_id") or line.get("to") for line in lines) == ["U1", "a@b.c"]


def test_flask_extension_reads_app_config(tmp_path: Path) -> None:
    flask = pytest.importorskip("flask")
    from hedwig_tasks.flask import HedwigTasks

    web = flask.Flask("shop")
    web.config.update(QUICK_START, HEDWIG_TRANSPORT_URL=f"sqlite:///{tmp_path}/bus.db")
    extension = HedwigTasks(web)
    assert extension.app is not None
    extension.app.provision()
    with web.app_context():
        sent = Message.new("send_email", "1.0", {"to": "a@b.c", "subject": "hi"}).publish()
    assert sent.publisher == "myapp"
    Worker(extension.app, WorkerOptions(burst=True, wait_s=0.05)).run()
    assert [m.id for m in hedwig_callbacks.handled] == [sent.id]
    web.config["HEDWIG_QUEUEE"] = "typo"
    with pytest.raises(ConfigurationError, match="did you mean HEDWIG_QUEUE"):
        HedwigTasks(web)
