"""Real worker processes, started through the CLI, on the Redis Streams transport: the worker contract.

The machine's Redis is shared (db 9): every test uses names of its own and deletes only their
keys (``redis_server.cleanup``). Redis restarts mid-run are in ``test_redis_faults.py``, on a
private redis-server.
"""

from __future__ import annotations

import functools

import pytest
from redis_server import cleanup, redis_url

from hedwig_tasks.testing import worker_contract
from hedwig_tasks.testing.worker_contract import WorkerContract

pytestmark = pytest.mark.slow


def redis_broker(url: str) -> worker_contract.Broker:
    return worker_contract.Broker(url, cleanup=functools.partial(cleanup, url))


class TestRedisWorkers(WorkerContract):
    # A killed worker's entries stay in the group's pending list and are taken over once idle for
    # the lease (1 s in the kill scenario), by the rescuer's next look after leases.
    redelivery_timeout_s = 30.0

    @pytest.fixture
    def broker(self) -> worker_contract.Broker:
        return redis_broker(redis_url())
