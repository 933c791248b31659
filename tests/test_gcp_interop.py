"""Interop through Google's Pub/Sub emulator with authedwig 11 (PyPI ``authedwig``), both directions.

authedwig publishes and a hedwig-tasks worker handles the message with the same id, data,
headers, publisher and timestamp; hedwig-tasks publishes and authedwig's own streaming-pull
consumer handles it. Both validators (JSON Schema and protobuf), both forms (transport
attributes and container), on topics and subscriptions provisioned by hedwig-tasks. And
Hedwig's minor-version semantics: authedwig publishing a minor our schema does not know yet (a
publisher deployed first) is handled, or dead-lettered naming the minor when the validator has
``strict_minor``.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import SCHEMA_FILE, authedwig_settings
from gcp_server import PROJECT, emulator_host, gcp_transport, tag  # noqa: F401
from test_jsonschema_validator import schema_knowing
from test_protobuf_validator import knowing_minor

from hedwig_tasks import DecodeError, Hedwig, Message, Version, signals
from hedwig_tasks.conf import build_app
from hedwig_tasks.settings import HedwigSettings
from hedwig_tasks.transports.gcp import GooglePubSubTransport
from hedwig_tasks.validators.base import Validator
from hedwig_tasks.validators.jsonschema import JSONSchemaValidator
from hedwig_tasks.validators.protobuf import ProtobufValidator
from hedwig_tasks.worker import Worker, WorkerOptions

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # authedwig's modules import distutils
    from distutils.version import StrictVersion

    from examples.protos.schema_pb2 import UserCreatedV1, UserUpdatedV1

pytestmark = pytest.mark.slow

FORMS = [pytest.param(False, id="attributes"), pytest.param(True, id="container")]
VALIDATORS = ["jsonschema", "protobuf"]
HEADERS = {"request_id": "req-42", "tenant": "acme"}
#: user-created as a publisher at 1.1 has it: minor_version 1 and a field 1.0 lacks.
UserCreatedV1_1 = knowing_minor(UserCreatedV1, 1, nickname=2)


class Route:
    """A topic and a queue of their own for one test, provisioned by hedwig-tasks."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.topic = f"user-created-{tag()}"
        self.queue = f"interop-{tag()}"
        self.transport: GooglePubSubTransport = gcp_transport(host, lease_s=10)

    def app(
        self,
        validator: str,
        *,
        container: bool = False,
        handled: list[Message] | None = None,
        schema: Any = None,
    ) -> Hedwig:
        if schema is None:
            schema = SCHEMA_FILE if validator == "jsonschema" else [UserCreatedV1, UserUpdatedV1]
        app = Hedwig(
            "hedwig-tasks-service",
            schema=schema,
            transport=self.transport,
            routing={"user-created": self.topic},
            queue=self.queue,
            container=container,
        )
        if handled is not None:
            app.handler("user-created", "1.*")(handled.append)
        return app

    @contextlib.contextmanager
    def authedwig(
        self, validator: str, *, container: bool, monkeypatch: pytest.MonkeyPatch, **more: Any
    ) -> Iterator[Any]:
        """authedwig configured for this route's topic and queue on the emulator."""
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", self.host)
        settings: dict[str, Any] = {
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            "HEDWIG_QUEUE": self.queue,
            "HEDWIG_SUBSCRIPTIONS": [self.topic],
            "HEDWIG_PUBLISHER_BACKEND": "hedwig.backends.gcp.GooglePubSubPublisherBackend",
            "HEDWIG_CONSUMER_BACKEND": "hedwig.backends.gcp.GooglePubSubConsumerBackend",
            "HEDWIG_MESSAGE_ROUTING": {("user-created", "1.*"): self.topic},
            "HEDWIG_USE_TRANSPORT_MESSAGE_ATTRIBUTES": not container,
        }
        if validator == "protobuf":
            settings["HEDWIG_DATA_VALIDATOR_CLASS"] = "hedwig.validators.protobuf.ProtobufValidator"
            settings["HEDWIG_PROTOBUF_MESSAGES"] = [UserCreatedV1, UserUpdatedV1]
        settings.update(more)
        with authedwig_settings(**settings) as configured:
            yield configured


def _data(validator: str) -> Any:
    return (
        {"user_id": "U_1234", "profile": {"name": "Zoë"}}
        if validator == "jsonschema"
        else UserCreatedV1(user_id="U_1234")
    )


def _version(validator: str) -> str:
    return "1.1" if validator == "jsonschema" else "1.0"


