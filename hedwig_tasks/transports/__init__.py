"""Transports, chosen by URL and imported only when used, so an unused SDK is never loaded."""

from __future__ import annotations

import difflib
import importlib
from urllib.parse import urlsplit

from hedwig_tasks.exceptions import ConfigurationError
from hedwig_tasks.transports.base import Transport

__all__ = ["DEFAULT_URL", "TRANSPORT_ALIASES", "from_url", "transport_class"]

#: The transport used when none is configured: the embedded bus under the working directory.
DEFAULT_URL = "sqlite:///.hedwig/bus.db"

#: URL scheme -> ``"module:Class"`` and the extra that installs its SDK.
TRANSPORT_ALIASES: dict[str, tuple[str, str | None]] = {
    "memory": ("hedwig_tasks.transports.memory:MemoryTransport", None),
    "sqlite": ("hedwig_tasks.transports.sqlite:SQLiteTransport", None),
    "aws": ("hedwig_tasks.transports.aws:AWSTransport", "aws"),
    "gcp": ("hedwig_tasks.transports.gcp:GooglePubSubTransport", "gcp"),
    "amqp": ("hedwig_tasks.transports.kombu:KombuTransport", "kombu"),
    "redis": ("hedwig_tasks.transports.redis:RedisTransport", "redis"),
    "amqps": ("hedwig_tasks.transports.kombu:KombuTransport", "kombu"),
    "pyamqp": ("hedwig_tasks.transports.kombu:KombuTransport", "kombu"),
    "rediss": ("hedwig_tasks.transports.redis:RedisTransport", "redis"),
}


def transport_class(scheme: str, *, url: str | None = None) -> type[Transport]:
    """The transport class of a URL scheme, imported now.

    Raises :class:`ConfigurationError` for an unknown scheme (suggesting the nearest) or a
    missing SDK (naming the extra to install).
    """
    if scheme not in TRANSPORT_ALIASES:
        close = difflib.get_close_matches(scheme, TRANSPORT_ALIASES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        known = ", ".join(sorted(TRANSPORT_ALIASES))
        raise ConfigurationError(f"unknown transport {scheme!r} in {url or scheme!r} (known: {known}){hint}")
    target, extra = TRANSPORT_ALIASES[scheme]
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if extra is None or exc.name is None or exc.name.startswith("hedwig_tasks"):
            raise
        raise ConfigurationError(
            f"the {scheme!r} transport needs {exc.name!r}: pip install 'hedwig-tasks[{extra}]'"
        ) from exc
    cls: type[Transport] = getattr(module, class_name)
    return cls


def from_url(url: str) -> Transport:
    """Build the transport a URL names; :class:`ConfigurationError` for a bad scheme or option."""
    return transport_class(urlsplit(url).scheme, url=url).from_url(url)
