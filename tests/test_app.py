from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import SCHEMA_FILE

from hedwig_tasks import (
    ConfigurationError,
    Hedwig,
    Message,
    PublishError,
    RoutingError,
    ValidationError,
    Version,
    signals,
)
from hedwig_tasks.testing import Published, eager
from hedwig_tasks.transports.memory import MemoryTransport


def make_app(**options: Any) -> Hedwig:
    options.setdefault("transport", MemoryTransport())
    return Hedwig("myapp", schema=SCHEMA_FILE, **options)


def test_handler_stays_callable_and_publishes_newest_minor() -> None:
    app = make_app()

    @app.handler("send_email", "1.*")
    def send_email(message: Message) -> str:
        return f"sent to {message.data['to']}"

    assert send_email(Message.new("send_email", "1.0", {"to": "x@y", "subject": "s"})) == "sent to x@y"
    app.provision()
    sent = send_email.publish(to="someone@example.com", subject="Hello!")
    assert sent.version == Version(1, 1)  # x-version of send_email 1.*
    assert sent.publisher == "myapp"
    [delivery] = app.transport.consumer("myapp", ["send_email-v1"]).receive(10, 0.1)
    assert json.loads(delivery.body) == {"to": "someone@example.com", "subject": "Hello!"}
    assert delivery.attributes["hedwig_schema"].endswith("/send_email/1.1")


def test_publish_explicit_version_and_mapping() -> None:
    app = make_app()
    handler = app.handler("send_email", 1)(lambda message: None)
    app.provision()
    sent = handler.publish({"to": "a@b.c", "subject": "s"}, version="1.0", headers={"request_id": "r"})
    assert (sent.version, dict(sent.headers)) == (Version(1, 0), {"request_id": "r"})
    with pytest.raises(TypeError, match="either as one mapping or as keyword fields"):
        handler.publish({"to": "a@b.c"}, subject="s")


def test_handler_for_several_majors_publishes_highest() -> None:
    app = make_app()

    @app.handler("user-created", ["1.*", "2.*"])
    def created(message: Message) -> None: ...

    app.provision()
    assert app.handler_for(Message.new("user-created", "1.0", {})) is created
    assert app.handler_for(Message.new("user-created", "2.0", {})) is created
    assert created.publish(user_id="U", email="e@x").version == Version(2, 0)


def test_duplicate_registration_fails_at_declaration() -> None:
    app = make_app()
    app.handler("send_email", "1.*")(lambda message: None)
    with pytest.raises(ConfigurationError, match="already has a handler"):
        app.handler("send_email", "1.*")(lambda message: None)


@pytest.mark.parametrize(
    "fn",
    [lambda: None, lambda message, other: None, lambda *, message: None],
)
def test_handler_that_cannot_take_a_message_fails_at_declaration(fn: Any) -> None:
    with pytest.raises(ConfigurationError, match="must take the message"):
        make_app().handler("send_email", "1.*")(fn)


