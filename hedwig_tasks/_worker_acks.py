"""The worker's acker: acknowledgements gathered into batches, one broker round trip each.

A mixin of :class:`~hedwig_tasks.worker.Worker` (kept apart so each module holds one concern).
A handled message's ack goes to the acker's queue (:meth:`Acks._ack_later`), and its slot stays
taken until the batch holding it is sent: the receive loop never holds more than its bound.
While deliveries are still held, more acks are coming, so the acker gathers for up to
``ACK_GATHER_S`` or until half of what may be held is acked; it is woken by a full batch, not
by each ack. Once nothing is held, what it has goes at once, so the freed slots reach the
receive loop without delay.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from hedwig_tasks._worker_limits import _Held
from hedwig_tasks.transports.base import Delivery

if TYPE_CHECKING:
    from hedwig_tasks.transports.base import Consumer

__all__ = ["ACK_GATHER_S", "Acks"]

logger = logging.getLogger("hedwig_tasks.worker")

#: Longest an ack waits for others to go with it while handlers still have work, in seconds.
ACK_GATHER_S = 0.02
#: An ack count never reached: the acker is not gathering.
_NEVER = 1 << 62


class Acks:
    """The acker's side of the worker: queue an ack, gather a batch, send it, give back its slots."""

    _consumer: Consumer | None
    _held: dict[int, _Held]
    _stopping: threading.Event

    if TYPE_CHECKING:

        def _settle(self, what: str, action: Any, *args: Any) -> None: ...
        def _give_back_slots(self, count: int) -> None: ...

    def _init_acks(self, batch: int) -> None:
        self._ack_batch = batch  #: acks worth one broker round trip
        self._acks: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        self._ack_due = threading.Event()  #: the acker's batch is full, or nothing is held: send it
        self._ack_wanted = _NEVER  #: acks the acker's batch still lacks, while it gathers

    def _ack_later(self, delivery: Delivery) -> None:
        """Acknowledge ``delivery`` with the acker's next batch (its slot comes back then)."""
        self._acks.put(delivery)
        if self._acks.qsize() >= self._ack_wanted:
            self._ack_due.set()

    def _acks_waiting(self) -> bool:
        return not self._acks.empty()

    def _nothing_held(self) -> None:
        """No delivery is held any more: no ack is coming to fill the batch, send it now."""
        self._ack_due.set()

    def _stop_acks(self) -> None:
        """The acker sends what it has and ends."""
        self._acks.put(None)
        self._ack_due.set()

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

        While deliveries are held, the acker sleeps until a batch is full or ``ACK_GATHER_S``
        has passed, whether or not an ack has come yet: one wake-up per batch. Only with
        nothing held does it sleep until the first ack (none may come for hours).
        """
        batch: list[Delivery] = []
        deadline = time.monotonic() + ACK_GATHER_S
        while True:
            while True:
                try:
                    item = self._acks.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    return batch, True
                batch.append(item)
            now = time.monotonic()
            full = len(batch) >= self._ack_batch or now >= deadline
            if batch and (full or not self._held or self._stopping.is_set()):
                return batch, False
            if now >= deadline:  # nothing came meanwhile: gather afresh
                deadline = now + ACK_GATHER_S
            gathering = bool(batch or self._held)
            self._ack_wanted = self._ack_batch - len(batch) if gathering else 1  # not woken by each ack
            self._ack_due.clear()
            if self._acks.qsize() < self._ack_wanted:
                self._ack_due.wait(deadline - now if gathering else None)
            self._ack_wanted = _NEVER  # until it sleeps again, acks need not wake it
