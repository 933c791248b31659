"""What the worker's uses of the state store share: its name in the store, and outages logged once.

A store error never stops a worker: idempotency then cannot tell whether a message ran (the
message comes back later), a fleet rate limit waits and asks again, a heartbeat skips a beat.
:class:`Outage` writes one WARNING when the store first fails and one INFO line when it answers
again, not a line per message.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

__all__ = ["Outage", "worker_id"]

logger = logging.getLogger("hedwig_tasks.worker")


def worker_id() -> str:
    """A name for this worker in the state store, unique in the fleet: ``host:pid:token``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Outage:
    """Logs a state store's failure once per outage, and its recovery; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.failing = False
        self.errors = 0  #: store errors seen since the worker started

    def failed(self, what: str, exc: BaseException, consequence: str) -> None:
        """The store failed at ``what``; logged only if it was answering until now."""
        with self._lock:
            self.errors += 1
            first, self.failing = not self.failing, True
        if first:
            logger.warning("state store failed (%s: %s); %s until it answers again", what, exc, consequence)

    def answered(self) -> None:
        """The store answered; logs the recovery after an outage."""
        if self.failing:
            with self._lock:
                was, self.failing = self.failing, False
            if was:
                logger.info("state store answers again")
