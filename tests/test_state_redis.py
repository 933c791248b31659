"""The Redis state store on the machine's Redis (db 9): the shared contract on the server's time,
and what only Redis shows. Every test has a key prefix of its own and deletes only its keys."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from redis_server import redis_url
from state_stores import delete_prefix

from hedwig_tasks.exceptions import StateError
from hedwig_tasks.state import from_url
from hedwig_tasks.state.redis import RedisStore
from hedwig_tasks.testing.contract import ContractClock, RealClock
from hedwig_tasks.testing.state_contract import StateContract


@pytest.fixture
def prefix() -> Iterator[str]:
    prefix = f"hedwig-test:{uuid.uuid4().hex[:10]}:"
    yield prefix
    delete_prefix(redis_url(), prefix)


class TestRedisStore(StateContract):
    """Redis keeps the time: TTLs are short and the clock real."""

    ttl_s = 0.4
    time_slack_s = 1.0

    @pytest.fixture
    def clock(self) -> ContractClock:
        return RealClock()

    @pytest.fixture
    def store(self, prefix: str) -> Iterator[RedisStore]:
        with RedisStore(redis_url(), prefix=prefix) as store:
            yield store

    @pytest.fixture
    def other_store(self, prefix: str) -> Iterator[RedisStore]:
        with RedisStore(redis_url(), prefix=prefix) as store:
            yield store


# -- what only Redis shows --------------------------------------------------------------------


def test_keys_live_under_the_prefix_and_expire_on_the_server(prefix: str) -> None:
    url = redis_url()
    store = from_url(f"{url}?prefix={prefix}&socket_keepalive=true")
    assert isinstance(store, RedisStore) and store.prefix == prefix
    store.put("k", "v", ttl_s=60)
    store.acquire("lease", "me", ttl_s=60)
    store.take("bucket", rate_per_s=1, burst=5)
    store.heartbeat("workers", "w1", {"pid": 1}, ttl_s=60)
    client = redis.Redis.from_url(url)
    try:
        keys = sorted(k.decode() for k in client.scan_iter(match=f"{prefix}*"))
        assert keys == [f"{prefix}{k}" for k in ("b:bucket", "k:k", "k:lease", "m:workers", "mx:workers")]
        assert all(0 < client.pttl(k) <= 60_000 for k in keys)  # nothing is left behind for ever
    finally:
        client.close()
        store.close()


def test_the_password_never_shows_and_an_outage_is_a_state_error() -> None:
    store = RedisStore("redis://:s3cret@127.0.0.1:1/9")
    assert "s3cret" not in repr(store)
    with pytest.raises(StateError) as caught:
        store.get("k")
    assert "s3cret" not in str(caught.value)
