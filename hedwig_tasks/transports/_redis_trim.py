"""Trimming the Redis transport's streams: entries every group has acknowledged go, now and then.

The Hedwig library never trims; a stream here is trimmed, at most every ``trim_every_s`` per
process, to the oldest entry any of its groups (ours and the Hedwig library's alike) still needs:
its first pending entry, or the one after its last delivered. A topic stream no group reads is
emptied (what is published to it is kept nowhere); the queue's own streams are never emptied
for want of a group. See ``redis.py`` for the design."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Sequence

from hedwig_tasks.transports._redis_client import DRIVER_ERRORS, RedisLink

__all__ = ["Trimmer"]

logger = logging.getLogger("hedwig_tasks.transports.redis")  # one logger for the whole transport


class Trimmer:
    """Trims streams by script, each at most every ``trim_every_s`` in this process."""

    def __init__(self, link: RedisLink) -> None:
        self._link = link
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}

    def maybe(self, keys: Sequence[str], *, empty_ok: Collection[str] = ()) -> int:
        """Trim those of ``keys`` not trimmed lately; a stream in ``empty_ok`` that no group reads
        is emptied. Returns how many entries went; a failure is logged, never raised (trimming
        waits for the next time)."""
        now = time.monotonic()
        with self._lock:
            due = [key for key in dict.fromkeys(keys) if self._next.get(key, 0.0) <= now]
            for key in due:
                self._next[key] = now + self._link.trim_every_s
        if not due:
            return 0
        try:
            trimmed = int(self._link.script("trim")(keys=due, args=["1" if k in empty_ok else "0" for k in due]))
        except DRIVER_ERRORS as exc:
            logger.warning("trimming %s failed: %s", ", ".join(due), exc)
            return 0
        if trimmed:
            logger.debug("trimmed %d acknowledged entries from %s", trimmed, ", ".join(due))
        return trimmed
