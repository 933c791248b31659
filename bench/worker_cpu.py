"""Worker CPU per message, on the SQLite bus and on RabbitMQ, against a plain loop on each.

Each contender runs in a child process of its own. The child first fills its queue with N
messages (not measured), then consumes them while its CPU time (every thread of the process,
``resource.getrusage(RUSAGE_SELF)``) is read before and after; the figure is that CPU over N.

* ``hedwig_sqlite``: ``Worker(app, WorkerOptions(burst=True, concurrency=C, prefetch=P))`` on
  ``sqlite:///<tmp>/bus.db``, a no-op handler, validation on (JSON Schema, on receive as on
  publish), logging at WARNING as ``-l WARNING`` sets it.
* ``plain_sqlite``: a ``sqlite3`` loop in WAL mode doing the same claim and delete work: claim
  up to C+P visible rows per ``BEGIN IMMEDIATE`` (select, then lease them), ``json.loads`` each
  body, delete them in one transaction.
* ``hedwig_rabbitmq``: the same worker on ``amqp://`` (RabbitMQ through Kombu).
* ``plain_rabbitmq``: a pika ``BlockingConnection`` consumer with manual acks and
  ``basic_qos(prefetch_count=C+P)``: ``json.loads`` each body, ack it.

Usage::

    python bench/worker_cpu.py [--n 5000] [--rounds 3] [-c 4] [--prefetch 12] [--only sqlite,rabbitmq]

Rounds rotate which contender goes first. A table goes to stderr; the last line on stdout is
ONE JSON object: microseconds of worker CPU per message for each contender (median over the
rounds, with the spread min..max), ``ratio``: hedwig-tasks over the plain loop on each broker,
and ``target_us`` (60) with whether each hedwig-tasks median meets it.
RabbitMQ comes from ``HEDWIG_TEST_AMQP_URL`` or ``amqp://guest:guest@127.0.0.1:5672//``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

# This folder holds bench/kombu.py: never let ``import kombu`` find it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

AMQP_URL = os.environ.get("HEDWIG_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
#: The issue's target, in microseconds of worker CPU per message.
TARGET_US = 60.0
CONTENDERS = {
    "sqlite": ("hedwig_sqlite", "plain_sqlite"),
    "rabbitmq": ("hedwig_rabbitmq", "plain_rabbitmq"),
}

SCHEMA = {
    "id": "https://hedwig-tasks.bench/schema",
    "$schema": "http://json-schema.org/draft-04/schema",
    "schemas": {
        "user-created": {
            "1.*": {
                "type": "object",
                "x-version": "1.0",
                "required": ["user_id", "email"],
                "properties": {"user_id": {"type": "string"}, "email": {"type": "string", "minLength": 3}},
            }
        }
    },
}


def _data(n: int) -> dict[str, str]:
    return {"user_id": f"U{n}", "email": "u@example.com"}


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the children ------------------------------------------------------------------------------


def _hedwig(url: str, name: str, n: int, concurrency: int, prefetch: int) -> float:
    """Fill ``name``'s queue with ``n`` messages, then the CPU seconds a burst worker takes on them."""
    from hedwig_tasks import Hedwig
    from hedwig_tasks.validators.base import to_transport
    from hedwig_tasks.worker import Worker, WorkerOptions

    schema = Path(tempfile.mkdtemp(prefix="hedwig-cpu-")) / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    app = Hedwig(name, schema=schema, transport=url, routing={"user-created": name})
    seen = []
    app.handler("user-created", "1.*")(lambda message: seen.append(1))
    app.provision()
    text_only = app.transport.capabilities.text_only
    for start in range(0, n, 500):
        rows = [
            to_transport(app.validator.encode(app.message("user-created", "1.0", _data(i))), text_only=text_only)
            for i in range(start, min(start + 500, n))
        ]
        app.transport.publish_many(name, rows)
    options = WorkerOptions(burst=True, concurrency=concurrency, prefetch=prefetch, wait_s=0.05)
    worker = Worker(app, options)
    started = _cpu_s()
    worker.run()
    elapsed = _cpu_s() - started
    app.close()
    if len(seen) != n:
        raise SystemExit(f"{name}: handled {len(seen)} of {n}")
    return elapsed


def hedwig_sqlite(n: int, concurrency: int, prefetch: int) -> float:
    with tempfile.TemporaryDirectory(prefix="hedwig-cpu-") as tmp:
        return _hedwig(f"sqlite:///{tmp}/bus.db", "cpu", n, concurrency, prefetch)


def hedwig_rabbitmq(n: int, concurrency: int, prefetch: int) -> float:
    name = f"cpu-{uuid.uuid4().hex[:8]}"
    try:
        return _hedwig(AMQP_URL, name, n, concurrency, prefetch)
    finally:
        _delete_amqp([f"hedwig-{name}-{name}", f"hedwig-{name}-dlq"], [f"hedwig-{name}"])


