"""Where Hedwig-style settings come from, and the app they build: ``hedwig_tasks.conf.settings``.

Which settings exist and how they are checked is :mod:`hedwig_tasks.settings`; this module
finds the source and turns the checked values into a :class:`Hedwig` app (:func:`build_app`).
Settings come, in this order, from an object given to ``settings.configure_with_object(obj)``
(an object, a module or a dict), the module named by ``$SETTINGS_MODULE``, Django's settings
(when ``$DJANGO_SETTINGS_MODULE`` is set or Django is configured), or the current Flask app's
config. Nothing is read until first used. :func:`default_app` builds the app those settings
describe, once; ``Message.new(...).publish()`` and ``hedwig-tasks worker`` without ``-A``
use it.
"""

from __future__ import annotations

import importlib
import os
import threading
from typing import Any

from hedwig_tasks.app import Hedwig, Hooks
from hedwig_tasks.exceptions import ConfigurationError
from hedwig_tasks.retry import DEFAULT_RETRY_POLICY, RetryPolicy
from hedwig_tasks.settings import SUPPORTED, HedwigSettings, import_string
from hedwig_tasks.transports import DEFAULT_URL, transport_class
from hedwig_tasks.transports.base import Transport
from hedwig_tasks.validators.base import Validator

__all__ = ["build_app", "default_app", "handler", "reset", "settings", "use_app"]

_AWS_BACKENDS = {
    "hedwig.backends.aws.AWSSQSConsumerBackend",
    "hedwig.backends.aws.AWSSNSPublisherBackend",
}
_GCP_BACKENDS = {
    "hedwig.backends.gcp.GooglePubSubConsumerBackend",
    "hedwig.backends.gcp.GooglePubSubPublisherBackend",
    "hedwig.backends.gcp.GooglePubSubAsyncPublisherBackend",
}
_REDIS_BACKENDS = {
    "hedwig.backends.redis.RedisStreamsConsumerBackend",
    "hedwig.backends.redis.RedisStreamsPublisherBackend",
}
_FAMILIES = {
    **dict.fromkeys(_AWS_BACKENDS, "aws"),
    **dict.fromkeys(_GCP_BACKENDS, "gcp"),
    **dict.fromkeys(_REDIS_BACKENDS, "redis"),
}
_JSON_VALIDATORS = {
    "hedwig.validators.jsonschema.JSONSchemaValidator",
    "hedwig_tasks.validators.jsonschema.JSONSchemaValidator",
}
_PROTOBUF_VALIDATORS = {
    "hedwig.validators.protobuf.ProtobufValidator",
    "hedwig_tasks.validators.protobuf.ProtobufValidator",
}


def _find_source() -> Any:
    module = os.environ.get("SETTINGS_MODULE")
    if module:
        return importlib.import_module(module)
    try:
        from django.conf import settings as django_settings

        if os.environ.get("DJANGO_SETTINGS_MODULE") or django_settings.configured:
            return django_settings
    except ImportError:
        pass
    try:
        from flask import current_app, has_app_context

        if has_app_context():
            return current_app.config
    except ImportError:
        pass
    raise ConfigurationError(
        "hedwig-tasks settings are not configured: call "
        "hedwig_tasks.conf.settings.configure_with_object(...), set SETTINGS_MODULE, "
        "or use Django settings or a Flask app context"
    )


