"""hedwig-tasks: Celery's ergonomics on Hedwig's contracts.

Typed, versioned, schema-validated messages between services, handled by a worker::

    hedwig = Hedwig("myapp", schema="schema.json")

    @hedwig.handler("send_email", "1.*")
    def send_email(message: Message) -> None: ...

    send_email.publish(to="someone@example.com", subject="Hello!")
"""

from __future__ import annotations

from hedwig_tasks._version import __version__ as __version__
from hedwig_tasks.app import Hedwig
from hedwig_tasks.exceptions import (
    ConfigurationError,
    DeadLetter,
    DecodeError,
    HandlerNotFound,
    HedwigError,
    Ignore,
    PublishError,
    Retry,
    RoutingError,
    SchemaError,
    TransportError,
    ValidationError,
)
from hedwig_tasks.handler import Handler
from hedwig_tasks.message import Message, Metadata, Version
from hedwig_tasks.retry import RetryPolicy

__all__ = [
    "ConfigurationError",
    "DeadLetter",
    "DecodeError",
    "Handler",
    "HandlerNotFound",
    "Hedwig",
    "HedwigError",
    "Ignore",
    "Message",
    "Metadata",
    "PublishError",
    "Retry",
    "RetryPolicy",
    "RoutingError",
    "SchemaError",
    "TransportError",
    "ValidationError",
    "Version",
]
