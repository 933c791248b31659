"""Interop on Redis Streams with authedwig 11 (PyPI ``authedwig``), both directions.

authedwig's ``RedisStreamsPublisherBackend`` publishes and a hedwig-tasks worker handles the
message with the same id, data, headers, publisher and timestamp; hedwig-tasks publishes and
authedwig's ``RedisStreamsConsumerBackend`` handles it. Both validators (JSON Schema, and
protobuf, whose bodies travel base64 with ``hedwig_encoding``), both forms (transport
attributes and container), on the groups ``hedwig-tasks provision`` made (authedwig creates
none). Dead letters cross over too: one dead-lettered by hedwig-tasks is moved back by
authedwig's ``requeue_dead_letter`` and handled, and one authedwig dead-lettered after
``HEDWIG_MAX_DELIVERY_ATTEMPTS`` is listed and requeued by hedwig-tasks. authedwig is
configured through its own settings (``REDIS_URL``, its backends, ``HEDWIG_QUEUE`` ...).
"""

from __future__ import annotations

import contextlib
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from conftest import SCHEMA_FILE, authedwig_settings
from helpers import wait_for
from redis_server import cleanup, redis_url
from test_aws_interop import FORMS, HEADERS, VALIDATORS, _data, _version  # the same cases as on SNS/SQS

from hedwig_tasks import DeadLetter, Hedwig, Message
from hedwig_tasks.conf import build_app
from hedwig_tasks.settings import HedwigSettings
from hedwig_tasks.worker import Worker, WorkerOptions

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # authedwig's modules import distutils
    from distutils.version import StrictVersion

    from examples.protos.schema_pb2 import UserCreatedV1, UserUpdatedV1

pytestmark = pytest.mark.slow

PUBLISHER_BACKEND = "hedwig.backends.redis.RedisStreamsPublisherBackend"
CONSUMER_BACKEND = "hedwig.backends.redis.RedisStreamsConsumerBackend"
#: authedwig's lease on Redis, in seconds: a message it did not ack is claimed again after it.
AUTHEDWIG_VISIBILITY_TIMEOUT_S = 1


