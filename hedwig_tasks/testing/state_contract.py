"""The state store contract suite: one class of tests that every store's test module subclasses.

A subclass provides ``store`` and ``other_store`` fixtures (two clients of one store, as two
processes would hold) built on the suite's ``clock``::

    class TestSQLiteStore(StateContract):
        @pytest.fixture
        def store(self, clock: ContractClock, tmp_path: Path) -> Iterator[StateStore]:
            with SQLiteStore(tmp_path / "state.db", clock=clock) as store:
                yield store

Time: ``clock`` is a :class:`~hedwig_tasks.testing.contract.ManualClock` by default, so TTLs
run out the moment a test calls ``clock.advance(...)``. A store whose server keeps the time
(Redis, PostgreSQL) overrides ``clock`` to return a ``RealClock`` (``advance`` sleeps) and sets
``ttl_s`` short. Every duration in the tests is a multiple of ``ttl_s``; what must not expire
during a test is given ``long_ttl_s``, so a slow machine never fails a test.
Names are unique per test (``tag``), so a shared server needs no cleaning between tests.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

import pytest

from hedwig_tasks.exceptions import StateError
from hedwig_tasks.state.base import StateStore
from hedwig_tasks.testing.contract import ContractClock, ManualClock

__all__ = ["StateContract"]


def _race(count: int, attempt: Callable[[int], Any]) -> list[Any]:
    """``attempt(i)`` on ``count`` threads released at once; their results in order."""
    results: list[Any] = [None] * count
    gate = threading.Barrier(count)

    def run(i: int) -> None:
        gate.wait()
        results[i] = attempt(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


class StateContract:
    """What every state store must do; subclass it in ``tests/test_state_<name>.py``."""

    #: The unit of time of the tests, in seconds: short TTLs are this long.
    ttl_s: ClassVar[float] = 10.0
    #: A TTL no test outlives.
    long_ttl_s: ClassVar[float] = 600.0
    #: How far the store's time may be from the test's clock when checking an expiry, in seconds.
    time_slack_s: ClassVar[float] = 0.5

    # -- fixtures ---------------------------------------------------------------------------

    @pytest.fixture
    def clock(self) -> ContractClock:
        return ManualClock()

    @pytest.fixture
    def store(self) -> StateStore:
        raise NotImplementedError("a StateContract subclass provides the store fixture")

    @pytest.fixture
    def other_store(self) -> StateStore:
        raise NotImplementedError("a StateContract subclass provides a second client of the same store")

    @pytest.fixture
    def tag(self) -> str:
        return uuid.uuid4().hex[:10]

    def expire(self, clock: ContractClock) -> None:
        """Let every short TTL run out."""
        clock.advance(self.ttl_s * 1.3)

    # -- leases -----------------------------------------------------------------------------

    def test_a_lease_has_one_holder(self, store: StateStore, other_store: StateStore, tag: str) -> None:
        name = f"lease-{tag}"
        assert store.holder(name) is None
        assert store.acquire(name, "a", ttl_s=self.long_ttl_s)
        assert not other_store.acquire(name, "b", ttl_s=self.long_ttl_s)
        assert store.acquire(name, "a", ttl_s=self.long_ttl_s)  # its holder takes it again
        lease = other_store.holder(name)
        assert lease is not None and lease.owner == "a" and lease.name == name
        now = store.now()
        assert now + self.long_ttl_s - 5 < lease.expires_at <= now + self.long_ttl_s + self.time_slack_s

    def test_an_expired_lease_can_be_taken_and_its_old_owner_learns_it(
        self, store: StateStore, other_store: StateStore, clock: ContractClock, tag: str
    ) -> None:
        name = f"lease-{tag}"
        assert store.acquire(name, "a", ttl_s=self.ttl_s)
        self.expire(clock)
        assert store.holder(name) is None
        assert not store.renew(name, "a", ttl_s=self.long_ttl_s)  # renew never revives an expired lease
        assert other_store.acquire(name, "b", ttl_s=self.long_ttl_s)
        assert not store.renew(name, "a", ttl_s=self.long_ttl_s)
        assert not store.release(name, "a")
        lease = store.holder(name)
        assert lease is not None and lease.owner == "b"

    def test_renew_extends_only_the_holders_lease(
        self, store: StateStore, other_store: StateStore, clock: ContractClock, tag: str
    ) -> None:
        name = f"lease-{tag}"
        assert store.acquire(name, "a", ttl_s=self.ttl_s)
        assert not other_store.renew(name, "b", ttl_s=self.long_ttl_s)
        assert store.renew(name, "a", ttl_s=self.long_ttl_s)
        self.expire(clock)  # the first TTL has passed; the renewed one has not
        assert not other_store.acquire(name, "b", ttl_s=self.ttl_s)
        lease = store.holder(name)
        assert lease is not None and lease.owner == "a"

    def test_release_frees_a_lease_for_another(self, store: StateStore, other_store: StateStore, tag: str) -> None:
        name = f"lease-{tag}"
        assert store.acquire(name, "a", ttl_s=self.long_ttl_s)
        assert not other_store.release(name, "b")
        assert store.holder(name) is not None
        assert store.release(name, "a")
        assert store.holder(name) is None
        assert not store.release(name, "a")
        assert other_store.acquire(name, "b", ttl_s=self.long_ttl_s)

    def test_racing_owners_get_one_lease(self, store: StateStore, other_store: StateStore, tag: str) -> None:
        stores = [store, other_store]
        won = _race(8, lambda i: stores[i % 2].acquire(f"lease-{tag}", f"owner-{i}", ttl_s=self.long_ttl_s))
        assert won.count(True) == 1
        lease = store.holder(f"lease-{tag}")
        assert lease is not None and lease.owner == f"owner-{won.index(True)}"

    # -- keys -------------------------------------------------------------------------------

    def test_set_if_absent_keeps_the_first_value_until_it_expires(
        self, store: StateStore, other_store: StateStore, clock: ContractClock, tag: str
    ) -> None:
        key = f"key-{tag}"
        assert store.set_if_absent(key, "first", ttl_s=self.ttl_s)
        assert not other_store.set_if_absent(key, "second", ttl_s=self.ttl_s)
        assert other_store.get(key) == "first"
        self.expire(clock)
        assert store.get(key) is None
        assert other_store.set_if_absent(key, "third")
        assert store.get(key) == "third"

    def test_racing_writers_set_a_key_once(self, store: StateStore, other_store: StateStore, tag: str) -> None:
        stores = [store, other_store]
        won = _race(8, lambda i: stores[i % 2].set_if_absent(f"key-{tag}", str(i), ttl_s=self.long_ttl_s))
        assert won.count(True) == 1
        assert store.get(f"key-{tag}") == str(won.index(True))

    def test_put_get_delete(self, store: StateStore, other_store: StateStore, clock: ContractClock, tag: str) -> None:
        key = f"key-{tag}"
        assert store.get(key) is None
        store.put(key, "one")
        store.put(key, "two ü")  # overwrites; any text
        assert other_store.get(key) == "two ü"
        assert other_store.delete(key)
        assert not store.delete(key)
        assert store.get(key) is None
        store.put(key, "short", ttl_s=self.ttl_s)
        assert store.get(key) == "short"
        self.expire(clock)
        assert store.get(key) is None
        assert not store.delete(key)  # an expired key is not there to delete

    def test_compare_and_set(self, store: StateStore, other_store: StateStore, clock: ContractClock, tag: str) -> None:
        key = f"cursor-{tag}"
        assert not store.compare_and_set(key, "1", "2")  # absent is not "1"
        assert store.compare_and_set(key, None, "1")
        assert not other_store.compare_and_set(key, None, "x")
        assert not other_store.compare_and_set(key, "0", "x")
        assert other_store.compare_and_set(key, "1", "2", ttl_s=self.ttl_s)
        assert store.get(key) == "2"
        self.expire(clock)
        assert not store.compare_and_set(key, "2", "3")  # expired: it holds nothing now
        assert store.compare_and_set(key, None, "3")
        assert other_store.get(key) == "3"

    def test_racing_compare_and_set_advances_once(self, store: StateStore, other_store: StateStore, tag: str) -> None:
        key = f"cursor-{tag}"
        store.put(key, "10")
        stores = [store, other_store]
        won = _race(8, lambda i: stores[i % 2].compare_and_set(key, "10", f"11-{i}"))
        assert won.count(True) == 1
        assert store.get(key) == f"11-{won.index(True)}"

    def test_bad_ttls_are_refused(self, store: StateStore, tag: str) -> None:
        for bad in (0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="ttl_s"):
                store.acquire(f"lease-{tag}", "a", ttl_s=bad)
            with pytest.raises(ValueError, match="ttl_s"):
                store.set_if_absent(f"key-{tag}", "v", ttl_s=bad)
        with pytest.raises(ValueError, match="window_s"):
            store.incr(f"count-{tag}", window_s=0)

    # -- counters and buckets ---------------------------------------------------------------

    def test_a_counter_counts_within_its_window(
        self, store: StateStore, other_store: StateStore, clock: ContractClock, tag: str
    ) -> None:
        key = f"count-{tag}"
        assert store.incr(key, window_s=self.ttl_s) == 1
        assert other_store.incr(key, window_s=self.ttl_s) == 2
        assert store.incr(key, 5, window_s=self.ttl_s) == 7
        self.expire(clock)
        assert other_store.incr(key, 2, window_s=self.ttl_s) == 2

    def test_racing_increments_are_all_counted(self, store: StateStore, other_store: StateStore, tag: str) -> None:
        stores = [store, other_store]
        counts = _race(8, lambda i: [stores[i % 2].incr(f"count-{tag}", window_s=self.long_ttl_s) for _ in range(5)])
        assert sorted(c for run in counts for c in run) == list(range(1, 41))

    def test_a_counter_is_not_a_key_of_text(self, store: StateStore, tag: str) -> None:
        store.put(f"text-{tag}", "hello")
        with pytest.raises(StateError, match="not a count"):
            store.incr(f"text-{tag}", window_s=self.ttl_s)

    def test_a_token_bucket_grants_its_burst_then_refills(
        self, store: StateStore, other_store: StateStore, clock: ContractClock, tag: str
    ) -> None:
        bucket, rate = f"bucket-{tag}", 2.0 / self.ttl_s  # two tokens per ttl_s
        assert [store.take(bucket, rate_per_s=rate, burst=3) for _ in range(3)] == [0.0, 0.0, 0.0]
        wait = other_store.take(bucket, rate_per_s=rate, burst=3)
        assert 0.8 * self.ttl_s / 2 < wait <= self.ttl_s / 2 + self.time_slack_s  # one token is half a ttl_s away
        assert store.take(bucket, rate_per_s=rate, burst=3, tokens=2) > wait  # a refused take takes nothing
        clock.advance(self.ttl_s * 0.6)
        assert other_store.take(bucket, rate_per_s=rate, burst=3) == 0.0
        with pytest.raises(ValueError, match="could never"):
            store.take(bucket, rate_per_s=rate, burst=3, tokens=4)

    def test_racing_takers_share_one_bucket(self, store: StateStore, other_store: StateStore, tag: str) -> None:
        stores = [store, other_store]
        rate = 1.0 / self.long_ttl_s  # no refill to speak of during the test
        takes = _race(8, lambda i: [stores[i % 2].take(f"bucket-{tag}", rate_per_s=rate, burst=10) for _ in range(4)])
        assert [w for run in takes for w in run].count(0.0) == 10

    # -- heartbeats -------------------------------------------------------------------------

    def test_heartbeat_rows_live_until_they_expire(
        self, store: StateStore, other_store: StateStore, clock: ContractClock, tag: str
    ) -> None:
        group = f"workers-{tag}"
        before = store.now()
        store.heartbeat(group, "w1", {"pid": 1, "topics": ["a", "b"]}, ttl_s=self.ttl_s)
        other_store.heartbeat(group, "w2", {"pid": 2}, ttl_s=self.long_ttl_s)
        other_store.heartbeat(f"others-{tag}", "w9", {}, ttl_s=self.long_ttl_s)
        rows = store.members(group)
        assert [(m.member, dict(m.data)) for m in rows] == [
            ("w1", {"pid": 1, "topics": ["a", "b"]}),
            ("w2", {"pid": 2}),
        ]
        assert all(m.group == group and before - self.time_slack_s <= m.seen <= m.expires_at for m in rows)
        self.expire(clock)
        assert [m.member for m in other_store.members(group)] == ["w2"]
        store.heartbeat(group, "w1", {"pid": 1, "again": True}, ttl_s=self.long_ttl_s)  # a row comes back
        assert [dict(m.data) for m in store.members(group)] == [{"pid": 1, "again": True}, {"pid": 2}]

    def test_forget_removes_a_row_at_once(self, store: StateStore, other_store: StateStore, tag: str) -> None:
        group = f"workers-{tag}"
        store.heartbeat(group, "w1", {}, ttl_s=self.long_ttl_s)
        assert other_store.forget(group, "w1")
        assert not store.forget(group, "w1")
        assert store.members(group) == []

    def test_heartbeat_data_must_be_json(self, store: StateStore, tag: str) -> None:
        with pytest.raises(TypeError):
            store.heartbeat(f"workers-{tag}", "w1", {"when": object()}, ttl_s=self.ttl_s)
        with pytest.raises(TypeError):
            store.heartbeat(f"workers-{tag}", "w1", ["not", "a", "mapping"], ttl_s=self.ttl_s)  # type: ignore[arg-type]
