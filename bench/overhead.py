"""Per-message cost of tracing and metrics, on the in-process transport.

Each variant publishes N small messages and handles them with a burst worker, all in one
process, so what differs between the variants is only the observability work (measured in CPU
time):

* ``off``: ``Hedwig(..., tracing=False)``, no metrics;
* ``api``: tracing on with only opentelemetry-api (no SDK configured: the usual default);
* ``sdk``: tracing on with the SDK recording every span to an in-memory exporter;
* ``metrics``: tracing off, Prometheus metrics collecting from the signals.

Usage: python bench/overhead.py [--n 3000] [--rounds 5]
Rounds rotate which variant goes first; each variant's figure is its best round.
The last line on stdout is one JSON object with microseconds per message and each variant's
``ratio`` to ``off``, and ``tracing_calls_us_per_message``: the tracing work of one message
(its producer and consumer span calls) timed alone, since the end-to-end figures move from run
to run by more than tracing adds.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from hedwig_tasks import Hedwig
from hedwig_tasks.instrumentation import Tracing
from hedwig_tasks.metrics import Metrics
from hedwig_tasks.transports.base import Delivery
from hedwig_tasks.transports.memory import MemoryTransport
from hedwig_tasks.worker import Worker, WorkerOptions

SCHEMA = Path(__file__).resolve().parent.parent / "tests" / "schemas" / "schema.json"


def run_once(n: int, *, tracing: bool, metrics: bool) -> float:
    """CPU seconds (every thread of this process) to publish and handle ``n`` messages.

    CPU time, not wall time: a worker's threads wait on each other, and how long the scheduler
    makes them wait is noise that would drown a few microseconds per message.
    """
    bus = MemoryTransport()
    app = Hedwig("bench", schema=SCHEMA, transport=bus, tracing=tracing)
    app.handler("user-created", "1.*")(lambda message: None)
    app.provision()
    collector = Metrics(app) if metrics else None
    started = time.process_time()
    for number in range(n):
        app.publish("user-created", "1.0", {"user_id": f"U{number}"}, headers={"request_id": "r"})
    Worker(app, WorkerOptions(burst=True, wait_s=0.01, concurrency=1, prefetch=100)).run()
    elapsed = time.process_time() - started
    if collector is not None:
        assert collector.value("hedwig_handled_total", "user-created", 1) == n
        collector.close()
    return elapsed


def tracing_calls_us(tracing: Tracing, n: int) -> float:
    """Microseconds for the tracing work of one message alone: its publish and its handling span.

    The end-to-end figures above move by more than this from run to run (thread scheduling);
    this isolates what tracing itself adds.
    """
    app = Hedwig("bench", schema=SCHEMA, transport=MemoryTransport(), tracing=False)
    message = app.message("user-created", "1.0", {"user_id": "U1"}, {"request_id": "r"})
    delivery = Delivery(b"{}", {"hedwig_id": message.id, "request_id": "r"}, 1, None, "bench:user-created-v1")
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            with tracing.publishing(message, "user-created-v1", "memory"):
                pass
            with tracing.processing(delivery, "memory"):
                pass
        best = min(best, time.perf_counter() - started)
    return best / n * 1e6


def install_sdk() -> Any:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trace.set_tracer_provider(provider)
    return exporter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    variants = {"off": {"tracing": False, "metrics": False}, "api": {"tracing": True, "metrics": False}}
    variants["metrics"] = {"tracing": False, "metrics": True}
    best: dict[str, float] = {}
    run_once(200, tracing=False, metrics=False)  # warm up imports and caches
    calls = {"off": tracing_calls_us(Tracing(enabled=False), 20000), "api": tracing_calls_us(Tracing(), 20000)}
    names = list(variants)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:  # each goes first in turn
            gc.collect()  # no variant pays for the garbage of the one before
            best[name] = min(best.get(name, float("inf")), run_once(args.n, **variants[name]))
    exporter = install_sdk()  # the SDK stays installed once set, so it runs last
    for _ in range(args.rounds):
        exporter.clear()
        gc.collect()
        best["sdk"] = min(best.get("sdk", float("inf")), run_once(args.n, tracing=True, metrics=False))
    assert len(exporter.get_finished_spans()) == 2 * args.n
    calls["sdk"] = tracing_calls_us(Tracing(), 2000)
    per_message_us = {name: seconds / args.n * 1e6 for name, seconds in best.items()}
    for name, us in per_message_us.items():
        print(f"{name:8} {us:8.1f} us/message", file=sys.stderr)
    for name, us in calls.items():
        print(f"tracing calls alone, {name:8} {us:8.2f} us/message", file=sys.stderr)
    result = {
        "bench": "overhead",
        "n": args.n,
        "us_per_message": {name: round(us, 1) for name, us in per_message_us.items()},
        "ratio": {name: round(us / per_message_us["off"], 3) for name, us in per_message_us.items() if name != "off"},
        "tracing_calls_us_per_message": {name: round(us, 2) for name, us in calls.items()},
        "tracing_calls_added_us": {name: round(us - calls["off"], 2) for name, us in calls.items() if name != "off"},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
