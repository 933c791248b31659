"""A thread-safe tally of benchmark messages, shared by the hedwig-tasks and Celery helper apps.

Each side's handler calls :meth:`Tally.hit` with the message's ``n`` (and, when the publisher
stamped it, the epoch time the publish call started, for the latency to the handler's start).
When the expected count is reached the time is written to ``<out>.done`` at once, so the bench
can stop its clock without waiting for the worker to exit; :meth:`Tally.write` writes the final
figures at shutdown, with every ``n`` seen, so the tallies of several processes can be merged.
Configured from ``BENCH_N`` and ``BENCH_OUT`` at first use, never at import.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path


def write_json(path: Path, value: object) -> None:
    """Write ``value`` so a reader polling ``path`` never sees half of it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value))
    os.replace(partial, path)


class Tally:
    """Counts handled messages and which ``n`` each was, to catch duplicates and losses."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._expected = -1
        self._seen = bytearray()
        self._out: Path | None = None
        self.handled = 0
        self.duplicates = 0
        self.first_at = 0.0
        self.last_at = 0.0
        self.done_at = 0.0
        self.latencies_s: list[float] = []

    def _configure(self) -> None:
        self._expected = int(os.environ["BENCH_N"])
        self._seen = bytearray(self._expected)
        self._out = Path(os.environ["BENCH_OUT"])

    def hit(self, n: int, sent_at: float | None = None) -> None:
        now = time.time()
        with self._lock:
            if self._expected < 0:
                self._configure()
            if sent_at is not None:
                self.latencies_s.append(now - sent_at)
            if not self.handled:
                self.first_at = now
            self.last_at = now
            self.handled += 1
            if 0 <= n < self._expected and not self._seen[n]:
                self._seen[n] = 1
            else:
                self.duplicates += 1
            if self.handled == self._expected:
                self.done_at = time.time()
                assert self._out is not None
                write_json(self._out.with_name(self._out.name + ".done"), {"done_at": self.done_at})

    def write(self) -> None:
        """Write the final figures to ``BENCH_OUT`` (at worker shutdown)."""
        with self._lock:
            if self._expected < 0:
                self._configure()
            assert self._out is not None
            figures = {
                "handled": self.handled,
                "distinct": sum(self._seen),
                "duplicates": self.duplicates,
                "first_at": self.first_at,
                "last_at": self.last_at,
                "done_at": self.done_at,
                "seen": [n for n, hit in enumerate(self._seen) if hit],
                "latencies_s": self.latencies_s,
            }
            write_json(self._out, figures)
