"""The prefetch bound: how many deliveries a worker may hold, as slots taken in bulk."""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["Slots"]


class Slots:
    """A count of free places for deliveries, taken in bulk by the receive loop.

    The receive loop takes every free slot at once, and waits for ``enough`` of them while the
    handlers still have buffered work: a receive (and later its ack) costs a broker round
    trip, so a few large batches cost the worker less than many small ones.
    """

    def __init__(self, total: int, *, enough: int) -> None:
        self._free = total
        self._enough = enough
        self._changed = threading.Condition(threading.Lock())

    def take(self, most: int, timeout_s: float, hungry: Callable[[], bool]) -> int:
        """Every free slot, up to ``most``, once there are ``enough`` of them or the handlers are
        ``hungry()``; 0 if that does not happen within ``timeout_s``."""

        def ready() -> bool:
            return self._free >= self._enough or (self._free > 0 and hungry())

        with self._changed:
            if not ready() and not self._changed.wait_for(ready, timeout_s):
                return 0
            taken = min(self._free, most)
            self._free -= taken
            return taken

    def give(self, count: int) -> None:
        if count:
            with self._changed:
                self._free += count
                self._changed.notify()
