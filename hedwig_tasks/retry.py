"""Retry policy: what happens to a message after its handler ran. Pure; no clock, no I/O.

:func:`decide` turns a handler's outcome (nothing raised, or an exception) and the delivery's
attempt number into an :class:`Outcome`: acknowledge, retry after a delay, or dead-letter
with a reason. The worker asks; the transport carries it out.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Literal

from hedwig_tasks.exceptions import ConfigurationError, DeadLetter, Ignore, Retry, RoutingError, ValidationError

__all__ = ["DEFAULT_RETRY_POLICY", "NON_RETRYABLE", "Outcome", "RetryPolicy", "decide"]

#: Retries after the first attempt before a message is dead-lettered.
DEFAULT_MAX_RETRIES = 5
#: The first backoff, in seconds; each later one doubles.
DEFAULT_BACKOFF_S = 2.0
#: The longest backoff, in seconds.
DEFAULT_MAX_BACKOFF_S = 600.0
#: Errors a handler raises that no retry can cure, so its message is dead-lettered at once with
#: the error as the reason: a message that breaks its schema (``ValidationError``, say from a
#: publish inside the handler), a wrong setting or schema (``ConfigurationError``), a message
#: type with no route (``RoutingError``). The default of ``RetryPolicy.dont_retry_on``; extend
#: it with ``RetryPolicy(dont_retry_on=(*NON_RETRYABLE, KeyError))``.
NON_RETRYABLE: tuple[type[BaseException], ...] = (ValidationError, ConfigurationError, RoutingError)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How a handler's failures are retried.

    The n-th retry waits ``backoff_s * 2**(n-1)`` seconds, capped at ``max_backoff_s``; with
    ``jitter`` the wait is drawn from its upper half so that retries of many messages spread
    out. An exception in ``dont_retry_on`` (by default :data:`NON_RETRYABLE`, the errors no
    retry can cure), or not in ``retry_on``, dead-letters at once with the error as the reason.
    """

    max_retries: int = DEFAULT_MAX_RETRIES
    backoff_s: float = DEFAULT_BACKOFF_S
    max_backoff_s: float = DEFAULT_MAX_BACKOFF_S
    jitter: bool = True
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    dont_retry_on: tuple[type[BaseException], ...] = NON_RETRYABLE

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("backoff_s and max_backoff_s must be >= 0")

    def backoff(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        delay = min(self.max_backoff_s, self.backoff_s * 2.0 ** max(retry - 1, 0))
        if self.jitter:
            delay = delay / 2 + rand() * delay / 2
        return delay

    def retries(self, exc: BaseException) -> bool:
        """Whether this exception is one the policy retries at all."""
        return isinstance(exc, self.retry_on) and not isinstance(exc, self.dont_retry_on)


DEFAULT_RETRY_POLICY = RetryPolicy()


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What to do with a message: ``ack``, ``retry`` after ``delay_s``, or ``dead_letter``."""

    action: Literal["ack", "retry", "dead_letter"]
    delay_s: float = 0.0
    reason: str = ""


ACK = Outcome("ack")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def decide(
    policy: RetryPolicy,
    exc: BaseException | None,
    attempt: int,
    *,
    rand: Callable[[], float] = random.random,
) -> Outcome:
    """The outcome of a handler run on delivery number ``attempt`` (1 for the first)."""
    if exc is None or isinstance(exc, Ignore):
        return ACK
    if isinstance(exc, DeadLetter):
        return Outcome("dead_letter", reason=exc.reason)
    if not isinstance(exc, Retry) and not policy.retries(exc):
        return Outcome("dead_letter", reason=f"not retried: {_describe(exc)}")
    if attempt > policy.max_retries:
        return Outcome(
            "dead_letter",
            reason=f"gave up after {attempt} attempts: {_describe(exc)}",
        )
    if isinstance(exc, Retry) and exc.delay_s is not None:
        return Outcome("retry", delay_s=exc.delay_s, reason=exc.reason)
    return Outcome("retry", delay_s=policy.backoff(attempt, rand), reason=_describe(exc))
