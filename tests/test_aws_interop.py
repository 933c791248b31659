"""Interop through moto's SNS/SQS with authedwig 11 (PyPI ``authedwig``), both directions.

authedwig publishes and a hedwig-tasks worker handles the message with the same id, data,
headers, publisher and timestamp; hedwig-tasks publishes and authedwig's own SQS consumer
handles it. Both validators (JSON Schema and protobuf), both forms (transport attributes and
container), on queues and topics provisioned by hedwig-tasks. And Hedwig's minor-version
semantics: authedwig publishing a minor our schema does not know yet (a publisher deployed
first) is handled, or dead-lettered naming the minor when the validator has ``strict_minor``.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from aws_server import ACCOUNT, CREDENTIALS, REGION, aws_transport, moto_url, tag  # noqa: F401
from conftest import SCHEMA_FILE, authedwig_settings
from test_jsonschema_validator import schema_knowing
from test_protobuf_validator import knowing_minor

from hedwig_tasks import DecodeError, Hedwig, Message, Version, signals
from hedwig_tasks.conf import build_app
from hedwig_tasks.settings import HedwigSettings
from hedwig_tasks.transports.aws import AWSTransport
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

    def __init__(self, server: str) -> None:
        self.server = server
        self.topic = f"user-created-{tag()}"
        self.queue = f"interop-{tag()}"
        self.transport: AWSTransport = aws_transport(server, lease_s=5)

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
    def authedwig(self, validator: str, *, container: bool, **more: Any) -> Iterator[Any]:
        """authedwig configured for this route's topic and queue on moto."""
        settings: dict[str, Any] = {
            "AWS_REGION": REGION,
            "AWS_ACCOUNT_ID": ACCOUNT,
            "AWS_ACCESS_KEY": CREDENTIALS["access_key_id"],
            "AWS_SECRET_KEY": CREDENTIALS["secret_access_key"],
            "AWS_ENDPOINT_SNS": self.server,
            "AWS_ENDPOINT_SQS": self.server,
            "HEDWIG_QUEUE": self.queue,
            "HEDWIG_PUBLISHER_BACKEND": "hedwig.backends.aws.AWSSNSPublisherBackend",
            "HEDWIG_CONSUMER_BACKEND": "hedwig.backends.aws.AWSSQSConsumerBackend",
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


def _drain(app: Hedwig) -> None:
    """Run a worker until the queue is empty (burst mode), raising what it raised."""
    Worker(app, WorkerOptions(burst=True, concurrency=2, prefetch=2, wait_s=1)).run()


@pytest.mark.parametrize("container", FORMS)
@pytest.mark.parametrize("validator", VALIDATORS)
def test_authedwig_publishes_hedwig_tasks_handles(moto_url: str, validator: str, container: bool) -> None:
    route = Route(moto_url)
    handled: list[Message] = []
    ours = route.app(validator, handled=handled)
    ours.provision()
    with route.authedwig(validator, container=container):
        from hedwig.models import Message as AuthedwigMessage

        sent = AuthedwigMessage.new(
            "user-created", StrictVersion(_version(validator)), _data(validator), headers=HEADERS
        )
        sent.publish()
    _drain(ours)
    [got] = handled
    assert (got.id, got.type, str(got.version)) == (sent.id, "user-created", _version(validator))
    assert got.data == sent.data
    assert dict(got.headers) == HEADERS
    assert (got.publisher, got.timestamp) == ("legacy-service", sent.timestamp)
    assert got.delivery.attempt == 1
    [row] = route.transport.status(route.queue, [route.topic])
    assert (row.depth, row.in_flight, row.dead_letters) == (0, 0, 0)


@pytest.mark.parametrize("container", FORMS)
@pytest.mark.parametrize("validator", VALIDATORS)
def test_hedwig_tasks_publishes_authedwig_handles(
    moto_url: str,
    validator: str,
    container: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    route = Route(moto_url)
    ours = route.app(validator, container=container)
    route.app(validator, handled=[]).provision()  # our provisioning: queue, raw subscription, policy
    sent = ours.publish("user-created", _version(validator), _data(validator), headers=HEADERS)
    handled = _authedwig_consume(route, validator, container, monkeypatch)
    [got] = handled
    assert (got.id, got.type, str(got.version)) == (sent.id, "user-created", _version(validator))
    assert got.data == sent.data
    assert dict(got.headers) == HEADERS
    assert (got.publisher, got.timestamp) == ("hedwig-tasks-service", sent.timestamp)
    assert got.provider_metadata.receive_count == 1
    [row] = route.transport.status(route.queue, [route.topic])
    assert (row.depth, row.in_flight) == (0, 0)  # authedwig acked it


def _authedwig_consume(route: Route, validator: str, container: bool, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Run authedwig's SQS consumer until it handled one message (or 20 s passed)."""
    handled: list[Any] = []
    done = threading.Event()

    def callback(message):  # type: ignore[no-untyped-def]  # authedwig refuses any annotation but its Message
        handled.append(message)
        done.set()

    callbacks = {("user-created", "1.*"): callback}
    with route.authedwig(validator, container=container, HEDWIG_CALLBACKS=callbacks):
        from hedwig.backends.aws import AWSSQSConsumerBackend
        from hedwig.consumer import listen_for_messages

        monkeypatch.setattr(AWSSQSConsumerBackend, "WAIT_TIME_SECONDS", 1)  # its 20 s long poll delays the stop
        consumer = threading.Thread(target=listen_for_messages, kwargs={"shutdown_event": done}, daemon=True)
        consumer.start()
        done.wait(20)
        done.set()
        consumer.join(10)
    assert not consumer.is_alive()
    return handled


def test_an_app_built_from_authedwig_settings_talks_to_authedwig(moto_url: str) -> None:
    """The same settings dict drives authedwig and hedwig-tasks, on the same queue and topic."""
    route = Route(moto_url)
    handled: list[Message] = []
    settings = {
        "AWS_REGION": REGION,
        "AWS_ACCOUNT_ID": ACCOUNT,
        "AWS_ACCESS_KEY": CREDENTIALS["access_key_id"],
        "AWS_SECRET_KEY": CREDENTIALS["secret_access_key"],
        "AWS_ENDPOINT_SNS": moto_url,
        "AWS_ENDPOINT_SQS": moto_url,
        "HEDWIG_QUEUE": route.queue,
        "HEDWIG_PUBLISHER": "settings-service",
        "HEDWIG_JSONSCHEMA_FILE": str(SCHEMA_FILE),
        "HEDWIG_CONSUMER_BACKEND": "hedwig.backends.aws.AWSSQSConsumerBackend",
        "HEDWIG_PUBLISHER_BACKEND": "hedwig.backends.aws.AWSSNSPublisherBackend",
        "HEDWIG_MESSAGE_ROUTING": {("user-created", "1.*"): route.topic},
        "HEDWIG_CALLBACKS": {("user-created", "1.*"): handled.append},
    }
    app = build_app(HedwigSettings.read(settings))
    assert isinstance(app.transport, AWSTransport)
    app.provision()
    with route.authedwig("jsonschema", container=False):
        from hedwig.models import Message as AuthedwigMessage

        sent = AuthedwigMessage.new("user-created", StrictVersion("1.0"), {"user_id": "U_9"}, headers=HEADERS)
        sent.publish()
    _drain(app)
    [got] = handled
    assert (got.id, got.data, dict(got.headers)) == (sent.id, {"user_id": "U_9"}, HEADERS)


# A minor newer than the consumer's schema: a Hedwig publisher deployed first


def _knowing_1_0(validator: str, *, strict_minor: bool) -> Validator:
    """A consumer's schema that knows user-created 1.0 only."""
    if validator == "jsonschema":
        return JSONSchemaValidator(schema_knowing("1.0"), strict_minor=strict_minor)
    return ProtobufValidator([UserCreatedV1, UserUpdatedV1], strict_minor=strict_minor)


def _publish_1_1(route: Route, validator: str, container: bool) -> Any:
    """authedwig publishes user-created 1.1, which its schema knows (the test schema file knows 1.2)."""
    if validator == "jsonschema":
        data: Any = {"user_id": "U_1234", "nickname": "Zoë"}
    else:
        data = UserCreatedV1_1(user_id="U_1234", nickname="Zoë")
    protobuf = {"HEDWIG_PROTOBUF_MESSAGES": [UserCreatedV1_1, UserUpdatedV1]} if validator == "protobuf" else {}
    with route.authedwig(validator, container=container, **protobuf):
        from hedwig.models import Message as AuthedwigMessage

        sent = AuthedwigMessage.new("user-created", StrictVersion("1.1"), data, headers=HEADERS)
        sent.publish()
    return sent


@pytest.mark.parametrize("container", FORMS)
@pytest.mark.parametrize("validator", VALIDATORS)
def test_authedwigs_newer_minor_is_handled_like_hedwig_does(moto_url: str, validator: str, container: bool) -> None:
    route = Route(moto_url)
    handled: list[Message] = []
    ours = route.app(validator, handled=handled, schema=_knowing_1_0(validator, strict_minor=False))
    ours.provision()
    sent = _publish_1_1(route, validator, container)
    _drain(ours)
    [got] = handled
    assert (got.id, got.type, got.version) == (sent.id, "user-created", Version(1, 1))
    assert (dict(got.headers), got.publisher, got.timestamp) == (HEADERS, "legacy-service", sent.timestamp)
    if validator == "jsonschema":
        assert got.data == {"user_id": "U_1234", "nickname": "Zoë"}
    else:
        assert type(got.data) is UserCreatedV1 and got.data.user_id == "U_1234"
        assert got.data.SerializeToString() == sent.data.SerializeToString()  # nickname kept, unknown to 1.0
    [row] = route.transport.status(route.queue, [route.topic])
    assert (row.depth, row.in_flight, row.dead_letters) == (0, 0, 0)


@pytest.mark.parametrize("container", FORMS)
@pytest.mark.parametrize("validator", VALIDATORS)
def test_strict_minor_dead_letters_authedwigs_newer_minor(moto_url: str, validator: str, container: bool) -> None:
    route = Route(moto_url)
    handled: list[Message] = []
    ours = route.app(validator, handled=handled, schema=_knowing_1_0(validator, strict_minor=True))
    ours.provision()
    _publish_1_1(route, validator, container)
    errors: list[Exception] = []
    with signals.message_invalid.connected_to(lambda app, **kw: errors.append(kw["error"]), sender=ours):
        _drain(ours)
    assert handled == []
    [error] = errors
    assert isinstance(error, DecodeError)
    assert str(error) == (
        "user-created 1.1: minor version 1 is newer than the schema knows (newest is 1.0) and strict_minor is set"
    )
    [record] = route.transport.dead_letters(route.queue)
    assert record.reason == f"invalid message: {error}"
