"""Transports, chosen by URL and imported only when used, so an unused SDK is never loaded."""

from __future__ import annotations

from urllib.parse import urlsplit

from hedwig_tasks._by_scheme import class_for_scheme
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
    cls: type[Transport] = class_for_scheme(TRANSPORT_ALIASES, scheme, kind="transport", url=url)
    return cls


def from_url(url: str) -> Transport:
    """Build the transport a URL names; :class:`ConfigurationError` for a bad scheme or option."""
    return transport_class(urlsplit(url).scheme, url=url).from_url(url)
