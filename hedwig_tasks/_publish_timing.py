"""When a published message may run, and until when: countdown, ETA and expiry on publish.

A delay is the transport's to keep (``Transport.publish(..., delay_s=)``), held by the broker,
never in a worker's memory. An expiry travels with the message in the ``hedwig_expires_at``
attribute (epoch milliseconds, as ``hedwig_message_timestamp``); a worker that receives the
message after that time does not run its handler (see :mod:`hedwig_tasks._worker_expiry`).
Hedwig's own consumers ignore ``hedwig_*`` attributes they do not know: they run an expired
message as any other.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import time
from collections.abc import Callable

from hedwig_tasks.exceptions import ConfigurationError

__all__ = ["EXPIRES_AT_ATTRIBUTE", "Timing", "timing"]

#: The attribute that carries a message's expiry time, in epoch milliseconds.
EXPIRES_AT_ATTRIBUTE = "hedwig_expires_at"


@dataclasses.dataclass(frozen=True)
class Timing:
    """A publish's delay (seconds from now, 0 for none) and expiry (epoch ms, None for none)."""

    delay_s: float = 0.0
    expires_at_ms: int | None = None

    @property
    def plain(self) -> bool:
        return self.delay_s <= 0 and self.expires_at_ms is None


NOW = Timing()


def _seconds(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ConfigurationError(f"{name}={value!r}: expected seconds, 0 or more")
    return float(value)


def _epoch_s(value: dt.datetime | float | None, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ConfigurationError(f"{name}={value!r}: give an aware datetime (with a tzinfo), not a naive one")
        return value.timestamp()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{name}={value!r}: expected an aware datetime or epoch seconds")
    return float(value)


def timing(
    *,
    delay_s: float | None = None,
    eta: dt.datetime | float | None = None,
    expires_s: float | None = None,
    expires_at: dt.datetime | float | None = None,
    clock: Callable[[], float] = time.time,
) -> Timing:
    """The delay and expiry that these publish options ask for; one of each pair at most.

    ``eta`` and ``expires_at`` are aware datetimes or epoch seconds; an ``eta`` in the past is
    no delay. Raises :class:`ConfigurationError` naming a bad or conflicting option.
    """
    if delay_s is None and eta is None and expires_s is None and expires_at is None:
        return NOW
    if delay_s is not None and eta is not None:
        raise ConfigurationError("give delay_s or eta, not both")
    if expires_s is not None and expires_at is not None:
        raise ConfigurationError("give expires_s or expires_at, not both")
    now = clock()
    delay = _seconds(delay_s, "delay_s")
    eta_s = _epoch_s(eta, "eta")
    wait_s = delay if delay is not None else max(0.0, eta_s - now) if eta_s is not None else 0.0
    lifetime = _seconds(expires_s, "expires_s")
    until_s = _epoch_s(expires_at, "expires_at")
    if lifetime is not None:
        until_s = now + lifetime
    expires_ms = None if until_s is None else math.ceil(until_s * 1000)
    if expires_ms is not None and expires_ms <= math.ceil((now + wait_s) * 1000) and wait_s > 0:
        raise ConfigurationError("the message would expire before its delay is over: expiry must come after the eta")
    return Timing(wait_s, expires_ms)
