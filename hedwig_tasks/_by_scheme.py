"""Classes chosen by URL scheme and imported only when used: transports and state stores."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from typing import Any

from hedwig_tasks.exceptions import ConfigurationError

__all__ = ["class_for_scheme"]


def class_for_scheme(aliases: Mapping[str, tuple[str, str | None]], scheme: str, *, kind: str, url: str | None) -> Any:
    """The class ``aliases`` names for ``scheme`` (``"module:Class"``, extra), imported now.

    Raises :class:`ConfigurationError` for an unknown scheme (suggesting the nearest) or a missing
    driver (naming the extra that installs it). ``kind`` names what is chosen ("transport").
    """
    if scheme not in aliases:
        close = difflib.get_close_matches(scheme, aliases, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        known = ", ".join(sorted(aliases))
        what = f"{kind} {scheme!r}"
        raise ConfigurationError(f"unknown {what} in {url or scheme!r} (known: {known}){hint}")
    target, extra = aliases[scheme]
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if extra is None or exc.name is None or exc.name.startswith("hedwig_tasks"):
            raise
        raise ConfigurationError(
            f"the {scheme!r} {kind} needs {exc.name!r}: pip install 'hedwig-tasks[{extra}]'"
        ) from exc
    return getattr(module, class_name)
