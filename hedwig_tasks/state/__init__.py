"""State stores, chosen by URL like transports and imported only when used.

=====================================  ==========================================================
``sqlite:///.hedwig/state.db``         the default: a file beside the SQLite bus (client clock)
``redis://host:6379/0?prefix=...``     Redis (server time); needs ``hedwig-tasks[redis]``
``postgresql://user@host/db?...``      PostgreSQL (server time); needs ``hedwig-tasks[postgres]``
=====================================  ==========================================================

:func:`default_url` derives the default from the app's transport URL: a bus at
``sqlite:///path/bus.db`` keeps its state at ``sqlite:///path/state.db``; any other transport
gets ``sqlite:///.hedwig/state.db`` (set ``HEDWIG_STATE_URL`` or ``Hedwig(state=...)`` for a
fleet on several machines: an SQLite file is shared only by the processes of one machine).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from urllib.parse import urlsplit

from hedwig_tasks._by_scheme import class_for_scheme
from hedwig_tasks.exceptions import ConfigurationError
from hedwig_tasks.state.base import Lease, Member, StateStore

__all__ = ["DEFAULT_URL", "STORE_ALIASES", "Lease", "Member", "StateStore", "default_url", "from_url", "store_class"]

#: The store used when none is configured and the transport is not an SQLite bus.
DEFAULT_URL = "sqlite:///.hedwig/state.db"

#: URL scheme -> ``"module:Class"`` and the extra that installs its driver.
STORE_ALIASES: dict[str, tuple[str, str | None]] = {
    "sqlite": ("hedwig_tasks.state.sqlite:SQLiteStore", None),
    "redis": ("hedwig_tasks.state.redis:RedisStore", "redis"),
    "rediss": ("hedwig_tasks.state.redis:RedisStore", "redis"),
    "postgresql": ("hedwig_tasks.state.postgres:PostgresStore", "postgres"),
    "postgres": ("hedwig_tasks.state.postgres:PostgresStore", "postgres"),
}


def store_class(scheme: str, *, url: str | None = None) -> type[StateStore]:
    """The store class of a URL scheme, imported now.

    Raises :class:`ConfigurationError` for an unknown scheme (suggesting the nearest) or a
    missing driver (naming the extra to install).
    """
    cls: type[StateStore] = class_for_scheme(STORE_ALIASES, scheme, kind="state store", url=url)
    return cls


def from_url(url: str, *, clock: Callable[[], float] | None = None) -> StateStore:
    """Build the store a URL names; :class:`ConfigurationError` for a bad scheme or option.

    ``clock`` (epoch seconds) is used by a store that keeps time on the client (SQLite); a
    store whose server keeps the time (Redis, PostgreSQL) refuses one.
    """
    cls = store_class(urlsplit(url).scheme, url=url)
    if clock is None:
        return cls.from_url(url)
    from hedwig_tasks.state.sqlite import SQLiteStore

    if not issubclass(cls, SQLiteStore):
        raise ConfigurationError(f"{cls.__name__} keeps time on its server: it takes no injected clock")
    return cls.from_url(url, clock=clock)


def default_url(transport_url: str | None) -> str:
    """The state store beside a transport: the SQLite bus's folder, else ``DEFAULT_URL``."""
    if not transport_url:
        return DEFAULT_URL
    from hedwig_tasks.state.sqlite import SQLiteStore  # the bus and its store share the scheme

    parts = urlsplit(transport_url)
    in_memory = parts.path[1:] == ":memory:"
    if parts.scheme not in SQLiteStore.schemes or not parts.path[1:] or in_memory:
        return DEFAULT_URL
    folder = posixpath.dirname(parts.path[1:])
    return f"sqlite:///{posixpath.join(folder, 'state.db')}"