class Route:
    """A topic and a queue of their own for one test, provisioned by hedwig-tasks."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.tag = uuid.uuid4().hex[:8]
        self.topic = f"user-created-{self.tag}"
        self.queue = f"interop-{self.tag}"
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.apps: list[Hedwig] = []  # closed with the route (the state store a worker opened, too)

    def app(
        self,
        validator: str,
        *,
        container: bool = False,
        handled: Callable[[Message], Any] | None = None,
        lease_s: float | None = None,
    ) -> Hedwig:
        schema = SCHEMA_FILE if validator == "jsonschema" else [UserCreatedV1, UserUpdatedV1]
        app = Hedwig(
            "hedwig-tasks-service",
            schema=schema,
            transport=self.url if lease_s is None else f"{self.url}?lease_s={lease_s}",
            routing={"user-created": self.topic},
            queue=self.queue,
            container=container,
        )
        if handled is not None:
            app.handler("user-created", "1.*")(handled)
        return self.keep(app)

    def keep(self, app: Hedwig) -> Hedwig:
        """``app``, to be closed with the route."""
        self.apps.append(app)
        return app

    def settings(self, validator: str, *, container: bool, **more: Any) -> dict[str, Any]:
        """authedwig's settings for this route's topic and queue on Redis."""
        settings: dict[str, Any] = {
            "REDIS_URL": self.url,
            "HEDWIG_QUEUE": self.queue,
            "HEDWIG_SUBSCRIPTIONS": [self.topic],
            "HEDWIG_PUBLISHER_BACKEND": PUBLISHER_BACKEND,
            "HEDWIG_CONSUMER_BACKEND": CONSUMER_BACKEND,
            "HEDWIG_MESSAGE_ROUTING": {("user-created", "1.*"): self.topic},
            "HEDWIG_USE_TRANSPORT_MESSAGE_ATTRIBUTES": not container,
            "HEDWIG_MAX_DELIVERY_ATTEMPTS": 5,
            "HEDWIG_VISIBILITY_TIMEOUT_S": AUTHEDWIG_VISIBILITY_TIMEOUT_S,
        }
        if validator == "protobuf":
            settings["HEDWIG_DATA_VALIDATOR_CLASS"] = "hedwig.validators.protobuf.ProtobufValidator"
            settings["HEDWIG_PROTOBUF_MESSAGES"] = [UserCreatedV1, UserUpdatedV1]
        return {**settings, **more}

    @contextlib.contextmanager
    def authedwig(self, validator: str, *, container: bool, **more: Any) -> Iterator[Any]:
        with authedwig_settings(**self.settings(validator, container=container, **more)) as configured:
            yield configured

    def authedwig_publishes(self, validator: str, *, container: bool) -> Any:
        with self.authedwig(validator, container=container):
            from hedwig.models import Message as AuthedwigMessage

            sent = AuthedwigMessage.new(
                "user-created", StrictVersion(_version(validator)), _data(validator), headers=HEADERS
            )
            sent.publish()
        return sent

    def entries(self, stream: str) -> list[dict[str, str]]:
        """The fields of every entry of ``hedwig:<stream>``, read raw."""
        return [fields for _, fields in self.client.xrange(f"hedwig:{stream}")]

    def delete(self) -> None:
        for app in self.apps:
            app.close()
        self.client.close()
        cleanup(self.url, [self.queue], [self.topic])


@pytest.fixture
def route() -> Iterator[Route]:
    route = Route(redis_url())
    try:
        yield route
    finally:
        route.delete()


def _drain(app: Hedwig) -> Worker:
    """Run a worker until the queue is empty (burst mode), raising what it raised."""
    worker = Worker(app, WorkerOptions(burst=True, concurrency=2, prefetch=2, wait_s=0.5))
    worker.run()
    return worker


def _assert_settled(route: Route, app: Hedwig) -> None:
    [row] = app.transport.status(route.queue, [route.topic])
    assert (row.depth, row.in_flight, row.dead_letters) == (0, 0, 0)


@pytest.mark.parametrize("container", FORMS)
@pytest.mark.parametrize("validator", VALIDATORS)
def test_authedwig_publishes_hedwig_tasks_handles(route: Route, validator: str, container: bool) -> None:
    handled: list[Message] = []
    ours = route.app(validator, handled=handled.append)
    ours.provision()
    sent = route.authedwig_publishes(validator, container=container)
    [entry] = route.entries(route.topic)
    assert entry.get("hedwig_encoding") == ("base64" if validator == "protobuf" else None)  # binary: base64
    worker = _drain(ours)
    [got] = handled
    assert (got.id, got.type, str(got.version)) == (sent.id, "user-created", _version(validator))
    assert got.data == sent.data
    assert dict(got.headers) == HEADERS
    assert (got.publisher, got.timestamp) == ("legacy-service", sent.timestamp)
    assert got.delivery is not None and got.delivery.attempt == 1
    assert worker.counts == {"handled": 1, "retried": 0, "dead_lettered": 0}
    _assert_settled(route, ours)


@pytest.mark.parametrize("container", FORMS)
@pytest.mark.parametrize("validator", VALIDATORS)
def test_hedwig_tasks_publishes_authedwig_handles(route: Route, validator: str, container: bool) -> None:
    ours = route.app(validator, container=container)
    route.app(validator, handled=lambda message: None).provision()  # the group authedwig reads with
    sent = ours.publish("user-created", _version(validator), _data(validator), headers=HEADERS)
    handled = _authedwig_consume(route, validator, container)
    [got] = handled
    assert (got.id, got.type, str(got.version)) == (sent.id, "user-created", _version(validator))
    assert got.data == sent.data
    assert dict(got.headers) == HEADERS
    assert (got.publisher, got.timestamp) == ("hedwig-tasks-service", sent.timestamp)
    assert got.provider_metadata.delivery_attempt == 1
    assert got.provider_metadata.stream == f"hedwig:{route.topic}"
    assert route.client.xpending(f"hedwig:{route.topic}", route.queue)["pending"] == 0  # authedwig acked it
    _assert_settled(route, ours)


def _authedwig_consume(
    route: Route,
    validator: str,
    container: bool,
    *,
    until: Callable[[list[Any]], bool] = bool,
    callback: Callable[[Any], None] | None = None,
    **more: Any,
) -> list[Any]:
    """Run authedwig's Redis consumer until ``until(messages it was given)`` holds (by default: one)."""
    handled: list[Any] = []
    done = threading.Event()

    def record(message):  # type: ignore[no-untyped-def]  # authedwig refuses any annotation but its Message
        handled.append(message)
        if callback is not None:
            callback(message)

    callbacks = {("user-created", "1.*"): record}
    with route.authedwig(validator, container=container, HEDWIG_CALLBACKS=callbacks, **more):
        from hedwig.consumer import listen_for_messages

        consumer = threading.Thread(target=listen_for_messages, kwargs={"shutdown_event": done}, daemon=True)
        consumer.start()
        try:
            wait_for(lambda: until(handled), timeout_s=20)
        finally:
            done.set()
            consumer.join(10)
    assert not consumer.is_alive()
    return handled


