"""The worker's limits on a handler's run: its rate limit (per process or fleet) and, on a thread, its time limit.

A mixin of :class:`~hedwig_tasks.worker.Worker` (kept apart so each module holds one concern):
waiting for a rate limit's turn, running a handler on its thread under a time limit, and what
happens at the limit (on the time keeper's thread): the message failed by policy, its lease no
longer extended, the stuck thread replaced, its late result discarded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from hedwig_tasks import signals
from hedwig_tasks._worker_report import report
from hedwig_tasks.exceptions import StateError, TimeLimitExceeded
from hedwig_tasks.handler import Handler
from hedwig_tasks.message import Message
from hedwig_tasks.ratelimit import FleetRateLimiter
from hedwig_tasks.retry import ACK, Outcome, decide
from hedwig_tasks.transports.base import Delivery

if TYPE_CHECKING:
    from hedwig_tasks._worker_deadlines import Deadlines
    from hedwig_tasks._worker_options import WorkerOptions
    from hedwig_tasks._worker_state import Outage
    from hedwig_tasks.app import Hedwig
    from hedwig_tasks.transports.base import Consumer

__all__ = ["ASYNC_CANCEL_GRACE_S", "Limits"]

logger = logging.getLogger("hedwig_tasks.worker")

#: How long after its time limit an ``async`` handler that did not let itself be cancelled (it
#: blocks its event loop) has its thread abandoned, in seconds.
ASYNC_CANCEL_GRACE_S = 1.0
#: How long a fleet rate limit waits before asking a state store that failed again, in seconds.
STORE_RETRY_S = 1.0


@dataclasses.dataclass(eq=False, slots=True)  # slots: one is built per message, and read often
class _Held:
    """A delivery the worker holds, and what became of it."""

    delivery: Delivery
    received_at: float
    running: bool = False
    settled: str = ""  #: "ack", "retry", "dead_letter" or "release", once asked of the transport
    outcome: str = ""  #: the count it goes under: "handled", "retried" or "dead_lettered"
    abandoned: bool = False  #: its handler ran past the time limit; the time keeper settled it
    #: Set while a time limit watches the run: what the time keeper needs to settle it.
    watch: tuple[Handler, Message, float, threading.Thread] | None = None
    message: Message | None = None  #: once decoded and about to run
    started_at: float = 0.0  #: when its handler started (monotonic), for the heartbeat row
    claim: tuple[str, str] | None = None  #: an idempotent handler's key and owner while it holds it


class Limits:
    """Rate and time limits of handler runs; mixed into the worker, whose state it shares."""

    app: Hedwig
    options: WorkerOptions
    counts: dict[str, int]
    abandoned_threads: int
    _consumer: Consumer | None
    _stopping: threading.Event
    _held: dict[int, _Held]
    _held_lock: threading.Lock
    _handler_threads: set[threading.Thread]
    _withheld: int
    _deadlines: Deadlines | None
    _local: threading.local
    _state_outage: Outage

    if TYPE_CHECKING:

        def _settle(self, what: str, action: Any, *args: Any) -> None: ...
        def _spawn_handler(self) -> None: ...
        def _give_back_slots(self, count: int) -> None: ...
        def _carry_out(self, outcome: Outcome, held: _Held, message: Message, handler: Handler) -> None: ...

    def _await_turn(self, held: _Held, handler: Handler) -> bool:
        """Wait for the handler's rate limit to let it start (the message stays leased); False, and
        the message released, if the worker stops meanwhile."""
        limiter = handler.limiter
        assert limiter is not None and self._consumer is not None
        if not limiter.reserves:
            assert isinstance(limiter, FleetRateLimiter)
            if self._await_fleet_turn(limiter):
                return True
        else:
            wait_s = limiter.acquire(time.monotonic())
            if wait_s <= 0 or not self._stopping.wait(wait_s):
                return True
        if self._still_held(held, pop=True):
            held.settled = "release"
            self._settle("release", self._consumer.release, [held.delivery])
        return False

    def _await_fleet_turn(self, limiter: FleetRateLimiter) -> bool:
        """Take a start from the fleet's bucket, waiting out each answer (one thread of this process
        asks at a time); a store error waits a second and asks again. False if the worker stops."""
        with limiter.turn:
            while not self._stopping.is_set():
                try:
                    wait_s = limiter.acquire(0.0)
                    self._state_outage.answered()
                except StateError as exc:
                    self._state_outage.failed("fleet rate limit", exc, f"{limiter.bucket} waits")
                    wait_s = STORE_RETRY_S
                if wait_s <= 0:
                    return True
                self._stopping.wait(wait_s)
        return False

    def _still_held(self, held: _Held, *, pop: bool = False) -> bool:
        with self._held_lock:
            ours = self._held.get(id(held.delivery)) is held
            if ours and pop:
                del self._held[id(held.delivery)]
            return ours

    def _run_here(
        self, held: _Held, handler: Handler, message: Message, limit: float | None
    ) -> tuple[Exception | None, float, Outcome | None]:
        """Run the handler on this thread; no outcome if it was abandoned at its time limit."""
        deadlines = self._deadlines if limit is not None else None
        if deadlines is not None:
            assert limit is not None
            held.watch = (handler, message, limit, threading.current_thread())
            grace_s = ASYNC_CANCEL_GRACE_S if handler.is_async else 0.0
            deadlines.watch(held, time.monotonic() + limit + grace_s)
        started = time.perf_counter()
        error: Exception | None = None
        try:
            handler.run(message, loop=self._event_loop() if handler.is_async else None, time_limit_s=limit)
        except Exception as exc:
            error = exc
        duration_s = time.perf_counter() - started
        if deadlines is not None and not deadlines.done(held):
            held.abandoned = True
            self._discard_late(message, duration_s)
            return error, duration_s, None
        if error is None:  # what decide() says, without asking for the handler's policy
            return None, duration_s, ACK
        return error, duration_s, decide(handler.retry_policy, error, held.delivery.attempt)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        loop: asyncio.AbstractEventLoop | None = getattr(self._local, "loop", None)
        if loop is None:
            loop = self._local.loop = asyncio.new_event_loop()
        return loop

    # -- time limits ----------------------------------------------------------------------------

    def _expire(self, held: _Held) -> None:
        """A run on a thread passed its time limit (called on the time keeper's thread): fail its
        message by policy, stop extending its lease, and start a thread in place of the stuck one."""
        assert held.watch is not None
        handler, message, limit, thread = held.watch
        held.abandoned = True
        with self._held_lock:
            ours = self._held.pop(id(held.delivery), None) is held
            self._handler_threads.discard(thread)
            self.abandoned_threads += 1
        if not self._stopping.is_set():
            self._spawn_handler()
        self._timed_out(handler, message, limit, f"thread {thread.name}")
        if not ours:  # released at shutdown meanwhile
            return
        error = TimeLimitExceeded(limit)
        outcome = decide(handler.retry_policy, error, held.delivery.attempt)
        report(self.app, handler, message, error, limit, outcome)
        self._carry_out(outcome, held, message, handler)
        with self._held_lock:
            withheld, self._withheld = self._withheld, 0
            if held.outcome:
                self.counts[held.outcome] += 1
        self._give_back_slots(withheld + 1)

    def _timed_out(self, handler: Handler, message: Message, limit: float, abandoned: str) -> None:
        what = {"": "cancelled it"}.get(abandoned, f"abandoned {abandoned} and started another")
        logger.warning(
            "time limit of %gs exceeded by %s on %s %s id=%s attempt=%d: %s (%d abandoned thread(s) still running)",
            limit,
            handler.name,
            message.type,
            message.version,
            message.id,
            message.attempt,
            what,
            self.abandoned_threads,
            extra={"message_id": message.id, "message_type": message.type, "outcome": "time_limit_exceeded"},
        )
        signals.send(
            signals.handler_time_limit_exceeded,
            self.app,
            message=message,
            handler=handler,
            time_limit_s=limit,
            abandoned=abandoned,
        )

    def _discard_late(self, message: Message, duration_s: float) -> None:
        with self._held_lock:
            self.abandoned_threads -= 1
        logger.warning(
            "abandoned thread %s returned after %.1fs from %s id=%s; what it returned is discarded",
            threading.current_thread().name,
            duration_s,
            message.type,
            message.id,
            extra={"message_id": message.id},
        )
