"""The worker's watch over running handlers' time limits, on one thread that waits, never polls.

A handler thread :meth:`~Deadlines.watch`\\ es its run before calling the handler and calls
:meth:`~Deadlines.done` after: True means it finished in time and settles its message as usual;
False means the deadline passed first and ``expire`` was called (or is being called) for it on
the watching thread, which settles the message and replaces the stuck handler thread, so the
late result is discarded. Both calls and the expiry take one lock, so exactly one side wins.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Deadlines"]


class Deadlines:
    """Calls ``expire(item)`` for each watched item whose deadline (monotonic seconds) passes."""

    def __init__(self, expire: Callable[[Any], None]) -> None:
        self._expire = expire
        self._watched: dict[int, tuple[float, Any]] = {}
        self._changed = threading.Condition(threading.Lock())
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="hedwig-time-limits", daemon=True)
        self._thread.start()

    def watch(self, item: Any, deadline: float) -> None:
        with self._changed:
            self._watched[id(item)] = (deadline, item)
            self._changed.notify()

    def done(self, item: Any) -> bool:
        """Stop watching ``item``; False if its deadline came first (it was expired)."""
        with self._changed:
            return self._watched.pop(id(item), None) is not None

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify()
        self._thread.join(5.0)

    def _run(self) -> None:
        while True:
            with self._changed:
                expired = self._take_expired(time.monotonic())
                if not expired:
                    if self._stopped:
                        return
                    self._changed.wait(self._until_next())
                    continue
            for item in expired:
                self._expire(item)

    def _take_expired(self, now: float) -> list[Any]:
        """Remove and return the items past their deadline (holding the lock)."""
        expired = [key for key, (deadline, _) in self._watched.items() if deadline <= now]
        return [self._watched.pop(key)[1] for key in expired]

    def _until_next(self) -> float | None:
        if not self._watched:
            return None
        return max(0.0, min(deadline for deadline, _ in self._watched.values()) - time.monotonic())
