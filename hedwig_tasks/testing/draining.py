"""Run apps' real workers inside a test until everything sent to them is handled.

:func:`drain` is hedwig-tasks' answer to Dramatiq's ``join``: it starts a
:class:`~hedwig_tasks.worker.Worker` per app in background threads of the test's process
(the same code ``hedwig-tasks worker`` runs), waits until no delivery is waiting or in flight
on any of their subscriptions, and no retry they scheduled is due within ``retry_grace_s``,
then stops them and returns what each did. A handler that publishes to another drained app
keeps the drain going until that message is handled too.

It works on any transport whose ``counts`` are exact (the in-process ``memory://`` buses and
the SQLite bus); on a local bus each worker provisions its own subscriptions, as a worker does.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

from hedwig_tasks import signals
from hedwig_tasks.app import Hedwig
from hedwig_tasks.exceptions import ConfigurationError, HandlerControl
from hedwig_tasks.message import Message
from hedwig_tasks.transports.base import Delivery
from hedwig_tasks.worker import Worker, WorkerOptions

__all__ = ["DrainCounts", "drain"]

#: Longest a drain waits for the apps to settle, in seconds.
DEFAULT_TIMEOUT_S = 10.0
#: A retry due within this many seconds is waited for; a later one is left scheduled, in seconds.
DEFAULT_RETRY_GRACE_S = 5.0
#: Longest pause between two looks at whether everything settled, in seconds.
CHECK_INTERVAL_S = 0.02
#: How long a worker's receive blocks when its subscriptions are empty, in seconds.
WAIT_S = 0.02


@dataclasses.dataclass(frozen=True)
class DrainCounts:
    """What one app's worker did during a drain."""

    handled: int = 0
    retried: int = 0
    dead_lettered: int = 0


def drain(
    app: Hedwig,
    *apps: Hedwig,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    fail_fast: bool = True,
    retry_grace_s: float = DEFAULT_RETRY_GRACE_S,
    concurrency: int = 1,
) -> dict[str, DrainCounts]:
    """Run a worker for each app until nothing is waiting or in flight; returns counts by app name.

    With ``fail_fast`` the first exception a handler raises (other than ``Retry``, ``Ignore`` and
    ``DeadLetter``, which say what to do) stops the drain and is raised here, whether or not its
    retry policy would retry it; a message that cannot be decoded, or that no handler takes,
    raises ``AssertionError``. Without it, failures take their course (retried, dead-lettered)
    and show in the counts. Raises ``TimeoutError`` saying what is left when the apps have not
    settled within ``timeout_s``.
    """
    chosen = list(dict.fromkeys((app, *apps)))
    names = [a.name for a in chosen]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"drain: the apps' names must differ (they name the counts), got {names}")
    run = _Drain(chosen, fail_fast=fail_fast, retry_grace_s=retry_grace_s, concurrency=concurrency)
    return run.until_settled(timeout_s)


