"""The Redis transport's publishing: one kept connection per thread, each ``XADD`` written and its
reply read on it directly, and a batch's ``XADD``s written at once and their replies read in order.

redis-py's client takes a connection from its pool for every command, polls it for stray data,
wraps the call in its retry and observability layers and packs the command in pure Python: about
three times the client work of writing the command and reading the reply. A publisher does one
thing over and over, so it keeps a connection per thread (no pool, no lock, no poll) and packs
``XADD`` itself. A kept connection that the server closed meanwhile (a restart, a ``timeout``
in redis.conf) fails on its next use: that one call is sent once more on a new connection, so
a restart costs no publish (and, as everywhere in Redis, a reply lost with its connection can
mean the entry went in twice: delivery is at least once). See ``redis.py`` for the design.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import redis.exceptions

from hedwig_tasks.transports._redis_client import RedisLink

__all__ = ["Publisher", "pack"]

_XADD = b"$4\r\nXADD\r\n"
_AUTO_ID = b"$1\r\n*\r\n"


def pack(key: bytes, fields: Mapping[str, bytes]) -> bytes:
    """``XADD key * field value ...`` in RESP, the way redis-py would pack it."""
    parts = [b"*%d\r\n" % (3 + 2 * len(fields)), _XADD, b"$%d\r\n%b\r\n" % (len(key), key), _AUTO_ID]
    for name, value in fields.items():
        raw = name.encode()
        parts.append(b"$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(raw), raw, len(value), value))
    return b"".join(parts)


class Publisher:
    """``XADD``s on a connection of each thread's own, made from the link's pool settings (so
    TLS, password and database are the client's). Raises redis-py's errors: the transport's
    boundary maps them."""

    def __init__(self, link: RedisLink) -> None:
        self._link = link
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: weakref.WeakSet[Any] = weakref.WeakSet()  # a finished thread's goes with it

    def xadd(self, key: str, fields: Mapping[str, bytes]) -> bytes:
        """One ``XADD``, one round trip; returns the entry id."""
        replies: list[bytes] = self._round_trip(pack(key.encode(), fields), 1)
        return replies[0]

    def xadd_many(self, key: str, entries: Sequence[Mapping[str, bytes]]) -> list[bytes]:
        """Every ``XADD`` written at once, then every reply read; the entry ids in order."""
        raw = key.encode()
        replies: list[bytes] = self._round_trip(b"".join([pack(raw, fields) for fields in entries]), len(entries))
        return replies

    def close(self) -> None:
        """Disconnect every thread's connection; a thread's next publish connects again."""
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.disconnect()

    def _round_trip(self, packed: bytes, count: int) -> list[Any]:
        connection = self._connection()
        kept = connection._sock is not None  # is_connected, which redis-py 5.0 lacks
        try:
            return _exchange(connection, packed, count)
        except redis.exceptions.ConnectionError:
            if not kept:
                raise
        # The kept connection was closed by the server (redis-py disconnected it): once more, anew.
        return _exchange(connection, packed, count)

    def _connection(self) -> Any:
        """This thread's connection (a forked child makes its own); connecting is left to the send."""
        local = self._local
        connection = getattr(local, "connection", None)
        if connection is None or local.pid != os.getpid():
            pool = self._link.client.connection_pool
            connection = pool.connection_class(**pool.connection_kwargs)
            local.connection, local.pid = connection, os.getpid()
            with self._lock:
                self._connections.add(connection)
        return connection


def _exchange(connection: Any, packed: bytes, count: int) -> list[Any]:
    """Write ``packed`` and read ``count`` replies; an error reply is raised once all are read, so
    the connection stays in step. Anything else disconnects: a reply may be left unread."""
    replies: list[Any] = []
    refused: redis.exceptions.ResponseError | None = None
    try:
        connection.send_packed_command([packed], check_health=False)
        for _ in range(count):
            try:
                replies.append(connection.read_response())
            except redis.exceptions.ResponseError as exc:
                refused = refused or exc
    except BaseException:
        connection.disconnect()
        raise
    if refused is not None:
        raise refused
    return replies
