"""The worker: receive, decode, dispatch, settle; with prefetch, leases and graceful shutdown.

Threads: one receive loop (the caller's), ``concurrency`` handler threads, one lease keeper
and one acker that batches acknowledgements. ``concurrency + prefetch`` slots bound what is
held: the receive loop takes every free slot at once and asks the transport for no more, and a
slot comes back only when its delivery is settled (for an ack, once the batched ack is sent),
so nothing is hoarded. Every held delivery, buffered or running, has its lease extended by
the keeper until it is settled or ``max_lease_s`` has passed.

Shutdown (:meth:`Worker.stop`, SIGTERM or SIGINT from the CLI): stop receiving, release the
buffered deliveries at once, let running handlers finish within ``shutdown_timeout_s``,
release what is still running after that, flush acks, return. A second stop request gives
up waiting at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

from hedwig_tasks import signals
from hedwig_tasks.app import Hedwig
from hedwig_tasks.exceptions import (
    ConfigurationError,
    DeadLetter,
    DecodeError,
    HandlerControl,
    HandlerNotFound,
    Ignore,
    TransportError,
)
from hedwig_tasks.handler import Handler
from hedwig_tasks.instrumentation import Tracing
from hedwig_tasks.message import Message
from hedwig_tasks.retry import Outcome, decide
from hedwig_tasks.slots import Slots
from hedwig_tasks.transports.base import Consumer, Delivery

__all__ = ["Worker", "WorkerOptions"]

logger = logging.getLogger(__name__)

#: Handler threads.
DEFAULT_CONCURRENCY = 4
#: Deliveries held beyond those running.
DEFAULT_PREFETCH = 8
#: Longest a receive blocks waiting for messages, in seconds.
DEFAULT_WAIT_S = 1.0
#: Longest a delivery is kept leased in all, in seconds; then it is let go to be redelivered.
DEFAULT_MAX_LEASE_S = 3600.0
#: How long running handlers may finish after a stop request, in seconds.
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
#: Interval between ``heartbeat`` signals, in seconds.
HEARTBEAT_INTERVAL_S = 1.0
#: Longest pause between receives after a transport error, in seconds.
MAX_ERROR_BACKOFF_S = 30.0
#: Longest an ack waits for others to go with it while handlers still have work, in seconds.
ACK_GATHER_S = 0.02
#: How long after its due time a burst worker still waits for a retry it scheduled, in seconds
#: (only where the broker cannot count delayed retries itself).
BURST_RETRY_GRACE_S = 10.0


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """How a worker runs. ``topics`` limits consumption to some of the app's subscriptions."""

    concurrency: int = DEFAULT_CONCURRENCY
    prefetch: int = DEFAULT_PREFETCH
    topics: Sequence[str] | None = None
    burst: bool = False
    wait_s: float = DEFAULT_WAIT_S
    lease_s: float | None = None  #: what the lease keeper extends by; None: the transport's own lease
    max_lease_s: float = DEFAULT_MAX_LEASE_S
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigurationError(f"concurrency must be 1 or more, got {self.concurrency}")
        if self.prefetch < 0:
            raise ConfigurationError(f"prefetch must be 0 or more, got {self.prefetch}")
        if self.lease_s is not None and self.lease_s <= 0:
            raise ConfigurationError(f"lease_s must be more than 0, got {self.lease_s}")
        if self.wait_s < 0 or self.shutdown_timeout_s < 0:
            raise ConfigurationError("wait_s and shutdown_timeout_s must be 0 or more")


@dataclasses.dataclass
class _Held:
    delivery: Delivery
    received_at: float
    running: bool = False


