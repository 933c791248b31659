"""The PostgreSQL state store on the machine's server: the shared contract on the server's time,
and what only PostgreSQL shows. Each test class or test makes a schema of its own and drops it."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from postgres_server import own_schema, postgres_url

from hedwig_tasks.exceptions import ConfigurationError, StateError
from hedwig_tasks.state import from_url
from hedwig_tasks.state.postgres import PostgresStore
from hedwig_tasks.testing.contract import ContractClock, RealClock
from hedwig_tasks.testing.state_contract import StateContract


@pytest.fixture(scope="module")
def schema() -> Iterator[tuple[str, str]]:
    with own_schema() as found:
        yield found


class TestPostgresStore(StateContract):
    """PostgreSQL keeps the time: TTLs are short and the clock real."""

    ttl_s = 0.4
    time_slack_s = 1.0

    @pytest.fixture
    def clock(self) -> ContractClock:
        return RealClock()

    @pytest.fixture
    def store(self, schema: tuple[str, str]) -> Iterator[PostgresStore]:
        with PostgresStore(schema[0], schema=schema[1]) as store:
            yield store

    @pytest.fixture
    def other_store(self, schema: tuple[str, str]) -> Iterator[PostgresStore]:
        with PostgresStore(schema[0], schema=schema[1]) as store:
            yield store


# -- what only PostgreSQL shows -------------------------------------------------------------


def test_the_url_names_schema_and_table_and_passes_the_rest_to_libpq(schema: tuple[str, str]) -> None:
    url, name = schema
    store = from_url(f"{url}?schema={name}&table=other&application_name=hedwig-test")
    assert isinstance(store, PostgresStore) and (store.schema, store.table) == (name, "other")
    assert "connect_timeout=5" in store.url and "application_name=hedwig-test" in store.url
    with store:
        store.put("k", "v")
    with psycopg.connect(url) as connection:
        tables = connection.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s ORDER BY 1", (name,)
        ).fetchall()
    assert ("other_keys",) in tables and ("other_members",) in tables
    with pytest.raises(ConfigurationError, match="letters, digits"):
        from_url(f"{url}?schema=a-b")


def test_sweep_deletes_expired_rows(schema: tuple[str, str]) -> None:
    with PostgresStore(schema[0], schema=schema[1], table="sweep") as store:
        store.put("short", "v", ttl_s=0.05)
        store.put("kept", "v")
        store.heartbeat("g", "m", {}, ttl_s=0.05)
        store.now()
        deadline = store.now() + 0.1
        while store.now() < deadline:
            pass
        assert store.sweep() == 2
        assert store.get("kept") == "v"


def test_an_outage_is_a_state_error_without_the_password() -> None:
    postgres_url()
    store = PostgresStore("postgresql://someone:s3cret@127.0.0.1:1/test?connect_timeout=1")
    assert "s3cret" not in repr(store)
    with pytest.raises(StateError) as caught:
        store.get("k")
    assert "s3cret" not in str(caught.value)
