"""Which Hedwig settings exist, and how one source of them is read and checked.

This module holds the vocabulary: every supported ``HEDWIG_*`` / ``AWS_*`` / ``GOOGLE_*`` name
and ``REDIS_URL`` with its default (:data:`SUPPORTED`), the Hedwig names whose feature
hedwig-tasks does not have (:data:`UNSUPPORTED`), and :class:`HedwigSettings`, the checked values of one source. Every
``HEDWIG_*`` name is checked: a misspelt one, or one whose feature hedwig-tasks does not have,
fails at start-up naming it. ``AWS_*`` and ``GOOGLE_*`` names that Hedwig does not define are
left alone, since other libraries use those prefixes.

Where the settings come from (Django, Flask, ``SETTINGS_MODULE``, ``configure_with_object``)
and the app they build (``build_app``, ``default_app``) live in :mod:`hedwig_tasks.conf`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from hedwig_tasks.exceptions import ConfigurationError

__all__ = ["SUPPORTED", "UNSUPPORTED", "HedwigSettings", "import_string"]

#: Every setting understood, with its default.
SUPPORTED: dict[str, Any] = {
    "HEDWIG_CALLBACKS": {},
    "HEDWIG_QUEUE": None,
    "HEDWIG_MESSAGE_ROUTING": {},
    "HEDWIG_JSONSCHEMA_FILE": None,
    "HEDWIG_PROTOBUF_MESSAGES": None,
    "HEDWIG_DATA_VALIDATOR_CLASS": "hedwig.validators.jsonschema.JSONSchemaValidator",
    "HEDWIG_CONSUMER_BACKEND": None,
    "HEDWIG_PUBLISHER_BACKEND": None,
    "HEDWIG_SUBSCRIPTIONS": [],
    "HEDWIG_PUBLISHER": None,
    "HEDWIG_USE_TRANSPORT_MESSAGE_ATTRIBUTES": True,
    "HEDWIG_DEFAULT_HEADERS": None,
    "HEDWIG_PRE_PROCESS_HOOK": None,
    "HEDWIG_POST_PROCESS_HOOK": None,
    "HEDWIG_HEARTBEAT_HOOK": None,
    "HEDWIG_HEARTBEAT_INTERVAL_S": 15.0,
    "HEDWIG_SYNC": False,
    "HEDWIG_VISIBILITY_TIMEOUT_S": None,
    "HEDWIG_MAX_DELIVERY_ATTEMPTS": None,
    "HEDWIG_TRANSPORT_URL": None,
    "HEDWIG_STATE_URL": None,
    "AWS_REGION": None,
    "AWS_ACCOUNT_ID": None,
    "AWS_ACCESS_KEY": None,
    "AWS_SECRET_KEY": None,
    "AWS_SESSION_TOKEN": None,
    "AWS_ENDPOINT_SNS": None,
    "AWS_ENDPOINT_SQS": None,
    "AWS_CONNECT_TIMEOUT_S": 2.0,
    "AWS_READ_TIMEOUT_S": 2.0,
    "GOOGLE_CLOUD_PROJECT": None,
    "GOOGLE_APPLICATION_CREDENTIALS": None,
    "GOOGLE_PUBSUB_MAX_LEASE_DURATION_S": 3600.0,
    "PUBSUB_EMULATOR_HOST": None,
    "REDIS_URL": None,
}

#: Hedwig settings whose feature hedwig-tasks does not have, with what to do instead.
UNSUPPORTED: dict[str, str] = {
    "HEDWIG_HEARTBEAT_INACTIVITY_RESET_S": "the heartbeat hook gets the live error count; reset it in the hook",
    "HEDWIG_PUBLISHER_GCP_BATCH_SETTINGS": "set the batching options on the gcp:// transport URL",
    "GOOGLE_PUBSUB_READ_TIMEOUT_S": "requeue uses the transport's own timeouts",
}

_SECRET = ("SECRET", "TOKEN", "ACCESS_KEY", "CREDENTIALS")
#: Settings that are URLs: a password in one is hidden in a repr.
_URLS = ("REDIS_URL", "HEDWIG_TRANSPORT_URL", "HEDWIG_STATE_URL")


def import_string(value: Any, setting: str) -> Any:
    """The object a dotted path names, or ``value`` itself when it is not a string."""
    if not isinstance(value, str):
        return value
    module_name, _, attribute = value.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigurationError(f"{setting}: cannot import {value!r}: {exc}") from None


def _names_of(source: Any) -> list[str]:
    if isinstance(source, Mapping):
        return [k for k in source if isinstance(k, str)]
    return [name for name in dir(source) if not name.startswith("_")]


def _value_of(source: Any, name: str) -> Any:
    return source[name] if isinstance(source, Mapping) else getattr(source, name)


def _check_publisher(values: Mapping[str, Any]) -> None:
    """A service that publishes (it names a publisher backend) must name itself."""
    if values.get("HEDWIG_PUBLISHER_BACKEND") and not values.get("HEDWIG_PUBLISHER"):
        raise ConfigurationError(
            "HEDWIG_PUBLISHER must be set when HEDWIG_PUBLISHER_BACKEND is: every message carries its "
            "publisher's name (hedwig_publisher), and Hedwig's default (None) names no one; "
            "set HEDWIG_PUBLISHER to this service's name"
        )


def _shown(name: str, value: Any) -> Any:
    """``value`` as a repr may show it: secrets hidden, and the password of a URL."""
    if value and any(secret in name for secret in _SECRET):
        return "***"
    if name in _URLS and isinstance(value, str):
        try:
            password = urlsplit(value).password
        except ValueError:
            return "***"
        if password:
            return value.replace(f":{password}@", ":***@", 1)
    return value


@dataclasses.dataclass(frozen=True)
class HedwigSettings:
    """The Hedwig settings found in one source (a module, Django settings, Flask config, object)."""

    values: Mapping[str, Any]

    @classmethod
    def read(cls, source: Any) -> HedwigSettings:
        """Read and check ``source``; :class:`ConfigurationError` names an unknown or unsupported setting."""
        values: dict[str, Any] = {}
        for name in _names_of(source):
            upper = name.upper()
            if upper in SUPPORTED:
                values[upper] = _value_of(source, name)
            elif upper in UNSUPPORTED:
                raise ConfigurationError(f"{upper} is not supported by hedwig-tasks: {UNSUPPORTED[upper]}")
            elif upper.startswith("HEDWIG_"):
                close = difflib.get_close_matches(upper, SUPPORTED, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise ConfigurationError(f"unknown setting {upper}{hint}")
        _check_publisher(values)
        return cls(values)

    def __getitem__(self, name: str) -> Any:
        return self.values.get(name, SUPPORTED[name])

    def __repr__(self) -> str:
        return f"HedwigSettings({ {name: _shown(name, value) for name, value in self.values.items()}!r})"

    def callable_setting(self, name: str) -> Callable[..., Any] | None:
        value = import_string(self[name], name)
        if value is not None and not callable(value):
            raise ConfigurationError(f"{name}: expected a function or its dotted path, got {value!r}")
        return value  # type: ignore[no-any-return]

    def module_or_classes(self, name: str) -> list[Any]:
        items = self[name] or []
        if isinstance(items, (str, ModuleType)):
            items = [items]
        return [import_string(item, name) for item in items]
