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

The ``idempotency`` part measures what the store costs an idempotent handler per message: a
worker (``burst``, 4 threads, prefetch 12, receives of 20 ms, no heartbeat row) drains ``--messages`` messages from
the SQLite bus into a no-op handler declared ``idempotent=True`` (its keys in the store: an
``acquire`` and a ``put`` per message), and the same handler without it, rounds rotating the
order. Figures: microseconds per message, wall clock and the process's CPU (the store server's
own CPU is not in it), medians over rounds, and ``ratio``: idempotent over plain. PostgreSQL
runs twice: as configured, and with ``options=-csynchronous_commit=off`` in its URL (commits not
waiting for the disk, which is most of its cost per message on a slow disk).

Run: ``python bench/state.py [--rounds 5] [--ops 300] [--messages 2000] [--parts ops,idempotency]``
with Redis on 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432 (``HEDWIG_TEST_REDIS_URL`` /
``HEDWIG_TEST_POSTGRES_URL``). Prints ONE JSON line: ``{"us": {store: {op: {"store": ..,
"plain": ..}}}, "ratios": {...}, "idempotency": {store: {"plain_us": .., "idempotent_us": ..,
"ratio": .., "cpu_ratio": ..}}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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

from hedwig_tasks import Hedwig  # noqa: E402
from hedwig_tasks.state import postgres as pg_store  # noqa: E402
from hedwig_tasks.state import redis as redis_store  # noqa: E402
from hedwig_tasks.state.postgres import PostgresStore  # noqa: E402
from hedwig_tasks.state.redis import RedisStore  # noqa: E402
from hedwig_tasks.state.sqlite import SQLiteStore  # noqa: E402
from hedwig_tasks.state.sqlite import _schema as sqlite_schema  # noqa: E402
from hedwig_tasks.worker import Worker, WorkerOptions  # noqa: E402

REDIS_URL = os.environ.get("HEDWIG_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
POSTGRES_URL = os.environ.get("HEDWIG_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
OPS = ("set_if_absent+delete", "lease acquire+renew", "token bucket take")
SCHEMA = _HERE.parent / "tests" / "schemas" / "schema.json"

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


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def drain(folder: Path, state: str, *, idempotent: bool, count: int) -> tuple[float, float]:
    """Microseconds of wall clock and of CPU per message for a worker draining ``count`` messages."""
    bus = f"sqlite:///{folder}/bus-{uuid.uuid4().hex[:8]}.db"
    app = Hedwig("benchidem", schema=SCHEMA, transport=bus, state=state)
    app.handler("user-created", "1.*", idempotent=idempotent)(lambda message: None)
    app.provision()
    for n in range(count):
        app.publish("user-created", "1.0", {"user_id": f"U{n}"})
    app.state.get("warm")  # connect the store before timing
    options = WorkerOptions(burst=True, concurrency=4, prefetch=12, wait_s=0.02, heartbeat_s=None)
    worker = Worker(app, options)
    wall, cpu = time.perf_counter(), _cpu_s()
    worker.run()
    wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
    app.close()
    assert worker.counts["handled"] == count, worker.counts
    return wall / count * 1e6, cpu / count * 1e6


def idempotency(state: str, folder: Path, rounds: int, count: int) -> dict[str, float]:
    """An idempotent handler against the same handler without it, on one store."""
    samples: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    drain(folder, state, idempotent=True, count=count // 10)  # warm: imports, statements, scripts
    for r in range(rounds):
        for flag in (True, False) if r % 2 else (False, True):
            samples[flag].append(drain(folder, state, idempotent=flag, count=count))
    plain, idem = (statistics.median(w for w, _ in samples[f]) for f in (False, True))
    plain_cpu, idem_cpu = (statistics.median(c for _, c in samples[f]) for f in (False, True))
    return {
        "plain_us": round(plain, 1),
        "idempotent_us": round(idem, 1),
        "ratio": round(idem / plain, 3),
        "plain_cpu_us": round(plain_cpu, 1),
        "idempotent_cpu_us": round(idem_cpu, 1),
        "cpu_ratio": round(idem_cpu / plain_cpu, 3),
    }


def idempotency_part(rounds: int, count: int, prefix: str, schema: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        results["sqlite"] = idempotency(f"sqlite:///{folder}/idem-state.db", Path(folder), rounds, count)
        try:
            results["redis"] = idempotency(f"{REDIS_URL}?prefix={prefix}idem:", Path(folder), rounds, count)
        finally:
            cleaner = redis.Redis.from_url(REDIS_URL)
            keys = list(cleaner.scan_iter(match=f"{prefix}idem:*"))
            if keys:
                cleaner.delete(*keys)
            cleaner.close()
        try:
            url = f"{POSTGRES_URL}?schema={schema}_idem"
            results["postgres"] = idempotency(url, Path(folder), rounds, count)
            # libpq's own option: commits do not wait for the WAL flush (a server crash may lose
            # the last few records: those messages could run once more)
            url += "&options=-csynchronous_commit%3Doff"
            results["postgres_synchronous_commit_off"] = idempotency(url, Path(folder), rounds, count)
        finally:
            with psycopg.connect(POSTGRES_URL, autocommit=True) as c:
                c.execute(f'DROP SCHEMA IF EXISTS "{schema}_idem" CASCADE')
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ops", type=int, default=300)
    parser.add_argument("--messages", type=int, default=2000, help="messages per drain in the idempotency part")
    parser.add_argument("--parts", default="ops,idempotency", help="what to measure, comma-separated")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    tag = uuid.uuid4().hex[:8]
    prefix, schema = f"hedwig-bench:{tag}:", f"hedwig_bench_{tag}"
    report: dict[str, Any] = {"bench": "state", "rounds": args.rounds, "ops": args.ops}
    if "idempotency" in parts:
        report["messages"] = args.messages
        report["idempotency"] = idempotency_part(args.rounds, args.messages, prefix, schema)
    if "ops" in parts:
        report |= ops_part(args.rounds, args.ops, prefix, schema)
    print(json.dumps(report))


def ops_part(rounds: int, count: int, prefix: str, schema: str) -> dict[str, Any]:
    """Each store operation against a plain driver sending the same commands."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        sqlite = SQLiteStore(Path(folder) / "state.db")
        results["sqlite"] = measure(
            {"store": store_ops(sqlite), "plain": plain_sqlite(Path(folder) / "plain.db")}, rounds, count
        )
        sqlite.close()
    redis_client = RedisStore(REDIS_URL, prefix=prefix)
    try:
        results["redis"] = measure(
            {"store": store_ops(redis_client), "plain": plain_redis(f"{prefix}plain:")}, rounds, count
        )
    finally:
        cleaner = redis.Redis.from_url(REDIS_URL)
        keys = list(cleaner.scan_iter(match=f"{prefix}*"))
        if keys:
            cleaner.delete(*keys)
        cleaner.close()
    pg = PostgresStore(POSTGRES_URL, schema=schema)
    try:
        results["postgres"] = measure({"store": store_ops(pg), "plain": plain_postgres(schema)}, rounds, count)
    finally:
        pg.close()
        with psycopg.connect(POSTGRES_URL, autocommit=True) as c:
            c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    ratios = {
        store: {op: round(v["store"] / v["plain"], 3) for op, v in by_op.items()} for store, by_op in results.items()
    }
    us = {store: {op: {k: round(x, 1) for k, x in v.items()} for op, v in by.items()} for store, by in results.items()}
    return {"us": us, "ratios": ratios}


if __name__ == "__main__":
    main()
