"""Testing support: record publishes without sending them, run handlers eagerly, drain workers.

* :func:`record_published` (the ``hedwig_published`` fixture) records what the code under test
  publishes and, like Hedwig's publish mock, keeps it in the process: each message is still
  validated and encoded, so a bad publish fails the test, but no transport is called unless
  the test asks for it (``published.passthrough()``, ``record_published(passthrough=True)``
  or the ``@pytest.mark.hedwig_passthrough`` marker).
* :func:`eager` (the ``hedwig_eager`` fixture) runs the publishes of one or more apps inline:
  a message runs the publishing app's own handler and that of every other eager app
  subscribed to its topic, after the full encode/decode round trip; nothing reaches a
  transport.
* :func:`drain` runs the apps' real workers in the test's process until everything waiting
  on their subscriptions is handled, and returns what each did (see :mod:`.draining`).
* :func:`reset_memory_buses` empties the named in-process buses (``memory://NAME``); the
  pytest plugin does it before and after each test.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from hedwig_tasks import app as app_module
from hedwig_tasks import signals
from hedwig_tasks.message import Message, Version, VersionLike
from hedwig_tasks.testing.draining import DrainCounts, drain
from hedwig_tasks.transports.base import Delivery
from hedwig_tasks.transports.memory import reset_named_buses

if TYPE_CHECKING:
    from hedwig_tasks.app import Hedwig

__all__ = ["DrainCounts", "Published", "drain", "eager", "record_published", "reset_memory_buses"]


class Published:
    """The messages published while recording (kept in the process, run eagerly, or sent).

    ``app`` limits recording (and interception) to one app's publishes; ``passthrough`` lets
    them reach the transport as well.
    """

    def __init__(self, app: Hedwig | None = None, *, passthrough: bool = False) -> None:
        self.messages: list[Message] = []
        self.topics: list[str] = []
        self._app = app
        self._passing = passthrough

    def _record(self, sender: Any, *, message: Message, topic: str, **_: Any) -> None:
        self.messages.append(message)
        self.topics.append(topic)

    def _intercepts(self, app: Hedwig) -> bool:
        return not self._passing and (self._app is None or self._app is app)

    @contextlib.contextmanager
    def passthrough(self) -> Iterator[Published]:
        """Inside the block, publishes reach the transport too (they are still recorded)."""
        before, self._passing = self._passing, True
        try:
            yield self
        finally:
            self._passing = before

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


# -- the interception point: which publishes stay in the process -------------------------------

_lock = threading.Lock()
_recorders: list[Published] = []
_eager_apps: list[Hedwig] = []  # one entry per eager() block an app is in
_ids = itertools.count(1)


def _install() -> None:
    """Set the app module's interception point while anything needs it; hold ``_lock``."""
    app_module.publish_interceptor = _intercept if (_recorders or _eager_apps) else None


def _intercept(app: Hedwig, message: Message, topic: str, body: bytes, attributes: dict[str, str]) -> str | None:
    if any(a is app for a in _eager_apps):
        _run_eagerly(app, topic, Delivery(body, attributes, attempt=1, receipt=None, subscription="eager"))
        return "eager"
    if app.eager:  # eager by its own setting (HEDWIG_SYNC): it runs inline and sends nothing
        return None
    if not any(r._intercepts(app) for r in list(_recorders)):
        return None
    limit = app.transport.capabilities.max_attributes
    if limit is not None and len(attributes) > limit:
        return None  # the app refuses it, as it would refuse it from a service
    return f"intercepted-{next(_ids)}"


def _run_eagerly(app: Hedwig, topic: str, delivery: Delivery) -> None:
    """The publisher's own handler, then each other eager app's that is subscribed to ``topic``."""
    app._run_eagerly(delivery)
    others = [a for a in dict.fromkeys(_eager_apps) if a is not app]
    for other in others:
        if topic in other.subscribed_topics():
            other._run_eagerly(delivery)


@contextlib.contextmanager
def record_published(app: Hedwig | None = None, *, passthrough: bool = False) -> Iterator[Published]:
    """Record the publishes of ``app`` (or of every app) inside the block, keeping them in the process.

    A message is validated and encoded as for sending, so a bad publish raises here; then,
    unless ``passthrough`` (or inside ``published.passthrough()``), it is recorded and not sent.
    Publishes of an eager app run its handlers as usual and are recorded too.
    """
    published = Published(app, passthrough=passthrough)
    receiver = published._record
    if app is None:
        signals.after_publish.connect(receiver, weak=False)
    else:
        signals.after_publish.connect(receiver, sender=app, weak=False)
    with _lock:
        _recorders.append(published)
        _install()
    try:
        yield published
    finally:
        signals.after_publish.disconnect(receiver)
        with _lock:
            _recorders.remove(published)
            _install()


@contextlib.contextmanager
def eager(app: Hedwig, *apps: Hedwig) -> Iterator[Hedwig]:
    """Inside the block, the publishes of these apps run handlers inline; yields the first app.

    A message makes the full encode/decode round trip first, so schema errors surface; then it
    runs the publishing app's handler for its type and that of every other app given here
    (or eager in an enclosing block) subscribed to its topic. Handler exceptions propagate to
    the publisher. Nothing reaches a transport.
    """
    chosen = (app, *apps)
    before = [a.eager for a in chosen]
    with _lock:
        _eager_apps.extend(chosen)
        _install()
    for each in chosen:
        each.eager = True  # the strictest encoding (text only), as eager runs take
    try:
        yield app
    finally:
        for each, was in zip(reversed(chosen), reversed(before), strict=True):
            each.eager = was
        with _lock:
            for each in chosen:
                _eager_apps.remove(each)
            _install()


def reset_memory_buses() -> None:
    """Empty every named in-process bus (``memory://NAME``) in place; see :mod:`~hedwig_tasks.transports.memory`."""
    reset_named_buses()
