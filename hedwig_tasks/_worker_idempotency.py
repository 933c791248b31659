"""Idempotent handlers: a message runs once per key while its success is remembered in the state store.

A mixin of :class:`~hedwig_tasks.worker.Worker`. Before an idempotent handler runs, the worker
takes the lease ``idem/<app>/<type>/<key>`` (the key: the message id, or the handler's
``idempotency_key(message)``) for one message lease, as owner ``<worker id>/<this delivery>``;
the lease keeper renews it with the message's lease while the handler runs. Then:

* success (or ``Ignore``): the lease becomes the record ``done`` for ``idempotency_ttl_s``,
  written before the acknowledgement is sent;
* failure, ``Retry`` or a dead letter: the lease is released at once, so a retry can run;
* a crash (or a handler abandoned at its time limit): the lease is no longer renewed and ends
  within one lease.

A delivery whose lease cannot be taken is a **duplicate** if the key holds ``done``: it is
acknowledged without running (``message_duplicate``, ``hedwig_duplicates_total``). Otherwise
another delivery of it is running right now, here or on another worker: it is made visible
again after about a lease (``retry_later``), not run and not counted as a failure (its retry
policy is not asked). A store that fails cannot tell either: the message comes back the same
way, and the outage is logged once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from hedwig_tasks import signals
from hedwig_tasks._worker_report import key as _key
from hedwig_tasks.exceptions import StateError

if TYPE_CHECKING:
    from hedwig_tasks._worker_limits import _Held
    from hedwig_tasks._worker_state import Outage
    from hedwig_tasks.app import Hedwig
    from hedwig_tasks.handler import Handler
    from hedwig_tasks.message import Message
    from hedwig_tasks.transports.base import Consumer, Delivery

__all__ = ["DONE", "Idempotency", "idempotency_key"]

logger = logging.getLogger("hedwig_tasks.worker")

#: The value of a key whose message was handled (no worker's owner name is ever this).
DONE = "done"
#: Bounds of the wait before a message held elsewhere (or that the store could not tell about) comes back, in seconds.
MIN_DEFER_S, MAX_DEFER_S = 1.0, 30.0


def idempotency_key(app_name: str, handler: Handler, message: Message) -> str:
    """The state store's name for a message's run: ``idem/<app>/<type>/<key>``."""
    assert handler.idempotency_key is not None
    return f"idem/{app_name}/{message.type}/{handler.idempotency_key(message)}"


class Idempotency:
    """Claims, records and releases the keys of idempotent handlers' messages; mixed into the worker."""

    app: Hedwig
    lease_s: float
    worker_id: str
    duplicates: int
    _state_outage: Outage
    _consumer: Consumer | None
    _held: dict[int, _Held]
    _held_lock: threading.Lock
    _retries_due: dict[str, float]
    _max_delay_s: float | None

    if TYPE_CHECKING:

        def _settle(self, what: str, action: Any, *args: Any) -> None: ...
        def _forget_past_retries(self, now: float) -> None: ...
        def _ack_later(self, delivery: Delivery) -> None: ...

    def _claim(self, held: _Held, handler: Handler, message: Message) -> bool:
        """True: this delivery holds the key, run it. False: it was settled here (a duplicate
        acknowledged, or made visible again later)."""
        name = idempotency_key(self.app.name, handler, message)
        owner = f"{self.worker_id}/{id(held):x}"
        store = self.app.state
        try:
            if store.acquire(name, owner, ttl_s=self.lease_s):
                self._state_outage.answered()
                held.claim = (name, owner)
                return True
            done = store.get(name) == DONE
            self._state_outage.answered()
        except StateError as exc:
            self._state_outage.failed("idempotency", exc, "messages of idempotent handlers come back later")
            self._defer(held.delivery, message, "the state store cannot tell whether it ran")
            held.settled = "retry"
            return False
        if done:
            self._drop_duplicate(held, handler, message, name)
        else:
            self._defer(held.delivery, message, "another delivery of it is running")
            held.settled = "retry"
        return False

    def _drop_duplicate(self, held: _Held, handler: Handler, message: Message, name: str) -> None:
        held.settled = "ack"
        self._ack_later(held.delivery)
        with self._held_lock:
            self.duplicates += 1
        logger.info(
            "duplicate %s %s id=%s attempt=%d: already handled (%s); acknowledged without running",
            message.type,
            message.version,
            message.id,
            message.attempt,
            name,
            extra={"message_id": message.id, "message_type": message.type, "outcome": "duplicate"},
        )
        signals.send(signals.message_duplicate, self.app, message=message, handler=handler, key=name)

    def _defer(self, delivery: Delivery, message: Message, why: str) -> None:
        """Make the delivery visible again after about a lease, asking no retry policy."""
        assert self._consumer is not None
        delay_s = min(max(self.lease_s, MIN_DEFER_S), MAX_DEFER_S)
        if self._max_delay_s is not None:
            delay_s = min(delay_s, self._max_delay_s)
        logger.info(
            "deferring %s %s id=%s by %.1fs: %s",
            message.type,
            message.version,
            message.id,
            delay_s,
            why,
            extra={"message_id": message.id, "message_type": message.type, "outcome": "deferred"},
        )
        self._settle("retry", self._consumer.retry_later, delivery, delay_s)
        with self._held_lock:
            now = time.monotonic()
            self._forget_past_retries(now)
            self._retries_due[_key(delivery)] = now + delay_s  # a burst worker waits for it

    def _end_claim(self, held: _Held, handled: bool, ttl_s: float) -> None:
        """Record the key as done (``handled``) or release it for a retry; a store error is logged once."""
        assert held.claim is not None
        name, owner = held.claim
        held.claim = None
        store = self.app.state
        try:
            if handled:
                store.put(name, DONE, ttl_s=ttl_s)
            else:
                store.release(name, owner)
            self._state_outage.answered()
        except StateError as exc:
            self._state_outage.failed("idempotency", exc, "handled messages go unrecorded (their keys expire)")

    def _renew_claims(self) -> None:
        """Extend the keys of running idempotent messages (from the lease keeper)."""
        with self._held_lock:
            claims = [(h, h.claim) for h in self._held.values() if h.claim is not None and h.running]
        for held, (name, owner) in claims:
            try:
                kept = self.app.state.renew(name, owner, ttl_s=self.lease_s)
                self._state_outage.answered()
            except StateError as exc:
                self._state_outage.failed("idempotency", exc, "running keys are not renewed")
                return
            if not kept and held.claim == (name, owner):  # not merely ended meanwhile
                logger.warning("lost the idempotency key %s while its handler runs: another may run it too", name)
