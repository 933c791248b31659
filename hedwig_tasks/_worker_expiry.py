"""What the worker does with a message received after its expiry (``publish(..., expires_s=)``).

The expiry rides in the ``hedwig_expires_at`` attribute (epoch ms). A message received after
it never reaches its handler: it is acknowledged (``Hedwig(expired="ignore")``, the default)
or dead-lettered with the reason ``expired at <time>`` (``expired="dead-letter"``), logged,
and announced by the ``message_expired`` signal (counted in ``hedwig_expired_total``). The
worker calls :func:`settle_if_expired` only for a delivery that carries the attribute, so a
message without one costs a dictionary lookup.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import TYPE_CHECKING, Any

from hedwig_tasks import signals
from hedwig_tasks._publish_timing import EXPIRES_AT_ATTRIBUTE
from hedwig_tasks.message import Message

if TYPE_CHECKING:
    from hedwig_tasks.worker import Worker

__all__ = ["EXPIRED_ACTIONS", "EXPIRES_AT_ATTRIBUTE", "expired_since", "settle_if_expired"]

logger = logging.getLogger("hedwig_tasks.worker")

#: What ``Hedwig(expired=...)`` may say to do with an expired message.
EXPIRED_ACTIONS = ("ignore", "dead-letter")


def expired_since(attributes: Any, now_ms: int) -> int | None:
    """The expiry time (epoch ms) if it is past at ``now_ms``; None if not, or if unreadable."""
    try:
        expires_ms = int(attributes[EXPIRES_AT_ATTRIBUTE])
    except (KeyError, ValueError, TypeError):
        return None
    return expires_ms if expires_ms <= now_ms else None


def _when(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="milliseconds")


def settle_if_expired(worker: Worker, held: Any, message: Message) -> tuple[str, None, str] | None:
    """Settle an expired message as the app says and return (action, None, reason) for its span;
    None: it has not expired, run it."""
    expires_ms = expired_since(held.delivery.attributes, int(time.time() * 1000))
    if expires_ms is None:
        return None
    app = worker.app
    reason = f"expired at {_when(expires_ms)}"
    action = "dead_letter" if app.expired == "dead-letter" else "ack"
    signals.send(signals.message_expired, app, message=message, delivery=held.delivery, expired_at_ms=expires_ms)
    if action == "dead_letter":
        worker._dead_letter(held, message, reason)
        return action, None, reason
    logger.info(
        "ignored %s %s id=%s: %s",
        message.type,
        message.version,
        message.id,
        reason,
        extra={"message_id": message.id, "outcome": "expired", "subscription": held.delivery.subscription},
    )
    held.settled = "ack"  # counted by hedwig_expired_total, not among the worker's handled
    worker._ack_later(held.delivery)
    return action, None, reason
