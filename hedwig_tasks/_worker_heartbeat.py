"""The worker's heartbeats: the ``heartbeat`` signal and Hedwig's heartbeat hook from the receive
loop, and the live-worker registry, each worker's row in the state store, read by ``inspect``.

A mixin of :class:`~hedwig_tasks.worker.Worker`. A thread writes the row
``heartbeat("workers/<app>", <worker id>, {...}, ttl_s=3 * interval)`` when the worker starts and
every ``heartbeat_s`` (default 5 s) after; a clean stop removes it (``forget``), and the row of a
worker that died expires within three intervals. A store error skips that beat (logged once).
The row holds no secrets: the transport is named by its repr, which masks passwords.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hedwig_tasks import signals
from hedwig_tasks._version import __version__
from hedwig_tasks._worker_report import key as _key
from hedwig_tasks.exceptions import StateError

if TYPE_CHECKING:
    from hedwig_tasks._worker_limits import _Held
    from hedwig_tasks._worker_options import WorkerOptions
    from hedwig_tasks._worker_state import Outage
    from hedwig_tasks.app import Hedwig

__all__ = ["HEARTBEAT_INTERVAL_S", "HEARTBEAT_TTL_BEATS", "Heartbeats", "group", "transport_text"]

#: Interval between ``heartbeat`` signals, in seconds.
HEARTBEAT_INTERVAL_S = 1.0
#: A row lives this many heartbeat intervals unless written again.
HEARTBEAT_TTL_BEATS = 3


def group(app_name: str) -> str:
    """The heartbeat group of an app's workers."""
    return f"workers/{app_name}"


def transport_text(app: Hedwig) -> str:
    """The app's transport as its repr, which every transport writes without secrets."""
    return repr(app.transport)


class Heartbeats:
    """Writes this worker's heartbeat row; mixed into the worker, whose state it reads."""

    app: Hedwig
    options: WorkerOptions
    topics: Sequence[str]
    worker_id: str
    counts: dict[str, int]
    duplicates: int
    started_at: float
    error_count: int
    last_beat: float
    _last_heartbeat: float
    _last_hook_beat: float
    _state_outage: Outage
    _stopping: threading.Event
    _held: dict[int, _Held]
    _held_lock: threading.Lock

    if TYPE_CHECKING:

        def _spawn(self, target: Any, name: str) -> threading.Thread: ...
        def _call_hook(self, name: str, hook: Any, **kwargs: Any) -> bool: ...
        @property
        def held(self) -> int: ...

    def _beat(self) -> None:
        """From the receive loop: the ``heartbeat`` signal every second, the Hedwig hook at its interval."""
        now = self.last_beat = time.monotonic()
        if now - self._last_heartbeat >= HEARTBEAT_INTERVAL_S:
            self._last_heartbeat = now
            signals.send(signals.heartbeat, self.app, worker=self, error_count=self.error_count, held=self.held)
        hooks = self.app.hooks
        if hooks.heartbeat and now - self._last_hook_beat >= hooks.heartbeat_interval_s:
            self._last_hook_beat = now
            self._call_hook("heartbeat", hooks.heartbeat, error_count=self.error_count)

    def _keeps_row(self) -> bool:
        """Unless switched off, where the rest of the fleet can read the row.

        Not on an in-process bus no other process sees. On a cloud or broker transport only with
        a state store configured (``Hedwig(state=...)`` or ``$HEDWIG_STATE_URL``): the default
        store is a file in the working directory, which no other host or pod reads.
        """
        from hedwig_tasks.transports.memory import MemoryTransport

        transport = self.app.transport
        if self.options.heartbeat_s is None or isinstance(transport, MemoryTransport):
            return False
        return transport.capabilities.local or self.app.state_configured

    def _uses_state(self) -> bool:
        """Whether this worker keeps a heartbeat row, or runs idempotent or fleet-limited handlers."""
        return self._keeps_row() or any(h.idempotency_key or h.rate_scope == "fleet" for h in self.app.registry)

    def _check_state(self) -> None:
        """Build the state store now if it will be used, so a bad URL fails the start (nothing connects)."""
        if self._uses_state():
            self.app.state  # noqa: B018 - built for its ConfigurationError

    def _release_state(self) -> None:
        """At shutdown: close the connections of the store the app built from its URL, so none
        outlives the worker (each store connects again if used again); a store object passed in
        is its owner's to close."""
        from hedwig_tasks.state.base import StateStore

        state = self.app._state
        if state is not None and not isinstance(self.app._state_spec, StateStore):
            state.close()

    def _start_heartbeats(self) -> None:
        if self._keeps_row():
            self._spawn(self._heartbeat_loop, "hedwig-heartbeat")

    def _heartbeat_loop(self) -> None:
        interval = self.options.heartbeat_s
        assert interval is not None
        fixed = self._fixed_fields()
        while True:
            self._write_row(fixed, interval)
            if self._stopping.wait(interval):
                break
        try:
            self.app.state.forget(group(self.app.name), self.worker_id)
        except StateError:
            pass  # the row expires on its own

    def _write_row(self, fixed: dict[str, Any], interval: float) -> None:
        try:
            row = {**fixed, **self._live_fields()}
            self.app.state.heartbeat(group(self.app.name), self.worker_id, row, ttl_s=HEARTBEAT_TTL_BEATS * interval)
            self._state_outage.answered()
        except StateError as exc:
            self._state_outage.failed("heartbeat", exc, "this worker's heartbeat row is not written")

    def _fixed_fields(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "app": self.app.name,
            "queue": self.app.queue,
            "version": __version__,
            "transport": transport_text(self.app),
            "topics": list(self.topics),
            "concurrency": self.options.concurrency,
            "prefetch": self.options.prefetch,
            "pool": self.options.pool,
            "started": self.started_at,
        }

    def _live_fields(self) -> dict[str, Any]:
        """What changes between beats: what is held and running, and the counts."""
        wall, mono = time.time(), time.monotonic()
        with self._held_lock:
            held = list(self._held.values())
            counts = dict(self.counts, duplicates=self.duplicates)
        running = [
            {
                "id": h.message.id if h.message else _key(h.delivery),
                "type": f"{h.message.type} {h.message.version}" if h.message else "",
                "since": round(wall - (mono - h.started_at), 3),
            }
            for h in held
            if h.running and h.started_at
        ]
        failed = counts["retried"] + counts["dead_lettered"]
        return {"held": len(held), "running": running, **counts, "failed": failed}
