"""The public API is what ``__all__`` says, and every name in it exists."""

from __future__ import annotations

import hedwig_tasks
from hedwig_tasks import exceptions, signals


def test_public_api_is_pinned() -> None:
    assert sorted(hedwig_tasks.__all__) == [
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
    for name in hedwig_tasks.__all__:
        assert getattr(hedwig_tasks, name) is not None


def test_every_error_has_one_root() -> None:
    for name in exceptions.__all__:
        assert issubclass(getattr(exceptions, name), exceptions.HedwigError), name


def test_signal_catalogue() -> None:
    documented = signals.__doc__ or ""
    names = [n for n in signals.__all__ if n != "send"]
    assert len(names) == 18
    for name in names:
        assert f"``{name}(" in documented, f"{name} is not documented with its keyword arguments"
