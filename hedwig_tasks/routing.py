"""Which topic a message goes to: ``(type, major) -> topic``.

Keys of the override map may be a type (every major), ``(type, major)`` or Hedwig's
``(type, "1.*")``. A value is a topic name, or ``(topic, account_or_project)`` for a topic
owned by another AWS account or Google project. Without an override the topic is
``"<type>-v<major>"``; pass ``default=None`` for Hedwig's strict behaviour, where every
published type must be routed explicitly.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from hedwig_tasks.exceptions import ConfigurationError, RoutingError

__all__ = ["DEFAULT_TOPIC", "Route", "Router"]

#: The topic naming used when no override matches; ``{type}`` and ``{major}`` are filled in.
DEFAULT_TOPIC = "{type}-v{major}"

_PATTERN_RE = re.compile(r"^(\d+)\.\*$")


@dataclasses.dataclass(frozen=True)
class Route:
    """Where a message goes: a topic name, and the account or project that owns it if not ours."""

    topic: str
    owner: str | None = None


def _parse_key(key: Any) -> tuple[str, int | None]:
    if isinstance(key, str):
        return key, None
    if isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str):
        message_type, major = key
        if isinstance(major, int) and not isinstance(major, bool):
            return message_type, major
        match = _PATTERN_RE.match(str(major))
        if match:
            return message_type, int(match.group(1))
    raise ConfigurationError(f"routing key {key!r}: expected a type, (type, major) or (type, '1.*')")


def _parse_value(key: Any, value: Any) -> Route:
    if isinstance(value, str) and value:
        return Route(value)
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, str) and v for v in value):
        return Route(value[0], value[1])
    raise ConfigurationError(
        f"routing for {key!r}: expected a topic name or (topic, account_or_project), got {value!r}"
    )


class Router:
    """Maps ``(type, major)`` to a :class:`Route`. Raises :class:`ConfigurationError` for a bad map."""

    def __init__(self, routes: Mapping[Any, Any] | None = None, *, default: str | None = DEFAULT_TOPIC) -> None:
        self._exact: dict[tuple[str, int], Route] = {}
        self._by_type: dict[str, Route] = {}
        for key, value in (routes or {}).items():
            message_type, major = _parse_key(key)
            route = _parse_value(key, value)
            if major is None:
                self._by_type[message_type] = route
            else:
                self._exact[(message_type, major)] = route
        self.default = default

    def route(self, message_type: str, major: int) -> Route:
        """The route for a type and major; :class:`RoutingError` naming the type if there is none."""
        route = self._exact.get((message_type, major)) or self._by_type.get(message_type)
        if route is not None:
            return route
        if self.default is None:
            raise RoutingError(
                f"no route for message type {message_type!r} major {major}: "
                f"add ({message_type!r}, '{major}.*') to the routing map"
            )
        return Route(self.default.format(type=message_type, major=major))

    def topic_for(self, message_type: str, major: int) -> str:
        return self.route(message_type, major).topic

    def explicit_keys(self) -> list[tuple[str, int | None]]:
        """Every (type, major) the map names; major is None for a whole-type entry."""
        return [*self._exact, *((t, None) for t in self._by_type)]
