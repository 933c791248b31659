"""A state store of the test's own on each kind of store (an SQLite file, a Redis key prefix in
database 9, a PostgreSQL schema), for the tests of what the worker keeps in the store."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import redis
from postgres_server import own_schema
from redis_server import redis_url

#: The kinds of store a test runs on, for ``@pytest.fixture(params=STORES)``.
STORES = ["sqlite", "redis", "postgres"]


def delete_prefix(url: str, prefix: str) -> None:
    """Delete the Redis keys under ``prefix`` (the server is shared: never flushed)."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def redis_prefix() -> str:
    return f"hedwig-test:{uuid.uuid4().hex[:10]}:"


@contextlib.contextmanager
def own_store(kind: str, folder: Path) -> Iterator[str]:
    """The URL of a store of this test's own, cleaned up afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{folder}/state.db"
    elif kind == "redis":
        prefix = redis_prefix()
        yield f"{redis_url()}?prefix={prefix}"
        delete_prefix(redis_url(), prefix)
    else:
        with own_schema() as (url, schema):
            yield f"{url}?schema={schema}"
