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
    "Retry",
    "RoutingError",
    "SchemaError",
    "StateError",
    "TransportError",
    "ValidationError",
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