@pytest.mark.parametrize("validator", VALIDATORS)
def test_entries_carry_the_fields_authedwig_writes(route: Route, validator: str) -> None:
    """The same message published by each library makes an entry with the same fields."""
    route.app(validator, handled=lambda message: None).provision()
    theirs = route.authedwig_publishes(validator, container=False)
    ours = route.app(validator).publish("user-created", _version(validator), _data(validator), headers=HEADERS)
    by_id = {entry["hedwig_id"]: entry for entry in route.entries(route.topic)}
    assert set(by_id) == {theirs.id, ours.id}
    assert set(by_id[ours.id]) == set(by_id[theirs.id])
    assert by_id[ours.id]["hedwig_schema"] == by_id[theirs.id]["hedwig_schema"]
    assert by_id[ours.id].get("hedwig_encoding") == by_id[theirs.id].get("hedwig_encoding")


# Dead letters, both ways


def test_hedwig_tasks_dead_letter_is_requeued_by_authedwig(route: Route) -> None:
    handled: list[Message] = []

    def handler(message: Message) -> None:
        if not handled:
            handled.append(message)
            raise DeadLetter("the mailer refused it")
        handled.append(message)

    ours = route.app("jsonschema", handled=handler)
    ours.provision()
    sent = ours.publish("user-created", "1.0", {"user_id": "U_7"}, headers=HEADERS)
    assert _drain(ours).counts == {"handled": 0, "retried": 0, "dead_lettered": 1}
    [record] = ours.transport.dead_letters(route.queue)
    assert (record.attributes["hedwig_id"], record.reason) == (sent.id, "the mailer refused it")
    assert len(route.entries(f"{route.queue}:dlq")) == 1  # where authedwig looks for it

    with route.authedwig("jsonschema", container=False):
        from hedwig.commands import requeue_dead_letter

        requeue_dead_letter()
    assert _drain(ours).counts == {"handled": 1, "retried": 0, "dead_lettered": 0}
    _, again = handled
    assert (again.id, again.data, dict(again.headers)) == (sent.id, {"user_id": "U_7"}, HEADERS)
    assert again.delivery is not None and again.delivery.attempt == 1
    assert ours.transport.dead_letters(route.queue) == []  # authedwig acked it on the dead-letter stream
    _assert_settled(route, ours)


def test_hedwig_tasks_requeue_is_handled_by_authedwig(route: Route) -> None:
    """A dead letter with our reason fields, requeued by us, reads in authedwig as the message it was."""

    def refuse(message: Message) -> None:
        raise DeadLetter("refused")

    ours = route.app("jsonschema", handled=refuse)
    ours.provision()
    sent = ours.publish("user-created", "1.0", {"user_id": "U_5"}, headers=HEADERS)
    assert _drain(ours).counts == {"handled": 0, "retried": 0, "dead_lettered": 1}
    assert ours.transport.requeue_dead_letters(route.queue) == 1
    [requeued] = route.entries(route.queue)
    assert any(name.startswith("hedwig_tasks_") for name in requeued)  # our own fields travel along
    [got] = _authedwig_consume(route, "jsonschema", False)
    assert (got.id, got.data, dict(got.headers)) == (sent.id, {"user_id": "U_5"}, HEADERS)
    assert got.provider_metadata.stream == f"hedwig:{route.queue}"


def test_authedwig_dead_letter_is_listed_and_requeued_by_hedwig_tasks(route: Route) -> None:
    handled: list[Message] = []
    ours = route.app("jsonschema", handled=handled.append)
    ours.provision()
    sent = ours.publish("user-created", "1.0", {"user_id": "U_8"}, headers=HEADERS)

    def fail(message: Any) -> None:
        raise RuntimeError("authedwig's handler fails")

    dlq = f"hedwig:{route.queue}:dlq"
    tries = _authedwig_consume(
        route,
        "jsonschema",
        False,
        until=lambda tried: route.client.xlen(dlq) == 1,
        callback=fail,
        HEDWIG_MAX_DELIVERY_ATTEMPTS=1,  # dead-lettered when claimed again after its visibility timeout
    )
    assert [message.id for message in tries] == [sent.id]

    [record] = ours.transport.dead_letters(route.queue)
    assert (record.attributes["hedwig_id"], record.attributes["request_id"]) == (sent.id, "req-42")
    assert ours.transport.requeue_dead_letters(route.queue) == 1
    assert _drain(ours).counts == {"handled": 1, "retried": 0, "dead_lettered": 0}
    [got] = handled
    assert (got.id, got.data, dict(got.headers)) == (sent.id, {"user_id": "U_8"}, HEADERS)
    assert ours.transport.dead_letters(route.queue) == []
    _assert_settled(route, ours)


