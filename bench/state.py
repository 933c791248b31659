"""The state store's own cost per operation, against a plain driver sending the same commands.

For each store (SQLite, Redis db 9, PostgreSQL) and each operation the beat, idempotent handlers
and fleet limits use:

* ``set_if_absent+delete``: record a key with a TTL, then remove it;
* ``lease acquire+renew``: take a lease, then extend it;
* ``token bucket take``: take one token from a bucket that never runs dry;

it times the store's method against a plain client (sqlite3, redis-py, psycopg) sending the
very commands the store sends (the same SQL in the same transaction, the same Lua script by
EVALSHA, the same statement), so the ratio is what the store's Python adds: argument checks,
key naming, the error boundary, decoding. Rounds rotate the order of the contestants; the
figures are medians over rounds of microseconds per operation.

Run: ``python bench/state.py [--rounds 5] [--ops 300]`` with Redis on 127.0.0.1:6379 and
PostgreSQL on 127.0.0.1:5432 (``HEDWIG_TEST_REDIS_URL`` / ``HEDWIG_TEST_POSTGRES_URL``).
Prints ONE JSON line: ``{"us": {store: {op: {"store": .., "plain": ..}}}, "ratios": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

# bench/redis.py is named like the library: never let ``import redis`` find it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import psycopg  # noqa: E402
import redis  # noqa: E402

from hedwig_tasks.state import postgres as pg_store  # noqa: E402
from hedwig_tasks.state import redis as redis_store  # noqa: E402
from hedwig_tasks.state.postgres import PostgresStore  # noqa: E402
from hedwig_tasks.state.redis import RedisStore  # noqa: E402
from hedwig_tasks.state.sqlite import SQLiteStore  # noqa: E402
from hedwig_tasks.state.sqlite import _schema as sqlite_schema  # noqa: E402

REDIS_URL = os.environ.get("HEDWIG_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
POSTGRES_URL = os.environ.get("HEDWIG_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
OPS = ("set_if_absent+delete", "lease acquire+renew", "token bucket take")

Op = Callable[[int], Any]


def store_ops(store: Any) -> dict[str, Op]:
    return {
        "set_if_absent+delete": lambda i: (store.set_if_absent(f"k{i}", "v", ttl_s=60), store.delete(f"k{i}")),
        "lease acquire+renew": lambda i: (
            store.acquire("lease", "me", ttl_s=60),
            store.renew("lease", "me", ttl_s=60),
        ),
        "token bucket take": lambda i: store.take("bucket", rate_per_s=1e9, burst=1e9),
    }


def plain_sqlite(path: Path) -> dict[str, Op]:
    c = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=NORMAL")
    t = "plain"
    c.executescript(sqlite_schema(t))

    def write(*steps: tuple[str, tuple[Any, ...]]) -> None:
        c.execute("BEGIN IMMEDIATE")
        for sql, params in steps:
            c.execute(sql, params).fetchall()
        c.execute("COMMIT")

    sel = f"SELECT value, expires_at FROM {t}_keys WHERE key = ?"
    put = f"INSERT OR REPLACE INTO {t}_keys (key, value, expires_at) VALUES (?, ?, ?)"

    def sid(i: int) -> None:
        now = time.time()
        write((sel, (f"k{i}",)), (put, (f"k{i}", "v", now + 60)))
        write((sel, (f"k{i}",)), (f"DELETE FROM {t}_keys WHERE key = ?", (f"k{i}",)))

    def lease(i: int) -> None:
        now = time.time()
        write((sel, ("lease",)), (put, ("lease", "me", now + 60)))
        write((sel, ("lease",)), (put, ("lease", "me", now + 60)))

    def take(i: int) -> None:
        now = time.time()
        write(
            (f"SELECT tokens, updated_at, expires_at FROM {t}_buckets WHERE key = ?", ("bucket",)),
            (
                f"INSERT OR REPLACE INTO {t}_buckets (key, tokens, updated_at, expires_at) VALUES (?, ?, ?, ?)",
                ("bucket", 1e9, now, now + 1),
            ),
        )

    return dict(zip(OPS, (sid, lease, take), strict=True))


def plain_redis(prefix: str) -> dict[str, Op]:
    c = redis.Redis.from_url(REDIS_URL)
    acquire, renew = c.register_script(redis_store.ACQUIRE), c.register_script(redis_store.RENEW)
    take = c.register_script(redis_store.TAKE)
    k = f"{prefix}k:"
    return {
        "set_if_absent+delete": lambda i: (c.set(f"{k}k{i}", "v", nx=True, px=60000), c.delete(f"{k}k{i}")),
        "lease acquire+renew": lambda i: (
            acquire(keys=[f"{k}lease"], args=["me", 60000]),
            renew(keys=[f"{k}lease"], args=["me", 60000]),
        ),
        "token bucket take": lambda i: take(keys=[f"{prefix}b:bucket"], args=["1e9", "1e9", "1.0"]),
    }


def plain_postgres(schema: str) -> dict[str, Op]:
    c = psycopg.connect(POSTGRES_URL, autocommit=True)
    sql = pg_store._statements(schema, "plain")
    for statement in pg_store._schema_sql(schema, "plain"):
        c.execute(statement)

    def run(name: str, **params: Any) -> Any:
        with c.cursor() as cursor:
            cursor.execute(sql[name], params)
            if cursor.description is not None:
                cursor.fetchone()

    bucket = {"k": "bucket", "rate": 1e9, "burst": 1e9, "want": 1.0}
    return {
        "set_if_absent+delete": lambda i: (
            run("insert_if_absent", k=f"k{i}", v="v", ttl=60.0),
            run("delete", k=f"k{i}"),
        ),
        "lease acquire+renew": lambda i: (
            run("acquire", k="lease", v="me", ttl=60.0),
            run("renew", k="lease", v="me", ttl=60.0),
        ),
        "token bucket take": lambda i: run("take", **bucket),
    }


def timed(op: Op, count: int) -> float:
    started = time.perf_counter()
    for i in range(count):
        op(i)
    return (time.perf_counter() - started) / count * 1e6


def measure(contestants: dict[str, dict[str, Op]], rounds: int, count: int) -> dict[str, dict[str, float]]:
    samples: dict[str, dict[str, list[float]]] = {op: {name: [] for name in contestants} for op in OPS}
    names = list(contestants)
    for op in OPS:
        for name in names:
            timed(contestants[name][op], count // 10)  # warm: prepared statements, script cache
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for op in OPS:
            for name in order:
                samples[op][name].append(timed(contestants[name][op], count))
    return {op: {name: statistics.median(v) for name, v in by.items()} for op, by in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ops", type=int, default=300)
    args = parser.parse_args()
    tag = uuid.uuid4().hex[:8]
    prefix, schema = f"hedwig-bench:{tag}:", f"hedwig_bench_{tag}"
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        sqlite = SQLiteStore(Path(folder) / "state.db")
        results["sqlite"] = measure(
            {"store": store_ops(sqlite), "plain": plain_sqlite(Path(folder) / "plain.db")}, args.rounds, args.ops
        )
        sqlite.close()
    redis_client = RedisStore(REDIS_URL, prefix=prefix)
    try:
        results["redis"] = measure(
            {"store": store_ops(redis_client), "plain": plain_redis(f"{prefix}plain:")}, args.rounds, args.ops
        )
    finally:
        cleaner = redis.Redis.from_url(REDIS_URL)
        keys = list(cleaner.scan_iter(match=f"{prefix}*"))
        if keys:
            cleaner.delete(*keys)
        cleaner.close()
    pg = PostgresStore(POSTGRES_URL, schema=schema)
    try:
        results["postgres"] = measure({"store": store_ops(pg), "plain": plain_postgres(schema)}, args.rounds, args.ops)
    finally:
        pg.close()
        with psycopg.connect(POSTGRES_URL, autocommit=True) as c:
            c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    ratios = {
        store: {op: round(v["store"] / v["plain"], 3) for op, v in by_op.items()} for store, by_op in results.items()
    }
    us = {store: {op: {k: round(x, 1) for k, x in v.items()} for op, v in by.items()} for store, by in results.items()}
    print(json.dumps({"bench": "state", "rounds": args.rounds, "ops": args.ops, "us": us, "ratios": ratios}))


if __name__ == "__main__":
    main()
