"""The RabbitMQ server the Kombu tests use (and the Redis one other tests ask for by name), and
cleaning up after a test.

``HEDWIG_TEST_AMQP_URL`` and ``HEDWIG_TEST_REDIS_URL`` (exported by ``.ci/servers/``) name
them; outside CI they default to the machine's own servers. Under CI (``CI=true``) a server
that does not answer fails the test; elsewhere the test is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterable, Iterator
from urllib.parse import urlsplit

import pytest

from hedwig_tasks.testing.contract import Names
from hedwig_tasks.transports._kombu_names import publish_delay_queue_name
from hedwig_tasks.transports.kombu import (
    DELAY_BUCKETS_S,
    KombuTransport,
    delay_queue_name,
    dlq_name,
    exchange_name,
    subscription_name,
)

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/9"


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), 1.0).close()
    except OSError:
        return False
    return True


def server_url(broker: str) -> str:
    """The URL of ``broker`` ("amqp" or "redis"): fails under CI, skips elsewhere, when it is down."""
    default = DEFAULT_AMQP_URL if broker == "amqp" else DEFAULT_REDIS_URL
    url = os.environ.get(f"HEDWIG_TEST_{broker.upper()}_URL", default)
    if not _answers(url):
        message = f"{broker} server {url} does not answer"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return url


def cleanup(url: str, queues: Iterable[str], topics: Iterable[str]) -> None:
    """Delete what tests with these app and topic names may have declared on RabbitMQ."""
    queues, topics = list(queues), list(topics)
    subscriptions = [subscription_name(q, t) for q in queues for t in topics]
    import amqp.exceptions
    import kombu

    with kombu.Connection(url) as connection:
        channel = connection.channel()
        names = [*subscriptions, *map(dlq_name, queues)]
        names += [delay_queue_name(s, b) for s in subscriptions for b in DELAY_BUCKETS_S]
        names += [publish_delay_queue_name(t, b) for t in topics for b in DELAY_BUCKETS_S]
        for name in names:
            channel.queue_delete(name)
        for topic in topics:
            with contextlib.suppress(amqp.exceptions.NotFound):  # a missing exchange closes the channel
                channel.exchange_delete(exchange_name(topic))
                continue
            channel = connection.channel()


@contextlib.contextmanager
def fresh_bus() -> Iterator[tuple[KombuTransport, Names]]:
    """A transport on the test broker, with a queue and a topic of the test's own, deleted after."""
    url = server_url("amqp")
    names = Names.fresh()
    bus = KombuTransport(url)
    bus.provision(names.queue, [names.topic], [])
    try:
        yield bus, names
    finally:
        bus.close()
        cleanup(url, [names.queue], [names.topic])