def _drain(app: Hedwig, handled: list[Any], count: int = 1) -> Worker:
    """Run a worker until ``handled`` holds ``count`` items (Pub/Sub cannot say a subscription is empty)."""
    worker = Worker(app, WorkerOptions(concurrency=2, prefetch=2, wait_s=0.5))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while len(handled) < count and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    worker.stop()
    thread.join(15)
    assert not thread.is_alive()
    return worker


@pytest.mark.parametrize("container", FORMS)
@pytest.mark.parametrize("validator", VALIDATORS)
def test_authedwig_publishes_hedwig_tasks_handles(
    emulator_host: str,
    validator: str,
    container: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    route = Route(emulator_host)
    handled: list[Message] = []
    ours = route.app(validator, handled=handled)
    ours.provision()
    with route.authedwig(validator, container=container, monkeypatch=monkeypatch):
        from hedwig.models import Message as AuthedwigMessage

        sent = AuthedwigMessage.new(
            "user-created", StrictVersion(_version(validator)), _data(validator), headers=HEADERS
        )
        sent.publish()
    worker = _drain(ours, handled)
    [got] = handled
    assert (got.id, got.type, str(got.version)) == (sent.id, "user-created", _version(validator))
    assert got.data == sent.data
    assert dict(got.headers) == HEADERS
    assert (got.publisher, got.timestamp) == ("legacy-service", sent.timestamp)
    assert got.delivery is not None and got.delivery.attempt == 1
    assert worker.counts == {"handled": 1, "retried": 0, "dead_lettered": 0}


@pytest.mark.parametrize("container", FORMS)
@pytest.mark.parametrize("validator", VALIDATORS)
def test_hedwig_tasks_publishes_authedwig_handles(
    emulator_host: str,
    validator: str,
    container: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    route = Route(emulator_host)
    ours = route.app(validator, container=container)
    route.app(validator, handled=[]).provision()  # our provisioning: topics, subscriptions, DLQ
    sent = ours.publish("user-created", _version(validator), _data(validator), headers=HEADERS)
    handled = _authedwig_consume(route, validator, container, monkeypatch)
    [got] = handled
    assert (got.id, got.type, str(got.version)) == (sent.id, "user-created", _version(validator))
    assert got.data == sent.data
    assert dict(got.headers) == HEADERS
    assert (got.publisher, got.timestamp) == ("hedwig-tasks-service", sent.timestamp)
    assert got.provider_metadata.delivery_attempt == 1  # our dead-letter policy is on the subscription
    # authedwig acked it: nothing comes back to us once its lease would have run out
    consumer = route.transport.consumer(route.queue, [route.topic])
    assert consumer.receive(10, wait_s=0.5) == []


def _authedwig_consume(route: Route, validator: str, container: bool, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Run authedwig's Pub/Sub consumer until it handled one message (or 20 s passed)."""
    handled: list[Any] = []
    done = threading.Event()

    def callback(message):  # type: ignore[no-untyped-def]  # authedwig refuses any annotation but its Message
        handled.append(message)
        done.set()

    callbacks = {("user-created", "1.*"): callback}
    with route.authedwig(validator, container=container, monkeypatch=monkeypatch, HEDWIG_CALLBACKS=callbacks):
        from hedwig.consumer import listen_for_messages

        consumer = threading.Thread(target=listen_for_messages, kwargs={"shutdown_event": done}, daemon=True)
        consumer.start()
        done.wait(20)
        done.set()
        consumer.join(10)
    assert not consumer.is_alive()
    return handled


def test_an_app_built_from_authedwig_settings_talks_to_authedwig(
    emulator_host: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same Google settings drive authedwig and hedwig-tasks, on the same topic and subscriptions."""
    route = Route(emulator_host)
    handled: list[Message] = []
    settings = {
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "HEDWIG_QUEUE": route.queue,
        "HEDWIG_PUBLISHER": "settings-service",
        "HEDWIG_JSONSCHEMA_FILE": str(SCHEMA_FILE),
        "HEDWIG_SUBSCRIPTIONS": [route.topic],
        "HEDWIG_CONSUMER_BACKEND": "hedwig.backends.gcp.GooglePubSubConsumerBackend",
        "HEDWIG_PUBLISHER_BACKEND": "hedwig.backends.gcp.GooglePubSubPublisherBackend",
        "HEDWIG_MESSAGE_ROUTING": {("user-created", "1.*"): route.topic},
        "HEDWIG_CALLBACKS": {("user-created", "1.*"): handled.append},
    }
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator_host)  # read at first use, as Google's clients do
    app = build_app(HedwigSettings.read(settings))
    assert isinstance(app.transport, GooglePubSubTransport)
    app.provision()
    with route.authedwig("jsonschema", container=False, monkeypatch=monkeypatch):
        from hedwig.models import Message as AuthedwigMessage

        sent = AuthedwigMessage.new("user-created", StrictVersion("1.0"), {"user_id": "U_9"}, headers=HEADERS)
        sent.publish()
    _drain(app, handled)
    [got] = handled
    assert (got.id, got.data, dict(got.headers)) == (sent.id, {"user_id": "U_9"}, HEADERS)


# A minor newer than the consumer's schema: a Hedwig publisher deployed first


def _knowing_1_0(validator: str, *, strict_minor: bool) -> Validator:
    """A consumer's schema that knows user-created 1.0 only."""
    if validator == "jsonschema":
        return JSONSchemaValidator(schema_knowing("1.0"), strict_minor=strict_minor)
    return ProtobufValidator([UserCreatedV1, UserUpdatedV1], strict_minor=strict_minor)


def _publish_1_1(route: Route, validator: str, container: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    """authedwig publishes user-created 1.1, which its schema knows (the test schema file knows 1.2)."""
    if validator == "jsonschema":
        data: Any = {"user_id": "U_1234", "nickname": "Zoë"}
    else:
        data = UserCreatedV1_1(user_id="U_1234", nickname="Zoë")
    protobuf = {"HEDWIG_PROTOBUF_MESSAGES": [UserCreatedV1_1, UserUpdatedV1]} if validator == "protobuf" else {}
    with route.authedwig(validator, container=container, monkeypatch=monkeypatch, **protobuf):
        from hedwig.models import Message as AuthedwigMessage

        sent = AuthedwigMessage.new("user-created", StrictVersion("1.1"), data, headers=HEADERS)
        sent.publish()
    return sent


@pytest.mark.parametrize("container", FORMS)
@pytest.mark.parametrize("validator", VALIDATORS)
def test_authedwigs_newer_minor_is_handled_like_hedwig_does(
    emulator_host: str,
    validator: str,
    container: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    route = Route(emulator_host)
    handled: list[Message] = []
    ours = route.app(validator, handled=handled, schema=_knowing_1_0(validator, strict_minor=False))
    ours.provision()
    sent = _publish_1_1(route, validator, container, monkeypatch)
    worker = _drain(ours, handled)
    [got] = handled
    assert (got.id, got.type, got.version) == (sent.id, "user-created", Version(1, 1))
    assert (dict(got.headers), got.publisher, got.timestamp) == (HEADERS, "legacy-service", sent.timestamp)
    if validator == "jsonschema":
        assert got.data == {"user_id": "U_1234", "nickname": "Zoë"}
    else:
        assert type(got.data) is UserCreatedV1 and got.data.user_id == "U_1234"
        assert got.data.SerializeToString() == sent.data.SerializeToString()  # nickname kept, unknown to 1.0
    assert worker.counts == {"handled": 1, "retried": 0, "dead_lettered": 0}


@pytest.mark.parametrize("container", FORMS)
@pytest.mark.parametrize("validator", VALIDATORS)
def test_strict_minor_dead_letters_authedwigs_newer_minor(
    emulator_host: str,
    validator: str,
    container: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    route = Route(emulator_host)
    handled: list[Message] = []
    ours = route.app(validator, handled=handled, schema=_knowing_1_0(validator, strict_minor=True))
    ours.provision()
    _publish_1_1(route, validator, container, monkeypatch)
    errors: list[Exception] = []
    reasons: list[str] = []
    with (
        signals.message_invalid.connected_to(lambda app, **kw: errors.append(kw["error"]), sender=ours),
        signals.message_dead_lettered.connected_to(lambda app, **kw: reasons.append(kw["reason"]), sender=ours),
    ):
        worker = _drain(ours, reasons)
    assert handled == []
    [error] = errors
    assert isinstance(error, DecodeError)
    assert str(error) == (
        "user-created 1.1: minor version 1 is newer than the schema knows (newest is 1.0) and strict_minor is set"
    )
    assert worker.counts == {"handled": 0, "retried": 0, "dead_lettered": 1}
    [record] = route.transport.dead_letters(route.queue)
    assert record.reason == reasons[0] == f"invalid message: {error}"
