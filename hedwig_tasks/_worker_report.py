"""How the worker tells of a handler's run: its signals and its one log line per message."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from hedwig_tasks import signals
from hedwig_tasks.exceptions import DeadLetter, HandlerControl, Ignore, RemoteError
from hedwig_tasks.message import Message
from hedwig_tasks.retry import Outcome
from hedwig_tasks.transports.base import Delivery

if TYPE_CHECKING:
    from hedwig_tasks.app import Hedwig
    from hedwig_tasks.handler import Handler

__all__ = ["describe", "key", "report"]

logger = logging.getLogger("hedwig_tasks.worker")


def report(
    app: Hedwig, handler: Handler, message: Message, error: Exception | None, duration_s: float, outcome: Outcome
) -> None:
    """Signal and log how the handler's run ended: one log line per message, a traceback
    only for an error nobody raised on purpose."""
    if error is None or isinstance(error, Ignore):
        if signals.handler_succeeded.receivers:  # else not even the call: this runs per message
            signals.send(signals.handler_succeeded, app, message=message, handler=handler, duration_s=duration_s)
        if logger.isEnabledFor(logging.INFO):  # the line and its fields cost more than the handler often
            tag, fields = describe(message, error, duration_s, outcome)
            logger.info("handled %s%s", tag, " (ignored)" if error else "", extra=fields)
        return
    tag, fields = describe(message, error, duration_s, outcome)
    if isinstance(error, DeadLetter):  # the handler's decision, not a failure
        reason = outcome.reason
        signals.send(
            signals.handler_dead_lettered, app, message=message, handler=handler, reason=reason, duration_s=duration_s
        )
        logger.warning("dead-lettered %s: %s", tag, outcome.reason, extra=fields)
        return
    signals.send(signals.handler_failed, app, message=message, handler=handler, error=error, duration_s=duration_s)
    if outcome.action == "retry":
        fields["retry_in_s"] = round(outcome.delay_s, 3)
        logger.warning("failed %s: %s; retrying in %.1fs", tag, outcome.reason, outcome.delay_s, extra=fields)
    elif isinstance(error, HandlerControl):  # Retry past the policy's retries: asked for, no traceback
        logger.error("failed %s: %s; dead-lettered", tag, outcome.reason, extra=fields)
    elif isinstance(error, RemoteError):  # raised in a process-pool child: its traceback came as text
        trace = error.traceback_text.rstrip()
        logger.error("failed %s: %s; dead-lettered\n%s", tag, outcome.reason, trace, extra=fields)
    else:
        logger.error("failed %s: %s; dead-lettered", tag, outcome.reason, exc_info=error, extra=fields)


def describe(
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


def key(delivery: Delivery) -> str:
    """What names a message across its deliveries: its Hedwig id, else the broker's id."""
    return delivery.attributes.get("hedwig_id") or delivery.transport_id
