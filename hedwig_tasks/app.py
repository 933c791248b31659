"""The :class:`Hedwig` app: one service's schema, handlers, routes and transport."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import threading
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hedwig_tasks import signals
from hedwig_tasks._publish_timing import EXPIRES_AT_ATTRIBUTE, timing
from hedwig_tasks.exceptions import ConfigurationError, HandlerNotFound, PublishError, RoutingError
from hedwig_tasks.handler import DEFAULT_IDEMPOTENCY_TTL_S, Handler
from hedwig_tasks.instrumentation import Tracing
from hedwig_tasks.message import Message, Version, VersionLike
from hedwig_tasks.periodic import Schedule
from hedwig_tasks.registry import Registry, parse_majors
from hedwig_tasks.retry import DEFAULT_RETRY_POLICY, RetryPolicy
from hedwig_tasks.routing import DEFAULT_TOPIC, Route, Router
from hedwig_tasks.state.base import StateStore
from hedwig_tasks.transports import DEFAULT_URL, from_url
from hedwig_tasks.transports.base import Delivery, Transport
from hedwig_tasks.validators.base import Validator, from_transport, to_transport

__all__ = ["Hedwig", "Hooks"]

logger = logging.getLogger(__name__)

#: The environment variable read (at first use, never at import) when no transport is given.
TRANSPORT_ENV = "HEDWIG_TRANSPORT_URL"
#: The environment variable read (at first use) when no state store is given.
STATE_ENV = "HEDWIG_STATE_URL"

DefaultHeaders = Callable[[Message], Mapping[str, str]] | Mapping[str, str] | None

#: The one interception point for tests, set by :mod:`hedwig_tasks.testing` while a test records
#: or runs publishes eagerly: called as ``(app, message, topic, body, attributes)`` with each
#: encoded message before it is sent; an id back means the message stayed in the process (the
#: transport is not called), None lets the publish go on as usual.
publish_interceptor: Callable[[Hedwig, Message, str, bytes, dict[str, str]], str | None] | None = None


def _validator_for(schema: Any, *, strict_minor: bool) -> Validator:
    if isinstance(schema, Validator):
        if strict_minor and not schema.strict_minor:
            raise ConfigurationError("strict_minor: build the validator given as schema with strict_minor=True")
        return schema
    if isinstance(schema, (str, Path, Mapping)):
        from hedwig_tasks.validators.jsonschema import JSONSchemaValidator

        return JSONSchemaValidator(schema, strict_minor=strict_minor)
    if isinstance(schema, types.ModuleType) or isinstance(schema, Iterable):
        from hedwig_tasks.validators.protobuf import ProtobufValidator, messages_of

        classes = messages_of(schema) if isinstance(schema, types.ModuleType) else schema
        return ProtobufValidator(classes, strict_minor=strict_minor)
    raise ConfigurationError(
        f"schema: expected a JSON-Schema file path, a protobuf module or a Validator, got {schema!r}"
    )


@dataclasses.dataclass(frozen=True)
class Hooks:
    """Hedwig's process hooks, for services migrating from it. Each is optional.

    * ``pre_process(delivery=...)`` runs before a message is decoded; if it raises, the
      message is retried later instead of handled.
    * ``post_process(delivery=..., message=...)`` runs after a handler succeeded, before the
      acknowledgement; if it raises, the error is logged and the message still acknowledged
      (the handler is never run twice for it).
    * ``heartbeat(error_count=...)`` runs from the receive loop at most every
      ``heartbeat_interval_s``; what it raises is logged.
    """

    pre_process: Callable[..., Any] | None = None
    post_process: Callable[..., Any] | None = None
    heartbeat: Callable[..., Any] | None = None
    heartbeat_interval_s: float = 15.0


class Hedwig:
    """One service on the bus.

    ``name`` is the service: the publisher id on every message and, unless ``queue`` says
    otherwise, the stem of its queue or subscriptions. ``schema`` is a Hedwig JSON-Schema file,
    a protobuf module (or list of message classes), or a ready :class:`Validator`.
    ``transport`` is a URL or a :class:`Transport`; by default ``$HEDWIG_TRANSPORT_URL`` at
    first use, else the embedded bus ``sqlite:///.hedwig/bus.db``. ``container`` publishes
    Hedwig's container form instead of transport attributes. ``subscriptions`` names the
    topics to consume when they are not simply those of the handlers. ``strict_minor``
    dead-letters a received message whose minor version is newer than the schema knows
    (by default it is accepted and validated against its major's schema, as Hedwig does).
    ``state`` is the state store of periodic tasks (a URL or a :class:`StateStore`); by default
    ``$HEDWIG_STATE_URL`` at first use, else an SQLite file beside the SQLite bus.
    ``expired`` says what a worker does with a message received after its expiry
    (``publish(..., expires_s=)``): ``"ignore"`` acknowledges it, ``"dead-letter"`` dead-letters
    it; either way its handler does not run. Nothing connects until used.
    """

    def __init__(
        self,
        name: str,
        *,
        schema: Any,
        transport: str | Transport | None = None,
        routing: Mapping[Any, Any] | None = None,
        default_topic: str | None = DEFAULT_TOPIC,
        queue: str | None = None,
        publisher: str | None = None,
        container: bool = False,
        default_headers: DefaultHeaders = None,
        retry: RetryPolicy = DEFAULT_RETRY_POLICY,
        eager: bool = False,
        subscriptions: Sequence[str] | None = None,
        hooks: Hooks | None = None,
        tracing: bool = True,
        strict_minor: bool = False,
        state: str | StateStore | None = None,
        expired: str = "ignore",
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"name: expected the service's name, got {name!r}")
        self.name = name
        self.queue = queue or name
        self.publisher = name if publisher is None else publisher
        self.validator = _validator_for(schema, strict_minor=strict_minor)
        self.router = Router(routing, default=default_topic)
        self.registry = Registry()
        self.container = container
        self.default_headers = default_headers
        self.retry = retry
        self.eager = eager
        self.subscriptions = list(subscriptions) if subscriptions is not None else None
        self.hooks = hooks or Hooks()
        self.tracing = Tracing(enabled=tracing)
        if expired not in ("ignore", "dead-letter"):
            raise ConfigurationError(f"expired={expired!r}: expected 'ignore' or 'dead-letter'")
        #: What a worker does with a message received after its expiry: "ignore" (acknowledge) or "dead-letter".
        self.expired = expired
        self._transport_spec = transport
        self._transport: Transport | None = transport if isinstance(transport, Transport) else None
        self._lock = threading.Lock()
        self._state_spec = state
        self._state: StateStore | None = state if isinstance(state, StateStore) else None
        self.schedules: dict[str, Schedule] = {}
        self._check_routes()

    def _check_routes(self) -> None:
        known = {t for t, _ in self.validator.known_types()}
        for message_type, major in self.router.explicit_keys():
            if message_type not in known:
                raise ConfigurationError(f"routing names {message_type!r}, which the schema does not define")
            if major is not None and (message_type, major) not in set(self.validator.known_types()):
                raise ConfigurationError(f"routing names {message_type!r} major {major}, which the schema lacks")

    # -- transport ----------------------------------------------------------------------------

    @property
    def transport(self) -> Transport:
        """The transport, built from its URL on first use."""
        if self._transport is None:
            with self._lock:
                if self._transport is None:
                    spec = self._transport_spec or os.environ.get(TRANSPORT_ENV) or DEFAULT_URL
                    self._transport = from_url(str(spec))
        return self._transport

    def close(self) -> None:
        """Close the transport, if it was ever used (flushing what it buffered).

        A transport built from a URL is built again on next use; one passed in is closed.
        """
        with self._lock:
            transport = self._transport
            if not isinstance(self._transport_spec, Transport):
                self._transport = None
        if transport is not None:
            transport.close()
        self._close_state()

    # -- state --------------------------------------------------------------------------------

    @property
    def state(self) -> StateStore:
        """The state store (leases, cursors of periodic tasks), built from its URL on first use."""
        if self._state is None:
            from hedwig_tasks.state import default_url
            from hedwig_tasks.state import from_url as state_from_url

            with self._lock:
                if self._state is None:
                    transport_url = None if isinstance(self._transport_spec, Transport) else self._transport_spec
                    spec = self._state_spec or os.environ.get(STATE_ENV)
                    self._state = state_from_url(
                        str(spec or default_url(transport_url or os.environ.get(TRANSPORT_ENV)))
                    )
        return self._state

    @property
    def state_configured(self) -> bool:
        """Whether a state store was chosen (``state=`` or ``$HEDWIG_STATE_URL``), not defaulted."""
        return self._state_spec is not None or bool(os.environ.get(STATE_ENV))

    def _close_state(self) -> None:
        with self._lock:
            state = self._state
            if not isinstance(self._state_spec, StateStore):
                self._state = None
        if state is not None:
            state.close()

    def subscribed_topics(self) -> list[str]:
        """The topics this app consumes: ``subscriptions`` if given, else its handlers' topics.

        Raises :class:`ConfigurationError` naming a handled type that has no route.
        """
        if self.subscriptions is not None:
            return list(self.subscriptions)
        topics = []
        for message_type, major in self.registry.keys():
            try:
                topics.append(self.router.topic_for(message_type, major))
            except RoutingError as exc:
                raise ConfigurationError(f"cannot subscribe to what the handlers take: {exc}") from None
        return list(dict.fromkeys(topics))

    def published_topics(self) -> list[str]:
        """Every topic a message of the schema may be published to (unrouted and cross-owner left out)."""
        topics = []
        for message_type, major in self.validator.known_types():
            try:
                route = self.router.route(message_type, major)
            except RoutingError:
                continue
            if route.owner is None:
                topics.append(route.topic)
        return list(dict.fromkeys(topics))

    def provision(self, *, dry_run: bool = False, topics: Sequence[str] | None = None) -> list[str]:
        """Create the topics this app publishes to and its subscriptions; idempotent.

        Publishing never provisions: on every transport a publish to a topic that does not
        exist raises ``PublishError``, so run this (or ``hedwig-tasks provision``) first. An app
        that consumes nothing (no handlers, no ``subscriptions``) gets only its topics: no queue
        and no dead-letter queue.
        """
        subscribe = list(topics) if topics is not None else self.subscribed_topics()
        queue = self.queue if subscribe else None
        return self.transport.provision(queue, subscribe, self.published_topics(), dry_run=dry_run)

    # -- handlers -----------------------------------------------------------------------------

    def handler(
        self,
        message_type: str,
        pattern: Any = "1.*",
        *,
        retry: RetryPolicy | None = None,
        name: str | None = None,
        time_limit_s: float | None = None,
        rate_limit: str | None = None,
        rate_scope: str = "process",
        idempotent: bool = False,
        idempotency_key: Callable[[Message], str] | None = None,
        idempotency_ttl_s: float = DEFAULT_IDEMPOTENCY_TTL_S,
    ) -> Callable[[Callable[..., Any]], Handler]:
        """Register the decorated function for ``message_type`` at the majors ``pattern`` names.

        ``time_limit_s`` bounds one run (default: the worker's ``--time-limit``); ``rate_limit``
        (``"100/s"``, ``"30/m"``, ``"500/h"``) bounds its starts per worker process, or across
        every worker with ``rate_scope="fleet"``. ``idempotent=True`` (or an
        ``idempotency_key(message) -> str``) runs it once per message id (or key) while its
        success is remembered, ``idempotency_ttl_s`` (see docs/state.md). Raises
        :class:`ConfigurationError` at declaration for an unknown type or major, a duplicate
        registration, a function that cannot take a message, or a bad limit (naming the option).
        """
        if callable(message_type):
            raise self._bare_handler(message_type)
        majors = parse_majors(pattern)
        for major in majors:
            try:
                self.validator.latest_version(message_type, major)
            except Exception as exc:
                raise ConfigurationError(f"handler for {message_type!r} {major}.*: {exc}") from None

        def register(fn: Callable[..., Any]) -> Handler:
            handler = Handler(
                self,
                fn,
                message_type,
                majors,
                retry=retry,
                name=name,
                time_limit_s=time_limit_s,
                rate_limit=rate_limit,
                rate_scope=rate_scope,
                idempotent=idempotent,
                idempotency_key=idempotency_key,
                idempotency_ttl_s=idempotency_ttl_s,
            )
            self.registry.add(handler)
            return handler

        return register

    def _bare_handler(self, fn: Callable[..., Any]) -> ConfigurationError:
        """The error for ``@app.handler`` written without its arguments, saying how to write it."""
        name = getattr(fn, "__name__", "handler")
        types = sorted({t for t, _ in self.validator.known_types()})
        example = types[0] if types else "send_email"
        return ConfigurationError(
            f"@handler used without arguments on {name}(): name the message type and the majors it "
            f'takes, as in @app.handler("{example}", "1.*") (app being your Hedwig app); '
            f"the schema defines {', '.join(map(repr, types)) or 'no types'}"
        )

    def handler_for(self, message: Message) -> Handler:
        """The handler for a message; :class:`HandlerNotFound` if none takes it."""
        return self.registry.lookup(message.type, message.version.major)

    # -- periodic tasks -----------------------------------------------------------------------

    def periodic(
        self,
        message_type: str,
        version: VersionLike,
        *,
        cron: str | None = None,
        every: dt.timedelta | float | None = None,
        data: Mapping[str, Any] | None = None,
        tz: str | dt.tzinfo | None = None,
        catch_up: bool = False,
        name: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Callable[[Any], Any]:
        """Publish ``message_type`` ``version`` with ``data`` on a schedule (``hedwig-tasks beat``).

        Decorates a function (registered as the handler of that type's major, as
        ``@app.handler`` would) or a :class:`Handler` (left as it is). See :meth:`add_periodic`.
        """
        schedule = self.add_periodic(
            message_type,
            version,
            cron=cron,
            every=every,
            data=data,
            tz=tz,
            catch_up=catch_up,
            name=name,
            headers=headers,
        )

        def register(target: Any) -> Any:
            if isinstance(target, Handler):
                return target
            return self.handler(message_type, f"{Version.parse(schedule.version).major}.*")(target)

        return register

    def add_periodic(self, message_type: str, version: VersionLike, **options: Any) -> Schedule:
        """Register a schedule (without a handler here: another service may consume it).

        Options as :meth:`Schedule.build <hedwig_tasks.periodic.Schedule.build>`: ``cron`` or
        ``every``, ``data``, ``tz``, ``catch_up``, ``name`` (default the message type; unique per
        app, it names the schedule's state) and ``headers``. Raises :class:`ConfigurationError`
        for a bad schedule, a duplicate name, or data the schema refuses (``ValidationError``).
        """
        schedule = Schedule.build(message_type, str(Version.parse(version)), **options)
        if schedule.name in self.schedules:
            raise ConfigurationError(f"a periodic schedule named {schedule.name!r} exists: give this one name=...")
        message = self.message(message_type, schedule.version, dict(schedule.data), schedule.headers)
        self.validator.encode(message, container=self.container)  # the schema's verdict now, not at the first tick
        self.schedules[schedule.name] = schedule
        return schedule

    # -- publishing ---------------------------------------------------------------------------

    def message(
        self, message_type: str, version: VersionLike, data: Any, headers: Mapping[str, str] | None = None
    ) -> Message:
        """A new message from this app."""
        return Message.new(message_type, version, data, headers, publisher=self.publisher)

    def _complete(self, message: Message) -> Message:
        """Fill in what the app adds at publish: its publisher name and default headers."""
        if not message.publisher and self.publisher:
            message = message.with_metadata(publisher=self.publisher)
        if self.default_headers:
            defaults = self.default_headers(message) if callable(self.default_headers) else self.default_headers
            message = message.with_metadata(headers={**defaults, **message.headers})
        return message

    def publish(
        self,
        message_type: str,
        version: VersionLike,
        data: Any,
        headers: Mapping[str, str] | None = None,
        *,
        delay_s: float | None = None,
        eta: dt.datetime | float | None = None,
        expires_s: float | None = None,
        expires_at: dt.datetime | float | None = None,
    ) -> Message:
        """Validate, encode, route and send one message; returns it (``.id`` is the Hedwig id).

        Timing options, keyword-only: ``delay_s`` (seconds) or ``eta`` (an aware datetime or
        epoch seconds) holds the message with the broker until then; ``expires_s`` or
        ``expires_at`` makes a worker that receives it later skip it (see ``Hedwig(expired=...)``).
        Raises ``ValidationError`` (naming the field), ``RoutingError``, ``PublishError``, or
        ``ConfigurationError`` for a bad timing option or a transport that cannot delay.
        """
        message = self.message(message_type, version, data, headers)
        return self.publish_message(message, delay_s=delay_s, eta=eta, expires_s=expires_s, expires_at=expires_at)

    def publish_message(
        self,
        message: Message,
        *,
        delay_s: float | None = None,
        eta: dt.datetime | float | None = None,
        expires_s: float | None = None,
        expires_at: dt.datetime | float | None = None,
    ) -> Message:
        """Send a ready :class:`Message` (from :meth:`message` or ``Message.new``); returns it as sent.

        Timing options as :meth:`publish`.
        """
        when = timing(delay_s=delay_s, eta=eta, expires_s=expires_s, expires_at=expires_at)
        message = self._complete(message)
        route = self.router.route(message.type, message.major_version)
        with self.tracing.publishing(message, route.topic, self.transport.messaging_system) as trace_headers:
            if trace_headers:
                message = message.with_headers(trace_headers)
            # eager runs take the strictest path (text only), so encoding errors surface in tests
            body, attributes = self.encode(message, text_only=True if self.eager else None)
            if when.expires_at_ms is not None:
                attributes[EXPIRES_AT_ATTRIBUTE] = str(when.expires_at_ms)
            signals.send(signals.before_publish, self, message=message, topic=route.topic)
            transport_id = self._send(message, body, attributes, route, when.delay_s)
        signals.send(signals.after_publish, self, message=message, topic=route.topic, transport_id=transport_id)
        return message

    def _send(self, message: Message, body: bytes, attributes: dict[str, str], route: Route, delay_s: float) -> str:
        if publish_interceptor is not None:
            intercepted = publish_interceptor(self, message, route.topic, body, attributes)
            if intercepted is not None:
                return intercepted
        if self.eager:  # run at once, as Celery's eager mode does, whatever the delay
            self._run_eagerly(Delivery(body, attributes, attempt=1, receipt=None, subscription="eager"))
            return "eager"
        transport = self.transport
        limit = transport.capabilities.max_attributes
        if limit is not None and len(attributes) > limit:
            raise PublishError(
                f"publish {message.type} {message.version} id={message.id} to {route.topic!r}: "
                f"{len(attributes)} attributes, and {type(transport).__name__} carries at most {limit}; "
                "send fewer headers or publish the container form (container=True)"
            )
        if delay_s > 0:
            if not transport.capabilities.delayed_publish:
                raise ConfigurationError(f"the {transport.scheme} transport does not support delayed publish yet")
            transport_id = transport.publish(route.topic, body, attributes, owner=route.owner, delay_s=delay_s)
        else:
            transport_id = transport.publish(route.topic, body, attributes, owner=route.owner)
        logger.debug("published %s %s id=%s to %s", message.type, message.version, message.id, route.topic)
        return transport_id

    def _run_eagerly(self, delivery: Delivery) -> None:
        # The same round trip a worker sees, so schema and encoding errors surface in tests.
        message = self.decode(delivery)
        try:
            handler = self.handler_for(message)
        except HandlerNotFound:
            logger.debug("eager: no local handler for %s %s id=%s", message.type, message.version, message.id)
            return
        handler.run(message)

    # -- the wire -----------------------------------------------------------------------------

    def encode(self, message: Message, *, text_only: bool | None = None) -> tuple[bytes, dict[str, str]]:
        """The body and attributes that carry ``message`` on the wire, in this app's form.

        ``text_only`` (by default the transport's) base64-encodes a binary body, as Hedwig does
        on SQS. Raises ``ValidationError`` naming the field, or a minor the schema does not know.
        """
        if text_only is None:
            text_only = self.transport.capabilities.text_only
        encoded = self.validator.encode(message, container=self.container)
        return to_transport(encoded, text_only=text_only)

    def decode(self, delivery: Delivery) -> Message:
        """The validated message a delivery carries, with the delivery attached.

        Raises ``DecodeError`` saying what is wrong (the worker dead-letters it with that reason).
        """
        attributes = delivery.attributes
        return self.validator.decode_delivery(from_transport(delivery.body, attributes), attributes, delivery)

    def __repr__(self) -> str:
        return f"<Hedwig {self.name!r} queue={self.queue!r} handlers={len(self.registry)}>"