class _Drain:
    """The workers of one drain, what their signals said, and when everything is settled."""

    def __init__(self, apps: list[Hedwig], *, fail_fast: bool, retry_grace_s: float, concurrency: int) -> None:
        self.apps = apps
        self.fail_fast = fail_fast
        self.retry_grace_s = retry_grace_s
        options = WorkerOptions(concurrency=concurrency, wait_s=WAIT_S)
        self.workers = {a.name: Worker(a, options) for a in apps if a.subscribed_topics()}
        self.threads: list[threading.Thread] = []
        self.failure: BaseException | None = None
        self.crashed: BaseException | None = None  # a worker that could not run
        self.left = ""  # what the last look found unsettled, for the timeout's message
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._retries: dict[tuple[str, str, str], tuple[float, int]] = {}  # key -> (due, attempt)
        self._seen: dict[tuple[str, str, str], int] = {}  # key -> newest attempt received

    # -- running ------------------------------------------------------------------------------

    def until_settled(self, timeout_s: float) -> dict[str, DrainCounts]:
        receivers = self._connect()
        settled = False
        try:
            self._start()
            settled = self._wait(time.monotonic() + timeout_s)
        finally:
            self._stop(at_once=not settled)
            for signal, receiver in receivers:
                signal.disconnect(receiver)
        if self.crashed is not None:
            raise self.crashed
        if self.failure is not None:
            raise self.failure
        if not settled:
            raise TimeoutError(f"drain: not settled after {timeout_s}s: {self.left}")
        return {a.name: _counts(self.workers.get(a.name)) for a in self.apps}

    def _start(self) -> None:
        for name, worker in self.workers.items():
            thread = threading.Thread(target=self._run, args=(worker,), name=f"hedwig-drain-{name}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def _run(self, worker: Worker) -> None:
        try:
            worker.run()
        except BaseException as exc:  # raised in the test's thread once the others stopped
            self.crashed = exc
            self._wake.set()

    def _wait(self, deadline: float) -> bool:
        while self.crashed is None and self.failure is None:
            if self._settled():
                return True
            if time.monotonic() >= deadline:
                return False
            self._wake.wait(CHECK_INTERVAL_S)
            self._wake.clear()
        return False

    def _stop(self, *, at_once: bool) -> None:
        for worker in self.workers.values():
            worker.stop()
            if at_once:
                worker.stop()  # a second request does not wait for running handlers
        for thread in self.threads:
            thread.join()

    # -- settled ------------------------------------------------------------------------------

    def _settled(self) -> bool:
        """Nothing held, waiting or in flight, no retry due soon, and no worker moved meanwhile."""
        before = self._snapshot()
        if before is None:
            return False
        for name, worker in self.workers.items():
            if not self._quiet(name, worker):
                return False
        return self._snapshot() == before

    def _snapshot(self) -> tuple[int, ...] | None:
        """Every worker's finished count, or None while one is not ready or holds a delivery."""
        workers = list(self.workers.values())
        if not all(w.ready and w.held == 0 for w in workers):
            self.left = "workers still starting or handling"
            return None
        return tuple(sum(w.counts.values()) for w in workers)

    def _quiet(self, name: str, worker: Worker) -> bool:
        app = worker.app
        statuses = app.transport.counts(app.queue, worker.topics)
        waiting = sum(s.depth or 0 for s in statuses)
        in_flight = sum(s.in_flight or 0 for s in statuses)
        horizon = time.monotonic() + self.retry_grace_s
        with self._lock:
            retries = [due for (app_name, _, _), (due, _) in self._retries.items() if app_name == name]
        soon = [due for due in retries if due <= horizon]
        self.left = f"{name}: {waiting} waiting ({len(retries)} of them retries), {in_flight} in flight"
        return not in_flight and not soon and waiting <= len(retries)

    # -- what the workers' signals say ---------------------------------------------------------

    def _connect(self) -> list[tuple[Any, Any]]:
        receivers = [
            (signals.message_received, self._received),
            (signals.handler_retried, self._retried),
            (signals.handler_failed, self._failed),
            (signals.message_invalid, self._invalid),
            (signals.message_unknown, self._unknown),
            (signals.handler_succeeded, self._woken),
            (signals.message_dead_lettered, self._woken),
        ]
        for signal, receiver in receivers:
            for app in self.apps:
                signal.connect(receiver, sender=app, weak=False)
        return receivers

    def _woken(self, app: Hedwig, **_: Any) -> None:
        self._wake.set()

    def _received(self, app: Hedwig, *, delivery: Delivery, **_: Any) -> None:
        key = _key(app, delivery)
        with self._lock:
            self._seen[key] = max(self._seen.get(key, 0), delivery.attempt)
            scheduled = self._retries.get(key)
            if scheduled is not None and delivery.attempt > scheduled[1]:
                del self._retries[key]

    def _retried(self, app: Hedwig, *, message: Message, delay_s: float, **_: Any) -> None:
        delivery = message.delivery
        if delivery is None:
            return
        key = _key(app, delivery)
        with self._lock:
            if self._seen.get(key, 0) <= delivery.attempt:  # not already back
                self._retries[key] = (time.monotonic() + delay_s, delivery.attempt)
        self._wake.set()

    def _failed(self, app: Hedwig, *, error: BaseException, **_: Any) -> None:
        if not isinstance(error, HandlerControl):
            self._fail(error)

    def _invalid(self, app: Hedwig, *, delivery: Delivery, error: BaseException, **_: Any) -> None:
        failure = AssertionError(f"drain: {app.name} dead-lettered an invalid message from {delivery.subscription}")
        failure.__cause__ = error
        self._fail(failure)

    def _unknown(self, app: Hedwig, *, message: Message, **_: Any) -> None:
        self._fail(
            AssertionError(
                f"drain: no handler of {app.name} takes {message.type} {message.version} "
                f"(id={message.id}); it was dead-lettered"
            )
        )

    def _fail(self, error: BaseException) -> None:
        if self.fail_fast:
            with self._lock:
                if self.failure is None:
                    self.failure = error
        self._wake.set()


def _key(app: Hedwig, delivery: Delivery) -> tuple[str, str, str]:
    """One message on one app's subscription, across its deliveries."""
    return app.name, delivery.subscription, delivery.attributes.get("hedwig_id") or delivery.transport_id


def _counts(worker: Worker | None) -> DrainCounts:
    if worker is None:
        return DrainCounts()
    counts = worker.counts
    return DrainCounts(counts.get("handled", 0), counts.get("retried", 0), counts.get("dead_lettered", 0))
