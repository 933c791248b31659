"""A handler: the decorated function, its message type and majors, its retry policy and limits."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from hedwig_tasks.exceptions import ConfigurationError, TimeLimitExceeded
from hedwig_tasks.message import Message, VersionLike
from hedwig_tasks.ratelimit import RATE_SCOPES, FleetRateLimiter, Limiter, RateLimit, RateLimiter
from hedwig_tasks.retry import RetryPolicy
from hedwig_tasks.typed import payload_builder

if TYPE_CHECKING:
    from hedwig_tasks.app import Hedwig

__all__ = ["DEFAULT_IDEMPOTENCY_TTL_S", "Handler"]

#: How long an idempotent handler's success is remembered (a duplicate within it is dropped), in seconds.
DEFAULT_IDEMPOTENCY_TTL_S = 7 * 24 * 3600.0


def _check_signature(fn: Callable[..., Any], name: str, typed: bool) -> None:
    """The message is the one required positional argument; with a typed payload, the data too."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"handler {name}: cannot read its signature: {exc}") from exc
    try:
        signature.bind(*([object()] * (2 if typed else 1)))
    except TypeError:
        raise ConfigurationError(
            f"handler {name}{signature}: must take the message as its only required "
            "positional argument, as in def handler(message): ..., and then, if any, its data "
            "annotated with a dataclass, TypedDict or pydantic model, as in "
            "def handler(message, data: SendEmailV1): ..."
        ) from None


def _check_time_limit(time_limit_s: float | None, name: str) -> float | None:
    if time_limit_s is None:
        return None
    if isinstance(time_limit_s, bool) or not isinstance(time_limit_s, (int, float)) or not time_limit_s > 0:
        raise ConfigurationError(f"handler {name}: time_limit_s={time_limit_s!r}: expected seconds, more than 0")
    return float(time_limit_s)


def _check_idempotency(
    idempotent: bool, key: Callable[[Message], str] | None, ttl_s: float, name: str
) -> Callable[[Message], str] | None:
    """The function naming a message's idempotency key (the message id by default); None: not idempotent."""
    if key is not None and not callable(key):
        raise ConfigurationError(f"handler {name}: idempotency_key={key!r}: expected a function of the message")
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not ttl_s > 0:
        raise ConfigurationError(f"handler {name}: idempotency_ttl_s={ttl_s!r}: expected seconds, more than 0")
    if not idempotent and key is None:
        return None
    return key or _message_id


def _message_id(message: Message) -> str:
    return message.id


def _limiter(app: Hedwig, name: str, rate: RateLimit | None, scope: str) -> Limiter | None:
    if scope not in RATE_SCOPES:
        raise ConfigurationError(f"handler {name}: rate_scope={scope!r}: expected one of {', '.join(RATE_SCOPES)}")
    if rate is None:
        return None
    if scope == "fleet":
        return FleetRateLimiter(rate, lambda: app.state, f"rate/{app.name}/{name}")
    return RateLimiter(rate)


