"""A transport URL's query options, read the same way for every transport.

Each transport names its options with a converter (:func:`seconds`, :func:`count`,
:func:`text`, or its own ``str -> value`` that raises ``ValueError`` saying what it takes).
An unknown name or a refused value is a ``ConfigurationError`` naming the option, the value
and what it takes; a misspelt name gets a "did you mean".
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from hedwig_tasks.exceptions import ConfigurationError

__all__ = ["Option", "count", "read_options", "seconds", "text"]

#: Turns an option's text into its value; raises ``ValueError`` saying what it takes.
Option = Callable[[str], Any]


def seconds(value: str) -> float:
    """A positive, finite number of seconds."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (number > 0 and math.isfinite(number)):
        raise ValueError("must be a positive number of seconds")
    return number


def count(value: str) -> int:
    """A whole number, 1 or more."""
    if not value.isdigit() or int(value) < 1:
        raise ValueError("must be a whole number, 1 or more")
    return int(value)


def text(value: str) -> str:
    """Any text but the empty one."""
    if not value:
        raise ValueError("must not be empty")
    return value


def read_options(
    scheme: str, query: str, known: Mapping[str, Option], *, pass_on: bool = False
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """``(ours, others)``: the known options converted, and, with ``pass_on``, the rest in order.

    Without ``pass_on`` an unknown option raises; with it, unknown ones are returned for the
    driver (Kombu takes its own options from the same URL). The last of repeated names wins.
    """
    ours: dict[str, Any] = {}
    others: list[tuple[str, str]] = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        convert = known.get(name)
        if convert is None:
            if pass_on:
                others.append((name, value))
                continue
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigurationError(f"unknown {scheme} option {name!r}{hint} (known: {', '.join(sorted(known))})")
        try:
            ours[name] = convert(value)
        except ValueError as exc:
            raise ConfigurationError(f"{scheme} option {name}={value!r} {exc}") from None
    return ours, others
