"""Rate limits: how often a handler may start, as ``"100/s"``, ``"30/m"`` or ``"500/h"``.

A :class:`RateLimiter` hands out start times spaced ``1 / rate`` seconds apart (a token bucket
holding one token, as Celery's): :meth:`RateLimiter.acquire` reserves the next one and says how
long the caller waits for it. It keeps no thread and never polls; the worker waits out the
answer on an event that a stop request sets. The limiter is per worker process; a fleet-wide
limiter backed by the state store can offer the same ``acquire(now) -> wait_s``.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from typing import Protocol

from hedwig_tasks.exceptions import ConfigurationError

__all__ = ["Limiter", "RateLimit", "RateLimiter"]

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")
_PER_S = {"s": 1.0, "m": 60.0, "h": 3600.0}


@dataclasses.dataclass(frozen=True)
class RateLimit:
    """A rate: ``count`` starts per ``period_s`` seconds."""

    count: float
    period_s: float

    @classmethod
    def parse(cls, text: str, *, option: str = "rate_limit") -> RateLimit:
        """``"100/s"``, ``"30/m"``, ``"500/h"``; :class:`ConfigurationError` naming ``option`` otherwise."""
        match = _RATE_RE.match(text) if isinstance(text, str) else None
        if match is None or float(match[1]) <= 0:
            raise ConfigurationError(
                f"{option}={text!r}: expected a positive count per second, minute or hour, "
                "such as '100/s', '30/m' or '500/h'"
            )
        return cls(float(match[1]), _PER_S[match[2]])

    @property
    def per_s(self) -> float:
        return self.count / self.period_s

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}[self.period_s]
        return f"{self.count:g}/{unit}"


class Limiter(Protocol):
    """What the worker asks of a limiter (a fleet-wide one backed by the state store included)."""

    def acquire(self, now: float) -> float:
        """Reserve the next start; the seconds from ``now`` until it (0 to start at once)."""
        ...


class RateLimiter:
    """Starts spaced ``1 / rate`` apart in one process; thread-safe. ``now`` is monotonic seconds."""

    def __init__(self, rate: RateLimit) -> None:
        self.rate = rate
        self._interval_s = 1.0 / rate.per_s
        self._next = float("-inf")  #: when the next start may be
        self._lock = threading.Lock()

    def acquire(self, now: float) -> float:
        with self._lock:
            start = max(now, self._next)
            self._next = start + self._interval_s
        return start - now

    def __repr__(self) -> str:
        return f"<RateLimiter {self.rate}>"
