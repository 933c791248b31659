"""Every signal hedwig-tasks sends, in one place (blinker).

The sender is always the :class:`~hedwig_tasks.app.Hedwig` app. Receivers observe; they never
decide: a receiver that raises is logged and ignored, so a broken metrics hook cannot change
what happens to a message. Connect with ``signals.handler_failed.connect(fn, sender=app)``
(or without ``sender`` for every app); ``fn(app, **kwargs)`` gets the keyword arguments listed.

Worker life cycle:

* ``worker_init(worker)``: the worker is built, before it connects.
* ``worker_ready(worker)``: consuming has started.
* ``worker_shutting_down(worker, reason)``: shutdown began (``"signal"``, ``"burst"``, ``"error"``).
* ``worker_shutdown(worker)``: the worker stopped; nothing is held any more.
* ``heartbeat(worker, error_count, held)``: about every second while the receive loop is alive.

Publishing:

* ``before_publish(message, topic)``: validated, about to be sent.
* ``after_publish(message, topic, transport_id)``: the transport accepted it.

Consuming:

* ``message_received(delivery)``: a delivery came in, before decoding.
* ``message_invalid(delivery, error)``: it could not be decoded; it will be dead-lettered.
* ``message_unknown(message)``: no handler takes its type and major; it will be dead-lettered.
* ``handler_started(message, handler)``: the handler is about to run.
* ``handler_succeeded(message, handler, duration_s)``: it returned (or raised ``Ignore``).
* ``handler_failed(message, handler, error, duration_s)``: it raised (anything but ``Ignore`` or
  ``DeadLetter``).
* ``handler_dead_lettered(message, handler, reason, duration_s)``: it raised ``DeadLetter``: a
  decision, not a failure (``message_dead_lettered`` follows, as for every dead letter).
* ``handler_time_limit_exceeded(message, handler, time_limit_s, abandoned)``: the handler ran past its
  time limit; its message is failed (``handler_failed`` follows, with a ``TimeLimitExceeded``).
  ``abandoned`` names what was given up: ``"thread <name>"`` (a sync handler's thread, replaced),
  ``"child process <pid>"`` (killed and replaced), or ``""`` (an ``async`` handler, cancelled).
* ``handler_retried(message, handler, error, delay_s, attempt)``: the message will come back after ``delay_s``.
* ``message_duplicate(message, handler, key)``: an idempotent handler's message already handled
  (its ``key`` in the state store says so); acknowledged without running the handler.
* ``message_dead_lettered(message, delivery, reason)``: sent to the dead letters; ``message`` is None if undecodable.
* ``message_expired(message, delivery, expired_at_ms)``: received after its expiry (``publish(...,
  expires_s=)``); its handler is not run and it is acknowledged or, with
  ``Hedwig(expired="dead-letter")``, dead-lettered (``message_dead_lettered`` follows).
"""

from __future__ import annotations

import logging
from typing import Any

from blinker import Namespace, Signal

__all__ = [
    "after_publish",
    "before_publish",
    "handler_dead_lettered",
    "handler_failed",
    "handler_retried",
    "handler_started",
    "handler_succeeded",
    "handler_time_limit_exceeded",
    "heartbeat",
    "message_dead_lettered",
    "message_expired",
    "message_invalid",
    "message_received",
    "message_unknown",
    "send",
    "worker_init",
    "worker_ready",
    "worker_shutdown",
    "worker_shutting_down",
]

logger = logging.getLogger(__name__)

_signals = Namespace()

worker_init = _signals.signal("worker-init")
worker_ready = _signals.signal("worker-ready")
worker_shutting_down = _signals.signal("worker-shutting-down")
worker_shutdown = _signals.signal("worker-shutdown")
heartbeat = _signals.signal("heartbeat")
before_publish = _signals.signal("before-publish")
after_publish = _signals.signal("after-publish")
message_received = _signals.signal("message-received")
handler_started = _signals.signal("handler-started")
handler_succeeded = _signals.signal("handler-succeeded")
handler_failed = _signals.signal("handler-failed")
handler_dead_lettered = _signals.signal("handler-dead-lettered")
handler_retried = _signals.signal("handler-retried")
handler_time_limit_exceeded = _signals.signal("handler-time-limit-exceeded")
message_dead_lettered = _signals.signal("message-dead-lettered")
message_duplicate = _signals.signal("message-duplicate")
message_expired = _signals.signal("message-expired")
message_unknown = _signals.signal("message-unknown")
message_invalid = _signals.signal("message-invalid")


def send(signal: Signal, sender: Any, **kwargs: Any) -> None:
    """Send ``signal``; a receiver that raises is logged and the others still run."""
    if not signal.receivers:
        return
    for receiver in signal.receivers_for(sender):
        try:
            receiver(sender, **kwargs)
        except Exception:
            logger.exception("signal %s: receiver %r raised; ignored", signal.name, receiver)
