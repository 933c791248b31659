"""Every error hedwig-tasks raises, under one root.

::

    HedwigError
    ├── ConfigurationError (ValueError)      a bad setting, schema file, handler or route; raised at start-up
    │   └── SchemaError                      the schema file or protobuf classes break Hedwig's conventions
    ├── ValidationError (ValueError)         a message that breaks its schema, at publish
    │   └── DecodeError                      a received message that cannot be read; goes to the dead letters
    ├── RoutingError (LookupError)           no topic for a (type, major) at publish
    ├── HandlerNotFound (LookupError)        no handler for a received (type, major)
    ├── TransportError                       the broker failed; driver errors become this at the transport boundary
    │   └── PublishError                     a publish that could not be delivered
    ├── TimeLimitExceeded (TimeoutError)     a handler ran past its time limit; its message is failed
    ├── WorkerLost                           a process-pool child died while handling a message
    ├── RemoteError                          what a handler raised in a process-pool child (type, text, traceback)
    ├── StateError                           the state store failed; driver errors become this at the store boundary
    └── HandlerControl                       raised by a handler to say what happens to its message
        ├── Retry                            retry later, after ``delay_s`` or the policy's backoff
        ├── Ignore                           acknowledge and drop, without counting as a failure
        └── DeadLetter                       send to the dead-letter queue now, with ``reason``
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "DeadLetter",
    "DecodeError",
    "HandlerControl",
    "HandlerNotFound",
    "HedwigError",
    "Ignore",
    "PublishError",
    "RemoteError",
    "Retry",
    "RoutingError",
    "SchemaError",
    "StateError",
    "TransportError",
    "ValidationError",
    "WorkerLost",
]


class HedwigError(Exception):
    """The root of every error hedwig-tasks raises."""


class ConfigurationError(HedwigError, ValueError):
    """A setting, handler declaration or route is wrong. Raised at declaration or start-up."""


class SchemaError(ConfigurationError):
    """A schema file or set of protobuf classes does not follow Hedwig's conventions."""


class ValidationError(HedwigError, ValueError):
    """A message does not fit its schema (raised at publish, naming the field path)."""


class DecodeError(ValidationError):
    """A received message cannot be decoded: bad body, missing attribute, unknown schema or version.

    The worker sends such messages to the dead-letter queue with ``str(error)`` as the reason.
    """


class RoutingError(HedwigError, LookupError):
    """No topic is known for a message's type and major version."""


class HandlerNotFound(HedwigError, LookupError):
    """No handler is registered for a received message's type and major version."""


class TransportError(HedwigError):
    """The transport or its broker failed. Driver errors are chained as ``__cause__``."""


class PublishError(TransportError):
    """A publish could not be delivered. Nothing was silently dropped: the caller must act."""


class StateError(HedwigError):
    """The state store (leases, keys, counters, heartbeats) failed. Driver errors are chained as ``__cause__``."""


class TimeLimitExceeded(HedwigError, TimeoutError):
    """A handler ran past its ``time_limit_s``: cancelled (``async``), abandoned (a thread) or
    killed (a process-pool child). Its message fails with this error, retried by policy."""

    def __init__(self, time_limit_s: float) -> None:
        super().__init__(f"time limit exceeded ({time_limit_s:g}s)")
        self.time_limit_s = time_limit_s


class WorkerLost(HedwigError):
    """The process-pool child running a handler died (a crash, a kill, memory); retried by policy."""


class RemoteError(HedwigError):
    """What a handler raised in a process-pool child: its type's name, its text and traceback.

    The exception itself stays in the child (nothing is pickled); the child's retry policy
    already decided the outcome, and this carries what the parent logs and signals.
    """

    def __init__(self, type_name: str, text: str, traceback_text: str = "") -> None:
        super().__init__(f"{type_name}: {text}" if text else type_name)
        self.type_name = type_name
        self.text = text
        self.traceback_text = traceback_text


class HandlerControl(HedwigError):
    """Base of the exceptions a handler raises on purpose to decide its message's fate."""


class Retry(HandlerControl):
    """Retry the message later: after ``delay_s`` when given, else after the policy's backoff.

    Counts as an attempt; past the policy's ``max_retries`` the message is dead-lettered.
    """

    def __init__(self, reason: str = "retry requested", *, delay_s: float | None = None) -> None:
        super().__init__(reason)
        if delay_s is not None and delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s!r}")
        self.reason = reason
        self.delay_s = delay_s


class Ignore(HandlerControl):
    """Acknowledge the message and drop it; it is not a failure and is not retried."""


class DeadLetter(HandlerControl):
    """Send the message to the dead-letter queue at once, recording ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