class LazySettings:
    """Hedwig's settings, found and checked on first use. ``settings.HEDWIG_QUEUE`` reads one."""

    def __init__(self) -> None:
        self._source: Any = None
        self._read: HedwigSettings | None = None
        self._lock = threading.Lock()

    def configure_with_object(self, obj: Any) -> None:
        """Use ``obj`` (an object, module or dict) as the settings. Configure once; ``reset()`` to redo."""
        with self._lock:
            if self._source is not None:
                raise ConfigurationError("settings are already configured; call hedwig_tasks.conf.reset() first")
            self._source, self._read = obj, None

    @property
    def configured(self) -> bool:
        return self._source is not None

    def read(self) -> HedwigSettings:
        """The checked settings; :class:`ConfigurationError` naming an unknown or unsupported one."""
        with self._lock:
            if self._read is None:
                source = self._source if self._source is not None else _find_source()
                self._read = HedwigSettings.read(source)
            return self._read

    def clear_cache(self) -> None:
        with self._lock:
            self._read = None

    def reset(self) -> None:
        """Forget the configured source and what was read from it."""
        with self._lock:
            self._source, self._read = None, None

    def __getattr__(self, name: str) -> Any:
        if name in SUPPORTED:
            return self.read()[name]
        raise AttributeError(f"{name} is not a hedwig-tasks setting")


settings = LazySettings()
_default: dict[str, Hedwig] = {}
_default_lock = threading.Lock()


def _flask_extension_app() -> Hedwig | None:
    try:
        from flask import current_app, has_app_context
    except ImportError:
        return None
    if not has_app_context():
        return None
    extension = current_app.extensions.get("hedwig_tasks")
    return getattr(extension, "app", None)


def default_app() -> Hedwig:
    """The app the settings describe, built on first use (in a Flask app with the extension, its app)."""
    app = _flask_extension_app()
    if app is not None:
        return app
    with _default_lock:
        if "app" not in _default:
            _default["app"] = build_app(settings.read())
        return _default["app"]


def use_app(app: Hedwig) -> None:
    """Make ``app`` the default app in every thread (the CLI does, for an app found through Flask).

    Raises :class:`ConfigurationError` when another default app was already built.
    """
    with _default_lock:
        current = _default.setdefault("app", app)
    if current is not app:
        raise ConfigurationError("a default app was already built; call hedwig_tasks.conf.reset() first")


def handler(message_type: str, pattern: Any = "1.*", **options: Any) -> Any:
    """Register the decorated function on the default app; see :meth:`Hedwig.handler`."""
    return default_app().handler(message_type, pattern, **options)


def reset() -> None:
    """Forget the configured settings and the default app (for tests)."""
    with _default_lock:
        app = _default.pop("app", None)
    if app is not None:
        app.close()
    settings.reset()


# -- building the app ------------------------------------------------------------------------------


def _validator(s: HedwigSettings) -> Validator:
    name = s["HEDWIG_DATA_VALIDATOR_CLASS"]
    if name in _JSON_VALIDATORS or (name is None and s["HEDWIG_JSONSCHEMA_FILE"]):
        if not s["HEDWIG_JSONSCHEMA_FILE"]:
            raise ConfigurationError("HEDWIG_JSONSCHEMA_FILE must name the schema file for the JSON-Schema validator")
        from hedwig_tasks.validators.jsonschema import JSONSchemaValidator

        return JSONSchemaValidator(s["HEDWIG_JSONSCHEMA_FILE"])
    if name in _PROTOBUF_VALIDATORS:
        classes = s.module_or_classes("HEDWIG_PROTOBUF_MESSAGES")
        if not classes:
            raise ConfigurationError(
                "HEDWIG_PROTOBUF_MESSAGES must list the message classes for the protobuf validator"
            )
        from hedwig_tasks.validators.protobuf import ProtobufValidator

        return ProtobufValidator(classes)
    cls = import_string(name, "HEDWIG_DATA_VALIDATOR_CLASS")
    if isinstance(cls, type) and issubclass(cls, Validator):
        return cls()
    raise ConfigurationError(f"HEDWIG_DATA_VALIDATOR_CLASS: {name!r} is not supported")


