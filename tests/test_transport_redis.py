"""The Redis Streams transport on the machine's Redis (db 9): the shared contract, and what only
Redis shows (layout, trimming, options)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis_server import cleanup, redis_url

from hedwig_tasks.testing.contract import ContractClock, Names, RealClock, TransportContract
from hedwig_tasks.transports.redis import RedisTransport


class TestRedisTransport(TransportContract):
    """Redis keeps the time (idle times, due retries): leases are short and the clock real."""

    lease_s = 1.0
    quiet_s = 0.3
    deliver_timeout_s = 10.0

    @pytest.fixture
    def clock(self) -> ContractClock:
        return RealClock()

    @pytest.fixture
    def url(self) -> str:
        return redis_url()

    @pytest.fixture
    def names(self, url: str) -> Iterator[Names]:
        names = Names.fresh()
        yield names
        cleanup(url, [names.queue, names.other_queue, names.third_queue], [names.topic, names.other_topic])

    @pytest.fixture
    def transport(self, url: str) -> Iterator[RedisTransport]:
        bus = RedisTransport(url, lease_s=self.lease_s)
        yield bus
        bus.close()
