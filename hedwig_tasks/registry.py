"""Which handler takes which messages: ``(type, major) -> Handler``, and version patterns."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from hedwig_tasks.exceptions import ConfigurationError, HandlerNotFound

if TYPE_CHECKING:
    from hedwig_tasks.handler import Handler

__all__ = ["Registry", "parse_majors"]

_PATTERN_RE = re.compile(r"^\s*(\d+)(?:\.\*)?\s*$")


def parse_majors(pattern: Any) -> tuple[int, ...]:
    """The majors a version pattern names: ``"1.*"``, ``1``, or several (``["1.*", "2.*"]``).

    Raises :class:`ConfigurationError` for anything else, such as ``"1.2"`` (a handler takes
    every minor of a major: minors only add fields).
    """
    items = [pattern] if isinstance(pattern, (str, int)) else list(pattern)
    majors = []
    for item in items:
        match = _PATTERN_RE.match(str(item)) if not isinstance(item, bool) else None
        if match is None:
            raise ConfigurationError(
                f"version pattern {item!r}: expected a major version such as '1.*' or 1 "
                "(a handler takes every minor of its major)"
            )
        majors.append(int(match.group(1)))
    if not majors or len(set(majors)) != len(majors):
        raise ConfigurationError(f"version pattern {pattern!r}: name each major once")
    return tuple(majors)


class Registry:
    """Handlers by ``(type, major)``. Registering twice is an error, never a silent override."""

    def __init__(self) -> None:
        self._handlers: dict[tuple[str, int], Handler] = {}

    def add(self, handler: Handler) -> None:
        """Register ``handler`` for each of its majors; :class:`ConfigurationError` on a clash."""
        for major in handler.majors:
            existing = self._handlers.get((handler.message_type, major))
            if existing is not None:
                raise ConfigurationError(
                    f"{handler.message_type!r} major {major} already has a handler: "
                    f"{existing.name}; cannot also register {handler.name}"
                )
        for major in handler.majors:
            self._handlers[(handler.message_type, major)] = handler

    def lookup(self, message_type: str, major: int) -> Handler:
        """The handler for a type and major; :class:`HandlerNotFound` if there is none."""
        try:
            return self._handlers[(message_type, major)]
        except KeyError:
            raise HandlerNotFound(f"no handler for {message_type!r} major {major}") from None

    def keys(self) -> Iterable[tuple[str, int]]:
        return self._handlers.keys()

    def __iter__(self) -> Iterator[Handler]:
        seen: dict[int, Handler] = {id(h): h for h in self._handlers.values()}
        return iter(seen.values())

    def __len__(self) -> int:
        return len(self._handlers)