class Handler:
    """The function a ``@hedwig.handler(...)`` decorator wraps; still callable as before.

    ``publish`` sends a message of the handler's type, so a task and its trigger live together.
    ``time_limit_s`` bounds one run (None: the worker's ``--time-limit``, if any);
    ``rate_limit`` (``"100/s"``, ``"30/m"``, ``"500/h"``) bounds how often it starts in one
    worker process, or across every worker of the app with ``rate_scope="fleet"`` (one token
    bucket in the app's state store). ``idempotent`` runs it once per message id (or per
    ``idempotency_key(message)``, which implies it) while its success is remembered in the state
    store, ``idempotency_ttl_s``.
    """

    def __init__(
        self,
        app: Hedwig,
        fn: Callable[..., Any],  # (message) or (message, data: a payload type)
        message_type: str,
        majors: tuple[int, ...],
        *,
        retry: RetryPolicy | None = None,
        name: str | None = None,
        time_limit_s: float | None = None,
        rate_limit: str | None = None,
        rate_scope: str = "process",
        idempotent: bool = False,
        idempotency_key: Callable[[Message], str] | None = None,
        idempotency_ttl_s: float = DEFAULT_IDEMPOTENCY_TTL_S,
    ) -> None:
        self.name = name or f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
        #: Builds the typed second argument from the message's data (None: the handler takes none).
        self.payload = payload_builder(fn)
        _check_signature(fn, self.name, self.payload is not None)
        self.time_limit_s = _check_time_limit(time_limit_s, self.name)
        option = f"handler {self.name}: rate_limit"
        self.rate_limit = None if rate_limit is None else RateLimit.parse(rate_limit, option=option)
        self.rate_scope = rate_scope
        #: The limiter of this handler's starts (None: no rate limit): the process's or the fleet's.
        self.limiter = _limiter(app, self.name, self.rate_limit, rate_scope)
        #: What names a message for idempotency (None: the handler is not idempotent).
        self.idempotency_key = _check_idempotency(idempotent, idempotency_key, idempotency_ttl_s, self.name)
        self.idempotency_ttl_s = float(idempotency_ttl_s)
        self.app = app
        self.fn = fn
        self.message_type = message_type
        self.majors = majors
        self.retry = retry
        self.is_async = inspect.iscoroutinefunction(fn)
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def run(
        self, message: Message, *, loop: asyncio.AbstractEventLoop | None = None, time_limit_s: float | None = None
    ) -> Any:
        """Run on one message; an ``async def`` handler runs to completion on ``loop``.

        Without a loop an ``async`` handler gets a fresh one (eager mode); the worker passes
        each handler thread's own loop, so one is not built per message. An ``async`` handler
        still running after ``time_limit_s`` is cancelled and :class:`TimeLimitExceeded` raised
        (a sync one cannot be stopped from inside: the worker abandons its thread).
        """
        args = (message,) if self.payload is None else (message, self.payload(message.data))
        if not self.is_async:
            return self.fn(*args)
        if loop is None and time_limit_s is None:
            return asyncio.run(self.fn(*args))
        if loop is None:
            assert time_limit_s is not None
            loop = asyncio.new_event_loop()
            try:
                return _run_with_limit(loop, self.fn(*args), time_limit_s)
            finally:
                loop.close()
        if time_limit_s is None:
            return loop.run_until_complete(self.fn(*args))
        return _run_with_limit(loop, self.fn(*args), time_limit_s)

    @property
    def retry_policy(self) -> RetryPolicy:
        return self.retry or self.app.retry

    def publish(
        self,
        data: Mapping[str, Any] | Any = None,
        /,
        *,
        version: VersionLike = None,
        headers: Mapping[str, str] | None = None,
        delay_s: float | None = None,
        eta: dt.datetime | float | None = None,
        expires_s: float | None = None,
        expires_at: dt.datetime | float | None = None,
        **fields: Any,
    ) -> Message:
        """Publish a message of this handler's type; returns the :class:`Message` sent.

        Data is ``data`` or the keyword fields (a field named as an option below goes in
        ``data``). Without ``version`` the newest minor of the handler's highest major that the
        schema knows is used. ``delay_s``/``eta`` and ``expires_s``/``expires_at`` as
        :meth:`Hedwig.publish <hedwig_tasks.app.Hedwig.publish>`. Raises ``ValidationError``,
        ``RoutingError``, ``PublishError`` or ``ConfigurationError`` (a bad timing option).
        """
        if data is not None and fields:
            raise TypeError("pass the data either as one mapping or as keyword fields, not both")
        if version is None:
            version = self.app.validator.latest_version(self.message_type, max(self.majors))
        return self.app.publish(
            self.message_type,
            version,
            fields if data is None else data,
            headers=headers,
            delay_s=delay_s,
            eta=eta,
            expires_s=expires_s,
            expires_at=expires_at,
        )

    def __repr__(self) -> str:
        majors = ", ".join(f"{m}.*" for m in self.majors)
        return f"<Handler {self.name} for {self.message_type!r} {majors}>"


def _run_with_limit(loop: asyncio.AbstractEventLoop, coro: Any, time_limit_s: float) -> Any:
    """Run ``coro`` on ``loop``, cancelled after ``time_limit_s``: then TimeLimitExceeded.

    A flag tells the limit's cancellation from any other (and from a TimeoutError the
    handler raises itself, which ``asyncio.wait_for`` could not).
    """
    task = loop.create_task(coro)
    expired: list[bool] = []

    def expire() -> None:
        expired.append(True)
        task.cancel()

    timer = loop.call_later(time_limit_s, expire)
    try:
        return loop.run_until_complete(task)
    except asyncio.CancelledError:
        if expired:
            raise TimeLimitExceeded(time_limit_s) from None
        raise
    finally:
        timer.cancel()
