"""A project configured for Hedwig on AWS, unchanged, on moto's SNS/SQS."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from apps import hedwig_callbacks
from aws_server import ACCOUNT, REGION, moto_url, tag  # noqa: F401 - moto_url is a fixture
from conftest import SCHEMA_FILE
from test_settings import QUICK_START

from hedwig_tasks import ConfigurationError, Hedwig, PublishError, conf
from hedwig_tasks.models import Message
from hedwig_tasks.transports.aws import AWSTransport
from hedwig_tasks.worker import Worker, WorkerOptions


@pytest.fixture(autouse=True)
def clean_settings() -> Iterator[None]:
    conf.reset()
    hedwig_callbacks.handled.clear()
    yield
    conf.reset()


def aws_settings(moto_url: str, name: str) -> dict[str, Any]:
    """The quick start's settings with Hedwig's AWS backends, on moto, with queue and topic of their own."""
    return {
        **QUICK_START,
        "HEDWIG_QUEUE": name,
        "HEDWIG_MESSAGE_ROUTING": {("send_email", "1.*"): f"send-email-v1-{name}"},
        "HEDWIG_CONSUMER_BACKEND": "hedwig.backends.aws.AWSSQSConsumerBackend",
        "HEDWIG_PUBLISHER_BACKEND": "hedwig.backends.aws.AWSSNSPublisherBackend",
        "HEDWIG_VISIBILITY_TIMEOUT_S": 20,
        "AWS_REGION": REGION,
        "AWS_ACCOUNT_ID": ACCOUNT,
        "AWS_ACCESS_KEY": "testing",
        "AWS_SECRET_KEY": "testing",
        "AWS_ENDPOINT_SNS": moto_url,
        "AWS_ENDPOINT_SQS": moto_url,
    }


def test_quick_start_settings_with_hedwigs_aws_backends(moto_url: str) -> None:
    name = f"DEV-MYAPP-{tag()}"
    conf.settings.configure_with_object(aws_settings(moto_url, name))
    app = conf.default_app()
    assert isinstance(app.transport, AWSTransport) and app.transport.lease_s == 20
    assert "testing" not in repr(app.transport)
    app.provision()
    sent = Message.new("send_email", "1.0", {"to": "a@b.c", "subject": "hi"}, headers={"request_id": "r"}).publish()
    Worker(app, WorkerOptions(burst=True, wait_s=1)).run()
    [handled] = hedwig_callbacks.handled
    assert (handled.id, handled.data, dict(handled.headers)) == (sent.id, sent.data, {"request_id": "r"})


def test_a_publishing_service_without_hedwig_publisher_fails_at_start_up_naming_it(moto_url: str) -> None:
    settings = aws_settings(moto_url, f"DEV-MYAPP-{tag()}")
    del settings["HEDWIG_PUBLISHER"]
    conf.settings.configure_with_object(settings)
    with pytest.raises(ConfigurationError, match="HEDWIG_PUBLISHER must be set"):
        conf.default_app()


def test_a_consuming_service_needs_no_hedwig_publisher(moto_url: str) -> None:
    settings = aws_settings(moto_url, f"DEV-MYAPP-{tag()}")
    del settings["HEDWIG_PUBLISHER"], settings["HEDWIG_PUBLISHER_BACKEND"]
    conf.settings.configure_with_object(settings)
    app = conf.default_app()
    app.provision()
    publisher = Hedwig("myapp", schema=SCHEMA_FILE, transport=app.transport, routing=settings["HEDWIG_MESSAGE_ROUTING"])
    sent = publisher.publish("send_email", "1.0", {"to": "a@b.c", "subject": "hi"})
    Worker(app, WorkerOptions(burst=True, wait_s=1)).run()
    assert [m.id for m in hedwig_callbacks.handled] == [sent.id]


def test_publishing_with_no_publisher_on_aws_names_the_setting(moto_url: str) -> None:
    settings = aws_settings(moto_url, f"DEV-MYAPP-{tag()}")
    del settings["HEDWIG_PUBLISHER"], settings["HEDWIG_PUBLISHER_BACKEND"]  # configured as a consumer
    conf.settings.configure_with_object(settings)
    app = conf.default_app()
    app.provision()
    with pytest.raises(PublishError, match=r"names no publisher.*set HEDWIG_PUBLISHER"):
        Message.new("send_email", "1.0", {"to": "a@b.c", "subject": "hi"}).publish()