class Worker:
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
        self._consumer: Consumer | None = None
        self._held: dict[int, _Held] = {}
        self._held_lock = threading.Lock()
        held = self.options.concurrency + self.options.prefetch
        self._ack_batch = max(1, held // 2)  #: acks worth one broker round trip
        self._slots = Slots(held, enough=self._ack_batch)
        self._withheld = 0  #: slots of buffered deliveries released as stale, back once a handler frees
        self._retries_due: dict[str, float] = {}  #: message key -> when a retry we scheduled is due
        self._buffer: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        self._acks: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._abort = threading.Event()
        self._threads: list[threading.Thread] = []
        self._local = threading.local()
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
        """Consume until stopped. Raises ``TransportError`` if the first receive fails."""
        self._consumer = self._connect()
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
        most = self.app.transport.capabilities.max_receive_batch
        return self._slots.take(most, 0.2, lambda: self._buffer.qsize() < self.options.concurrency)

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

    def _wait_after_error(self, exc: TransportError, backoff_s: float) -> float:
        self.error_count += 1
        self.ready = False
        logger.warning("receive failed (%s); retrying in %.1fs", exc, backoff_s)
        self._stopping.wait(backoff_s)
        return min(backoff_s * 2, MAX_ERROR_BACKOFF_S)

    def _idle(self) -> bool:
        if self.held or not self._acks.empty():
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

    def _beat(self) -> None:
        now = self.last_beat = time.monotonic()
        if now - self._last_heartbeat >= HEARTBEAT_INTERVAL_S:
            self._last_heartbeat = now
            signals.send(signals.heartbeat, self.app, worker=self, error_count=self.error_count, held=self.held)
        hooks = self.app.hooks
        if hooks.heartbeat and now - self._last_hook_beat >= hooks.heartbeat_interval_s:
            self._last_hook_beat = now
            self._call_hook("heartbeat", hooks.heartbeat, error_count=self.error_count)

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
        for index in range(self.options.concurrency):
            self._spawn(self._handle_loop, f"hedwig-handler-{index}")
        self._spawn(self._ack_loop, "hedwig-acker")
        self._spawn(self._lease_loop, "hedwig-lease-keeper")

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

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
            with self._held_lock:
                held = self._held.get(id(delivery))
                if held is None:  # released while buffered: at shutdown, or it waited past a lease
                    continue
                held.running = True
            self._local.outcome = ""
            acking = self._process_safely(delivery)
            with self._held_lock:
                self._held.pop(id(delivery), None)
                withheld, self._withheld = self._withheld, 0
                if self._local.outcome:
                    self.counts[self._local.outcome] += 1
            # an ack in the acker's queue still holds its slot until it is sent
            self._give_back_slots(withheld + (0 if acking else 1))

    def _process_safely(self, delivery: Delivery) -> bool:
        """Process one delivery whatever it holds; True when its ack was queued for the acker.

        This is the per-delivery boundary: an error nobody expected, before the delivery was
        settled, dead-letters that one delivery with the error as the reason.
        """
        self._local.settled = ""
        try:
            self._process(delivery)
        except Exception as exc:
            if self._local.settled:
                logger.exception("unexpected error after settling delivery %s", delivery.transport_id)
            else:
                logger.exception("unexpected error processing delivery %s; dead-lettering it", delivery.transport_id)
                self._dead_letter(delivery, None, f"unexpected error: {type(exc).__name__}: {exc}", logged=True)
        return bool(self._local.settled == "ack")

    def _ack_loop(self) -> None:
        assert self._consumer is not None
        done = False
        while not done:
            batch, done = self._next_acks()
            if batch:
                self._settle("ack", self._consumer.ack, batch)
                self._give_back_slots(len(batch))  # once per batch: one wake-up of the receive loop

    def _next_acks(self) -> tuple[list[Delivery], bool]:
        """The acks to send together, and whether the worker is done (a None came).

        While deliveries are still held (more acks are coming), up to ``ACK_GATHER_S`` more
        gathers a larger batch (an ack is a broker round trip); once none is held, what is
        there goes at once, so the slots it frees reach the receive loop without delay.
        """
        batch: list[Delivery] = []
        item = self._acks.get()
        deadline = time.monotonic() + ACK_GATHER_S
        while item is not None:
            batch.append(item)
            try:
                item = self._acks.get_nowait()
                continue
            except queue.Empty:
                pass
            wait_s = deadline - time.monotonic()
            if len(batch) >= self._ack_batch or wait_s <= 0 or not self._held or self._stopping.is_set():
                return batch, False
            try:
                item = self._acks.get(timeout=wait_s)
            except queue.Empty:
                return batch, False
        return batch, True

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

    def _tally(self, outcome: str) -> None:
        """Count this thread's delivery as ``outcome`` once it is finished (under the held lock)."""
        self._local.outcome = outcome

    def _settle(self, what: str, action: Any, *args: Any) -> None:
        try:
            action(*args)
        except TransportError as exc:
            self.error_count += 1
            logger.warning("%s failed: %s (the message will be redelivered)", what, exc)

    # -- one message --------------------------------------------------------------------------

    def _process(self, delivery: Delivery) -> None:
        """Handle one delivery, inside its consumer span when it gets one."""
        tracing = self.app.tracing
        if not tracing.spans(delivery):
            self._handle(delivery, None)
            return
        with tracing.processing(delivery, self.app.transport.messaging_system) as span:
            action, error, reason = self._handle(delivery, span)
            Tracing.outcome(span, action, error, reason)

    def _handle(self, delivery: Delivery, span: Any) -> tuple[str, BaseException | None, str]:
        """Decode, dispatch and settle one delivery; returns (action, error, reason) for its span."""
        assert self._consumer is not None
        app = self.app
        signals.send(signals.message_received, app, delivery=delivery)
        pre = app.hooks.pre_process
        if pre and not self._call_hook("pre-process", pre, delivery=delivery):
            self._local.settled = "retry"
            self._settle("retry", self._consumer.retry_later, delivery, app.retry.backoff(delivery.attempt))
            return "retry", None, "pre-process hook raised"
        if delivery.fault:
            reason = f"unreadable delivery: {delivery.fault}"
            signals.send(signals.message_invalid, app, delivery=delivery, error=DecodeError(delivery.fault))
            self._dead_letter(delivery, None, reason)
            return "dead_letter", None, reason
        try:
            message = app.decode(delivery)
        except DecodeError as exc:
            signals.send(signals.message_invalid, app, delivery=delivery, error=exc)
            self._dead_letter(delivery, None, f"invalid message: {exc}")
            return "dead_letter", exc, f"invalid message: {exc}"
        Tracing.describe(span, message)
        try:
            handler = app.handler_for(message)
        except HandlerNotFound as exc:
            signals.send(signals.message_unknown, app, message=message)
            self._dead_letter(delivery, message, str(exc))
            return "dead_letter", None, str(exc)
        return self._run(handler, message, delivery)

    def _run(self, handler: Handler, message: Message, delivery: Delivery) -> tuple[str, BaseException | None, str]:
        signals.send(signals.handler_started, self.app, message=message, handler=handler)
        started = time.perf_counter()
        error: Exception | None = None
        try:
            handler.run(message, loop=self._event_loop() if handler.is_async else None)
        except Exception as exc:
            error = exc
        duration_s = time.perf_counter() - started
        outcome = decide(handler.retry_policy, error, delivery.attempt)
        self._report(handler, message, error, duration_s, outcome)
        self._carry_out(outcome, delivery, message, handler)
        return outcome.action, error, outcome.reason

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        loop: asyncio.AbstractEventLoop | None = getattr(self._local, "loop", None)
        if loop is None:
            loop = self._local.loop = asyncio.new_event_loop()
        return loop

    def _report(
        self, handler: Handler, message: Message, error: Exception | None, duration_s: float, outcome: Outcome
    ) -> None:
        """Signal and log how the handler's run ended: one log line per message, a traceback
        only for an error nobody raised on purpose."""
        if error is None or isinstance(error, Ignore):
            self._tally("handled")
            signals.send(signals.handler_succeeded, self.app, message=message, handler=handler, duration_s=duration_s)
            if logger.isEnabledFor(logging.INFO):  # the line and its fields cost more than the handler often
                tag, fields = _describe(message, error, duration_s, outcome)
                logger.info("handled %s%s", tag, " (ignored)" if error else "", extra=fields)
            return
        tag, fields = _describe(message, error, duration_s, outcome)
        if isinstance(error, DeadLetter):  # the handler's decision, not a failure
            signals.send(
                signals.handler_dead_lettered,
                self.app,
                message=message,
                handler=handler,
                reason=outcome.reason,
                duration_s=duration_s,
            )
            logger.warning("dead-lettered %s: %s", tag, outcome.reason, extra=fields)
            return
        signals.send(
            signals.handler_failed, self.app, message=message, handler=handler, error=error, duration_s=duration_s
        )
        if outcome.action == "retry":
            fields["retry_in_s"] = round(outcome.delay_s, 3)
            logger.warning("failed %s: %s; retrying in %.1fs", tag, outcome.reason, outcome.delay_s, extra=fields)
        elif isinstance(error, HandlerControl):  # Retry past the policy's retries: asked for, no traceback
            logger.error("failed %s: %s; dead-lettered", tag, outcome.reason, extra=fields)
        else:
            logger.error("failed %s: %s; dead-lettered", tag, outcome.reason, exc_info=error, extra=fields)

    def _carry_out(self, outcome: Outcome, delivery: Delivery, message: Message, handler: Handler) -> None:
        assert self._consumer is not None
        if outcome.action == "ack":
            post = self.app.hooks.post_process
            if post:
                self._call_hook("post-process", post, delivery=delivery, message=message)
            self._local.settled = "ack"
            self._acks.put(delivery)
        elif outcome.action == "retry":
            delay_s = outcome.delay_s if self._max_delay_s is None else min(outcome.delay_s, self._max_delay_s)
            self._local.settled = "retry"
            self._settle("retry", self._consumer.retry_later, delivery, delay_s)
            with self._held_lock:
                now = time.monotonic()
                self._forget_past_retries(now)  # bounded however long the worker runs
                self._retries_due[_key(delivery)] = now + delay_s
            self._tally("retried")
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
            self._dead_letter(delivery, message, outcome.reason, logged=True)

    def _dead_letter(self, delivery: Delivery, message: Message | None, reason: str, *, logged: bool = False) -> None:
        """Send a delivery to the dead letters; ``logged``: its log line was already written."""
        assert self._consumer is not None
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
        self._local.settled = "dead_letter"
        self._settle("dead letter", self._consumer.dead_letter, delivery, reason)
        self._tally("dead_lettered")
        signals.send(signals.message_dead_lettered, self.app, message=message, delivery=delivery, reason=reason)

    # -- shutdown -----------------------------------------------------------------------------

    def _shutdown(self, reason: str) -> None:
        assert self._consumer is not None
        signals.send(signals.worker_shutting_down, self.app, worker=self, reason=reason)
        self._stopping.set()
        self._release(running=False)
        for _ in range(self.options.concurrency):
            self._buffer.put(None)
        deadline = time.monotonic() + self.options.shutdown_timeout_s
        handlers = [t for t in self._threads if t.name.startswith("hedwig-handler")]
        for thread in handlers:
            while thread.is_alive() and time.monotonic() < deadline and not self._abort.is_set():
                thread.join(0.1)
        self._release(running=True)
        self._acks.put(None)
        for thread in self._threads:
            if not thread.name.startswith("hedwig-handler"):
                thread.join(5.0)
        self._consumer.close()
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


def _describe(
    message: Message, error: Exception | None, duration_s: float, outcome: Outcome
) -> tuple[str, dict[str, Any]]:
    """The words and the structured fields of a log line about one handled message."""
    tag = f"{message.type} {message.version} id={message.id} attempt={message.attempt} in {duration_s * 1000:.1f}ms"
    fields = {
        "message_id": message.id,
        "message_type": message.type,
        "message_version": str(message.version),
        "attempt": message.attempt,
        "duration_ms": round(duration_s * 1000, 3),
        "outcome": "ignored" if isinstance(error, Ignore) else outcome.action,
    }
    return tag, fields


def _key(delivery: Delivery) -> str:
    """What names a message across its deliveries: its Hedwig id, else the broker's id."""
    return delivery.attributes.get("hedwig_id") or delivery.transport_id
