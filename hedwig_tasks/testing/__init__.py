"""Testing support: record what code under test published, and run handlers eagerly.

The pytest plugin (installed with the package) offers the fixtures ``hedwig_published``, a
:class:`Published` recorder, and ``hedwig_eager``, which turns on eager mode for an app for
one test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from hedwig_tasks import signals
from hedwig_tasks.message import Message, Version, VersionLike

if TYPE_CHECKING:
    from hedwig_tasks.app import Hedwig

__all__ = ["Published", "eager", "record_published"]


class Published:
    """The messages published (and accepted by the transport, or run eagerly) while recording."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.topics: list[str] = []

    def _record(self, sender: Any, *, message: Message, topic: str, **_: Any) -> None:
        self.messages.append(message)
        self.topics.append(topic)

    def of_type(self, message_type: str) -> list[Message]:
        return [m for m in self.messages if m.type == message_type]

    def find(
        self,
        message_type: str,
        *,
        data: Any = None,
        version: VersionLike = None,
        headers: Mapping[str, str] | None = None,
    ) -> list[Message]:
        """Messages of ``message_type`` matching each given field (headers match as a subset)."""
        wanted = None if version is None else Version.parse(version)
        return [
            m
            for m in self.of_type(message_type)
            if (data is None or m.data == data)
            and (wanted is None or m.version == wanted)
            and (headers is None or all(m.headers.get(k) == v for k, v in headers.items()))
        ]

    def assert_published(
        self,
        message_type: str,
        *,
        data: Any = None,
        version: VersionLike = None,
        headers: Mapping[str, str] | None = None,
        count: int | None = None,
    ) -> Message:
        """Assert a matching message was published (exactly ``count`` times if given); return it."""
        found = self.find(message_type, data=data, version=version, headers=headers)
        if not found or (count is not None and len(found) != count):
            seen = [(m.type, str(m.version), m.data, dict(m.headers)) for m in self.messages]
            expected = f"{count} x " if count is not None else ""
            raise AssertionError(
                f"expected {expected}{message_type!r} with data={data!r} version={version!r} "
                f"headers={headers!r}; found {len(found)}. Published: {seen!r}"
            )
        return found[-1]

    def assert_not_published(self, message_type: str, *, data: Any = None) -> None:
        found = self.find(message_type, data=data)
        if found:
            raise AssertionError(f"expected no {message_type!r} with data={data!r}, found {len(found)}")

    def clear(self) -> None:
        self.messages.clear()
        self.topics.clear()


@contextlib.contextmanager
def record_published(app: Hedwig | None = None) -> Iterator[Published]:
    """Record publishes of ``app`` (or of every app) inside the block."""
    published = Published()
    receiver = published._record
    if app is None:
        signals.after_publish.connect(receiver, weak=False)
    else:
        signals.after_publish.connect(receiver, sender=app, weak=False)
    try:
        yield published
    finally:
        signals.after_publish.disconnect(receiver)


@contextlib.contextmanager
def eager(app: Hedwig) -> Iterator[Hedwig]:
    """Inside the block, ``app``'s publishes run the matching local handler inline.

    Each message makes the full encode/decode round trip first, so schema errors surface;
    handler exceptions propagate to the publisher. Nothing reaches the transport.
    """
    before, app.eager = app.eager, True
    try:
        yield app
    finally:
        app.eager = before