def test_what_authedwig_left_unacknowledged_is_taken_over_by_hedwig_tasks(route: Route) -> None:
    """A service moving over: its old consumer read a message and never acked it; a worker takes it over."""
    handled: list[Message] = []
    ours = route.app("jsonschema", handled=handled.append, lease_s=AUTHEDWIG_VISIBILITY_TIMEOUT_S)
    ours.provision()
    sent = ours.publish("user-created", "1.0", {"user_id": "U_6"}, headers=HEADERS)

    def fail(message: Any) -> None:
        raise RuntimeError("authedwig's consumer stops before acknowledging")

    [tried] = _authedwig_consume(route, "jsonschema", False, callback=fail)
    assert tried.id == sent.id
    stream = f"hedwig:{route.topic}"
    [pending] = route.client.xpending_range(stream, route.queue, "-", "+", 10)
    assert pending["times_delivered"] == 1  # held by authedwig's consumer, unacknowledged
    lease_ms = AUTHEDWIG_VISIBILITY_TIMEOUT_S * 1000
    wait_for(
        lambda: route.client.xpending_range(stream, route.queue, "-", "+", 1)[0]["time_since_delivered"] > lease_ms
    )
    assert _drain(ours).counts == {"handled": 1, "retried": 0, "dead_lettered": 0}
    [got] = handled
    assert (got.id, dict(got.headers)) == (sent.id, HEADERS)
    assert got.delivery is not None and got.delivery.attempt == 2  # authedwig's delivery counted
    _assert_settled(route, ours)


def _as_hedwig_tasks_url(settings: dict[str, Any]) -> dict[str, Any]:
    """authedwig's Redis settings moved to one transport URL (the other way the migration guide shows)."""
    moved = {
        k: v
        for k, v in settings.items()
        if k not in ("REDIS_URL", "HEDWIG_PUBLISHER_BACKEND", "HEDWIG_CONSUMER_BACKEND")
    }
    return {
        **moved,
        "HEDWIG_TRANSPORT_URL": f"{settings['REDIS_URL']}?lease_s={settings['HEDWIG_VISIBILITY_TIMEOUT_S']}",
    }


SETTINGS_FORMS = [
    pytest.param(_as_hedwig_tasks_url, id="transport-url"),
    pytest.param(dict, id="as-authedwig-has-them"),
]


@pytest.mark.parametrize("form", SETTINGS_FORMS)
def test_an_app_built_from_authedwig_settings_talks_to_authedwig(
    route: Route, form: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    """authedwig's Redis settings build a hedwig-tasks app on the same streams and group."""
    handled: list[Message] = []
    settings = {
        **route.settings("jsonschema", container=False),
        "HEDWIG_PUBLISHER": "settings-service",
        "HEDWIG_JSONSCHEMA_FILE": str(SCHEMA_FILE),
        "HEDWIG_CALLBACKS": {("user-created", "1.*"): handled.append},
    }
    app = route.keep(build_app(HedwigSettings.read(form(settings))))
    assert (app.transport.scheme, app.transport.lease_s) == ("redis", AUTHEDWIG_VISIBILITY_TIMEOUT_S)
    app.provision()
    sent = route.authedwig_publishes("jsonschema", container=False)
    _drain(app)
    [got] = handled
    assert (got.id, got.data, dict(got.headers)) == (sent.id, sent.data, HEADERS)
    ours = app.publish("user-created", "1.0", {"user_id": "U_9"})
    [theirs] = _authedwig_consume(route, "jsonschema", False)
    assert (theirs.id, theirs.publisher) == (ours.id, "settings-service")


def test_the_transport_reads_authedwigs_redis_settings(route: Route) -> None:
    """``RedisTransport.from_settings``: REDIS_URL, and HEDWIG_VISIBILITY_TIMEOUT_S as the lease."""
    from hedwig_tasks.transports.redis import RedisTransport

    transport = RedisTransport.from_settings(route.settings("jsonschema", container=False))
    assert transport.lease_s == AUTHEDWIG_VISIBILITY_TIMEOUT_S
    handled: list[Message] = []
    app = route.keep(
        Hedwig(
            "settings-service",
            schema=SCHEMA_FILE,
            transport=transport,
            routing={"user-created": route.topic},
            queue=route.queue,
        )
    )
    app.handler("user-created", "1.*")(handled.append)
    app.provision()
    sent = route.authedwig_publishes("jsonschema", container=False)
    _drain(app)
    assert [message.id for message in handled] == [sent.id]
