"""Typed payloads: a handler that names its data's type in its signature receives it built.

A handler takes the message first, as every handler does; a second positional parameter
annotated with a dataclass, a ``TypedDict`` or a pydantic model receives the message's data
built as that type::

    @hedwig.handler("send_email", "1.*")
    def send(message: Message, email: SendEmailV1) -> None:
        deliver(email.to, email.subject)

The schema stays the authority: the data is validated against it first, as for every handler,
then built. Data the schema accepts but the type cannot hold (a field the type requires and the
schema leaves optional, a pydantic constraint) raises :class:`ValidationError`, which the retry
policy does not retry: the message is dead-lettered with the reason. ``hedwig-tasks schema
codegen`` writes such types from the schema (its dataclasses name a renamed key in ``_keys``,
which is honoured here).

A dataclass is built field by field, nested dataclasses (also inside lists and ``X | None``)
included; a ``TypedDict`` is the data itself once its required keys are there; a pydantic model
comes from its ``model_validate``.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from hedwig_tasks.exceptions import ValidationError

__all__ = ["Builder", "payload_builder"]

#: Builds a handler's typed argument from the message's (already validated) data.
Builder = Callable[[Any], Any]


def payload_builder(fn: Callable[..., Any]) -> Builder | None:
    """How to build ``fn``'s second positional argument from message data; None when it takes none.

    Only a parameter annotated with a dataclass, a ``TypedDict`` or a pydantic model counts; the
    annotation is resolved as ``typing.get_type_hints`` does, so ``from __future__ import
    annotations`` and string annotations work where the name is importable from ``fn``'s module.
    """
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(parameters) < 2 or parameters[1].kind not in positional:
        return None
    annotation = _annotation(fn, parameters[1])
    return None if annotation is None else _builder(annotation)


def _annotation(fn: Callable[..., Any], parameter: inspect.Parameter) -> Any:
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # a name the annotations use is not importable: take it as written
        hints = {}
    found = hints.get(parameter.name, parameter.annotation)
    return None if found is inspect.Parameter.empty or isinstance(found, str) else found


def _builder(cls: Any) -> Builder | None:
    if isinstance(cls, type) and dataclasses.is_dataclass(cls):
        return lambda data: _dataclass(cls, data)
    if typing.is_typeddict(cls):
        return lambda data: _typeddict(cls, data)
    if isinstance(cls, type) and callable(getattr(cls, "model_validate", None)):
        return lambda data: _pydantic(cls, data)
    return None


def _typeddict(cls: Any, data: Any) -> Any:
    missing = sorted(set(getattr(cls, "__required_keys__", ())) - set(data))
    if missing:
        raise ValidationError(f"data does not fit {cls.__name__}: missing {', '.join(missing)}")
    return data


def _pydantic(cls: Any, data: Any) -> Any:
    try:
        return cls.model_validate(data)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ValidationError(f"data does not fit {cls.__name__}: {' '.join(str(exc).split())}") from exc


def _dataclass(cls: Any, data: Any) -> Any:
    if not isinstance(data, Mapping):
        raise ValidationError(f"data does not fit {cls.__name__}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    keys: Mapping[str, str] = getattr(cls, "_keys", {})
    values = {}
    for field in dataclasses.fields(cls):
        key = keys.get(field.name, field.name)
        if field.init and key in data:
            values[field.name] = _value(hints.get(field.name, Any), data[key])
    try:
        return cls(**values)
    except TypeError as exc:
        raise ValidationError(f"data does not fit {cls.__name__}: {exc}") from exc


def _value(hint: Any, value: Any) -> Any:
    """``value`` as ``hint`` where that is a dataclass (or holds one: a list, an optional)."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return _dataclass(hint, value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list and args and isinstance(value, list):
        return [_value(args[0], item) for item in value]
    if origin in (typing.Union, types.UnionType) and value is not None:
        inner = [arg for arg in args if arg is not type(None)]
        return _value(inner[0], value) if len(inner) == 1 else value
    return value
