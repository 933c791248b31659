"""OpenTelemetry tracing: a producer span per publish, a consumer span per handled message.

Trace context travels in the message headers (``traceparent``, plus ``tracestate`` and
``baggage`` when set), injected and extracted with the globally configured propagator, as
Hedwig does, so traces join across hedwig-tasks and authedwig services. Only
``opentelemetry-api`` is needed; without an SDK configured every call is a no-op and no header
is added.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from opentelemetry import baggage, propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from hedwig_tasks._version import __version__
from hedwig_tasks.message import Message
from hedwig_tasks.transports.base import Delivery

__all__ = ["Tracing"]

#: How long a "no SDK configured" answer is kept before asking OpenTelemetry again, in seconds.
NOOP_RECHECK_S = 1.0
#: Attributes that carry trace context; without an SDK only these make a span worth starting.
_CARRIED = frozenset({"traceparent", "tracestate", "baggage"})


def _has_context() -> bool:
    """True if the current context holds a span or baggage that a publish must pass on."""
    return trace.get_current_span().get_span_context().is_valid or bool(baggage.get_all())


class Tracing:
    """Spans for one app. ``enabled=False`` skips all tracing work."""

    def __init__(self, *, enabled: bool = True, tracer_provider: Any = None) -> None:
        self.enabled = enabled
        self._tracer = trace.get_tracer("hedwig_tasks", __version__, tracer_provider=tracer_provider)
        self._own_provider = tracer_provider is not None
        self._noop_until = 0.0  #: monotonic time until which "no SDK" is taken as known

    def _noop(self) -> bool:
        """True while no SDK is configured: spans would record nothing.

        Asking OpenTelemetry costs microseconds (it looks in the environment each time), so a
        "no SDK" answer is kept for ``NOOP_RECHECK_S``: an SDK configured later is used from
        at most that long after. Once there is one it stays (OpenTelemetry sets it once).
        """
        if self._own_provider:
            return False
        now = time.monotonic()
        if now < self._noop_until:
            return True
        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            self._noop_until = now + NOOP_RECHECK_S
            return True
        return False

    @contextlib.contextmanager
    def publishing(self, message: Message, topic: str, system: str) -> Iterator[dict[str, str]]:
        """A PRODUCER span around one publish; yields the trace headers to send with it."""
        headers: dict[str, str] = {}
        if not self.enabled or (self._noop() and not _has_context()):
            yield headers
            return
        attributes = {
            "messaging.system": system,
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
            "messaging.destination.name": topic,
            "messaging.message.id": message.id,
            "hedwig.message.type": message.type,
            "hedwig.message.version": str(message.version),
        }
        with self._tracer.start_as_current_span(f"publish {topic}", kind=SpanKind.PRODUCER, attributes=attributes):
            propagate.inject(headers)
            yield headers

    def spans(self, delivery: Delivery) -> bool:
        """Whether handling ``delivery`` gets a span: tracing is on, and an SDK records it or the
        delivery carries trace context to pass on. The worker asks first, so a message costs no
        span machinery at all when neither holds."""
        if not self.enabled:
            return False
        # not self._noop(), without calling it per message while its "no SDK" answer is kept
        if self._own_provider or (time.monotonic() >= self._noop_until and not self._noop()):
            return True  # an SDK records it
        return not _CARRIED.isdisjoint(delivery.attributes)

    @contextlib.contextmanager
    def processing(self, delivery: Delivery, system: str) -> Iterator[Span | None]:
        """A CONSUMER span around the handling of one delivery, child of the publisher's span."""
        if not self.spans(delivery):
            yield None
            return
        parent = propagate.extract(dict(delivery.attributes))
        attributes = {
            "messaging.system": system,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.subscription.name": delivery.subscription,
            "messaging.message.id": delivery.attributes.get("hedwig_id", delivery.transport_id),
            "messaging.message.delivery_attempt": delivery.attempt,
        }
        name = f"process {delivery.subscription}"
        with self._tracer.start_as_current_span(
            name, context=parent, kind=SpanKind.CONSUMER, attributes=attributes, record_exception=False
        ) as span:
            yield span

    @staticmethod
    def describe(span: Span | None, message: Message) -> None:
        """Name the consumer span after the decoded message."""
        if span is not None and span.is_recording():
            span.set_attributes({"hedwig.message.type": message.type, "hedwig.message.version": str(message.version)})

    @staticmethod
    def outcome(span: Span | None, action: str, error: BaseException | None = None, reason: str = "") -> None:
        """Record how the message ended: ``ack``, ``retry`` or ``dead_letter``, and any error."""
        if span is None or not span.is_recording():
            return
        span.set_attribute("hedwig.outcome", action)
        if error is not None:
            span.record_exception(error)
        if action == "dead_letter" or error is not None:
            span.set_status(Status(StatusCode.ERROR, reason or str(error)))
