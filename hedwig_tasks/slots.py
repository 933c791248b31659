"""The prefetch bound: how many deliveries a worker may hold, as slots taken in bulk."""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["Slots"]


class Slots:
    """A count of free places for deliveries, taken in bulk by the receive loop.

    The receive loop takes every free slot at once, and waits for ``enough`` of them while the
    handlers still have work waiting (``hungry()`` is false): a receive (and later its ack)
    costs a broker round trip, so a few large batches cost the worker less than many small
    ones. Slots given back wake the receive loop only once it would take them: on this
    machine kind a thread's wake-up costs about what a message's own work does.
    """

    def __init__(self, total: int, *, enough: int, hungry: Callable[[], bool]) -> None:
        self._free = total
        self._enough = enough
        self._hungry = hungry
        self._changed = threading.Condition(threading.Lock())

    def _ready(self) -> bool:
        return self._free >= self._enough or (self._free > 0 and self._hungry())

    def take(self, most: int, timeout_s: float) -> int:
        """Every free slot, up to ``most``, once there are ``enough`` of them or the handlers are
        ``hungry()``; 0 if that does not happen within ``timeout_s``."""
        with self._changed:
            if not self._ready() and not self._changed.wait_for(self._ready, timeout_s):
                return 0
            taken = min(self._free, most)
            self._free -= taken
            return taken

    def give(self, count: int) -> None:
        if count:
            with self._changed:
                self._free += count
                if self._ready():
                    self._changed.notify()
