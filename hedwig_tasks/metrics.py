"""Prometheus metrics built on the signals, rendered in Prometheus' text format.

No client library is needed: the exposition format is a few lines of text, and writing it
here keeps the dependency list as it is. ``hedwig-tasks worker --metrics-port PORT`` serves
``/metrics``:

* ``hedwig_published_total``, ``hedwig_handled_total``, ``hedwig_failed_total``,
  ``hedwig_retried_total``, ``hedwig_dead_lettered_total``: counters by ``type`` and ``major``
  (dead letters that could not be decoded count under ``type="",major=""``);
* ``hedwig_handler_dead_lettered_total``: messages whose handler raised ``DeadLetter``, by
  ``type`` and ``major``. A deliberate dead letter is not a failure: it is counted here and in
  ``hedwig_dead_lettered_total``, never in ``hedwig_failed_total``;
* ``hedwig_duplicates_total``: messages of idempotent handlers acknowledged without running,
  already handled (``message_duplicate``), by ``type`` and ``major``;
* ``hedwig_time_limit_exceeded_total``: handler runs stopped at their time limit (cancelled,
  their thread abandoned, or their child process killed), by ``type`` and ``major``;
* ``hedwig_expired_total``: messages received after their expiry and not run (ignored or
  dead-lettered, as ``Hedwig(expired=...)`` says), by ``type`` and ``major``;
* ``hedwig_handler_duration_seconds``: a histogram by ``type`` and ``major``;
* ``hedwig_running``, ``hedwig_buffered``: gauges of what the worker holds;
* ``hedwig_abandoned_threads``: a gauge of handler threads abandoned at a time limit whose call
  has not returned yet (each still holds its stack and whatever it was waiting on);
* ``hedwig_subscription_depth``, ``hedwig_subscription_dead_letters``: gauges by
  ``subscription`` where the transport reports them, read at most every ``depth_every_s``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from hedwig_tasks import signals
from hedwig_tasks.message import Message

if TYPE_CHECKING:
    from hedwig_tasks.app import Hedwig
    from hedwig_tasks.worker import Worker

__all__ = ["Metrics"]

#: Upper bounds of the handler duration histogram's buckets, in seconds.
DEFAULT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: How often subscription depth is read from the transport at most, in seconds.
DEFAULT_DEPTH_EVERY_S = 5.0

_COUNTERS = {
    "hedwig_published_total": "Messages published.",
    "hedwig_handled_total": "Messages whose handler succeeded (or raised Ignore).",
    "hedwig_failed_total": "Handler runs that raised (not counting Ignore and DeadLetter).",
    "hedwig_retried_total": "Messages scheduled for a retry.",
    "hedwig_dead_lettered_total": "Messages sent to the dead letters.",
    "hedwig_handler_dead_lettered_total": "Messages whose handler raised DeadLetter (a decision, not a failure).",
    "hedwig_time_limit_exceeded_total": "Handler runs stopped at their time limit.",
    "hedwig_duplicates_total": "Messages of idempotent handlers already handled, acknowledged without running.",
    "hedwig_expired_total": "Messages received after their expiry, not run.",
}

Labels = tuple[str, str]


def _labels(message: Message | None) -> Labels:
    return (message.type, str(message.major_version)) if message is not None else ("", "")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _pairs(labels: Labels) -> str:
    return f'type="{_escape(labels[0])}",major="{_escape(labels[1])}"'


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[index] += 1
        self.total += 1
        self.sum += value


class Metrics:
    """Collects an app's signals. Call :meth:`close` to disconnect; :meth:`render` to expose."""

    def __init__(
        self,
        app: Hedwig,
        worker: Worker | None = None,
        *,
        buckets_s: tuple[float, ...] = DEFAULT_BUCKETS_S,
        depth_every_s: float = DEFAULT_DEPTH_EVERY_S,
    ) -> None:
        self.app = app
        self.worker = worker
        self._buckets = buckets_s
        self._depth_every_s = depth_every_s
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, int]] = {name: {} for name in _COUNTERS}
        self._durations: dict[Labels, _Histogram] = {}
        self._depth: tuple[float, list[Any]] = (0.0, [])
        self._receivers: list[tuple[Any, Callable[..., None]]] = []
        self._connect()

    def _connect(self) -> None:
        for signal, receiver in (
            (signals.after_publish, self._count("hedwig_published_total")),
            (signals.handler_succeeded, self._on_done("hedwig_handled_total")),
            (signals.handler_failed, self._on_done("hedwig_failed_total")),
            (signals.handler_dead_lettered, self._on_done("hedwig_handler_dead_lettered_total")),
            (signals.handler_retried, self._count("hedwig_retried_total")),
            (signals.message_dead_lettered, self._count("hedwig_dead_lettered_total")),
            (signals.handler_time_limit_exceeded, self._count("hedwig_time_limit_exceeded_total")),
            (signals.message_duplicate, self._count("hedwig_duplicates_total")),
            (signals.message_expired, self._count("hedwig_expired_total")),
        ):
            signal.connect(receiver, sender=self.app, weak=False)
            self._receivers.append((signal, receiver))

    def close(self) -> None:
        for signal, receiver in self._receivers:
            signal.disconnect(receiver, sender=self.app)
        self._receivers.clear()

    def _count(self, name: str) -> Callable[..., None]:
        def receiver(sender: Any, *, message: Message | None = None, **_: Any) -> None:
            labels = _labels(message)
            with self._lock:
                self._counters[name][labels] = self._counters[name].get(labels, 0) + 1

        return receiver

    def _on_done(self, name: str) -> Callable[..., None]:
        count = self._count(name)

        def receiver(sender: Any, *, message: Message, duration_s: float, **kwargs: Any) -> None:
            count(sender, message=message)
            labels = _labels(message)
            with self._lock:
                histogram = self._durations.setdefault(labels, _Histogram(self._buckets))
                histogram.observe(duration_s)

        return receiver

    def value(self, name: str, message_type: str = "", major: int | str = "") -> int:
        """One counter's value (for tests and ad-hoc checks)."""
        with self._lock:
            return self._counters[name].get((message_type, str(major)), 0)

    # -- exposition -------------------------------------------------------------------------------

    def render(self) -> str:
        """Everything, in Prometheus text exposition format 0.0.4."""
        with self._lock:
            lines = [*self._render_counters(), *self._render_histogram()]
        lines.extend(self._render_gauges())
        return "\n".join(lines) + "\n"

    def _render_counters(self) -> Iterable[str]:
        for name, help_text in _COUNTERS.items():
            yield f"# HELP {name} {help_text}"
            yield f"# TYPE {name} counter"
            for labels, value in sorted(self._counters[name].items()):
                yield f"{name}{{{_pairs(labels)}}} {value}"

    def _render_histogram(self) -> Iterable[str]:
        name = "hedwig_handler_duration_seconds"
        yield f"# HELP {name} Handler run time."
        yield f"# TYPE {name} histogram"
        for labels, histogram in sorted(self._durations.items()):
            pairs = _pairs(labels)
            for bound, count in zip(histogram.buckets, histogram.counts, strict=True):
                yield f'{name}_bucket{{{pairs},le="{bound}"}} {count}'
            yield f'{name}_bucket{{{pairs},le="+Inf"}} {histogram.total}'
            yield f"{name}_sum{{{pairs}}} {histogram.sum}"
            yield f"{name}_count{{{pairs}}} {histogram.total}"

    def _render_gauges(self) -> Iterable[str]:
        if self.worker is None:
            return
        yield "# HELP hedwig_running Messages whose handler is running."
        yield "# TYPE hedwig_running gauge"
        yield f"hedwig_running {self.worker.running}"
        yield "# HELP hedwig_buffered Messages received and waiting for a handler thread."
        yield "# TYPE hedwig_buffered gauge"
        yield f"hedwig_buffered {self.worker.buffered}"
        yield "# HELP hedwig_abandoned_threads Handler threads abandoned at a time limit, still running."
        yield "# TYPE hedwig_abandoned_threads gauge"
        yield f"hedwig_abandoned_threads {self.worker.abandoned_threads}"
        rows = self._subscription_rows()
        for field, name in (
            ("depth", "hedwig_subscription_depth"),
            ("dead_letters", "hedwig_subscription_dead_letters"),
        ):
            known = [(row.subscription, getattr(row, field)) for row in rows if getattr(row, field) is not None]
            if known:
                yield f"# TYPE {name} gauge"
                for subscription, value in known:
                    yield f'{name}{{subscription="{_escape(subscription)}"}} {value}'

    def _subscription_rows(self) -> list[Any]:
        read_at, rows = self._depth
        now = time.monotonic()
        if self.worker is not None and now - read_at >= self._depth_every_s:
            try:
                rows = self.app.transport.counts(self.app.queue, self.worker.topics)
            except Exception:  # a metrics scrape must never fail because the broker is slow
                rows = []
            self._depth = (now, rows)
        return rows