def plain_sqlite(n: int, concurrency: int, prefetch: int) -> float:
    """A plain sqlite3 claim/delete loop over ``n`` rows, in WAL mode; its CPU seconds."""
    batch = concurrency + prefetch
    with tempfile.TemporaryDirectory(prefix="hedwig-cpu-") as tmp:
        db = sqlite3.connect(f"{tmp}/plain.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, body BLOB, visible_at REAL, attempt INTEGER)")
        db.executemany(
            "INSERT INTO messages (body, visible_at, attempt) VALUES (?, 0, 0)",
            [(json.dumps(_data(i)).encode(),) for i in range(n)],
        )
        started, done = _cpu_s(), 0
        while done < n:
            now = time.time()
            db.execute("BEGIN IMMEDIATE")
            rows = db.execute(
                "SELECT id, body FROM messages WHERE visible_at <= ? ORDER BY id LIMIT ?", (now, batch)
            ).fetchall()
            db.executemany(
                "UPDATE messages SET visible_at = ?, attempt = attempt + 1 WHERE id = ?",
                [(now + 30, row[0]) for row in rows],
            )
            db.execute("COMMIT")
            for _, body in rows:
                json.loads(body)
            db.execute("BEGIN IMMEDIATE")
            db.executemany("DELETE FROM messages WHERE id = ?", [(row[0],) for row in rows])
            db.execute("COMMIT")
            done += len(rows)
        elapsed = _cpu_s() - started
        db.close()
        return elapsed


def plain_rabbitmq(n: int, concurrency: int, prefetch: int) -> float:
    """A pika consumer with manual acks and the same prefetch over ``n`` messages; its CPU seconds."""
    import pika  # type: ignore[import-untyped]

    queue = f"cpu-plain-{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(_pika_url(AMQP_URL)))
    channel = connection.channel()
    channel.queue_declare(queue, durable=True)
    try:
        channel.confirm_delivery()
        persistent = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        for i in range(n):
            channel.basic_publish("", queue, json.dumps(_data(i)).encode(), persistent)
        channel.basic_qos(prefetch_count=concurrency + prefetch)
        started, done = _cpu_s(), 0
        for method, _properties, body in channel.consume(queue, auto_ack=False):
            json.loads(body)
            channel.basic_ack(method.delivery_tag)
            done += 1
            if done == n:
                break
        elapsed = _cpu_s() - started
        channel.cancel()
        return elapsed
    finally:
        channel.queue_delete(queue)
        connection.close()


def _pika_url(url: str) -> str:
    """Kombu's ``amqp://host//`` (the default vhost) as pika writes it: ``amqp://host/%2F``."""
    return url[:-2] + "/%2F" if url.endswith("//") else url


def _delete_amqp(queues: list[str], exchanges: list[str]) -> None:
    import kombu

    with kombu.Connection(AMQP_URL) as connection:
        channel = connection.channel()
        for queue in queues:
            channel.queue_delete(queue)
        for exchange in exchanges:
            channel.exchange_delete(exchange)


CHILDREN = {f.__name__: f for f in (hedwig_sqlite, plain_sqlite, hedwig_rabbitmq, plain_rabbitmq)}


# -- the parent --------------------------------------------------------------------------------


def run_child(name: str, args: argparse.Namespace) -> float:
    """Microseconds of CPU per message that contender ``name`` spent, in a fresh process."""
    command = [sys.executable, __file__, "--child", name, "--n", str(args.n)]
    command += ["-c", str(args.concurrency), "--prefetch", str(args.prefetch)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-c", "--concurrency", type=int, default=4)
    parser.add_argument("--prefetch", type=int, default=12)
    parser.add_argument("--only", default="sqlite,rabbitmq", help="brokers to measure, comma-separated")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        seconds = CHILDREN[args.child](args.n, args.concurrency, args.prefetch)
        print(seconds / args.n * 1e6)
        return
    brokers = args.only.split(",")
    names = [name for broker in brokers for name in CONTENDERS[broker]]
    runs: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            runs[name].append(run_child(name, args))
            print(f"round {round_ + 1}: {name:16} {runs[name][-1]:7.1f} us/message", file=sys.stderr)
    median = {name: statistics.median(values) for name, values in runs.items()}
    for name, values in runs.items():
        print(
            f"{name:16} median {median[name]:7.1f} us/message  ({min(values):.1f}..{max(values):.1f})", file=sys.stderr
        )
    result = {
        "bench": "worker_cpu",
        "n": args.n,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "prefetch": args.prefetch,
        "us_per_message": {name: round(value, 1) for name, value in median.items()},
        "spread_us": {name: [round(min(v), 1), round(max(v), 1)] for name, v in runs.items()},
        "ratio": {b: round(median[f"hedwig_{b}"] / median[f"plain_{b}"], 2) for b in brokers},
        "target_us": TARGET_US,
        "meets_target": {b: median[f"hedwig_{b}"] <= TARGET_US for b in brokers},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
