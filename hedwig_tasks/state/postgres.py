"""The PostgreSQL state store.

Why psycopg: it is PostgreSQL's standard Python driver (psycopg 3, binary wheels with libpq
inside, ``pip install 'hedwig-tasks[postgres]'``). Speaking the wire protocol ourselves
(authentication methods, TLS, the extended query protocol, type parsing) would be a driver of
our own to keep correct for no gain, and every service that runs PostgreSQL has psycopg already.

Features
    Every operation of the contract in one SQL statement (``INSERT ... ON CONFLICT``, a
    conditional ``UPDATE`` or ``DELETE ... RETURNING``), so it is atomic under any number of
    clients. Tables and schema are made on first use (``IF NOT EXISTS``, under an advisory lock).
    Expired rows are swept from a write at most every ``sweep_every_s``.

Connection string
    ``postgresql://user[:password]@host:5432/dbname`` (or ``postgres://``); libpq's own query
    options pass through (``sslmode``, ``connect_timeout``, ``application_name``, ...).

Options (query string)
    ``schema`` (default ``public``), ``table`` (the tables' name prefix; default ``hedwig_state``).

Time
    The server's: every expiry is measured on ``now()``, the time the statement's transaction
    began, so clients whose clocks disagree still agree on every expiry.
"""

# ruff: noqa: S608 - the only text put into SQL is a schema and table name, checked by check_identifier
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import psycopg
import psycopg.errors

from hedwig_tasks.exceptions import ConfigurationError, StateError
from hedwig_tasks.state.base import Lease, Member, StateStore, check_bucket, check_ttl, encode_data
from hedwig_tasks.state.sqlite import DEFAULT_SWEEP_EVERY_S, DEFAULT_TABLE, check_identifier
from hedwig_tasks.transports._redis_client import mask
from hedwig_tasks.transports._url import Option, read_options, text

__all__ = ["DEFAULT_SCHEMA", "PostgresStore"]

#: The schema the tables are made in.
DEFAULT_SCHEMA = "public"
#: Seconds connecting may take, unless the URL's ``connect_timeout`` says otherwise.
DEFAULT_CONNECT_TIMEOUT_S = 5

_OPTIONS: dict[str, Option] = {"schema": text, "table": text}
_NOW = "EXTRACT(EPOCH FROM now())::float8"
_LIVE = f"(expires_at IS NULL OR expires_at > {_NOW})"


def _schema_sql(s: str, t: str) -> list[str]:
    return [
        f'CREATE SCHEMA IF NOT EXISTS "{s}"',
        f'CREATE TABLE IF NOT EXISTS "{s}"."{t}_keys" (key text PRIMARY KEY, value text NOT NULL, expires_at float8)',
        f'CREATE TABLE IF NOT EXISTS "{s}"."{t}_buckets" (key text PRIMARY KEY, tokens float8 NOT NULL, '
        "updated_at float8 NOT NULL, expires_at float8 NOT NULL)",
        f'CREATE TABLE IF NOT EXISTS "{s}"."{t}_members" (grp text NOT NULL, member text NOT NULL, data text NOT NULL, '
        "seen float8 NOT NULL, expires_at float8 NOT NULL, PRIMARY KEY (grp, member))",
    ]


