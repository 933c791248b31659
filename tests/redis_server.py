"""The Redis server the Redis transport's tests use, and cleaning up after a test.

``HEDWIG_TEST_REDIS_URL`` (exported by ``.ci/servers/``) names it; outside CI it defaults to the
machine's own server, database 9. Under CI (``CI=true``) a server that does not answer fails the
test; elsewhere the test is skipped with the reason. The server is shared: tests delete only
the keys of their own names, never flush.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

import pytest
import redis

from hedwig_tasks.transports._redis_wire import delayed_key, dlq_key, publish_delayed_key, queue_key, stream_key

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/9"


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 1.0).close()
    except OSError:
        return False
    return True


def redis_url() -> str:
    """The test server's URL: fails under CI, skips elsewhere, when it does not answer."""
    url = os.environ.get("HEDWIG_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    if not _answers(url):
        message = f"redis server {url} does not answer"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return url


def keys_of(queues: Iterable[str], topics: Iterable[str]) -> list[str]:
    """Every key the transport makes for these apps and topics."""
    topics = list(topics)
    found = [stream_key(t) for t in topics] + [publish_delayed_key(t) for t in topics]
    for queue in queues:
        found += [queue_key(queue), dlq_key(queue), delayed_key(queue)]
    return found


def cleanup(url: str, queues: Iterable[str], topics: Iterable[str]) -> None:
    """Delete the keys of these apps and topics."""
    client = redis.Redis.from_url(url)
    try:
        client.delete(*keys_of(queues, topics))
    finally:
        client.close()
