"""The dashboard's memory of the last hour: counts sampled every few seconds into a ring buffer.

A thread asks ``transport.counts()`` (the cheap counts every transport answers, as a metrics
scrape does) every ``sample_s`` and the live-worker registry for each worker's ``handled``
count; the throughput of a sample is the sum over workers of what each handled since the one
before (a worker that just appeared counts from its first row, one that left stops counting).
Nothing is written anywhere: a restarted dashboard starts its charts empty.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hedwig_tasks.exceptions import HedwigError

if TYPE_CHECKING:
    from hedwig_tasks.app import Hedwig

__all__ = ["DEFAULT_SAMPLE_S", "HISTORY_S", "Sample", "Sampler", "oldest_age_s"]

logger = logging.getLogger(__name__)

#: Seconds between two samples of the counts.
DEFAULT_SAMPLE_S = 5.0
#: How far back the charts go, in seconds.
HISTORY_S = 3600.0
#: The detail a transport may report the age of its oldest waiting message under, as "<n>s".
OLDEST_DETAIL = "oldest message age"


@dataclasses.dataclass(frozen=True)
class Sample:
    """One sample: per subscription ``[depth, in flight, dead letters, oldest age s]`` (None: unknown)."""

    t: float  #: epoch seconds
    subscriptions: Mapping[str, tuple[int | None, int | None, int | None, float | None]]
    throughput_per_s: float | None  #: messages handled per second by the live workers, None if none


def oldest_age_s(details: Mapping[str, str]) -> float | None:
    """The oldest waiting message's age where the broker says it (a detail ``"oldest message age"``)."""
    text = details.get(OLDEST_DETAIL, "").strip().removesuffix("s")
    try:
        age = float(text)
    except ValueError:
        return None
    return age if math.isfinite(age) else None


class Sampler:
    """Samples an app's counts on a thread of its own; ``history()`` is safe from any thread."""

    def __init__(self, app: Hedwig, *, sample_s: float = DEFAULT_SAMPLE_S) -> None:
        self.app = app
        self.sample_s = sample_s
        self.samples: collections.deque[Sample] = collections.deque(maxlen=max(2, math.ceil(HISTORY_S / sample_s)))
        self.latest: list[Any] = []  #: the last SubscriptionStatus rows
        self.error = ""  #: why the last sample failed, if it did
        self._handled: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hedwig-dashboard-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _loop(self) -> None:
        while True:
            self.sample_once()
            if self._stop.wait(self.sample_s):
                return

    def sample_once(self) -> None:
        """Take one sample now; a broker or store error is kept for the page, and logged once."""
        try:
            rows = self.app.transport.counts(self.app.queue, self.app.subscribed_topics())
        except HedwigError as exc:
            if not self.error:
                logger.warning("dashboard: the counts could not be read: %s", exc)
            self.error = str(exc)
            return
        self.error = ""
        sample = Sample(
            time.time(),
            {row.subscription: (row.depth, row.in_flight, row.dead_letters, oldest_age_s(row.details)) for row in rows},
            self._throughput(),
        )
        with self._lock:
            self.latest = rows
            self.samples.append(sample)

    def _throughput(self) -> float | None:
        """Messages per second the live workers handled since the last sample (None: no worker seen)."""
        from hedwig_tasks._worker_heartbeat import group

        try:
            members = self.app.state.members(group(self.app.name))
        except HedwigError:
            return None
        now, total, seen = time.monotonic(), 0.0, {}
        for member in members:
            handled = int(member.data.get("handled", 0))
            before = self._handled.get(member.member)
            if before is not None and now > before[0]:
                total += max(0, handled - before[1]) / (now - before[0])
            seen[member.member] = (now, handled)
        self._handled = seen
        return round(total, 3) if members else None

    def history(self) -> tuple[list[Any], list[Sample]]:
        """The last status rows and every sample of the last hour, oldest first."""
        with self._lock:
            return list(self.latest), list(self.samples)