def _statements(s: str, t: str) -> dict[str, str]:
    keys, buckets, members = f'"{s}"."{t}_keys"', f'"{s}"."{t}_buckets"', f'"{s}"."{t}_members"'
    upsert = f"INSERT INTO {keys} AS t (key, value, expires_at) VALUES (%(k)s, %(v)s, {_NOW} + %(ttl)s::float8) "
    held = (
        "LEAST(%(burst)s::float8, CASE WHEN b.expires_at <= excluded.updated_at THEN %(burst)s::float8 "
        "ELSE b.tokens + GREATEST(0, excluded.updated_at - b.updated_at) * %(rate)s::float8 END)"
    )
    return {
        "acquire": upsert + "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at "
        f"WHERE t.value = excluded.value OR t.expires_at <= {_NOW} RETURNING 1",
        "renew": f"UPDATE {keys} SET expires_at = {_NOW} + %(ttl)s::float8 "
        f"WHERE key = %(k)s AND value = %(v)s AND {_LIVE} RETURNING 1",
        "release": f"DELETE FROM {keys} WHERE key = %(k)s AND value = %(v)s AND {_LIVE} RETURNING 1",
        "holder": f"SELECT value, expires_at FROM {keys} WHERE key = %(k)s AND {_LIVE}",
        "get": f"SELECT value FROM {keys} WHERE key = %(k)s AND {_LIVE}",
        "put": upsert + "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
        "delete": f"DELETE FROM {keys} WHERE key = %(k)s RETURNING {_LIVE}",
        "insert_if_absent": upsert
        + "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at "
        f"WHERE t.expires_at <= {_NOW} RETURNING 1",
        "replace_if": f"UPDATE {keys} SET value = %(v)s, expires_at = {_NOW} + %(ttl)s::float8 "
        f"WHERE key = %(k)s AND value = %(e)s AND {_LIVE} RETURNING 1",
        "incr": upsert + "ON CONFLICT (key) DO UPDATE SET "
        f"value = CASE WHEN t.expires_at <= {_NOW} THEN excluded.value "
        "ELSE (t.value::bigint + %(a)s::bigint)::text END, "
        f"expires_at = CASE WHEN t.expires_at <= {_NOW} THEN excluded.expires_at "
        "ELSE COALESCE(t.expires_at, excluded.expires_at) END RETURNING value::bigint",
        "take": f"INSERT INTO {buckets} AS b (key, tokens, updated_at, expires_at) "
        f"VALUES (%(k)s, %(burst)s::float8 - %(want)s::float8, {_NOW}, "
        f"{_NOW} + %(want)s::float8 / %(rate)s::float8 + 1) "
        f"ON CONFLICT (key) DO UPDATE SET tokens = {held} - %(want)s::float8, updated_at = excluded.updated_at, "
        f"expires_at = excluded.updated_at + (%(burst)s::float8 - {held} + %(want)s::float8) / %(rate)s::float8 + 1 "
        f"WHERE {held} >= %(want)s::float8 RETURNING 1",
        "held": f"SELECT {held.replace('excluded.updated_at', _NOW)} FROM {buckets} AS b WHERE key = %(k)s",
        "heartbeat": f"INSERT INTO {members} (grp, member, data, seen, expires_at) "
        f"VALUES (%(g)s, %(m)s, %(d)s, {_NOW}, {_NOW} + %(ttl)s::float8) "
        "ON CONFLICT (grp, member) DO UPDATE SET data = excluded.data, seen = excluded.seen, "
        "expires_at = excluded.expires_at",
        "members": f"WITH gone AS (DELETE FROM {members} WHERE grp = %(g)s AND expires_at <= {_NOW}) "
        f"SELECT member, data, seen, expires_at FROM {members} WHERE grp = %(g)s AND expires_at > {_NOW} "
        "ORDER BY member",
        "forget": f"DELETE FROM {members} WHERE grp = %(g)s AND member = %(m)s RETURNING expires_at > {_NOW}",
        "now": f"SELECT {_NOW}",
        "sweep": f"WITH a AS (DELETE FROM {keys} WHERE expires_at <= {_NOW} RETURNING 1), "
        f"b AS (DELETE FROM {buckets} WHERE expires_at <= {_NOW} RETURNING 1), "
        f"c AS (DELETE FROM {members} WHERE expires_at <= {_NOW} RETURNING 1) "
        "SELECT (SELECT count(*) FROM a) + (SELECT count(*) FROM b) + (SELECT count(*) FROM c)",
    }


