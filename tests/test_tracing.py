"""OpenTelemetry: one trace across publisher and consumer, ours and authedwig's, both ways."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import SCHEMA_FILE, authedwig_settings
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once

from hedwig_tasks import Hedwig, Message, RetryPolicy
from hedwig_tasks.transports.memory import MemoryTransport
from hedwig_tasks.worker import Worker, WorkerOptions

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def sdk() -> Iterator[None]:
    """An SDK provider for this module's tests, removed after them so other tests see none.

    OpenTelemetry lets the global provider be set once per process; its own test helpers reset
    the same private globals this does.
    """
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trace.set_tracer_provider(provider)
    yield
    trace._TRACER_PROVIDER = None
    trace._TRACER_PROVIDER_SET_ONCE = Once()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def one(spans: InMemorySpanExporter, kind: SpanKind) -> ReadableSpan:
    [span] = [s for s in spans.get_finished_spans() if s.kind == kind]
    return span


def consume(bus: MemoryTransport, handler: Any = None) -> Hedwig:
    consumer = Hedwig("consumer", schema=SCHEMA_FILE, transport=bus)
    consumer.handler("user-created", "1.*")(handler or (lambda message: None))
    consumer.provision()
    return consumer


def test_publish_and_handle_in_two_apps_form_one_trace(spans: InMemorySpanExporter) -> None:
    bus = MemoryTransport()
    consumer = consume(bus)
    publisher = Hedwig("publisher", schema=SCHEMA_FILE, transport=bus)
    sent = publisher.publish("user-created", "1.0", {"user_id": "U"})
    assert sent.headers["traceparent"].startswith("00-")
    Worker(consumer, WorkerOptions(burst=True, wait_s=0.05)).run()
    producer, processor = one(spans, SpanKind.PRODUCER), one(spans, SpanKind.CONSUMER)
    assert processor.parent is not None and processor.parent.span_id == producer.context.span_id
    assert processor.context.trace_id == producer.context.trace_id
    assert producer.name == "publish user-created-v1"
    assert producer.attributes is not None and producer.attributes["messaging.message.id"] == sent.id
    assert processor.attributes is not None
    assert processor.attributes["messaging.destination.subscription.name"] == "consumer:user-created-v1"
    assert processor.attributes["hedwig.outcome"] == "ack"


def test_failed_handling_marks_the_span(spans: InMemorySpanExporter) -> None:
    bus = MemoryTransport()

    def broken(message: Message) -> None:
        raise RuntimeError("boom")

    consumer = consume(bus, broken)
    consumer.retry = RetryPolicy(max_retries=0)
    Hedwig("publisher", schema=SCHEMA_FILE, transport=bus).publish("user-created", "1.0", {"user_id": "U"})
    Worker(consumer, WorkerOptions(burst=True, wait_s=0.05)).run()
    processor = one(spans, SpanKind.CONSUMER)
    assert processor.status.status_code == StatusCode.ERROR
    assert processor.attributes is not None and processor.attributes["hedwig.outcome"] == "dead_letter"
    assert [e.name for e in processor.events] == ["exception"]


def test_authedwig_publisher_then_our_consumer(spans: InMemorySpanExporter) -> None:
    bus = MemoryTransport()
    consumer = consume(bus)
    with authedwig_settings():
        from distutils.version import StrictVersion

        import hedwig.instrumentation
        from hedwig.models import Message as HedwigMessage

        headers: dict[str, str] = {}
        theirs = HedwigMessage.new("user-created", StrictVersion("1.0"), {"user_id": "U"})
        with hedwig.instrumentation.on_publish(theirs, headers) as their_span:
            payload, attributes = theirs.with_headers(headers).serialize()
            their_span_id = their_span.get_span_context().span_id
    bus.publish("user-created-v1", payload.encode(), {**attributes, "hedwig_encoding": "utf8"})
    Worker(consumer, WorkerOptions(burst=True, wait_s=0.05)).run()
    processor = one(spans, SpanKind.CONSUMER)
    assert processor.parent is not None and processor.parent.span_id == their_span_id


def test_our_publisher_then_authedwig_consumer(spans: InMemorySpanExporter) -> None:
    bus = MemoryTransport()
    consume(bus)
    publisher = Hedwig("publisher", schema=SCHEMA_FILE, transport=bus)
    publisher.publish("user-created", "1.0", {"user_id": "U"})
    [delivery] = bus.consumer("consumer", ["user-created-v1"]).receive(1, 0.1)
    producer = one(spans, SpanKind.PRODUCER)
    with authedwig_settings():
        import hedwig.instrumentation

        with hedwig.instrumentation.on_receive(dict(delivery.attributes)) as their_span:
            assert their_span.parent is not None
            assert their_span.parent.span_id == producer.context.span_id


def test_tracing_off_adds_no_headers(spans: InMemorySpanExporter) -> None:
    bus = MemoryTransport()
    consume(bus)
    quiet = Hedwig("publisher", schema=SCHEMA_FILE, transport=bus, tracing=False)
    assert "traceparent" not in quiet.publish("user-created", "1.0", {"user_id": "U"}).headers
    assert spans.get_finished_spans() == ()