def _backend_family(s: HedwigSettings) -> str | None:
    families = set()
    for setting in ("HEDWIG_CONSUMER_BACKEND", "HEDWIG_PUBLISHER_BACKEND"):
        path = s[setting]
        if path is None:
            continue
        if path not in _FAMILIES:
            raise ConfigurationError(
                f"{setting}: {path!r} is not supported; use one of Hedwig's AWS, Google or Redis Streams "
                "backends or set HEDWIG_TRANSPORT_URL"
            )
        families.add(_FAMILIES[path])
    if len(families) > 1:
        raise ConfigurationError("HEDWIG_CONSUMER_BACKEND and HEDWIG_PUBLISHER_BACKEND name different backends")
    return families.pop() if families else None


def _transport(s: HedwigSettings) -> str | Transport | None:
    url: str | None = s["HEDWIG_TRANSPORT_URL"]
    family = _backend_family(s)
    if url and family:
        raise ConfigurationError("set HEDWIG_TRANSPORT_URL or the HEDWIG_*_BACKEND settings, not both")
    if family is not None:
        return transport_class(family).from_settings(s)
    lease_s = s["HEDWIG_VISIBILITY_TIMEOUT_S"]
    if url is None and lease_s is not None:
        url = f"{DEFAULT_URL}?lease_s={float(lease_s)}"
    return url


def _retry(s: HedwigSettings) -> RetryPolicy:
    attempts = s["HEDWIG_MAX_DELIVERY_ATTEMPTS"]
    if attempts is None:
        return DEFAULT_RETRY_POLICY
    if not isinstance(attempts, int) or attempts < 1:
        raise ConfigurationError(f"HEDWIG_MAX_DELIVERY_ATTEMPTS must be a whole number, 1 or more; got {attempts!r}")
    return RetryPolicy(max_retries=attempts - 1)


def _default_headers(s: HedwigSettings) -> Any:
    hook = s.callable_setting("HEDWIG_DEFAULT_HEADERS")
    return None if hook is None else (lambda message: hook(message=message))


def build_app(s: HedwigSettings) -> Hedwig:
    """The :class:`Hedwig` app Hedwig-style settings describe; :class:`ConfigurationError` names what is wrong."""
    queue, publisher = s["HEDWIG_QUEUE"], s["HEDWIG_PUBLISHER"]
    if not (queue or publisher):
        raise ConfigurationError("HEDWIG_QUEUE (or at least HEDWIG_PUBLISHER) must be set")
    subscriptions = s["HEDWIG_SUBSCRIPTIONS"]
    app = Hedwig(
        publisher or queue,
        schema=_validator(s),
        transport=_transport(s),
        state=s["HEDWIG_STATE_URL"],
        routing=s["HEDWIG_MESSAGE_ROUTING"],
        default_topic=None,
        queue=queue,
        publisher=publisher or "",
        container=not s["HEDWIG_USE_TRANSPORT_MESSAGE_ATTRIBUTES"],
        default_headers=_default_headers(s),
        retry=_retry(s),
        eager=bool(s["HEDWIG_SYNC"]),
        # (topic, project) items name another project's topic; the transport learns the project
        subscriptions=[s if isinstance(s, str) else s[0] for s in subscriptions] if subscriptions else None,
        hooks=Hooks(
            pre_process=s.callable_setting("HEDWIG_PRE_PROCESS_HOOK"),
            post_process=s.callable_setting("HEDWIG_POST_PROCESS_HOOK"),
            heartbeat=s.callable_setting("HEDWIG_HEARTBEAT_HOOK"),
            heartbeat_interval_s=float(s["HEDWIG_HEARTBEAT_INTERVAL_S"]),
        ),
    )
    for key, target in (s["HEDWIG_CALLBACKS"] or {}).items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ConfigurationError(f"HEDWIG_CALLBACKS: key {key!r} must be (message_type, '<major>.*')")
        fn = import_string(target, f"HEDWIG_CALLBACKS[{key!r}]")
        app.handler(key[0], key[1])(fn)
    if not subscriptions:
        app.subscribed_topics()  # a handled type without a route fails now, naming it
    return app
