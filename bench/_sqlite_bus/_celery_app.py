"""The Celery side of ``bench/sqlite_bus.py``: a trivial task on Kombu's SQLAlchemy transport.

The worker loads it with ``celery -A _celery_app worker``; the bench runs it as a script to
create the broker tables and queue, and to publish::

    python _celery_app.py provision
    python _celery_app.py publish N   # tick.delay(n) N times

Configured from the environment, because Celery apps are built at import:

* ``BENCH_BROKER_URL``: ``sqla+sqlite:///...``; ``BENCH_QUEUE``: the queue (``bench``);
* ``BENCH_PREFETCH_MULTIPLIER``: ``worker_prefetch_multiplier`` (4);
* ``BENCH_SQLITE_WAL=1``: put SQLite in WAL mode with ``synchronous=NORMAL``, as the
  hedwig-tasks bus runs. Not what a Celery user gets by default (a rollback journal with an
  fsync per commit); the bench labels it as a variant;
* ``BENCH_N`` and ``BENCH_OUT`` configure the tally (``_tally.py``).

JSON only, no result backend. Kombu's polling interval (1 s, slept only when the queue is empty)
stays at its default: the SQLAlchemy transport passes every transport option to
``create_engine``, which rejects ``polling_interval``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from _tally import Tally
from celery import Celery
from celery.signals import worker_shutdown
from sqlalchemy import event
from sqlalchemy.engine import Engine

QUEUE = os.environ.get("BENCH_QUEUE", "bench")

app = Celery("bench_celery")
app.conf.update(
    broker_url=os.environ.get("BENCH_BROKER_URL", "sqla+sqlite:///celery.db"),
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_ignore_result=True,
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH_MULTIPLIER", "4")),
    worker_hijack_root_logger=False,
)
tally = Tally()

if os.environ.get("BENCH_SQLITE_WAL") == "1":

    @event.listens_for(Engine, "connect")
    def _wal(connection: Any, record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()


@app.task(name="bench.tick")
def tick(n: int) -> None:
    tally.hit(n)


@worker_shutdown.connect
def _on_shutdown(sender: Any = None, **kwargs: Any) -> None:
    tally.write()


def provision() -> None:
    """Create the broker's tables and the queue, as ``hedwig.provision()`` does on the other side."""
    with app.connection_for_write() as connection:
        app.amqp.queues[QUEUE].bind(connection.default_channel).declare()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["provision", "publish"])
    parser.add_argument("count", type=int, nargs="?", default=0)
    args = parser.parse_args()
    if args.action == "provision":
        provision()
        return
    started = time.time()
    for n in range(args.count):
        tick.delay(n)
    json.dump({"publish_started_at": started, "publish_done_at": time.time()}, sys.stdout)


if __name__ == "__main__":
    main()
