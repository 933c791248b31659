"""Typed payloads (issue 20, item 3): a handler that annotates its data with a dataclass, a
TypedDict or a pydantic model receives it built; data that does not fit is dead-lettered."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, ClassVar, TypedDict

import pydantic
import pytest
from conftest import SCHEMA_FILE

from hedwig_tasks import ConfigurationError, Hedwig, Message
from hedwig_tasks.testing import drain, eager


@dataclasses.dataclass(frozen=True)
class Attachment:
    name: str


@dataclasses.dataclass(frozen=True)
class Email:
    to: str
    subject: str
    attachments: list[Attachment] | None = None


@dataclasses.dataclass(frozen=True)
class Renamed:
    """As ``schema codegen --dataclasses`` writes a key that is not a Python name."""

    recipient: str
    _keys: ClassVar[dict[str, str]] = {"recipient": "to"}


class EmailDict(TypedDict):
    to: str
    subject: str


class EmailModel(pydantic.BaseModel):
    to: str
    subject: str = pydantic.Field(max_length=5)


@dataclasses.dataclass(frozen=True)
class NeedsBody:
    to: str
    body: str  # the schema does not have it


def _app() -> Hedwig:
    return Hedwig(f"typed-{uuid.uuid4().hex[:8]}", schema=SCHEMA_FILE, transport="memory://")


def test_a_dataclass_is_built_with_its_nested_dataclasses() -> None:
    app = _app()
    got: list[Any] = []

    @app.handler("send_email", "1.*")
    def send(message: Message, email: Email) -> None:
        got.append((message.type, email))

    with eager(app):
        app.publish("send_email", "1.1", {"to": "a@b.c", "subject": "hi", "attachments": [{"name": "x.pdf"}]})
    assert got == [("send_email", Email("a@b.c", "hi", [Attachment("x.pdf")]))]
    send(Message.new("send_email", "1.1", {"to": "a@b.c", "subject": "hi"}), Email("a@b.c", "hi"))  # still callable


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (Renamed, Renamed("a@b.c")),
        (EmailDict, {"to": "a@b.c", "subject": "hi"}),
        (EmailModel, EmailModel(to="a@b.c", subject="hi")),
    ],
)
def test_each_kind_of_type_is_built(cls: Any, expected: Any) -> None:
    app = _app()
    got: list[Any] = []

    def handle(message: Message, data: Any) -> None:
        got.append(data)

    handle.__annotations__["data"] = cls
    app.handler("send_email", "1.*")(handle)
    with eager(app):
        app.publish("send_email", "1.0", {"to": "a@b.c", "subject": "hi"})
    assert got == [expected]


@pytest.mark.parametrize(
    ("cls", "reason"),
    [
        (NeedsBody, "data does not fit NeedsBody: "),
        (EmailModel, "data does not fit EmailModel: 1 validation error"),
    ],
)
def test_data_the_schema_takes_but_the_type_cannot_hold_is_dead_lettered_at_once(cls: Any, reason: str) -> None:
    app = _app()
    calls: list[Any] = []

    def handle(message: Message, data: Any) -> None:
        calls.append(data)

    handle.__annotations__["data"] = cls
    app.handler("send_email", "1.*")(handle)
    app.provision()
    app.publish("send_email", "1.0", {"to": "a@b.c", "subject": "a long subject"})
    counts = drain(app, fail_fast=False)
    assert calls == [] and counts[app.name].dead_lettered == 1 and counts[app.name].retried == 0
    (dead,) = app.transport.dead_letters(app.queue)
    assert reason in dead.reason
    app.close()


def test_a_second_parameter_that_is_not_a_payload_type_is_refused_at_registration() -> None:
    app = _app()

    def handle(message: Message, other: int) -> None: ...

    with pytest.raises(ConfigurationError, match="annotated with a dataclass, TypedDict or pydantic model"):
        app.handler("send_email", "1.*")(handle)
