"""A project configured for Hedwig on Google Pub/Sub, unchanged, on Google's emulator."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from apps import hedwig_callbacks
from gcp_server import PROJECT, emulator_host, tag  # noqa: F401 - emulator_host is a fixture
from test_settings import QUICK_START

from hedwig_tasks import conf, signals
from hedwig_tasks.models import Message
from hedwig_tasks.transports.gcp import GooglePubSubTransport
from hedwig_tasks.worker import Worker, WorkerOptions


@pytest.fixture(autouse=True)
def clean_settings() -> Iterator[None]:
    conf.reset()
    hedwig_callbacks.handled.clear()
    yield
    conf.reset()


def test_quick_start_settings_with_hedwigs_google_backends(emulator_host: str) -> None:
    name = f"dev-myapp-{tag()}"
    topic = f"send-email-v1-{name}"
    conf.settings.configure_with_object(
        {
            **QUICK_START,
            "HEDWIG_QUEUE": name,
            "HEDWIG_MESSAGE_ROUTING": {("send_email", "1.*"): topic},
            "HEDWIG_SUBSCRIPTIONS": [topic],
            "HEDWIG_CONSUMER_BACKEND": "hedwig.backends.gcp.GooglePubSubConsumerBackend",
            "HEDWIG_PUBLISHER_BACKEND": "hedwig.backends.gcp.GooglePubSubAsyncPublisherBackend",
            "HEDWIG_VISIBILITY_TIMEOUT_S": 20,
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            "PUBSUB_EMULATOR_HOST": emulator_host,
        }
    )
    app = conf.default_app()
    assert isinstance(app.transport, GooglePubSubTransport) and app.transport.lease_s == 20
    app.provision()
    sent = Message.new("send_email", "1.0", {"to": "a@b.c", "subject": "hi"}, headers={"request_id": "r"}).publish()
    worker = Worker(app, WorkerOptions(wait_s=0.5))
    handled = hedwig_callbacks.handled

    def stop_when_handled(sender: object, **kwargs: object) -> None:
        worker.stop()

    guard = threading.Timer(60, worker.stop)  # never hang the suite
    guard.start()
    with signals.handler_succeeded.connected_to(stop_when_handled, sender=app):
        worker.run()
    guard.cancel()
    [message] = handled
    assert (message.id, message.data, dict(message.headers)) == (sent.id, sent.data, {"request_id": "r"})
