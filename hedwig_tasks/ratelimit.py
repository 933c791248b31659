"""Rate limits: how often a handler may start, as ``"100/s"``, ``"30/m"`` or ``"500/h"``.

A :class:`RateLimiter` hands out start times spaced ``1 / rate`` seconds apart (a token bucket
holding one token, as Celery's): :meth:`RateLimiter.acquire` reserves the next one and says how
long the caller waits for it. It keeps no thread and never polls; the worker waits out the
answer on an event that a stop request sets. That limiter is per worker process.

A :class:`FleetRateLimiter` (``rate_scope="fleet"``) shares one token bucket in the app's state
store among every worker: :meth:`FleetRateLimiter.acquire` takes a token or says how long until
one could be, reserving nothing (the store's ``take``), so the worker asks again after the wait;
one thread per process asks (:attr:`FleetRateLimiter.turn`), the others queue behind it. Its
bucket holds a tenth of a second of starts (at least one), so tokens that fall due while the
asker wakes up are not lost, and an idle fleet starts at most that many at once.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from hedwig_tasks.exceptions import ConfigurationError

if TYPE_CHECKING:
    from hedwig_tasks.state.base import StateStore

__all__ = ["FLEET_BURST_S", "RATE_SCOPES", "FleetRateLimiter", "Limiter", "RateLimit", "RateLimiter"]

#: Where a rate limit holds: in each worker process, or across every worker of the app.
RATE_SCOPES = ("process", "fleet")
#: How many seconds of starts a fleet limit's bucket holds (at least one start).
FLEET_BURST_S = 0.1

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

    #: True: :meth:`acquire` reserved the start it names; False: it took one now (0) or nothing.
    reserves: bool

    def acquire(self, now: float) -> float:
        """The seconds from ``now`` until this caller's start (0 to start at once)."""
        ...


class RateLimiter:
    """Starts spaced ``1 / rate`` apart in one process; thread-safe. ``now`` is monotonic seconds."""

    reserves = True

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


class FleetRateLimiter:
    """One token bucket in the state store shared by every worker of the app; thread-safe.

    ``store`` returns the store (called at each take, so nothing connects at declaration).
    """

    reserves = False

    def __init__(self, rate: RateLimit, store: Callable[[], StateStore], bucket: str) -> None:
        self.rate = rate
        self.bucket = bucket
        self.burst = max(1.0, rate.per_s * FLEET_BURST_S)
        self._store = store
        #: Held by the one thread of this process asking the store for a start; the others wait on it.
        self.turn = threading.Lock()

    def acquire(self, now: float) -> float:
        """Take a start from the fleet's bucket: 0.0, or the seconds until one could be (nothing
        was taken; ask again then). ``now`` is unused: the store keeps the time. Raises ``StateError``."""
        return self._store().take(self.bucket, rate_per_s=self.rate.per_s, burst=self.burst)

    def __repr__(self) -> str:
        return f"<FleetRateLimiter {self.rate} bucket={self.bucket!r}>"
