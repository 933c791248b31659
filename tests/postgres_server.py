"""The PostgreSQL server the state store's tests use, and a schema of the test's own.

``HEDWIG_TEST_POSTGRES_URL`` (exported by ``.ci/servers/postgres.sh``) names it; outside CI it
defaults to the machine's own server, database ``test``. Under CI (``CI=true``) a server that
does not answer fails the test; elsewhere the test is skipped with the reason. The server is
shared: a test makes a schema of its own and drops only that one.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), 1.0).close()
    except OSError:
        return False
    return True


def postgres_url() -> str:
    """The test server's URL: fails under CI, skips elsewhere, when it does not answer."""
    url = os.environ.get("HEDWIG_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    if not _answers(url):
        message = f"postgresql server {url} does not answer"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return url


@contextlib.contextmanager
def own_schema() -> Iterator[tuple[str, str]]:
    """``(url, schema)``: a fresh schema name the store will make; dropped (only it) afterwards."""
    import psycopg

    url = postgres_url()
    schema = f"hedwig_test_{uuid.uuid4().hex[:10]}"
    try:
        yield url, schema
    finally:
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
