"""The worker: receive, decode, dispatch, settle; with prefetch, leases and graceful shutdown.

Threads: one receive loop (the caller's), ``concurrency`` handler threads, a lease keeper, an
acker that batches acknowledgements, and one writing the worker's row in the state store.
``concurrency + prefetch`` slots bound what is held: the receive loop takes every free slot at
once and asks the transport for no more, and a slot comes back only when its delivery is
settled (for an ack, once the batched ack is sent), so nothing is hoarded. Every held delivery,
buffered or running, has its lease extended by the keeper until it is settled or
``max_lease_s`` has passed.

With ``pool="processes"`` the pool's dispatcher thread (:mod:`hedwig_tasks.pool`) takes the
buffered deliveries as its children have room, does the work before the run (decode, signals,
the pre-process hook) and hands the delivery's bytes to a child; it settles the message when
the child answers. A delivery whose start may wait (a rate limit, an idempotency claim, a
tracing span) goes to one of ``2 * concurrency`` handler threads first, which submits it to the
pool. Pre-process hooks and signal receivers must not block there (they would hold up every
child). Time limits: an ``async``
handler is cancelled; a sync one in a thread is abandoned (its message failed, its thread
replaced, its late result discarded; see :mod:`hedwig_tasks._worker_deadlines`); a child
process is killed and replaced. A handler's rate limit makes its thread wait for its turn
(the message stays held and leased); an idempotent handler's message is run only by the
delivery holding its key in the state store (:mod:`hedwig_tasks._worker_idempotency`).

Shutdown (:meth:`Worker.stop`, SIGTERM or SIGINT from the CLI): stop receiving, release the
buffered deliveries at once, let running handlers finish within ``shutdown_timeout_s``,
release what is still running after that, flush acks, return. A second stop request gives
up waiting at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from hedwig_tasks import signals
from hedwig_tasks._worker_acks import Acks
from hedwig_tasks._worker_deadlines import Deadlines
from hedwig_tasks._worker_expiry import EXPIRES_AT_ATTRIBUTE, settle_if_expired
from hedwig_tasks._worker_heartbeat import Heartbeats
from hedwig_tasks._worker_idempotency import Idempotency
from hedwig_tasks._worker_limits import Limits, _Held
from hedwig_tasks._worker_options import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_LEASE_S,
    DEFAULT_PREFETCH,
    DEFAULT_SHUTDOWN_TIMEOUT_S,
    DEFAULT_WAIT_S,
    WorkerOptions,
)
from hedwig_tasks._worker_report import key as _key
from hedwig_tasks._worker_report import report
from hedwig_tasks._worker_state import Outage, worker_id
from hedwig_tasks.app import Hedwig
from hedwig_tasks.exceptions import ConfigurationError, DecodeError, HandlerNotFound, TimeLimitExceeded, TransportError
from hedwig_tasks.handler import Handler
from hedwig_tasks.instrumentation import Tracing
from hedwig_tasks.message import Message
from hedwig_tasks.pool.processes import Pool, child_spec
from hedwig_tasks.retry import Outcome
from hedwig_tasks.slots import Slots
from hedwig_tasks.transports.base import Consumer, Delivery

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_MAX_LEASE_S",
    "DEFAULT_PREFETCH",
    "DEFAULT_SHUTDOWN_TIMEOUT_S",
    "DEFAULT_WAIT_S",
    "Worker",
    "WorkerOptions",
]

logger = logging.getLogger(__name__)

#: Longest pause between receives after a transport error, in seconds.
MAX_ERROR_BACKOFF_S = 30.0
#: How long after its due time a burst worker still waits for a retry it scheduled, in seconds
#: (only where the broker cannot count delayed retries itself).
BURST_RETRY_GRACE_S = 10.0
#: What handling a delivery returns once a child process has it (it is settled on the answer).
_SUBMITTED = "submitted"


class Worker(Acks, Limits, Idempotency, Heartbeats):
    """Consumes an app's subscriptions until stopped (or, in burst mode, until they are empty)."""

    def __init__(self, app: Hedwig, options: WorkerOptions | None = None) -> None:
        self.app = app
        self.options = options or WorkerOptions()
        self.topics = list(self.options.topics or app.subscribed_topics())
        unknown = set(self.topics) - set(app.subscribed_topics())
        if unknown:
            raise ConfigurationError(
                f"no handler of {app.name!r} consumes {', '.join(sorted(unknown))}; "
                f"its topics are {', '.join(app.subscribed_topics())}"
            )
        self.error_count = 0
        self.counts: dict[str, int] = {"handled": 0, "retried": 0, "dead_lettered": 0}
        self.duplicates = 0  #: messages of idempotent handlers acknowledged without running
        self.worker_id, self.started_at, self._state_outage = worker_id(), time.time(), Outage()
        self._consumer: Consumer | None = None
        self._held: dict[int, _Held] = {}
        self._held_lock = threading.Lock()
        held = self.options.concurrency + self.options.prefetch
        self._init_acks(max(1, held // 2), free=app.transport.capabilities.local)
        self._slots = Slots(held, enough=self._ack_batch, hungry=self._hungry)
        self._withheld = 0  #: slots of buffered deliveries released as stale, back once a handler frees
        self._retries_due: dict[str, float] = {}  #: message key -> when a retry we scheduled is due
        self._buffer: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        #: With the process pool: deliveries whose start may wait, and how to handle each, for a handler thread.
        self._waits: queue.SimpleQueue[tuple[_Held, Any] | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._abort = threading.Event()
        self._threads: list[threading.Thread] = []
        self._handler_threads: set[threading.Thread] = set()  #: those not abandoned
        self._spawned = 0
        self.abandoned_threads = 0  #: threads abandoned at a time limit whose handler has not returned
        self._local = threading.local()
        self._deadlines: Deadlines | None = None
        self._pool: Pool | None = None  #: the children handlers run in, with pool="processes"
        self._last_heartbeat = 0.0
        self.last_beat = time.monotonic()  #: when the receive loop last came round
        self.ready = False  #: connected and consuming: a receive has succeeded
        self._last_hook_beat = 0.0
        capabilities = app.transport.capabilities
        lease_s = self.options.lease_s or app.transport.lease_s
        self.lease_s = min(lease_s, capabilities.max_lease_s or lease_s)  #: what each extension asks for
        self._max_delay_s = capabilities.max_delay_s
        signals.send(signals.worker_init, app, worker=self)

    # -- public -------------------------------------------------------------------------------

    @property
    def held(self) -> int:
        """Deliveries received and not yet finished (buffered plus running)."""
        with self._held_lock:
            return len(self._held)

    @property
    def running(self) -> int:
        """Deliveries whose handler is running."""
        with self._held_lock:
            return sum(1 for h in self._held.values() if h.running)

    @property
    def buffered(self) -> int:
        """Deliveries received and waiting for a handler thread."""
        with self._held_lock:
            return sum(1 for h in self._held.values() if not h.running)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        """Ask the worker to shut down gracefully; a second call stops waiting for handlers."""
        if self._stopping.is_set():
            self._abort.set()
        self._stopping.set()

    def run(self) -> None:
        """Consume until stopped. Raises ``TransportError`` if the first receive fails, and
        ``ConfigurationError`` if process-pool children cannot load the app or the state store's URL is bad."""
        self._check_state()
        if self.options.pool == "processes":
            self._pool = Pool(child_spec(self.app, self.options), self.options, feed=self._feed)
        try:
            self._consumer = self._connect()
        except BaseException:
            if self._pool is not None:
                self._pool.close()
            raise
        self._start_threads()
        reason = "error"  # unless the receive loop returns its own reason
        try:
            reason = self._receive_loop()
        finally:
            self._shutdown(reason)

    # -- receiving ----------------------------------------------------------------------------

    def _connect(self) -> Consumer:
        transport = self.app.transport
        if transport.capabilities.local:
            self.app.provision()
        held = self.options.concurrency + self.options.prefetch
        return transport.consumer(self.app.queue, self.topics, max_outstanding=held)

    def _receive_loop(self) -> str:
        assert self._consumer is not None
        first, backoff_s = True, 0.5
        while not self._stopping.is_set():
            self._beat()
            free = self._take_slots()
            if free == 0:
                continue
            try:
                deliveries = self._consumer.receive(free, self.options.wait_s)
            except TransportError as exc:
                self._give_back_slots(free)
                if first:
                    raise
                backoff_s = self._wait_after_error(exc, backoff_s)
                continue
            if first:
                self._announce_ready()
            first, backoff_s = False, 0.5
            self.ready = True
            self._give_back_slots(free - len(deliveries))
            if deliveries:
                self._buffer_all(deliveries)
            elif self.options.burst and self._idle():
                return "burst"
        return "signal"

    def _announce_ready(self) -> None:
        """Say the worker consumes, once its first receive has come back from the broker."""
        self.ready = True
        signals.send(signals.worker_ready, self.app, worker=self)
        logger.info(
            "worker %s ready: consuming %s from queue %s on %r",
            self.app.name,
            ", ".join(self.topics),
            self.app.queue,
            self.app.transport,
        )

    def _take_slots(self) -> int:
        """Wait briefly for free slots: half of them, or any once the handlers run short of work."""
        return self._slots.take(self.app.transport.capabilities.max_receive_batch, 0.2)

    def _hungry(self) -> bool:
        """Whether fewer deliveries wait than there are handlers (threads, or children with
        what waits in their pipes)."""
        waiting = self._buffer.qsize()
        if self._pool is not None:
            waiting += self._pool.waiting()
        return waiting < self.options.concurrency

    def _give_back_slots(self, count: int) -> None:
        self._slots.give(count)

    def _buffer_all(self, deliveries: list[Delivery]) -> None:
        now = time.monotonic()
        with self._held_lock:
            for delivery in deliveries:
                self._held[id(delivery)] = _Held(delivery, now)
                if self._retries_due:
                    self._retries_due.pop(_key(delivery), None)
        for delivery in deliveries:
            self._buffer.put(delivery)
        if self._pool is not None:
            self._pool.wake()

    def _wait_after_error(self, exc: TransportError, backoff_s: float) -> float:
        self.error_count += 1
        self.ready = False
        logger.warning("receive failed (%s); retrying in %.1fs", exc, backoff_s)
        self._stopping.wait(backoff_s)
        return min(backoff_s * 2, MAX_ERROR_BACKOFF_S)

    def _idle(self) -> bool:
        if self.held or self._acks_waiting():
            return False
        try:
            statuses = self.app.transport.counts(self.app.queue, self.topics)
        except TransportError as exc:  # the next receive meets the same trouble and backs off
            logger.warning("could not count what is left to do (%s); receiving again", exc)
            return False
        if any(s.depth or s.in_flight for s in statuses):
            return False
        if all(s.depth is not None for s in statuses):
            return True  # the broker counts delayed retries in its depth
        return not self._retries_to_come()

    def _retries_to_come(self) -> bool:
        """True while a retry this worker scheduled is not yet due (or only just due) nor back."""
        with self._held_lock:
            self._forget_past_retries(time.monotonic())
            return bool(self._retries_due)

    def _forget_past_retries(self, now: float) -> None:
        """Drop retries past their grace (another worker took them); hold ``_held_lock``."""
        for key, due in list(self._retries_due.items()):
            if now > due + BURST_RETRY_GRACE_S:
                del self._retries_due[key]

    def _call_hook(self, name: str, hook: Any, **kwargs: Any) -> bool:
        """Run a Hedwig-style hook; False (and a log line) if it raised."""
        try:
            hook(**kwargs)
        except Exception:
            self.error_count += 1
            logger.exception("%s hook raised", name)
            return False
        return True

    # -- threads ------------------------------------------------------------------------------

    def _start_threads(self) -> None:
        if self.options.pool == "threads" and self._time_limits():
            self._deadlines = Deadlines(self._expire)
        if self._pool is not None:
            for index in range(self._pool.threads):
                self._spawn_waiter(index)
        for _ in range(self.options.concurrency if self._pool is None else 0):
            self._spawn_handler()
        self._spawn(self._ack_loop, "hedwig-acker")
        self._spawn(self._lease_loop, "hedwig-lease-keeper")
        self._start_heartbeats()

    def _time_limits(self) -> bool:
        return self.options.time_limit_s is not None or any(h.time_limit_s for h in self.app.registry)

    def _spawn(self, target: Any, name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def _spawn_handler(self) -> None:
        with self._held_lock:
            index, self._spawned = self._spawned, self._spawned + 1
        thread = threading.Thread(target=self._handle_loop, name=f"hedwig-handler-{index}", daemon=True)
        with self._held_lock:
            self._handler_threads.add(thread)
        thread.start()

    def _spawn_waiter(self, index: int) -> None:
        """A thread for the pool's deliveries whose start may wait."""
        thread = threading.Thread(target=self._wait_loop, name=f"hedwig-handler-{index}", daemon=True)
        with self._held_lock:
            self._handler_threads.add(thread)
        thread.start()

    def _wait_loop(self) -> None:
        while (item := self._waits.get()) is not None:
            held, process = item
            if self._process_safely(held, process):
                self._finished(held)

    def _feed(self) -> bool:
        """On the pool's dispatcher: handle the next buffered delivery (a child or a handler thread
        takes it); False if none is buffered."""
        if self._buffer.empty():
            return False
        delivery = self._buffer.get_nowait()  # the dispatcher is its only taker
        if self._buffer.empty():
            self._buffer_drained()
        with self._held_lock:
            held = self._held.get(id(delivery)) if delivery is not None else None
            if held is None:  # released while buffered: at shutdown, or it waited past a lease
                return True
            held.running = True
        if self.app.tracing.spans(held.delivery):  # the span stays open while the child runs it
            self._waits.put((held, self._process))
        elif self._process_safely(held, self._process):
            self._finished(held)
        return True

    def _handle_loop(self) -> None:
        try:
            self._handle_until_told()
        finally:
            loop = getattr(self._local, "loop", None)
            if loop is not None:
                loop.close()

    def _handle_until_told(self) -> None:
        while True:
            delivery = self._buffer.get()
            if delivery is None:
                return
            if self._buffer.empty():
                self._buffer_drained()
            with self._held_lock:
                held = self._held.get(id(delivery))
                if held is None:  # released while buffered: at shutdown, or it waited past a lease
                    continue
                held.running = True
            if not self._process_safely(held, self._process):  # a child runs it: settled on answer
                continue
            if held.abandoned:  # the time keeper settled it and started another thread
                return
            self._finished(held)

    def _finished(self, held: _Held) -> None:
        """``held`` is settled: it is no longer held, and its slot comes back."""
        with self._held_lock:
            self._held.pop(id(held.delivery), None)
            withheld, self._withheld = self._withheld, 0
            if held.outcome:
                self.counts[held.outcome] += 1
            if not self._held:  # no more acks to wait for
                self._nothing_held()
        # an ack in the acker's queue still holds its slot until it is sent
        self._give_back_slots(withheld + (0 if held.settled == "ack" else 1))

    def _process_safely(self, held: _Held, process: Any, *args: Any) -> bool:
        """``process(held, *args)`` whatever the delivery holds; what it returns (True unless a
        child process took the delivery, to be settled on its answer).

        This is the per-delivery boundary: an error nobody expected, before the delivery was
        settled, dead-letters that one delivery with the error as the reason.
        """
        try:
            return bool(process(held, *args))
        except Exception as exc:
            delivery = held.delivery
            if held.settled or held.abandoned:
                logger.exception("unexpected error after settling delivery %s", delivery.transport_id)
            else:
                logger.exception("unexpected error processing delivery %s; dead-lettering it", delivery.transport_id)
                reason = f"unexpected error: {type(exc).__name__}: {exc}"
                self._dead_letter(held, None, reason, logged=True)
            return True

    def _lease_loop(self) -> None:
        assert self._consumer is not None
        interval = self.lease_s / 3
        while not self._stopping.wait(interval):
            self._release_stale()
            now = time.monotonic()
            with self._held_lock:
                keep = [h.delivery for h in self._held.values() if now - h.received_at < self.options.max_lease_s]
            if keep:
                self._settle("extend lease", self._consumer.extend_lease, keep, self.lease_s)
            self._renew_claims()

    def _release_stale(self) -> None:
        """Give back buffered deliveries that waited over a lease for a handler thread.

        Their slots stay taken until a handler thread frees up, so this worker does not take
        them straight back while its handlers are stuck: another worker gets them.
        """
        assert self._consumer is not None
        now = time.monotonic()
        with self._held_lock:
            stale = [k for k, h in self._held.items() if not h.running and now - h.received_at > self.lease_s]
            deliveries = [self._held.pop(k).delivery for k in stale]
            self._withheld += len(deliveries)
        if deliveries:
            logger.warning(
                "releasing %d buffered message(s) that waited over %.1fs for a handler thread (ids %s)",
                len(deliveries),
                self.lease_s,
                ", ".join(_key(d) for d in deliveries),
            )
            self._settle("release", self._consumer.release, deliveries)

    def _settle(self, what: str, action: Any, *args: Any) -> None:
        try:
            action(*args)
        except TransportError as exc:
            self.error_count += 1
            logger.warning("%s failed: %s (the message will be redelivered)", what, exc)

    # -- one message --------------------------------------------------------------------------

    def _process(self, held: _Held) -> bool:
        """Handle one delivery, inside its consumer span when it gets one; False if a child
        process took it (it is settled when the child answers)."""
        tracing = self.app.tracing
        if not tracing.spans(held.delivery):
            return self._handle(held, None)[0] != _SUBMITTED
        with tracing.processing(held.delivery, self.app.transport.messaging_system) as span:
            action, error, reason = self._handle(held, span)
            Tracing.outcome(span, action, error, reason)
        return True

    def _handle(self, held: _Held, span: Any) -> tuple[str, BaseException | None, str]:
        """Decode, dispatch and settle one delivery; returns (action, error, reason) for its span."""
        assert self._consumer is not None
        app, delivery = self.app, held.delivery
        signals.send(signals.message_received, app, delivery=delivery)
        pre = app.hooks.pre_process
        if pre and not self._call_hook("pre-process", pre, delivery=delivery):
            held.settled = "retry"
            self._settle("retry", self._consumer.retry_later, delivery, app.retry.backoff(delivery.attempt))
            return "retry", None, "pre-process hook raised"
        if delivery.fault:
            reason = f"unreadable delivery: {delivery.fault}"
            signals.send(signals.message_invalid, app, delivery=delivery, error=DecodeError(delivery.fault))
            self._dead_letter(held, None, reason)
            return "dead_letter", None, reason
        try:
            message = app.decode(delivery)
        except DecodeError as exc:
            signals.send(signals.message_invalid, app, delivery=delivery, error=exc)
            self._dead_letter(held, None, f"invalid message: {exc}")
            return "dead_letter", exc, f"invalid message: {exc}"
        Tracing.describe(span, message)
        if EXPIRES_AT_ATTRIBUTE in delivery.attributes and (expired := settle_if_expired(self, held, message)):
            return expired
        try:
            handler = app.handler_for(message)
        except HandlerNotFound as exc:
            signals.send(signals.message_unknown, app, message=message)
            self._dead_letter(held, message, str(exc))
            return "dead_letter", None, str(exc)
        return self._run(held, handler, message, span)

    def _run(self, held: _Held, handler: Handler, message: Message, span: Any) -> tuple[str, BaseException | None, str]:
        pool = self._pool
        if pool is not None and pool.on_dispatcher() and (handler.limiter or handler.idempotency_key):
            self._waits.put((held, lambda held: self._run(held, handler, message, None)[0] != _SUBMITTED))
            return _SUBMITTED, None, ""  # its start may wait: on a handler thread
        if handler.limiter is not None and not self._await_turn(held, handler):
            return "release", None, "the worker stopped while the message waited for its rate limit"
        if handler.idempotency_key is not None and not self._claim(held, handler, message):
            return held.settled, None, "duplicate" if held.settled == "ack" else "running elsewhere"
        held.message, held.started_at = message, time.monotonic()
        signals.send(signals.handler_started, self.app, message=message, handler=handler)
        limit = handler.time_limit_s or self.options.time_limit_s
        if pool is None:
            error, duration_s, outcome = self._run_here(held, handler, message, limit)
            return self._settle_run(held, handler, message, error, duration_s, outcome, None)
        if span is None:  # settled on the pool's thread when the child answers

            def done(error: Exception | None, duration_s: float, outcome: Outcome, lost: int | None) -> None:
                if self._process_safely(held, self._settle_run, handler, message, error, duration_s, outcome, lost):
                    self._finished(held)

            pool.submit(held.delivery, handler, limit, done)
            return _SUBMITTED, None, ""
        error, duration_s, outcome, lost = pool.run(held.delivery, handler, limit)  # the span ends after it
        return self._settle_run(held, handler, message, error, duration_s, outcome, lost)

    def _settle_run(
        self,
        held: _Held,
        handler: Handler,
        message: Message,
        error: Exception | None,
        duration_s: float,
        outcome: Outcome | None,
        lost: int | None,
    ) -> tuple[str, BaseException | None, str]:
        """Report and settle a run; ``lost``: the pid of the child process killed running it."""
        if self._pool is not None and not self._still_held(held):  # released at shutdown: nothing to settle
            outcome = None
        if error is not None and isinstance(error, TimeLimitExceeded) and not held.abandoned:
            self._timed_out(handler, message, error.time_limit_s, "" if lost is None else f"child process {lost}")
        if outcome is None:  # abandoned at its time limit (settled by the time keeper) or released
            return "abandoned", error, "time limit exceeded"
        report(self.app, handler, message, error, duration_s, outcome)
        if held.claim is not None:  # recorded before the ack goes out, or released for a retry
            self._end_claim(held, outcome.action == "ack", handler.idempotency_ttl_s)
        self._carry_out(outcome, held, message, handler)
        return outcome.action, error, outcome.reason

    # -- settling -------------------------------------------------------------------------------

    def _carry_out(self, outcome: Outcome, held: _Held, message: Message, handler: Handler) -> None:
        assert self._consumer is not None
        delivery = held.delivery
        if outcome.action == "ack":
            post = self.app.hooks.post_process
            if post:
                self._call_hook("post-process", post, delivery=delivery, message=message)
            held.settled, held.outcome = "ack", "handled"
            self._ack_later(delivery)
        elif outcome.action == "retry":
            delay_s = outcome.delay_s if self._max_delay_s is None else min(outcome.delay_s, self._max_delay_s)
            held.settled = "retry"
            self._settle("retry", self._consumer.retry_later, delivery, delay_s)
            with self._held_lock:
                now = time.monotonic()
                self._forget_past_retries(now)  # bounded however long the worker runs
                self._retries_due[_key(delivery)] = now + delay_s
            held.outcome = "retried"
            signals.send(
                signals.handler_retried,
                self.app,
                message=message,
                handler=handler,
                error=outcome.reason,
                delay_s=delay_s,
                attempt=delivery.attempt,
            )
        else:
            self._dead_letter(held, message, outcome.reason, logged=True)

    def _dead_letter(self, held: _Held, message: Message | None, reason: str, *, logged: bool = False) -> None:
        """Send a delivery to the dead letters; ``logged``: its log line was already written."""
        assert self._consumer is not None
        delivery = held.delivery
        if not logged:
            what = f"id={message.id}" if message else f"transport id={delivery.transport_id}"
            fields = {
                "message_id": message.id if message else delivery.attributes.get("hedwig_id", ""),
                "transport_id": delivery.transport_id,
                "subscription": delivery.subscription,
                "attempt": delivery.attempt,
                "outcome": "dead_letter",
            }
            logger.error("dead-lettering %s from %s: %s", what, delivery.subscription, reason, extra=fields)
        held.settled = "dead_letter"
        self._settle("dead letter", self._consumer.dead_letter, delivery, reason)
        held.outcome = "dead_lettered"
        signals.send(signals.message_dead_lettered, self.app, message=message, delivery=delivery, reason=reason)

    # -- shutdown -----------------------------------------------------------------------------

    def _shutdown(self, reason: str) -> None:
        assert self._consumer is not None
        signals.send(signals.worker_shutting_down, self.app, worker=self, reason=reason)
        self._stopping.set()
        self._release(running=False)
        with self._held_lock:
            handlers = list(self._handler_threads)  # abandoned threads are not waited for
        for _ in handlers:
            (self._buffer if self._pool is None else self._waits).put(None)
        deadline = time.monotonic() + self.options.shutdown_timeout_s
        for thread in handlers:
            while thread.is_alive() and time.monotonic() < deadline and not self._abort.is_set():
                thread.join(0.1)
        if self._pool is not None:
            self._pool.wait_idle(deadline, self._abort)  # what the children run
        self._release(running=True)
        if self._pool is not None:
            self._pool.stop()  # idle children exit; those still running what was just released are killed
        if self._deadlines is not None:
            self._deadlines.stop()
        self._stop_acks()
        for thread in self._threads:
            thread.join(5.0)
        self._consumer.close()
        self._release_state()
        signals.send(signals.worker_shutdown, self.app, worker=self)
        logger.info(
            "worker %s stopped (%s): %d handled, %d retried, %d dead-lettered",
            self.app.name,
            reason,
            *self.counts.values(),
        )

    def _release(self, *, running: bool) -> None:
        assert self._consumer is not None
        with self._held_lock:
            chosen = [k for k, h in self._held.items() if h.running == running]
            deliveries = [self._held.pop(k).delivery for k in chosen]
        if deliveries:
            state = "running" if running else "buffered"
            logger.info("releasing %d %s message(s)", len(deliveries), state)
            self._settle("release", self._consumer.release, deliveries)