class PostgresStore(StateStore):
    """The contract on PostgreSQL tables; one connection per process, shared by its threads under a lock."""

    schemes = ("postgresql", "postgres")

    def __init__(
        self,
        url: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        table: str = DEFAULT_TABLE,
        sweep_every_s: float = DEFAULT_SWEEP_EVERY_S,
    ) -> None:
        if urlsplit(url).scheme not in self.schemes:
            raise ConfigurationError(f"expected postgresql://user@host:5432/dbname, got {mask(url)!r}")
        self.url = url
        self.schema = check_identifier(schema, "schema")
        self.table = check_identifier(table)
        self.sweep_every_s = sweep_every_s
        self._sql = _statements(self.schema, self.table)
        self._lock = threading.Lock()
        self._connection: psycopg.Connection[Any] | None = None
        self._pid = 0
        self._swept_at = time.monotonic()

    @classmethod
    def from_url(cls, url: str) -> PostgresStore:
        """``postgresql://user@host/db?schema=...&table=...``; other query options go to libpq."""
        parts = urlsplit(url)
        options, others = read_options(parts.scheme, parts.query, _OPTIONS, pass_on=True)
        if not any(name == "connect_timeout" for name, _ in others):
            others.append(("connect_timeout", str(DEFAULT_CONNECT_TIMEOUT_S)))
        return cls(
            urlunsplit(parts._replace(query=urlencode(others))),
            schema=options.get("schema", DEFAULT_SCHEMA),
            table=options.get("table", DEFAULT_TABLE),
        )

    def __repr__(self) -> str:
        return f"<PostgresStore {mask(self.url)!r} table={self.schema}.{self.table}>"

    # -- the boundary -----------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        if self._connection is not None and self._pid == os.getpid() and not self._connection.closed:
            return self._connection
        connection = psycopg.connect(self.url, autocommit=True)
        with connection.transaction():  # two first users at once must not both create a table
            connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{self.schema}.{self.table}",))
            for statement in _schema_sql(self.schema, self.table):
                connection.execute(statement)  # identifiers checked
        self._connection, self._pid = connection, os.getpid()  # a parent's connection is left alone
        return connection

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[psycopg.Cursor[Any]]:
        with self._lock:
            try:
                connection = self._connect()
                with connection.cursor() as cursor:
                    yield cursor
            except psycopg.errors.InvalidTextRepresentation as exc:
                raise StateError(f"the key holds something that is not a count: use another name ({exc})") from exc
            except psycopg.Error as exc:
                if self._connection is not None and self._connection.broken:
                    self._connection = None  # reconnect on the next call
                raise StateError(f"state store {mask(self.url)}: {exc}") from exc

    def _one(self, name: str, **params: Any) -> tuple[Any, ...] | None:
        with self._cursor() as cursor:
            cursor.execute(self._sql[name], params)
            row: tuple[Any, ...] | None = cursor.fetchone() if cursor.description is not None else None
        return row

    def _write(self, name: str, **params: Any) -> tuple[Any, ...] | None:
        row = self._one(name, **params)
        if time.monotonic() - self._swept_at >= self.sweep_every_s:
            self.sweep()
        return row

    def sweep(self) -> int:
        """Delete expired rows now; returns how many."""
        self._swept_at = time.monotonic()
        row = self._one("sweep")
        return int(row[0]) if row else 0

    def now(self) -> float:
        row = self._one("now")
        assert row is not None
        return float(row[0])

    def close(self) -> None:
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None and self._pid == os.getpid():
            connection.close()

    # -- leases -----------------------------------------------------------------------------

    def acquire(self, name: str, owner: str, *, ttl_s: float) -> bool:
        check_ttl(ttl_s)
        return self._write("acquire", k=name, v=owner, ttl=ttl_s) is not None

    def renew(self, name: str, owner: str, *, ttl_s: float) -> bool:
        check_ttl(ttl_s)
        return self._one("renew", k=name, v=owner, ttl=ttl_s) is not None

    def release(self, name: str, owner: str) -> bool:
        return self._one("release", k=name, v=owner) is not None

    def holder(self, name: str) -> Lease | None:
        row = self._one("holder", k=name)
        if row is None:
            return None
        return Lease(name, row[0], float("inf") if row[1] is None else float(row[1]))

    # -- keys -------------------------------------------------------------------------------

    def set_if_absent(self, key: str, value: str, *, ttl_s: float | None = None) -> bool:
        return self.compare_and_set(key, None, value, ttl_s=ttl_s)

    def get(self, key: str) -> str | None:
        row = self._one("get", k=key)
        return None if row is None else str(row[0])

    def put(self, key: str, value: str, *, ttl_s: float | None = None) -> None:
        check_ttl(ttl_s, optional=True)
        self._write("put", k=key, v=value, ttl=ttl_s)

    def delete(self, key: str) -> bool:
        row = self._one("delete", k=key)
        return row is not None and bool(row[0])

    def compare_and_set(self, key: str, expected: str | None, value: str, *, ttl_s: float | None = None) -> bool:
        check_ttl(ttl_s, optional=True)
        if expected is None:
            return self._write("insert_if_absent", k=key, v=value, ttl=ttl_s) is not None
        return self._one("replace_if", k=key, v=value, e=expected, ttl=ttl_s) is not None

    # -- counters and buckets ---------------------------------------------------------------

    def incr(self, key: str, amount: int = 1, *, window_s: float) -> int:
        check_ttl(window_s, "window_s")
        row = self._write("incr", k=key, v=str(int(amount)), a=int(amount), ttl=window_s)
        assert row is not None
        return int(row[0])

    def take(self, bucket: str, *, rate_per_s: float, burst: float, tokens: float = 1.0) -> float:
        check_bucket(rate_per_s, burst, tokens)
        params = {"k": bucket, "rate": float(rate_per_s), "burst": float(burst), "want": float(tokens)}
        if self._write("take", **params) is not None:
            return 0.0
        row = self._one("held", **params)
        held = float(burst) if row is None else float(row[0])
        return max(0.0, tokens - held) / rate_per_s or 1e-6  # refused: never 0.0

    # -- heartbeats -------------------------------------------------------------------------

    def heartbeat(self, group: str, member: str, data: Mapping[str, Any], *, ttl_s: float) -> None:
        check_ttl(ttl_s)
        self._write("heartbeat", g=group, m=member, d=encode_data(data), ttl=ttl_s)

    def members(self, group: str) -> list[Member]:
        with self._cursor() as cursor:
            rows = cursor.execute(self._sql["members"], {"g": group}).fetchall()
        return [Member(group, m, json.loads(d), float(seen), float(expires)) for m, d, seen, expires in rows]

    def forget(self, group: str, member: str) -> bool:
        row = self._one("forget", g=group, m=member)
        return row is not None and bool(row[0])