@pytest.mark.parametrize(
    ("message_type", "pattern", "match"),
    [
        ("nope", "1.*", "unknown message type 'nope'"),
        ("send_email", "4.*", "no major version 4"),
        ("send_email", "1.2", "expected a major version"),
    ],
)
def test_bad_handler_declarations(message_type: str, pattern: str, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        make_app().handler(message_type, pattern)


def test_version_forms() -> None:
    class StrictLike:
        def __str__(self) -> str:
            return "1.0"

    for form in ("1.0", (1, 0), StrictLike(), Version(1, 0)):
        assert Message.new("send_email", form, {}).version == Version(1, 0)
    for bad in ("1", "1.0.0", "v1", (1, "0")):
        with pytest.raises(ValueError, match="invalid version"):
            Version.parse(bad)


def test_routing_overrides_and_default() -> None:
    app = make_app(
        routing={
            "send_email": "notifications",
            ("user-created", "2.*"): "users-v2",
            ("user-created", 1): ("users", "123456789012"),
        }
    )
    assert app.router.route("send_email", 1).topic == "notifications"
    assert app.router.route("user-created", 2).topic == "users-v2"
    assert app.router.route("user-created", 1).owner == "123456789012"
    assert make_app().router.topic_for("send_email", 1) == "send_email-v1"


def test_strict_routing_fails_at_publish_naming_the_type() -> None:
    app = make_app(routing={"send_email": "notifications"}, default_topic=None)
    app.provision()
    app.publish("send_email", "1.0", {"to": "a@b.c", "subject": "s"})
    with pytest.raises(RoutingError, match="'user-created' major 1"):
        app.publish("user-created", "1.0", {"user_id": "U"})


def test_routing_for_unknown_type_fails_at_start() -> None:
    with pytest.raises(ConfigurationError, match="'sms'"):
        make_app(routing={"sms": "texts"})


def test_publish_validates_before_sending() -> None:
    app = make_app()
    with pytest.raises(ValidationError, match=r"data\.to: 5 is not of type 'string'"):
        app.publish("send_email", "1.0", {"to": 5, "subject": "s"})
    with pytest.raises(ValidationError, match="unknown message type"):
        app.publish("sms", "1.0", {})
    with pytest.raises(ValidationError, match="no major version 7"):
        app.publish("send_email", "7.0", {})


def test_publish_never_provisions() -> None:
    app = make_app()
    with pytest.raises(PublishError, match="'send_email-v1' does not exist"):
        app.publish("send_email", "1.0", {"to": "a@b.c", "subject": "s"})
    assert "create topic send_email-v1" in app.provision(dry_run=True)


def test_fan_out_to_two_apps_on_memory() -> None:
    bus = MemoryTransport()
    apps = [Hedwig(name, schema=SCHEMA_FILE, transport=bus) for name in ("billing", "audit")]
    for app in apps:
        app.handler("user-created", "1.*")(lambda message: None)
        app.provision()
    publisher = Hedwig("users", schema=SCHEMA_FILE, transport=bus)
    sent = publisher.publish("user-created", "1.0", {"user_id": "U"})
    for app in apps:
        [delivery] = bus.consumer(app.queue, app.subscribed_topics()).receive(10, 0.1)
        assert delivery.attributes["hedwig_id"] == sent.id


def test_default_headers_and_container_form() -> None:
    app = make_app(default_headers=lambda message: {"tenant": "acme", "request_id": "default"}, container=True)
    app.handler("send_email", "1.*")(lambda message: None)
    app.provision()
    sent = app.publish("send_email", "1.0", {"to": "a@b.c", "subject": "s"}, headers={"request_id": "r"})
    assert dict(sent.headers) == {"tenant": "acme", "request_id": "r"}
    [delivery] = app.transport.consumer("myapp", ["send_email-v1"]).receive(1, 0.1)
    assert json.loads(delivery.body)["metadata"]["headers"] == {"tenant": "acme", "request_id": "r"}
    assert delivery.attributes["hedwig_encoding"] == "utf8"


def test_signals_fire_and_a_raising_receiver_changes_nothing() -> None:
    app = make_app()
    app.provision()
    seen: list[tuple[str, str]] = []

    def broken(sender: Hedwig, **kwargs: Any) -> None:
        raise RuntimeError("metrics down")

    def record(sender: Hedwig, *, message: Message, topic: str, **kwargs: Any) -> None:
        seen.append((message.type, topic))

    with (
        signals.before_publish.connected_to(broken, sender=app),
        signals.after_publish.connected_to(record, sender=app),
    ):
        app.publish("send_email", "1.0", {"to": "a@b.c", "subject": "s"})
    assert seen == [("send_email", "send_email-v1")]


def test_eager_runs_handler_after_round_trip() -> None:
    app = make_app()
    handled: list[Message] = []

    @app.handler("send_email", "1.*")
    def send_email(message: Message) -> None:
        handled.append(message)

    with eager(app):
        sent = send_email.publish(to="a@b.c", subject="s", headers={"request_id": "r"})
    assert handled == [sent]
    assert app.eager is False


def test_eager_surfaces_handler_errors_and_async_handlers_run() -> None:
    app = make_app()

    @app.handler("user-created", "1.*")
    async def created(message: Message) -> None:
        raise LookupError(message.data["user_id"])

    with eager(app), pytest.raises(LookupError, match="U7"):
        created.publish(user_id="U7")


def test_pytest_fixtures(hedwig_published: Published, hedwig_eager: Any) -> None:
    app = make_app()
    calls: list[str] = []
    app.handler("send_email", "1.*")(lambda message: calls.append(message.data["to"]))
    hedwig_eager(app)
    app.publish("send_email", "1.0", {"to": "a@b.c", "subject": "s"}, headers={"request_id": "r"})
    hedwig_published.assert_published(
        "send_email", data={"to": "a@b.c", "subject": "s"}, version="1.0", headers={"request_id": "r"}
    )
    hedwig_published.assert_not_published("user-created")
    with pytest.raises(AssertionError, match="found 0"):
        hedwig_published.assert_published("send_email", data={"to": "other"})
    assert calls == ["a@b.c"]


def test_nothing_happens_at_construction(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    app = Hedwig("lazy", schema=SCHEMA_FILE)
    app.handler("send_email", "1.*")(lambda message: None)
    assert list(tmp_path.iterdir()) == []
    assert "lazy" in repr(app)


def test_strict_minor_reaches_the_validator_built_from_the_schema(schema_file: Path) -> None:
    from hedwig_tasks.validators.jsonschema import JSONSchemaValidator

    assert Hedwig("lenient", schema=schema_file).validator.strict_minor is False
    assert Hedwig("strict", schema=schema_file, strict_minor=True).validator.strict_minor is True
    ready = JSONSchemaValidator(schema_file)
    with pytest.raises(ConfigurationError, match="strict_minor"):
        Hedwig("strict", schema=ready, strict_minor=True)


def test_the_app_encodes_and_decodes_one_way_for_publish_eager_and_worker(schema_file: Path) -> None:
    from hedwig_tasks.transports.base import Delivery

    app = Hedwig("wire", schema=schema_file, transport="memory://")
    sent = app.message("user-created", "1.0", {"user_id": "U1"}, headers={"request_id": "r"})
    body, attributes = app.encode(sent)
    assert attributes["hedwig_schema"].endswith("/user-created/1.0")
    delivery = Delivery(body, attributes, attempt=3, receipt=None, subscription="s")
    got = app.decode(delivery)
    assert (got.id, got.data, dict(got.headers), got.delivery) == (
        sent.id,
        {"user_id": "U1"},
        {"request_id": "r"},
        delivery,
    )


def test_a_publish_over_the_transports_attribute_limit_fails_before_sending(schema_file: Path) -> None:
    from hedwig_tasks.transports.aws import AWSTransport

    bus = MemoryTransport(capabilities=AWSTransport.capabilities)  # AWS's limits, in memory
    app = Hedwig("limits", schema=schema_file, transport=bus)
    app.provision()
    app.publish("user-created", "1.0", {"user_id": "U"}, headers={f"h{i}": "v" for i in range(4)})
    with pytest.raises(PublishError, match=r"1\d attributes, and MemoryTransport carries at most 10"):
        app.publish("user-created", "1.0", {"user_id": "U"}, headers={f"h{i}": "v" for i in range(6)})


def test_a_bare_handler_decorator_says_how_to_write_it() -> None:
    app = make_app()
    with pytest.raises(ConfigurationError) as caught:

        @app.handler  # type: ignore[arg-type]  # the mistake under test
        def send_email(message: Message) -> None: ...

    text = str(caught.value)
    assert "@handler used without arguments on send_email()" in text
    assert '@app.handler("send_email", "1.*")' in text
    assert "'send_email', 'user-created'" in text  # what the schema defines
    assert len(app.registry) == 0


def test_message_attempt_is_one_in_eager_mode_and_for_a_message_built_locally() -> None:
    app = make_app()
    attempts: list[int] = []

    @app.handler("user-created", "1.*")
    def created(message: Message) -> None:
        attempts.append(message.attempt)

    with eager(app):
        sent = created.publish(user_id="U1")
    assert attempts == [1]
    assert sent.delivery is None and sent.attempt == 1
    assert Message.new("user-created", "1.0", {"user_id": "U2"}).attempt == 1
