"""The SQLite state store: the shared contract (on an injected clock), and what only SQLite shows."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hedwig_tasks.exceptions import ConfigurationError, StateError
from hedwig_tasks.state import default_url, from_url
from hedwig_tasks.state.sqlite import SQLiteStore
from hedwig_tasks.testing.contract import ContractClock, ManualClock
from hedwig_tasks.testing.state_contract import StateContract


class TestSQLiteStore(StateContract):
    """SQLite keeps the client's time: the clock is injected, and TTLs end when the test says."""

    @pytest.fixture
    def store(self, clock: ContractClock, tmp_path: Path) -> Iterator[SQLiteStore]:
        with SQLiteStore(tmp_path / "state.db", clock=clock) as store:
            yield store

    @pytest.fixture
    def other_store(self, clock: ContractClock, tmp_path: Path) -> Iterator[SQLiteStore]:
        with SQLiteStore(tmp_path / "state.db", clock=clock) as store:
            yield store


# -- what only SQLite shows -------------------------------------------------------------------


def test_urls_choose_the_file_and_table(tmp_path: Path) -> None:
    store = from_url(f"sqlite:///{tmp_path}/s.db?table=mine&busy_timeout_s=2")
    assert isinstance(store, SQLiteStore)
    assert (store.path, store.table, store.busy_timeout_s) == (Path(f"{tmp_path}/s.db"), "mine", 2.0)
    store.put("k", "v")
    store.close()
    with pytest.raises(ConfigurationError, match="did you mean table"):
        from_url(f"sqlite:///{tmp_path}/s.db?tabel=x")
    with pytest.raises(ConfigurationError, match="letters, digits"):
        from_url(f"sqlite:///{tmp_path}/s.db?table=a;drop")
    with pytest.raises(ConfigurationError, match="state store file"):
        from_url("sqlite:///:memory:")
    with pytest.raises(ConfigurationError, match="did you mean 'redis'"):
        from_url("redsi://x")


def test_the_default_store_sits_beside_the_sqlite_bus() -> None:
    assert default_url("sqlite:///.hedwig/bus.db") == "sqlite:///.hedwig/state.db"
    assert default_url("sqlite:////var/lib/app/bus.db?lease_s=5") == "sqlite:////var/lib/app/state.db"
    assert default_url("sqlite:///bus.db") == "sqlite:///state.db"
    assert default_url("redis://127.0.0.1/9") == "sqlite:///.hedwig/state.db"
    assert default_url(None) == "sqlite:///.hedwig/state.db"


def test_server_stores_take_no_injected_clock() -> None:
    with pytest.raises(ConfigurationError, match="keeps time on its server"):
        from_url("redis://127.0.0.1:6379/9", clock=ManualClock())


def test_sweep_deletes_only_expired_rows(tmp_path: Path) -> None:
    clock = ManualClock()
    with SQLiteStore(tmp_path / "s.db", clock=clock, sweep_every_s=1000) as store:
        store.put("short", "v", ttl_s=1)
        store.put("kept", "v")
        store.take("bucket", rate_per_s=1, burst=1)
        store.heartbeat("g", "m", {}, ttl_s=1)
        clock.advance(5)
        assert store.sweep() == 3
        assert store.get("kept") == "v"


def test_a_write_waits_for_another_process_then_gives_up_as_state_error(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with SQLiteStore(path) as store:
        store.put("k", "v")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sqlite3,time,sys; c=sqlite3.connect({str(path)!r}, isolation_level=None);"
            "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with SQLiteStore(path, busy_timeout_s=0.2) as store, pytest.raises(StateError, match="locked"):
            store.put("k", "w")
    finally:
        holder.communicate("")
