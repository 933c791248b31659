"""The reference of ``bench/sqlite_bus.py``'s drain: a plain sqlite3 loop doing the bus's work.

It consumes the hedwig-tasks bus file the loader filled (the same table, index and rows), as a
programmer would with nothing but :mod:`sqlite3`: WAL mode and ``synchronous=NORMAL`` as the bus
runs; claim a batch of up to ``--batch`` rows in one ``BEGIN IMMEDIATE`` transaction (one
``UPDATE ... RETURNING`` that pushes their visibility out by a lease), decode each body and count
its ``n`` (the handler's work), then delete each message in one transaction per batch. It polls
every millisecond while the table is empty, and exits once it has counted ``BENCH_N``, printing
the CPU time the drain took (from the first claimed row to the last delete) as JSON.

    python _plain_loop.py BUS_FILE --batch 16 --ready FILE
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path

from _tally import Tally

#: How long the claimed rows stay invisible to others, in seconds (the bus's default lease).
LEASE_S = 30.0
#: Pause between polls of an empty table, in seconds.
POLL_S = 0.001

_CLAIM = """
UPDATE messages SET visible_at = ?, attempts = attempts + 1, lease = attempts + 1
WHERE id IN (SELECT id FROM messages WHERE subscription = ? AND visible_at <= ? ORDER BY visible_at, id LIMIT ?)
RETURNING id, body
"""
_DELETE = "DELETE FROM messages WHERE id = ?"


def drain(connection: sqlite3.Connection, subscription: str, batch: int, tally: Tally, expected: int) -> float:
    """Consume until ``expected`` are counted; the CPU seconds from the first claimed row on."""
    started = 0.0
    while tally.handled < expected:
        now = time.time()
        connection.execute("BEGIN IMMEDIATE")
        rows = connection.execute(_CLAIM, (now + LEASE_S, subscription, now, batch)).fetchall()
        connection.execute("COMMIT")
        if not rows:
            time.sleep(POLL_S)
            continue
        started = started or time.process_time()
        for _, body in rows:
            tally.hit(json.loads(body)["n"])
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(_DELETE, [(row_id,) for row_id, _ in rows])
        connection.execute("COMMIT")
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bus", type=Path)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--subscription", default="bench:bench-tick-v1")
    parser.add_argument("--ready", type=Path, required=True)
    args = parser.parse_args()
    tally = Tally()
    with contextlib.closing(sqlite3.connect(args.bus, isolation_level=None, timeout=10)) as connection:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
        args.ready.touch()
        cpu_s = drain(connection, args.subscription, args.batch, tally, int(os.environ["BENCH_N"]))
    tally.write()
    print(json.dumps({"cpu_s": cpu_s}))


if __name__ == "__main__":
    main()
