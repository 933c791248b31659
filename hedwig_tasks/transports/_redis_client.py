"""The Redis transport's connection: :class:`RedisLink`, the one object the transport, its
consumers and its administration hold: where Redis is, the lease, the redis-py client (one pool,
made on first use in each process), the Lua scripts, and the boundary where redis-py's errors
become ours. See ``redis.py`` for the design."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.exceptions

from hedwig_tasks.exceptions import ConfigurationError, TransportError
from hedwig_tasks.transports import _redis_scripts as scripts
from hedwig_tasks.transports._boundary import boundary

__all__ = ["DRIVER_ERRORS", "RedisLink", "mask"]

#: How long a receive leases a delivery (the idle time after which others take it over), in seconds.
DEFAULT_LEASE_S = 30.0
#: Longest a receive blocks in one XREADGROUP before it looks after leases and retries, in seconds.
DEFAULT_BLOCK_S = 1.0
#: Seconds between trims of a stream by one process.
DEFAULT_TRIM_EVERY_S = 30.0
#: Seconds a reply may take past any block before the connection counts as broken.
DEFAULT_SOCKET_TIMEOUT_S = 10.0
#: Seconds connecting may take.
DEFAULT_CONNECT_TIMEOUT_S = 5.0

#: The driver errors that become ``TransportError`` at the boundary (:meth:`RedisLink.errors`).
DRIVER_ERRORS: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)

_SCRIPTS = {
    "ack": scripts.ACK,
    "extend": scripts.EXTEND,
    "release": scripts.RELEASE,
    "retry": scripts.RETRY,
    "move_due": scripts.MOVE_DUE,
    "add_delayed": scripts.ADD_DELAYED,
    "takeover": scripts.TAKEOVER,
    "dead_letter": scripts.DEAD_LETTER,
    "requeue": scripts.REQUEUE,
    "purge": scripts.PURGE,
    "trim": scripts.TRIM,
    "counts": scripts.COUNTS,
}


def mask(url: str) -> str:
    """``url`` with its password hidden."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":**@", 1)
    if netloc == parts.netloc:  # a password without a user: redis://:secret@host
        netloc = parts.netloc.replace(f"{parts.password}@", "**@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class RedisLink:
    """One Redis server (and database) as every part of the transport reaches it.

    The redis-py client and its pool are made on first use in each process (a forked worker
    makes its own) and are thread-safe; each call takes a connection from the pool for its round
    trip, so a receive blocking in XREADGROUP holds one while settling goes on on others.
    Raises ``ConfigurationError`` for a URL that is not ``redis://`` or ``rediss://``.
    """

    def __init__(
        self,
        url: str,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        block_s: float = DEFAULT_BLOCK_S,
        trim_every_s: float = DEFAULT_TRIM_EVERY_S,
        socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> None:
        if urlsplit(url).scheme not in ("redis", "rediss"):
            raise ConfigurationError(f"the redis transport speaks redis:// and rediss://, got {mask(url)!r}")
        for name, value in (("lease_s", lease_s), ("block_s", block_s), ("trim_every_s", trim_every_s)):
            if not value > 0:
                raise ConfigurationError(f"{name} must be positive, got {value!r}")
        self.url = url
        self.lease_s = lease_s
        self.block_s = block_s
        self.trim_every_s = trim_every_s
        self.socket_timeout_s = max(socket_timeout_s, block_s + 5.0)  # a block is no timeout
        self.connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._client: Any = None
        self._pid = 0
        self._scripts: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<RedisLink {mask(self.url)!r}>"

    @property
    def lease_ms(self) -> int:
        return max(1, round(self.lease_s * 1000))

    @property
    def client(self) -> redis.Redis:
        """This process's client (made now if need be; connecting is lazy)."""
        if self._client is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    self._client = redis.Redis.from_url(
                        self.url,
                        socket_timeout=self.socket_timeout_s,
                        socket_connect_timeout=self.connect_timeout_s,
                        decode_responses=False,
                    )
                    self._scripts = {name: self._client.register_script(src) for name, src in _SCRIPTS.items()}
                    self._pid = os.getpid()
        client: redis.Redis = self._client
        return client

    def script(self, name: str) -> Any:
        """The Lua script ``name`` (see ``_redis_scripts``), callable with keys, args and a client."""
        self.client  # noqa: B018 - registers the scripts
        return self._scripts[name]

    @contextlib.contextmanager
    def errors(self, doing: str, error: type[TransportError] = TransportError) -> Iterator[None]:
        """The boundary: a redis-py error becomes ``error`` naming what was being done; ours pass."""
        with boundary(f"{doing} on {mask(self.url)}", DRIVER_ERRORS, error=error):
            yield

    def failure(self, doing: str, exc: BaseException, error: type[TransportError] = TransportError) -> TransportError:
        """What :meth:`errors` raises for the driver's ``exc``, for a hot path that catches it itself."""
        return error(f"{doing} on {mask(self.url)} failed: {exc}")

    def close(self) -> None:
        """Drop this process's connections; the next call connects again."""
        with self._lock:
            client, self._client = self._client, None
            pid = self._pid
        if client is not None and pid == os.getpid():
            with contextlib.suppress(*DRIVER_ERRORS):
                client.close()
                client.connection_pool.disconnect()
