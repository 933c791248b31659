"""The worker's acker: acknowledgements gathered into batches, one broker round trip each.

A mixin of :class:`~hedwig_tasks.worker.Worker` (kept apart so each module holds one concern).
A handled message's ack goes to the acker's queue (:meth:`Acks._ack_later`), and its slot stays
taken until the batch holding it is sent: the receive loop never holds more than its bound.
While deliveries are still held, more acks are coming, so the acker gathers for up to
``ACK_GATHER_S`` or until half of what may be held is acked; it is woken by a full batch, not
by each ack. Once nothing is held (or, on a local bus, once the last buffered delivery has been
taken), what it has goes at once, so the freed slots reach the receive loop while it has work
to fetch.
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

    def _init_acks(self, batch: int, *, free: bool) -> None:
        """``free``: an ack costs no request (a local bus), so a dry buffer is worth a small batch."""
        self._ack_batch = batch  #: acks worth one broker round trip
        self._acks_free = free
        self._acks: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        self._ack_due = threading.Event()  #: the acker's batch is full, or nothing is held: send it
        self._ack_wanted = _NEVER  #: acks the acker's batch still lacks, while it gathers
        self._ack_now = False  #: the buffer ran dry: what the acker has goes at once

    def _ack_later(self, delivery: Delivery) -> None:
        """Acknowledge ``delivery`` with the acker's next batch (its slot comes back then)."""
        self._acks.put(delivery)
        if self._acks.qsize() >= self._ack_wanted:
            self._ack_due.set()

    def _buffer_drained(self) -> None:
        """The last buffered delivery was taken: the receive loop needs the slots that waiting
        acks hold to refill the buffer, so a gathering acker sends what it has now (with long
        runs a batch can take longer to fill than the buffer lasts, and children would idle).
        Only on a local bus, where an ack costs no request: on SQS each would be one more."""
        if self._acks_free and self._ack_wanted != _NEVER and not self._acks.empty():
            self._ack_now = True
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

        While acks keep coming, the acker sleeps until a batch is full or ``ACK_GATHER_S`` has
        passed, whether or not an ack has come yet: one wake-up per batch. Once a whole window
        brought none, or nothing is held, it sleeps until the first (a long run may hold its
        delivery for hours), then gathers from there.
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
            timeout_s: float | None = deadline - now
            if batch:
                full = len(batch) >= self._ack_batch or now >= deadline
                if full or not self._held or self._ack_now or self._stopping.is_set():
                    self._ack_now = False
                    return batch, False
                wanted = self._ack_batch - len(batch)
            elif self._held and now < deadline:
                wanted = self._ack_batch
            else:
                wanted, timeout_s = 1, None
            self._ack_wanted = wanted  # not woken by each ack: by enough of them
            self._ack_due.clear()
            if self._acks.qsize() < wanted:
                self._ack_due.wait(timeout_s)
            self._ack_wanted = _NEVER  # until it sleeps again, acks need not wake it
            if timeout_s is None:  # the first after a quiet spell: gather from now
                deadline = time.monotonic() + ACK_GATHER_S
